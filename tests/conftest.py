import importlib
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import cli  # noqa: E402

SCRIPTS = [importlib.import_module(m) for m in ("train_sft", "train_grpo", "evaluate", "sample",
                                                 "tools.bench", "tools.study", "tools.gpu_check")]


@pytest.fixture(autouse=True)
def script_settings():
    """A test that calls a script's main() in this process sets its settings (the module's globals, as
    cli.configure does): each test starts from the defaults, whatever ran before it."""
    saved = [(vars(m), cli.settings(vars(m))) for m in SCRIPTS]
    yield
    for g, values in saved:
        g.update(values)
