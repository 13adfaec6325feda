"""
The GPU check: a 3B-shaped random Qwen2.5-VL through the paths a real fine-tune takes, on every
visible GPU, in a few minutes; it prints each run's peak memory per GPU and its step time, beside
the README's memory table.

    python -m tools.gpu_check                 # a machine with one or more GPUs
    python -m tools.gpu_check --size 0.5b     # a smaller GPU
    python -m tools.gpu_check --size tiny --processes 2   # CPU: the check checked (tests/test_scale.py)

Nothing is downloaded: the checkpoint is random (bench.make_checkpoint), the data eight random
photos. Each run is `torchrun --nproc_per_node <GPUs>`: LVR SFT for `steps` steps under DDP, then
under FSDP2, both in bf16 autocast; the FSDP2 run resumed for two more steps; GRPO_latent for two
steps from the SFT checkpoint; then evaluate.py on the eight records (one process). A run that fails
prints its last lines and the check goes on to the next.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

from tools import bench
import checkpoint
import cli

# -----------------------------------------------------------------------------
size = "3b"  # {3b, 0.5b, tiny} the model's shape (tiny: the check itself, on CPU too, as the tests run it)
processes = 0  # [0, inf) processes per run (0: one per visible GPU)
steps = 10  # [2, inf) SFT steps per run
batch_size = 2  # [1, inf) SFT examples per GPU per step
work_dir = ""  # where the checkpoint and the runs go ("": a temporary directory, removed at the end)
# -----------------------------------------------------------------------------
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
# the README's memory table, per GPU before activations (GRPO; SFT holds no reference and no
# rollout)
EXPECTED = {"3b": "GRPO 3B: 59 GB under DDP, 22 GB under FSDP2 x 8 (README)"}


def photos(path):
    """Eight random 640 x 480 photos and an LVR JSON file over them -> the file's path."""
    records = []
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (480, 640, 3), np.uint8)).save(
            os.path.join(path, f"{i}.jpg"))
        records.append({"image": f"{i}.jpg", "bboxes": [[0.3, 0.3, 0.4, 0.4]], "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the box?"},
            {"from": "gpt", "value": "<lvr>\n<answer>red</answer>"}]})

    with open(os.path.join(path, "d.json"), "w") as f:
        json.dump(records, f)
    return os.path.join(path, "d.json")


def launch(script, *args, gpus=1):
    """Run a script (under torchrun when gpus > 1, on a free port) -> (ok, stdout + stderr)."""
    head = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)]
        if gpus > 1
        else []
    )
    r = subprocess.run(
        [sys.executable, *head, script, *args], capture_output=True, text=True, cwd=ROOT
    )
    return r.returncode == 0, r.stdout + r.stderr


def report(name, ok, out, out_dir):
    """One line: the run's per-GPU peak memory (printed by the scripts) and its median step time
    (its history, log.jsonl)."""
    if not ok:
        print(f"{name:28} FAILED:\n" + "\n".join(out.strip().splitlines()[-8:]))
        return

    peaks = [float(x) for x in re.findall(r"peak GPU memory rank \d+: ([\d.]+) GiB", out)]
    step_s = "-"
    seconds = [x["step_s"] for x in checkpoint.read_log(out_dir) if "step_s" in x]
    if seconds:
        step_s = f"{statistics.median(seconds[1:] or seconds):.2f} s"
    peak = f"{max(peaks):.1f} GiB (of {len(peaks)} GPUs)" if peaks else "-"
    print(f"{name:28} peak memory {peak:24} median step {step_s}")


def main(argv):
    cli.configure(globals(), argv)
    gpus = processes or torch.cuda.device_count()
    cli.require(
        gpus > 0, "the GPU check needs a GPU: torch sees none (--size tiny --processes 2: on CPU)"
    )
    work = work_dir or tempfile.mkdtemp(prefix="gpu-check-")
    os.makedirs(work, exist_ok=True)
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU processes"
    print(f"{gpus} x {where}, torch {torch.__version__}; {size}-shaped random model")
    ckpt = os.path.join(work, "ckpt")
    if not os.path.isdir(ckpt):
        os.makedirs(ckpt)
        bench.make_checkpoint(size, ckpt)

    data = photos(work)
    common = [
        "--init_from", ckpt, "--data_path", data, "--image_root", work, "--batch_size",
        str(batch_size), "--max_iters", str(steps), "--eval_interval", str(steps),
        "--eval_examples", "4",
    ]
    sft = {}
    for name, extra in (("SFT, DDP", []), ("SFT, FSDP2", ["--fsdp", "true"])):
        out_dir = os.path.join(work, name.split(", ")[1].lower())
        shutil.rmtree(out_dir, ignore_errors=True)
        ok, out = launch("train_sft.py", *common, *extra, "--out_dir", out_dir, gpus=gpus)
        report(f"{name} ({steps} steps)", ok, out, out_dir=out_dir)
        sft[name] = ok

    fsdp_dir = os.path.join(work, "fsdp2")
    if sft["SFT, FSDP2"]:
        resumed = [
            *common[:-6], "--max_iters", str(steps + 2), "--eval_interval", str(steps + 2),
            "--eval_examples", "0", "--fsdp", "true", "--out_dir", fsdp_dir, "--resume", "true",
        ]
        ok, out = launch("train_sft.py", *resumed, gpus=gpus)
        report("SFT, FSDP2 resumed (+2)", ok, out, out_dir=fsdp_dir)

    if sft["SFT, DDP"]:
        grpo_dir = os.path.join(work, "grpo")
        shutil.rmtree(grpo_dir, ignore_errors=True)
        ok, out = launch(
            "train_grpo.py", "--init_from", os.path.join(work, "ddp"), "--data_path", data,
            "--image_root", work, "--batch_size", str(2 * gpus), "--group_size", "4",
            "--max_new_tokens", "16", "--max_iters", "2", "--save_interval", "2", "--filter_groups",
            "false", "--grad_checkpointing", "true", "--out_dir", grpo_dir, gpus=gpus,
        )
        report("GRPO, DDP (2 steps)", ok, out, out_dir=grpo_dir)
        ok, out = launch(
            "evaluate.py", "--init_from", os.path.join(work, "ddp"), "--data_path", data,
            "--image_root", work, "--n_examples", "8", "--max_new_tokens", "8",
        )
        print(f"{'evaluate.py (8 records)':28} {'ok' if ok else 'FAILED:'}"
              + ("" if ok else "\n" + "\n".join(out.strip().splitlines()[-8:])))

    if size in EXPECTED:
        print(f"expected: {EXPECTED[size]}")
    if not work_dir:
        shutil.rmtree(work)


if __name__ == "__main__":
    cli.run(main)
