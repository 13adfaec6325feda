"""The page: every usage line in a docstring names real flags, a flag the scripts share has one range,
and the indicators tools/page.py prints hold (nanoGPT's and nanochat's range)."""
import collections

import cli
from tools import page

SCRIPTS = ["train_sft.py", "train_grpo.py", "evaluate.py", "sample.py"]
# the same name, another meaning: GRPO's loss divides by its temperature (> 0), sample.py runs fp16
# too; evaluate and GRPO take a checkpoint's task, so their task has `auto` (train_sft makes one)
DIFFERENT = {("temperature", "sample.py"), ("dtype", "sample.py"), ("task", "evaluate.py"),
             ("task", "train_grpo.py")}


def test_usage_lines_name_real_flags():
    assert page.stale_usage(page.method_files()) == []


def test_a_flag_the_scripts_share_has_one_range():
    seen = collections.defaultdict(dict)
    for script in SCRIPTS:
        for name, (kind, spec) in cli.declarations(script).items():
            if (name, script) not in DIFFERENT:
                seen[name][script] = spec[-2] if kind == "range" else spec[1]
    assert {name: ranges for name, ranges in seen.items() if len(set(ranges.values())) > 1} == {}


def test_the_indicators_hold():
    values, places = page.measure(page.method_files())
    assert values["blank lines per 100 body lines"] >= 4
    assert values["lines over 100 characters (%)"] <= 5
    assert values["calls with 4+ positional arguments"] <= 20, places
    assert values["globals() writes"] == 0 and values["stale usage lines"] == 0, places


def test_every_long_function_says_why():
    """No function over 70 lines or 8 parameters without a `# long:` reason, in the method files and
    the tools; the check itself sees a long one and its reason."""
    import ast
    import os
    tools = os.listdir(os.path.join(page.ROOT, "tools"))
    paths = page.method_files() + [os.path.join("tools", f) for f in tools if f.endswith(".py")]
    assert page.measure(paths)[0]["unexplained long functions"] == 0, page.measure(paths)[1]
    long = "def f(" + ", ".join(f"a{i}" for i in range(9)) + "):\n    pass\n"
    assert page.unexplained_long(ast.parse(long), long.splitlines()) == [1]
    noted = "# long: nine things\n" + long
    assert page.unexplained_long(ast.parse(noted), noted.splitlines()) == []


def test_the_model_file_names_no_control_and_its_model_is_short():
    """The controls live in lvr.py: qwen.py applies a mask its caller hands it and names neither the
    bottleneck nor pause tokens; Qwen2_5_VL stays at most 215 lines (nanoGPT's GPT: 213)."""
    import ast
    import os
    text = open(os.path.join(page.ROOT, "qwen.py")).read()
    assert not [w for w in ("bottleneck", "blind", "pause") if w in text.lower()]
    cls = next(n for n in ast.parse(text).body if isinstance(n, ast.ClassDef) and n.name == "Qwen2_5_VL")
    assert cls.end_lineno - cls.lineno + 1 <= 215


def test_the_reading_path_defines_each_name_before_it_is_read():
    """Along the README's path, a function or class reads only the module's functions and classes
    defined above it (qwen.py, the model taken partly on trust, keeps its loading code below); the
    check itself sees a forward reference."""
    import ast
    import os

    def forward_refs(src):
        tree = ast.parse(src)
        defs = {n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        return sorted({(n.name, m.id) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                       for m in ast.walk(n) if isinstance(m, ast.Name) and defs.get(m.id, 0) > n.lineno})

    for name in ("tasks.py", "data.py", "lvr.py", "train_sft.py", "evaluate.py", "grpo.py",
                 "train_grpo.py"):
        assert forward_refs(open(os.path.join(page.ROOT, name)).read()) == [], name
    assert forward_refs("def f():\n    return g()\n\n\ndef g():\n    return 1\n") == [("f", "g")]
