"""--init_from ORG/NAME[@REVISION]: a Hugging Face hub id, resolved through huggingface_hub's cache (offline
here: the tests lay the cache out themselves), a local directory first, one line for what cannot load."""
import os
import shutil
import sys

import checkpoint
import helpers
from launch import run, run_here


def hub_cache(home, repo, files_from, commit="0123456789abcdef0123456789abcdef01234567"):
    """A Hugging Face hub cache under `home` (HF_HOME) holding a checkpoint as huggingface_hub lays it out:
    hub/models--ORG--NAME/refs/main names the commit, snapshots/<commit>/ holds its files -> the snapshot."""
    model_dir = os.path.join(home, "hub", "models--" + repo.replace("/", "--"))
    snapshot = os.path.join(model_dir, "snapshots", commit)
    shutil.copytree(files_from, snapshot)
    os.makedirs(os.path.join(model_dir, "refs"))
    with open(os.path.join(model_dir, "refs", "main"), "w") as f:
        f.write(commit)
    return snapshot


def test_a_hub_id_loads_from_the_hugging_face_cache(tmp_path):
    """--init_from ORG/NAME: offline, from a hub cache holding a tiny checkpoint in the official
    layout, sample.py answers and train_sft.py trains a step, both on the snapshot; an id the cache
    lacks is one line."""
    helpers.real_shaped(str(tmp_path / "official"))
    home = str(tmp_path / "hf")
    snapshot = hub_cache(home, "Qwen/Qwen2.5-VL-3B-Instruct", str(tmp_path / "official"))
    helpers.photo(64, 48).save(tmp_path / "a.png")
    env = {"HF_HOME": home, "HF_HUB_OFFLINE": "1"}
    s = run("sample.py", "--init_from", "Qwen/Qwen2.5-VL-3B-Instruct", "--image", str(tmp_path / "a.png"),
            "--q", "What is it?", "--max_new_tokens", "3", env=env)
    assert s.returncode == 0 and f"init_from={snapshot}" in s.stdout, s.stderr
    t = run("train_sft.py", "--init_from", "Qwen/Qwen2.5-VL-3B-Instruct", "--max_iters", "1", "--batch_size",
            "2", "--eval_examples", "0", "--image_size", "112", "--data_workers", "0", "--out_dir",
            str(tmp_path / "out"), env=env)
    assert t.returncode == 0 and f"init_from={snapshot}" in t.stdout, t.stderr
    assert os.path.isfile(tmp_path / "out" / "model.safetensors")
    missing = run("evaluate.py", "--init_from", "Qwen/Qwen2.5-VL-7B-Instruct@v2", env=env)
    assert missing.returncode == 1 and missing.stdout.count("\n") <= 1 and "Traceback" not in missing.stderr
    assert missing.stderr.strip() == (
        "error: --init_from Qwen/Qwen2.5-VL-7B-Instruct@v2: not a local directory, and from the "
        "Hugging Face hub: not in the Hugging Face cache, and the hub cannot be reached "
        "(HF_HUB_OFFLINE is set)")


def test_a_local_directory_wins_over_a_hub_id_and_no_hub_package_is_one_line(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "ORG" / "NAME")
    monkeypatch.chdir(tmp_path)
    assert checkpoint.locate("ORG/NAME") == "ORG/NAME"  # (a directory of that name: never the hub)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # (as if it were not installed)
    r = run_here("sample.py", "--init_from", "Qwen/Qwen2.5-VL-3B-Instruct", "--q", "hi")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        "error: Qwen/Qwen2.5-VL-3B-Instruct is not a directory; to load it from the Hugging Face hub: "
        "pip install huggingface_hub (or: hf download Qwen/Qwen2.5-VL-3B-Instruct --local-dir DIR, "
        "then --init_from DIR)")
