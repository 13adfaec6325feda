"""
How the code reads, measured: the indicators a review compares with nanoGPT and nanochat, over the
method files (every tracked .py file outside tests/ and tools/), and the usage lines of every
docstring.

    python -m tools.page            # the table
    python -m tools.page --files lvr.py,data.py

- paragraphs: blank lines inside function bodies, per 100 body lines (nanoGPT 6.4, nanochat 7.7);
- long lines: the share of lines over 100 characters (nanoGPT 4.1%, nanochat 7.9%);
- positional calls: calls of the project's own functions and records with 4 or more positional
  arguments;
- globals() writes: `globals()[k] = v` or `globals().update(...)`, settings rewritten after they are
  read;
- stale usage lines: a `python script.py --flag` line in a module docstring naming a flag the script
  lacks;
- unexplained long functions: over 70 lines or 8 parameters with no `# long: why` on the line
  above the def (or above its decorators).
"""
import ast
import os
import re
import subprocess

import cli

# -----------------------------------------------------------------------------
files = ""  # comma-separated: the files to measure ("": the method files)
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
USAGE = re.compile(r"^\s*(?:torchrun [^.]*?|python -m |python )([\w./]+?)(?:\.py)?\s(.*)$")


def method_files():
    """Every tracked .py file outside tests/ and tools/."""
    out = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    return [f for f in out.split() if not f.startswith(("tests/", "tools/"))]


def outer_functions(tree):
    """The functions not inside another function (methods included): their nested ones are their
    body."""
    found = []

    def visit(node, inside):
        for child in ast.iter_child_nodes(node):
            is_fn = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_fn and not inside:
                found.append(child)
            visit(child, inside or is_fn)

    visit(tree, False)
    return found


def paragraphs(tree, lines):
    """(blank lines, body lines) inside the outer functions' bodies, their docstrings left out."""
    blank = body = 0
    for fn in outer_functions(tree):
        first = fn.body[0]
        docstring = isinstance(first, ast.Expr) and isinstance(
            getattr(first, "value", None), ast.Constant
        )
        start = (
            (fn.body[1].lineno if len(fn.body) > 1 else fn.end_lineno + 1)
            if docstring
            else first.lineno
        )
        span = lines[start - 1:fn.end_lineno]
        blank += sum(not line.strip() for line in span)
        body += len(span)

    return blank, body


def project_names(paths):
    """The names of the project's functions and classes, and its module names."""
    names, modules = set(), {os.path.splitext(os.path.basename(p))[0] for p in paths}
    for p in paths:
        tree = ast.parse(open(os.path.join(ROOT, p)).read())
        names |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}

    return names, modules


def positional_calls(tree, names, modules):
    """Calls of a project function or record (`f(...)`, `module.f(...)`) with 4+ positional
    arguments."""
    hits = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        own = (isinstance(f, ast.Name) and f.id in names) or (
            isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in modules
        )
        if own and len([a for a in node.args if not isinstance(a, ast.Starred)]) >= 4:
            hits.append(node.lineno)

    return hits


def globals_writes(tree):
    """Lines that write a module's globals: globals().update(...) or globals()[k] = v."""
    def is_globals(n):
        return isinstance(n, ast.Call) and getattr(n.func, "id", "") == "globals"

    hits = []
    for node in ast.walk(tree):
        update = isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        if update and node.func.attr == "update" and is_globals(node.func.value):
            hits.append(node.lineno)
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Subscript) and is_globals(t.value) for t in targets):
            hits.append(node.lineno)

    return hits


def unexplained_long(tree, lines, most_lines=70, most_params=8):
    """Lines of the functions over most_lines lines or most_params parameters (self left out) with
    no `# long:` reason just above their def or decorators."""
    hits = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        a = fn.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, [a.vararg, a.kwarg])]
        n_params = len(params) - (bool(a.args) and a.args[0].arg in ("self", "cls"))
        first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
        above = lines[first - 2:fn.lineno - 1] if first >= 2 else []
        noted = any(line.strip().startswith("# long:") for line in above)
        if (fn.end_lineno - fn.lineno + 1 > most_lines or n_params > most_params) and not noted:
            hits.append(fn.lineno)

    return hits


def stale_usage(paths):
    """(file, flag) for every `--flag` of a docstring's usage line that its script does not
    declare."""
    stale = []
    for p in sorted(
        set(paths)
        | {
            f
            for f in os.listdir(os.path.join(ROOT, "tools"))
            if f.endswith(".py")
            for f in [os.path.join("tools", f)]
        }
    ):
        doc = ast.get_docstring(ast.parse(open(os.path.join(ROOT, p)).read())) or ""
        for line in doc.splitlines():
            m = USAGE.match(line)
            if not m:
                continue
            script = (
                m.group(1).replace(".", "/")
                if "/" not in m.group(1) and m.group(1).startswith("tools.")
                else m.group(1)
            )
            path = os.path.join(ROOT, script + ".py")
            if not os.path.isfile(path):
                continue
            tree = ast.parse(open(path).read())  # (a script's settings: its module-level names)
            declared = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets
                        if isinstance(t, ast.Name)}
            for flag in re.findall(r"--(\w+)", m.group(2).split("#")[0]):
                # (torchrun's)
                if flag not in declared and flag not in ("nproc_per_node", "standalone"):
                    stale.append((p, flag))

    return stale


def measure(paths):
    """-> {indicator: value} over `paths`, and the places behind the counts."""
    names, modules = project_names(method_files())
    blank = body = long = total = 0
    calls, writes, unexplained = [], [], []
    for p in paths:
        text = open(os.path.join(ROOT, p)).read()
        lines, tree = text.splitlines(), ast.parse(text)
        b, n = paragraphs(tree, lines)
        blank, body = blank + b, body + n
        long += sum(len(line) > 100 for line in lines)
        total += len(lines)
        calls += [f"{p}:{n}" for n in positional_calls(tree, names, modules)]
        writes += [f"{p}:{n}" for n in globals_writes(tree)]
        unexplained += [f"{p}:{n}" for n in unexplained_long(tree, lines)]

    stale = [f"{p}: --{flag}" for p, flag in stale_usage(paths)]
    return {"blank lines per 100 body lines": 100 * blank / max(1, body),
            "lines over 100 characters (%)": 100 * long / max(1, total),
            "calls with 4+ positional arguments": len(calls), "globals() writes": len(writes),
            "stale usage lines": len(stale),
            "unexplained long functions": len(unexplained)}, calls + writes + stale + unexplained


def main(argv):
    cli.configure(globals(), argv)
    values, places = measure(files.split(",") if files else method_files())
    for name, v in values.items():
        print(f"{name:40}{v:8.1f}" if isinstance(v, float) else f"{name:40}{v:8d}")
    if places:
        print("where: " + ", ".join(places))


if __name__ == "__main__":
    cli.run(main)
