"""Running the project's scripts from a test: in the test's own process (run_here, what most tests use: a
new process spends 2.5 s importing torch), in a new one (run: torchrun, a kill), several new ones at once
(run_all), or with Ctrl-C / SIGTERM arriving mid-step (run_signalled)."""
import contextlib
import importlib.util
import io
import os
import runpy
import signal
import subprocess
import sys
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the handlers a training script installs (cli.stop_flag)


def run(*args, env=None):
    """`python args` in its own process: for a test of the process itself (torchrun, a signal, a kill)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def run_here(*args):
    """`python args` run in this process, as the interpreter would run it: the script (or `-m module`) with
    fresh globals as `__main__`; its exit code, stdout and stderr (an uncaught exception: 1 and its
    traceback); one thread, as `run` gives it."""
    module = args[1] if args[0] == "-m" else None
    path = importlib.util.find_spec(module).origin if module else os.path.join(ROOT, args[0])
    argv, cwd, threads = sys.argv, os.getcwd(), torch.get_num_threads()
    handlers = [signal.getsignal(s) for s in STOP_SIGNALS]
    sys.argv = [path, *args[2 if module else 1:]]
    os.chdir(ROOT)
    torch.set_num_threads(1)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_main(path)
    finally:
        sys.argv = argv
        os.chdir(cwd)
        torch.set_num_threads(threads)
        for s, handler in zip(STOP_SIGNALS, handlers):
            signal.signal(s, handler)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_main(path):
    """The file at `path` run as `__main__` -> the exit code the interpreter would give."""
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as e:  # None: 0; a number: itself; a message: printed, 1
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except Exception:
        traceback.print_exc()
        return 1
    return 0


def run_all(*argvs):
    """Several independent runs at once (each is one thread): their CompletedProcess results, in order."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, *a], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for a in argvs]
    outs = [p.communicate(timeout=600) for p in procs]
    return [subprocess.CompletedProcess(p.args, p.returncode, *o) for p, o in zip(procs, outs)]


SIGNALLED = """
import os, runpy, signal, sys, torch
sys.path.insert(0, os.getcwd())  # the repository (a file run under torchrun: its own dir comes first)
zero_grad, calls = torch.optim.Optimizer.zero_grad, []
def signalled(self, *a, **k):  # the worst moment: updated, the step not yet counted
    calls.append(1)
    if len(calls) == {at} and os.environ.get("RANK", "0") == "{rank}":  # (under torchrun: one rank only)
        for sig in {sigs!r}:
            os.kill(os.getpid(), getattr(signal, sig))
    return zero_grad(self, *a, **k)
torch.optim.Optimizer.zero_grad = signalled
sys.argv = [{script!r}, *{args!r}]
try:
    runpy.run_path({script!r}, run_name="__main__")
finally:  # (run in the test's own process: put back what was patched)
    torch.optim.Optimizer.zero_grad = zero_grad
"""


def run_signalled(tmp_path, script, at, rank, sigs, args, procs=1, port=None):
    """`script args`, signalled `sigs` from inside its `at`-th zero_grad (on rank `rank`): in this process,
    or under torchrun with `procs` processes."""
    path = tmp_path / f"signalled_{len(list(tmp_path.glob('signalled_*')))}.py"
    path.write_text(SIGNALLED.format(script=script, at=at, rank=rank, sigs=sigs, args=args))
    if procs == 1:
        return run_here(str(path))
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", port]
    return run(*torchrun, str(path))
