"""
The command line and its errors. nanoGPT-style: every simple global of a script's settings block
is a `--name value` flag, typed like its default, and what a flag accepts is declared at the
start of its comment, on the same line as the default:

    lr = 1e-3  # (0, inf) peak learning rate            a range: [ ] closed, ( ) open, inf unbounded
    method = "lvr"  # {lvr, mirage, none} what to train  a set of choices
    out_dir = "out"  # checkpoint directory              no declaration: any string (a bool: true/false)
    lr = Auto(float)  # (0, inf) peak lr (auto: 1e-5 ...)  a placeholder the script resolves, or a number

A placeholder is spelled `auto` on the command line and in --help; its comment says what it resolves
to, and the script prints the resolved values on a `resolved:` line.

configure() reads the declarations from the script's own source and checks every value, the
defaults included, before any work starts; require() states a rule between two settings. A wrong
value is one line `error: --name ...` and exit 1 (run()). A number without a declared range is a
bug in the script: configure() refuses it, so a new flag cannot skip its check.
Also here: InputError, the one exception a user ever sees, and the training loops' stop flag.
"""

import contextlib
import difflib
import math
import os
import re
import signal
import sys
from typing import NamedTuple

import torch


class InputError(ValueError):
    """Something the user gave us is wrong. Scripts print the message on one line and exit 1."""


class Auto:
    """A setting's typed placeholder: `--name auto` (the default) leaves it to the script, which
    resolves it (its comment says to what); `--name 3e-4` gives a `kind` value, checked against the
    declared range."""

    def __init__(self, kind):
        self.kind = kind

    def __repr__(self):
        return "auto"

    def __eq__(self, other):
        return isinstance(other, Auto) and other.kind is self.kind

    def __hash__(self):
        return hash(("auto", self.kind))


class From(NamedTuple):
    """A resolved value and where it came from ("flag", "checkpoint", "default"): resolve returns
    it, the `resolved:` line prints both, the script's setting gets the value."""
    value: object
    source: str


def given(value):
    """A setting's value, or None where it is left at auto."""
    return None if isinstance(value, Auto) else value


def comments(path):
    """{name: comment} of a script's settings lines (`name = default  # comment`)."""
    with open(path, encoding="utf-8") as f:
        return dict(m.groups() for line in f if (m := re.match(r"^(\w+) = .*?  # (.*)$", line)))


def declarations(path):
    """{name: (kind, spec)} from a script's settings lines: kind "range" (lo, hi, lo_open, hi_open,
    text, auto value or None) or "choices" (tuple of strings, text)."""
    out = {}
    for name, comment in comments(path).items():
        r = re.match(r"^([\[(])\s*([-\w.+]+)\s*,\s*([-\w.+]+)\s*([\])])( or (-?[\d.]+))?", comment)
        c = re.match(r"^\{([^}]*)\}", comment)
        if r:  # a range, and maybe one value outside it that means "auto" (`[0, inf) or -1`)
            lo, hi, extra = float(r.group(2)), float(r.group(3)), r.group(6)
            out[name] = ("range", (lo, hi, r.group(1) == "(", r.group(4) == ")", r.group(0),
                                   None if extra is None else float(extra)))
        elif c:
            out[name] = ("choices", (tuple(s.strip() for s in c.group(1).split(",")), c.group(0)))

    return out


def check(name, value, decl):
    """Raise InputError when `value` is outside what `decl` (from declarations) accepts."""
    kind, spec = decl
    if kind == "choices" and str(value) not in spec[0]:
        raise InputError(f"--{name} must be one of {', '.join(spec[0])}; got {value!r}")
    if kind == "range" and value != spec[5] and not isinstance(value, Auto):
        lo, hi, lo_open, hi_open, text, _ = spec
        if (
            math.isnan(value)
            or value < lo
            or value > hi
            or (lo_open and value == lo)
            or (hi_open and value == hi)
        ):
            raise InputError(f"--{name} must be in {text}; got {value}")


def settings(g):
    """The script's flags: every simple lower-case global of its settings block, in order."""
    return {
        k: v
        for k, v in g.items()
        if not k.startswith("_") and k.islower() and isinstance(v, (bool, int, float, str, Auto))
    }


def usage(g, keys):
    """--help: each flag with its default and its comment (what it accepts, then what it does)."""
    doc = (g.get("__doc__") or "").strip().split("\n\n")[0].splitlines()  # its first paragraph
    said = comments(g["__file__"])
    lines = [*(doc or [os.path.basename(g["__file__"])]), "", "settings (--name value):"]
    width = max(len(k) for k in keys) + 2
    for k, v in keys.items():
        default = (
            str(v).lower() if isinstance(v, bool) else repr(v) if isinstance(v, str) else str(v)
        )
        lines.append(f"  --{k:<{width}}{default:<14} {said.get(k, '')}")

    return "\n".join(lines)


def parse(flag, value, default):
    """One --flag value, typed like its default (a placeholder: `auto`, or its kind)."""
    if isinstance(default, Auto) and value == "auto":
        return default
    kind = default.kind if isinstance(default, Auto) else type(default)
    try:
        if kind is bool and value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError
        return value.lower() in ("true", "1", "yes") if kind is bool else kind(value)
    except ValueError:
        raise InputError(f"{flag} expects {kind.__name__}, got {value!r}") from None


def configure(g, argv, resolve=None):
    """Override the script globals `g` from `--name value` pairs, typed like the defaults, check
    every setting against its declaration, print them; return them as a dict. --help prints them and
    exits. `resolve`: the script's function from the settings to the values of those left at auto (and
    of those it makes concrete: a hub id's directory), written into `g` here, once, at start-up, and
    printed on the `resolved:` line."""
    keys = settings(g)
    if "--help" in argv or "-h" in argv:
        print(usage(g, keys))
        raise SystemExit(0)

    if len(argv) % 2 or any(not a.startswith("--") for a in argv[::2]):
        raise InputError(
            f"arguments must be --name value pairs, got: {' '.join(argv)} (--help lists them)"
        )

    for flag, value in zip(argv[::2], argv[1::2]):
        name = flag[2:]
        if name not in keys:
            near = difflib.get_close_matches(name, list(keys), n=1, cutoff=0.5)
            hint = f"did you mean --{near[0]}?" if near else "--help lists the flags"
            raise InputError(f"unknown flag {flag}: {hint}")
        keys[name] = g[name] = parse(flag, value, keys[name])

    decl = declarations(g["__file__"])
    for name, value in keys.items():
        if (type(value) in (int, float) or isinstance(value, Auto)) and name not in decl:
            # a bug in the script
            raise TypeError(f"{g['__file__']}: setting {name} declares no range")
        if name in decl:
            check(name, value, decl[name])

    rank0 = os.environ.get("RANK", "0") == "0"  # (under torchrun: print once)
    if rank0:
        print("config: " + " ".join(f"{k}={v}" for k, v in keys.items()))

    # (plain values: it is saved)
    config = {k: "auto" if isinstance(v, Auto) else v for k, v in keys.items()}
    if resolve is not None:
        shown = resolve(dict(config))
        resolved = {k: v.value if isinstance(v, From) else v for k, v in shown.items()}
        g.update(resolved)
        config.update(resolved)
        if rank0:
            print("resolved: " + " ".join(
                f"{k}={v.value}({v.source})" if isinstance(v, From) else f"{k}={v}"
                for k, v in shown.items()
            ))

    return config


def require(ok, message):
    """A rule between settings, checked with the others before any work starts."""
    if not ok:
        raise InputError(message)


@contextlib.contextmanager
def out_of_memory(where, advice, out_dir):
    """Out of memory inside the block -> one line that says where, what lowers memory there, and
    that the last checkpoint on disk is intact (nothing is saved on the way out)."""
    try:
        yield
    except torch.OutOfMemoryError:
        raise InputError(
            f"out of memory in {where}: {advice}. {out_dir} keeps its last checkpoint"
        ) from None


def stop_flag():
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's preemption) -> a list a training loop reads
    between steps, so what it saves on the way out is one whole step (a KeyboardInterrupt can land
    inside opt.step()). A second signal stops at once, without saving: the last checkpoint on disk
    stays as it was."""
    flag = []

    def handler(sig, frame):
        if flag:
            raise KeyboardInterrupt
        flag.append(sig)
        print(
            f"\n{signal.Signals(sig).name}: saving and stopping at the end of a step "
            "(again: stop now, no save)",
            file=sys.stderr,
        )

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    return flag


def stop_saved(signalled, step, out_dir, rank):
    """The end of a run a signal stopped, once its last step is saved: say so, exit 130 (Ctrl-C) or
    143."""
    if rank == 0:
        print(f"\nstopped: saved step {step} to {out_dir}")
    raise SystemExit(128 + (signalled[0] if signalled else signal.SIGINT))


def run(main):
    """Run a script's main(): user errors print one line and exit 1, Ctrl-C exits 130."""
    try:
        main(sys.argv[1:])
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
