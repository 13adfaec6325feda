"""The command line: every number and choice flag of every script declares what it accepts, and a value
outside it is a one-line error before any work starts."""
import importlib
import math

import pytest

import cli
from cli import InputError
from launch import run_here

SCRIPTS = ["train_sft", "train_grpo", "evaluate", "sample", "tools.bench", "tools.study", "tools.gpu_check"]


def bad_value(kind, spec):
    """A value just outside a declaration."""
    if kind == "choices":
        return "bogus"
    lo, hi, lo_open, hi_open, _, auto = spec
    if math.isfinite(lo):
        v = lo if lo_open else lo - 1
        return v - 1 if v == auto else v  # (the "auto" value, -1, is accepted: step past it)
    return hi if hi_open else hi + 1


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_declares_and_checks_its_values(script):
    mod = importlib.import_module(script)
    decl = cli.declarations(mod.__file__)
    flags = cli.settings(vars(mod))
    numbers = [k for k, v in flags.items() if type(v) in (int, float) or isinstance(v, cli.Auto)]
    assert numbers and all(k in decl for k in numbers), [k for k in numbers if k not in decl]  # a range each
    assert set(decl) <= set(flags)  # no declaration for a flag that does not exist
    for name, d in decl.items():
        g = dict(vars(mod))
        cli.check(name, g[name], d)  # every default is accepted
        value = bad_value(*d)
        kind = g[name].kind if isinstance(g[name], cli.Auto) else type(g[name])  # (a placeholder: its kind)
        with pytest.raises(InputError) as e:
            cli.configure(g, [f"--{name}", str(kind(value) if kind is not str else value)])
        assert str(e.value).startswith(f"--{name} must be") and "\n" not in str(e.value)


def test_a_number_flag_without_a_declared_range_is_refused(tmp_path):
    script = tmp_path / "s.py"
    script.write_text('steps = 3  # how many\nname = "x"  # any string\n')
    g = {"__file__": str(script), "steps": 3, "name": "x"}
    with pytest.raises(TypeError, match="setting steps declares no range"):
        cli.configure(g, [])


def test_bad_values_end_to_end_are_one_line_errors():
    """The cases a new user hit, and the contradictory pairs: one line `error: --name ...`, exit 1."""
    cases = [("train_sft.py", ["--eval_interval", "0"], "--eval_interval must be in [1, inf)"),
             ("train_sft.py", ["--batch_size", "0"], "--batch_size must be in [1, inf)"),
             ("train_sft.py", ["--max_latents", "-3"], "--max_latents must be in [0, inf)"),
             ("train_sft.py", ["--method", "mirage", "--mirage_k", "0"], "--mirage_k must be in [1, inf)"),
             ("train_sft.py", ["--lr", "0"], "--lr must be in (0, inf)"),
             ("train_sft.py", ["--grad_accum", "0"], "--grad_accum must be in [1, inf)"),
             ("train_sft.py", ["--min_pixels", "50000"], "--min_pixels 50000 is above --max_pixels 28224"),
             ("train_sft.py", ["--image_size", "100"], "--image_size 100 is not a multiple of 28"),
             ("train_sft.py", ["--fsdp", "true"], "--fsdp true shards across processes"),
             ("train_sft.py", ["--method", "nope"], "--method must be one of lvr, mirage, none"),
             ("sample.py", ["--max_new_tokens", "0"], "--max_new_tokens must be in [1, inf)"),
             ("sample.py", ["--temperature", "-1"], "--temperature must be in [0, inf)"),
             ("sample.py", ["--top_p", "2"], "--top_p must be in (0, 1]"),
             ("evaluate.py", ["--n_examples", "-5"], "--n_examples must be in [1, inf)"),
             ("evaluate.py", ["--batch_size", "0"], "--batch_size must be in [1, inf)"),
             ("train_grpo.py", ["--batch_size", "0"], "--batch_size must be in [1, inf)"),
             ("train_grpo.py", ["--temperature", "0"], "--temperature must be in (0, inf)"),
             ("-m", ["tools.bench", "--sizes", "tiny,7b"], "--sizes must be a comma-separated list")]
    for script, args, msg in cases:
        r = run_here(script, *args, *(["--out_dir", "/nonexistent/x"] if script.startswith("train") else []))
        assert r.returncode == 1 and "Traceback" not in r.stderr, (script, args, r.stderr)
        assert r.stderr.strip() == f"error: {r.stderr.strip()[7:]}" and "\n" not in r.stderr.strip(), r.stderr
        assert msg in r.stderr, (script, args, r.stderr)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_and_a_misspelt_flag_names_the_nearest(script, capsys):
    mod = importlib.import_module(script)
    g = dict(vars(mod))
    with pytest.raises(SystemExit) as e:
        cli.configure(g, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    flags = [k for k, v in cli.settings(g).items()]
    assert flags and all(f"  --{k} " in out for k in flags), out
    name = flags[1]
    with pytest.raises(InputError, match=f"unknown flag --{name[:-1]}: did you mean --{name}"):
        cli.configure(dict(vars(mod)), [f"--{name[:-1]}", "1"])
    with pytest.raises(InputError, match="unknown flag --max_iter: did you mean --max_iters"):
        cli.configure(dict(vars(importlib.import_module("train_sft"))), ["--max_iter", "3"])


def test_auto_is_a_typed_placeholder():
    """`--lr auto` leaves the placeholder for the script to resolve, `--lr 3e-4` is a float, checked against
    the declared range; the config a run saves holds plain values ("auto")."""
    import train_sft
    g = dict(vars(train_sft))
    config = cli.configure(g, ["--lr", "auto", "--warmup_iters", "7"])
    assert isinstance(g["lr"], cli.Auto) and config["lr"] == "auto" and g["warmup_iters"] == 7
    assert cli.given(g["lr"]) is None and cli.given(g["warmup_iters"]) == 7
    g = dict(vars(train_sft))
    assert cli.configure(g, ["--lr", "3e-4"])["lr"] == 3e-4 and g["lr"] == 3e-4
    with pytest.raises(InputError, match="--warmup_iters expects int"):
        cli.configure(dict(vars(train_sft)), ["--warmup_iters", "0.5"])


def test_the_readers_path_reads_front_to_back():
    """The README's reading order: each file imports only files read before it, the plumbing (cli,
    checkpoint, parallel) and vision.py, and the names the README says to take on trust (tasks.py's special
    tokens from qwen and lvr; evaluate.evaluate in train_sft.py)."""
    import ast
    import os
    order = ["tasks", "qwen", "lvr", "data", "train_sft", "evaluate", "grpo", "train_grpo"]
    skippable = {"cli", "checkpoint", "parallel", "vision"}
    on_trust = {"tasks": {"lvr", "qwen"}, "train_sft": {"evaluate"}}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    for i, name in enumerate(order):
        tree = ast.parse(open(os.path.join(root, name + ".py")).read())
        nodes = list(ast.walk(tree))
        imported = {a.name.split(".")[0] for n in nodes if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in nodes if isinstance(n, ast.ImportFrom) and n.module}
        later = (imported & ours) - set(order[:i]) - skippable - on_trust.get(name, set())
        assert not later, (name, later)
