"""train_sft.py end to end: resume, DDP vs one process, NaN stop, dataset errors, then sample.py."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

import checkpoint
import cli
import data
import helpers
import lvr
import qwen
import tasks
import vision
from cli import InputError
from launch import ROOT, run, run_here, run_signalled

from helpers import SMALL, state

def losses(out):
    """A run's (ce, latent, switch) at every step, from its history (log.jsonl)."""
    return [(x["ce"], x["latent"], x["switch"]) for x in checkpoint.read_log(out) if "ce" in x]


def test_ddp_and_fsdp_two_processes_match_one(tmp_path):
    """2 processes (DDP; FSDP2 stopped and resumed) train as 1 process with 2 micro-batches: the same losses
    and weights. (FSDP2's evaluation and normal end: tools/gpu_check.py's run, in test_study.py.)"""
    one, two, four = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "four")
    common = [*SMALL, "--batch_size", "2", "--max_iters", "3", "--eval_interval", "3"]
    r = run_here("train_sft.py", *common, "--grad_accum", "2", "--out_dir", one)
    assert r.returncode == 0, r.stderr
    m1 = qwen.Qwen2_5_VL.from_pretrained(one)

    def same_as_one(out):
        assert torch.allclose(torch.tensor(losses(one)), torch.tensor(losses(out)), rtol=1e-4)
        helpers.assert_same_weights(m1, out)
    r = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", "train_sft.py",
            *common, "--out_dir", two)
    assert r.returncode == 0, r.stderr
    same_as_one(two)
    # FSDP2, Ctrl-C reaching one rank only: the flag is summed with the losses, so both ranks stop after the
    # same step and save it together (a collective); the optimizer state is keyed by parameter name, so that
    # checkpoint resumes in one process onto `one`'s curve and weights
    r = run_signalled(tmp_path, "train_sft.py", 1, 1, ["SIGINT"],
                      [*common, "--fsdp", "true", "--out_dir", four], procs=2, port="29535")
    assert f"stopped: saved step 2 to {four}" in r.stdout and state(four)["step"] == 2, r.stderr
    r = run_here("train_sft.py", *common, "--grad_accum", "2", "--out_dir", four, "--resume", "true")
    assert r.returncode == 0, r.stderr
    same_as_one(four)
    # stage 2 (each slot fed the previous pass's hidden state) on `one`: FSDP2 with gradient checkpointing in
    # 2 processes trains as 1 process without it
    stage2 = ["--init_from", one, "--stage", "2", *common[:-4], "--max_iters", "2", "--eval_interval", "2"]
    r = run_here("train_sft.py", *stage2, "--grad_accum", "2", "--out_dir", str(tmp_path / "s1"))
    assert r.returncode == 0, r.stderr
    r = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537", "train_sft.py",
            *stage2, "--fsdp", "true", "--grad_checkpointing", "true", "--out_dir", str(tmp_path / "s2"))
    assert r.returncode == 0, r.stderr
    assert torch.allclose(torch.tensor(losses(tmp_path / "s1")), torch.tensor(losses(tmp_path / "s2")),
                          rtol=1e-4)
    helpers.assert_same_weights(qwen.Qwen2_5_VL.from_pretrained(str(tmp_path / "s1")), str(tmp_path / "s2"))


def test_fsdp_needs_torchrun():
    r = run_here("train_sft.py", *SMALL, "--fsdp", "true")
    assert r.returncode == 1 and "torchrun" in r.stderr and "Traceback" not in r.stderr


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    import train_sft
    out = str(tmp_path / "out")
    real = lvr.sft_loss
    calls = []

    def poisoned(*a, **k):
        loss, ce, lat, sw = real(*a, **k)
        calls.append(1)
        return (loss * float("nan"), ce * float("nan"), lat, sw) if len(calls) > 2 else (loss, ce, lat, sw)
    monkeypatch.setattr(lvr, "sft_loss", poisoned)
    with pytest.raises(InputError, match="loss is not finite at step 2"):
        train_sft.main([*SMALL, "--max_iters", "5", "--eval_interval", "2", "--out_dir", out])
    assert state(out)["step"] == 2  # the good checkpoint of step 2 is intact
    model, tok = qwen.load(out)
    assert lvr.latent_ids(tok) is not None


def write_dataset(tmp_path, records):
    img = tasks.synthetic_example(0)["images"][0]
    img.save(tmp_path / "a.png")
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records))
    return str(path)


def record(bboxes, lvr_count=1, image="a.png"):
    return {"image": image, "bboxes": bboxes,
            "conversations": [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
                              {"from": "gpt", "value": "<lvr>\n" * lvr_count + "<answer>red</answer>"}]}


@pytest.mark.parametrize(
    "rec,msg",
    [
        (record([[0.1, 0.1, 0.3, 0.3]], lvr_count=2), "record 1: 2 <lvr> placeholders but 1 bboxes"),
        (record([[0.1, 0.1, 1.3, -0.3]]), "record 1: bbox .* lies outside the image"),
        (record([[0.3, 0.1, 0.3, 0.3]]), "record 1: bbox .* is empty or inverted"),
        (record([[0.1, 0.1, 0.3, 0.3]], image="missing.png"), "record 1: image not found"),
        (record([[0.1, 0.1, 0.3, 0.3]],
                image="../a.png"), "record 1: image path '../a.png' leaves --image_root"),
        (record([[0.1, 0.1, 0.3, 0.3]],
                image="/etc/passwd"), "record 1: image path '/etc/passwd' leaves --image_root"),
        (
            record([[0.1, 0.1, 0.3, 0.3]], image=["a.png", "a.png"]),
            "record 1: 2 images and 1 bboxes: 'bbox_images' must",
        ),
        (
            {**record([[0.1, 0.1, 0.3, 0.3]], image=["a.png", "a.png"]), "bbox_images": [2]},
            "index of its image .* got \\[2\\]",
        ),
        (
            {
                **record([[0.1, 0.1, 0.3, 0.3]], image=["a.png", "a.png"]),
                "conversations": [{"from": "human", "value": "<image>\n "},
                                  {"from": "gpt", "value": "<lvr>\nred"}],
            },
            "record 1: the question is empty",
        ),
    ],
)
def test_dataset_errors_name_the_record(tmp_path, rec, msg):
    path = write_dataset(tmp_path, [record([[0.1, 0.1, 0.3, 0.3]]), rec])
    records = data.load_records(path)
    data.record_example(records[0], str(tmp_path), f"{path} record 0")
    with pytest.raises(InputError, match=msg):
        data.record_example(records[1], str(tmp_path), f"{path} record 1")


def test_bboxes_name_their_image(tmp_path):
    """With several images each bbox names its image (bbox_images): its ROI tokens are that image's, offset
    by the tokens of the images before it, so the targets are image 1's features, not image 0's."""
    model, tok, ids = helpers.tiny_model(tmp_path / "m")
    write_dataset(tmp_path, [])
    tasks.synthetic_example(1, 112)["images"][0].save(tmp_path / "b.png")
    rec = {**record([[0.1, 0.1, 0.3, 0.3]], image=["a.png", "b.png"]), "bbox_images": [1]}
    ex = data.record_example(rec, str(tmp_path), "r")
    e = data.encode(ex, tok, ids, data.LatentTargets("lvr"), pixels=(3136, 12544))
    n0 = int(e["grid_thw"][0].prod()) // 4
    want = lvr.roi_indices(ex["bboxes"][0], e["grid_thw"][1])
    assert e["latent_groups"] == [[n0 + j] for j in want] and len(e["grid_thw"]) == 2
    prompt = data.grpo_example({"image": ["a.png", "b.png"], "question": "q", "answer": "a"},
                               str(tmp_path), "r")
    assert prompt["images"][1].size == (112, 112)  # a GRPO prompt carries every image


def test_roi_indices_of_official_shaped_records(tmp_path):
    """Pinned by hand (what the side-by-side run with the official LVR code found equal): a pixel bbox on a
    resized image, normalised by the original size, covering several merged tokens; a second bbox on a
    second image, offset by the first image's tokens."""
    model, tok, ids = helpers.tiny_model(tmp_path / "m")
    helpers.photo(300, 200).save(tmp_path / "a.png")
    tasks.synthetic_example(1, 112)["images"][0].save(tmp_path / "b.png")
    rec = {"image": ["a.png", "b.png"], "bboxes": [[30, 20, 150, 110], [0.5, 0.5, 1.0, 1.0]],
           "bbox_images": [0, 1],
           "conversations": [{"from": "human", "value": "<image>\nWhere?"},
                             {"from": "gpt", "value": "<lvr>\nand <lvr>\n<answer>red</answer>"}]}
    ex = data.record_example(rec, str(tmp_path), "r")
    assert ex["bboxes"][0] == [0.1, 0.1, 0.5, 0.55]  # pixels / the original 300 x 200
    e = data.encode(ex, tok, ids, data.LatentTargets("lvr"), pixels=(3136, 50176))
    # 300 x 200 -> 252 x 168 px: 18 x 12 patches, 9 x 6 merged tokens; x: floor(0.1 * 18) = 1 .. ceil(0.5 *
    # 18)
    # = 9 -> merged cols 0..4; y: floor(0.1 * 12) = 1 .. ceil(0.55 * 12) = 7 -> merged rows 0..3
    assert e["grid_thw"].tolist() == [[1, 12, 18], [1, 8, 8]]
    first = [[r * 9 + c] for r in range(4) for c in range(5)]
    # 112 x 112: 4 x 4 merged; cols and rows 2..3, after the first image's 54 tokens
    second = [[54 + r * 4 + c] for r in (2, 3) for c in (2, 3)]
    assert e["latent_groups"] == first + second
    assert e["latent_slot"] == list(range(20)) + list(range(4))


def test_a_checkpoint_is_evaluated_on_images_the_size_it_trained_on(tmp_path):
    """128-px images with a bbox of 2 x 2 merged tokens at official LVR's training bounds (12 x 12 =
    144 tokens): 4 latents a span. At the processor's bounds the same image is 5 x 5 tokens: the
    model was evaluated on images it never saw at that size. The checkpoint records its bounds and
    evaluate.py uses them."""
    model, tok, ids = helpers.tiny_model(tmp_path / "m")
    helpers.photo(128, 128).save(tmp_path / "a.png")
    rec = record([[3 / 12, 3 / 12, 5 / 12, 5 / 12]])
    ex = data.record_example(rec, str(tmp_path), "r")
    trained = data.encode(ex, tok, ids, data.LatentTargets("lvr"),
                          pixels=(data.LVR_PIXELS[0], data.LVR_PIXELS[1]))
    other = data.encode(ex, tok, ids, data.LatentTargets("lvr"),
                        pixels=(data.PROCESSOR_PIXELS[0], data.PROCESSOR_PIXELS[1]))
    assert (trained["n_feat"], len(trained["latent_pos"])) == (144, 4)
    # the box covers 2 x 2 of 5 x 5 tokens there: a third of the image, not a ninth
    assert other["n_feat"] == 25
    model.cfg.extra["lvr_image_pixels"] = list(data.LVR_PIXELS)  # (what train_sft.py records)
    model.save_pretrained(str(tmp_path / "ckpt"))
    assert data.trained_pixels(str(tmp_path / "ckpt"), data.PROCESSOR_PIXELS) == data.LVR_PIXELS
    # records none
    assert data.trained_pixels(str(tmp_path / "m"), data.PROCESSOR_PIXELS) == data.PROCESSOR_PIXELS


def test_mirage_records_train_on_mirages_sequence(tmp_path):
    """A record shaped like Mirage's data/examples/sample.jsonl: the input image where <image>
    stands in the question, the latent span where <output_image> stands (after the first </think>),
    both texts verbatim, no placeholder in any target; a 196-px map at the processor's bounds, 49
    merged tokens, as official Mirage."""
    model, tok, ids = helpers.tiny_model(tmp_path / "m")
    mirage = lvr.add_latent_tokens(model, tok, lvr.MIRAGE_TOKENS)
    tasks.synthetic_example(0, 196)["images"][0].save(tmp_path / "map.png")
    tasks.synthetic_example(1, 196)["images"][0].save(tmp_path / "step.png")
    rec = {"text_input": "\nPlan a path.\n\nHere is the map: <image>\n\nPlease answer in \\boxed{}.",
           "image_input": "map.png", "image_output": "step.png",
           "text_output": "<think> Moving to [(1,2),Ice] is safe. </think><output_image><think> Then "
                          "the goal. </think>The answer is \\boxed{A}."}
    ex = data.record_example(rec, str(tmp_path), "r")
    lo, hi = data.PROCESSOR_PIXELS
    e = data.encode(ex, tok, mirage, data.LatentTargets("mirage", k=4), pixels=(lo, hi))
    seq, a = e["input_ids"], e["n_prompt"]
    v0, v1 = seq.index(tok.vision_start), seq.index(tok.vision_end)
    assert v1 - v0 - 1 == 49 and vision.merged_tokens(e["helper"][1]) == 49  # 196 px: 7 x 7, not 144
    user = seq.index(tok.im_start, 1)
    assert tok.decode(seq[user + 1:v0]) == "user\n\nPlan a path.\n\nHere is the map: "
    assert tok.decode(seq[v1 + 1:a]).startswith("\n\nPlease answer in \\boxed{}.")
    s = seq.index(mirage.start)
    assert tok.decode(seq[a:s]) == "<think> Moving to [(1,2),Ice] is safe. </think>"
    assert seq[s + 1:s + 5] == [mirage.latent] * 4 and seq[s + 5] == mirage.end and seq[-1] == tok.im_end
    assert tok.decode(seq[s + 6:-1]) == "<think> Then the goal. </think>The answer is \\boxed{A}."
    targets = tok.decode([t for t in e["labels"] if t != -100], skip_special_tokens=False)
    assert "<output_image>" not in targets and "<image>" not in targets
    assert data.is_correct("The answer is \\boxed{A}.", ex["answer"])
    assert not data.is_correct("\\boxed{B}", ex["answer"])
    no_placeholder = data.record_example({
        **rec, "text_output": "The answer is \\boxed{A}."
    }, str(tmp_path), "r")
    e = data.encode(no_placeholder, tok, mirage, data.LatentTargets("mirage", k=4), pixels=(lo, hi))
    assert e["input_ids"][e["n_prompt"]] == mirage.start  # no <output_image>: the span opens the answer


def test_train_on_a_file_then_sample_with_latents(tmp_path):
    """An LVR JSONL file trains; sample.py decodes with latents and draws them."""
    path = write_dataset(tmp_path, [record([[0.1, 0.1, 0.3, 0.3]]), record([[10, 20, 60, 90]])])
    out = str(tmp_path / "out")
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps(record([[0.5, 0.5, 0.9, 0.7]])))
    r = run_here("train_sft.py", *SMALL, "--max_iters", "2", "--eval_interval", "2", "--data_path", path,
                 "--image_root", str(tmp_path), "--out_dir", out, "--max_latents", "2", "--latent_head",
                 "true", "--eval_data_path", str(held_out))
    assert r.returncode == 0, r.stderr
    assert "step 2: held-out accuracy" in r.stdout and "on 1 examples" in r.stdout
    viz = str(tmp_path / "viz.png")
    r = run_here("sample.py", "--init_from", out, "--image", str(tmp_path / "a.png"), "--q",
                 "What colour is the circle?", "--max_new_tokens", "12", "--lvr_steps", "2", "--viz", viz)
    assert r.returncode == 0, r.stderr
    assert "resolved: min_pixels=12544 max_pixels=12544" in r.stdout  # the image bounds it was trained with
    assert os.path.isfile(viz)
    model, tok = qwen.load(out)
    assert hasattr(model, "lvr_head") and model.cfg.extra["lvr_tokens"] == lvr.LVR_TOKENS
    assert model.cfg.extra["lvr_image_pixels"] == [12544, 12544]
    r = run_here("train_sft.py", *SMALL, "--data_path", str(tmp_path / "nope.json"), "--out_dir",
                 str(tmp_path / "o2"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "cannot read dataset" in r.stderr


@pytest.mark.parametrize("method,extra", [("mirage", ["--latent_loss", "cosine", "--ce_weight", "0.1",
                                                      "--latent_weight", "1.0"]), ("none", []),
                                         ("lvr", ["--latent_end", "true", "--max_latents", "2"])])
def test_other_methods_run(tmp_path, method, extra):
    out = str(tmp_path / "out")
    r = run_here("train_sft.py", *SMALL, "--max_iters", "2", "--eval_interval", "2", "--method", method,
                 *extra, "--out_dir", out)
    assert r.returncode == 0, r.stderr
    assert "held-out accuracy" in r.stdout
    extra_cfg = qwen.Qwen2_5_VL.from_pretrained(out).cfg.extra
    if method != "none":  # the mode-switch loss is on by default for LVR and Mirage
        assert losses(out)[0][2] > 0
        assert 0 < extra_cfg["latent_norm"] < 5  # cosine-trained: the targets' mean norm is recorded
    else:
        assert "latent_norm" not in extra_cfg
    if "--latent_end" in extra:  # trained the latent exit: a latent loss term for the end embedding exists,
        assert losses(out)[0][1] > 0  # and its distance and threshold are in the checkpoint's config
        assert (extra_cfg["latent_end_metric"], extra_cfg["latent_end_threshold"]) == ("cosine", 0.1)
    if method == "mirage":
        r = run_here("train_sft.py", *SMALL, "--max_iters", "2", "--eval_interval", "2", "--method",
                     "mirage", "--stage", "2", "--init_from", out, "--out_dir", str(tmp_path / "s2"),
                     "--eval_examples", "0")
        assert r.returncode == 0 and "accuracy" not in r.stdout, r.stderr  # no evaluation: checkpoints only
        assert state(str(tmp_path / "s2"))["step"] == 2


AUTO = {"latent_loss": "auto", "ce_weight": cli.Auto(float), "latent_weight": cli.Auto(float),
        "lr": cli.Auto(float), "min_lr": cli.Auto(float), "warmup_iters": cli.Auto(int), "dtype": "auto",
        "image_size": cli.Auto(int), "min_pixels": cli.Auto(int), "max_pixels": cli.Auto(int),
        "max_latents": cli.Auto(int), "max_iters": 1000, "lr_decay_iters": cli.Auto(int),
        "mirage_k": cli.Auto(int), "data_path": "synthetic", "task": "colour"}


def test_loss_defaults_follow_the_papers(monkeypatch, capsys):
    """From a real checkpoint LVR is mse with CE 1 / latent 0.1, Mirage cosine with CE 0.1 / latent
    1; the tiny scratch model keeps cosine, CE 1 / latent 0.1; a flag given explicitly wins; the
    resolved values print. The learning rate: official LVR's from a checkpoint (1e-5, cosine to 0,
    3% warmup), the tiny model's from scratch; bf16 autocast on CUDA; images: a file's within
    official LVR's bounds (Mirage's: the processor's, as official Mirage), synthetic unresized."""
    import train_sft
    for init, method, given, want in [
        ("ckpt", "lvr", {}, ("mse", 1.0, 0.1)),
        ("ckpt", "mirage", {}, ("cosine", 0.1, 1.0)),
        ("scratch", "lvr", {}, ("cosine", 1.0, 0.1)),
        ("scratch", "mirage", {}, ("cosine", 1.0, 0.1)),
        ("ckpt", "lvr", {"latent_loss": "l1", "ce_weight": 0.5}, ("l1", 0.5, 0.1)),
    ]:
        config = {**AUTO, **given}
        for k, v in {**config, "init_from": init, "method": method}.items():
            monkeypatch.setattr(train_sft, k, v)
        config.update(train_sft.resolve(config))
        assert (config["latent_loss"], config["ce_weight"], config["latent_weight"]) == want
        lrs = (1e-5, 0.0, 30) if init == "ckpt" else (1e-3, 1e-4, 50)
        assert (config["lr"], config["min_lr"], config["warmup_iters"], config["dtype"]) == (*lrs, "float32")
    given_lr = {"dtype": "float32", "max_pixels": 50000, "lr": 3e-4}
    for dev, data_path, given, want in [("cuda", "d.json", {}, ("bfloat16", 100352, 4014080)),
                                        ("cpu", "synthetic", {}, ("float32", 3136, 28224)),
                                        ("cuda", "d.json", given_lr, ("float32", 50000, 50000)),
                                        ("cpu", "d.jsonl", {"method": "mirage"},
                                         ("float32", *data.PROCESSOR_PIXELS))]:
        config = {**AUTO, "data_path": data_path, "method": "lvr", **given}
        for k, v in {**config, "init_from": "ckpt", "device": dev}.items():
            monkeypatch.setattr(train_sft, k, v)
        config.update(train_sft.resolve(config))
        assert (config["dtype"], config["min_pixels"], config["max_pixels"]) == want
        assert config["lr"] == given.get("lr", 1e-5)
    # VSP's latents: what its study chose (LVR's box pooled to 16, Mirage's k 16); elsewhere all, and k 4
    for task, data_path, want in [("vsp", "synthetic", (16, 16)), ("colour", "synthetic", (0, 4)),
                                  ("vsp", "d.jsonl", (0, 4))]:
        config = {**AUTO, "data_path": data_path, "task": task, "method": "mirage"}
        for k, v in {**config, "init_from": "scratch"}.items():
            monkeypatch.setattr(train_sft, k, v)
        config.update(train_sft.resolve(config))
        assert (config["max_latents"], config["mirage_k"]) == want
    r = run_here("train_sft.py", "--method", "mirage", "--latent_end", "true", "--ce_weight", "0.5")
    assert r.returncode == 1 and "Mirage's tokens have none" in r.stderr and "Traceback" not in r.stderr
    assert "resolved: latent_loss=cosine ce_weight=0.5 latent_weight=0.1" in r.stdout  # (printed once)


def test_ctrl_c_or_sigterm_saves_the_whole_step_and_resume_continues_the_same_loss_curve(tmp_path):
    a, b, c, d = (str(tmp_path / x) for x in "abcd")
    common = [*SMALL, "--max_iters", "6", "--eval_interval", "4"]

    def signalled(out, at, *sigs):  # the signals arrive in the at-th zero_grad (step at - 1)
        return run_signalled(tmp_path, "train_sft.py", at, 0, sigs, [*common, "--out_dir", out])
    ra = run_here("train_sft.py", *common, "--out_dir", a)
    rb = signalled(b, 2, "SIGINT")  # read at the next step's loss reduction: saved, exit
    rc = signalled(c, 2, "SIGTERM")  # a scheduler's preemption: the same, exit 143
    rd = signalled(d, 5, "SIGINT", "SIGINT")  # twice: stop at once, no save
    assert ra.returncode == 0, ra.stderr
    assert rb.returncode == 130 and "Traceback" not in rb.stderr, rb.stderr
    assert f"stopped: saved step 3 to {b}" in rb.stdout
    assert state(b)["step"] == len(losses(b)) == 3
    assert rc.returncode == 143 and state(c)["step"] == 3, rc.stderr
    assert rd.returncode == 130 and "Traceback" not in rd.stderr and "stopped" not in rd.stdout, rd.stderr
    assert state(d)["step"] == 4  # the step-4 checkpoint stays
    qwen.load(d)
    r = run_here("train_sft.py", *common, "--out_dir", b, "--resume", "true")  # the unbroken run's curve
    assert r.returncode == 0, r.stderr
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == 6 and torch.allclose(torch.tensor(la), torch.tensor(lb), rtol=1e-5,
                                                      atol=1e-6)
    assert la[0][1] > 0  # the latent loss is really trained and logged


SAVE_LOOP = """
import sys, torch
sys.path.insert(0, {root!r})
import checkpoint
model, tok = checkpoint.load({src!r})
for step in range(1, 10 ** 6):
    checkpoint.save(model, tok, {out!r}, {{"step": step}})
    print(step, flush=True)
"""


def test_a_save_killed_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    import random
    import signal
    import time
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    r = run_here("train_sft.py", *SMALL, "--max_iters", "1", "--eval_interval", "1", "--out_dir", src)
    assert r.returncode == 0, r.stderr
    rng = random.Random(0)
    last = 0
    for trial in range(12):
        p = subprocess.Popen([sys.executable, "-c", SAVE_LOOP.format(root=ROOT, src=src, out=out)],
                             stdout=subprocess.PIPE, text=True)
        if trial == 0:  # the first save must finish, so there is a checkpoint to protect
            p.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        # the previous checkpoint, where it lies, if the kill fell between the renames
        model, tok = checkpoint.load(out)
        step = checkpoint.load_train_state(out)["step"]
        assert step >= 1 and model.cfg.extra["lvr_token_ids"]
        last = step
    assert last >= 1
    # the worst moment, made by hand: a save (which first clears what the kills left) moved out aside and
    # did not rename the new one in; beside it, an older checkpoint whose deletion was killed half-way
    # (sorted first, so a careless restore would pick it)
    # (a save first puts back and clears what the kills left)
    checkpoint.save(model, tok, out, {"step": last})
    os.makedirs(tmp_path / ".tmp-out-a" / "ckpt")
    shutil.copy(os.path.join(out, "config.json"), tmp_path / ".tmp-out-a" / "ckpt")
    os.makedirs(tmp_path / ".old-out-x")
    os.rename(out, tmp_path / ".old-out-x" / "ckpt")
    os.makedirs(tmp_path / ".tmp-out-y")
    model, tok = checkpoint.load(out)
    assert checkpoint.load_train_state(out)["step"] == last
    assert not os.path.exists(out)  # a reader moves nothing: it could race the writer (or other DDP ranks)
    with pytest.raises(InputError, match="already holds a checkpoint"):  # a fresh run sees it too
        checkpoint.check_out_dir(out, fresh=True)
    leftovers = [d for d in os.listdir(tmp_path) if d.startswith(".")]
    checkpoint.save(model, tok, out, {"step": 0})  # the next save moves it back and cleans up the rest
    assert [d for d in os.listdir(tmp_path) if d.startswith(".")] == [], leftovers


def test_a_save_killed_while_deleting_the_old_checkpoint_or_failing_on_a_full_disk_leaves_it_clean(
    tmp_path, monkeypatch
):
    from helpers import tiny_model
    model, tok, _ = tiny_model(tmp_path / "src")
    out = str(tmp_path / "out")
    checkpoint.save(model, tok, out, {"step": 1})

    def killed(path, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(model, tok, out, {"step": 2})
    assert state(out)["step"] == 2
    # what is left half-deleted must not carry a name the next save would move back
    assert [d for d in os.listdir(tmp_path) if d.startswith(".old-")] == []
    monkeypatch.undo()

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(qwen, "save_file", full)  # a full disk: a one-line error, the partial copy dropped
    with pytest.raises(InputError, match="No space left on device.*is unchanged"):
        checkpoint.save(model, tok, out, {"step": 3})
    assert state(out)["step"] == 2 and [d for d in os.listdir(tmp_path) if d.startswith(".")] == []


def test_out_dir_is_never_a_directory_a_save_would_wipe(tmp_path):
    """A save replaces out_dir whole: a fresh run may not replace a checkpoint, and nothing else is
    replaced."""
    from helpers import tiny_model
    model, tok, _ = tiny_model(tmp_path / "src")
    ckpt, mine = str(tmp_path / "ckpt"), tmp_path / "mine"
    checkpoint.save(model, tok, ckpt, {"step": 7})
    os.makedirs(mine / "sub")
    (mine / "notes.txt").write_text("mine")
    scripts = {"train_sft.py": SMALL, "train_grpo.py": ["--init_from", ckpt]}
    cases = [([script, *extra, "--out_dir", out], msg) for script, extra in scripts.items()
             # a fresh run into a finished run's checkpoint
             for out, msg in ((ckpt, "already holds a checkpoint"),
                              (str(mine), "notes.txt, sub, which saving"))]
    for r, (_, msg) in zip([run_here(*argv) for argv, _ in cases], cases):
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert state(ckpt)["step"] == 7 and (mine / "notes.txt").read_text() == "mine"
    os.remove(os.path.join(ckpt, "train_state.pt"))  # a model saved without a run (the --init_from one, say)
    with pytest.raises(InputError, match="already holds a checkpoint"):
        checkpoint.check_out_dir(ckpt, fresh=True)
    checkpoint.check_out_dir(str(tmp_path / "new"), fresh=True)  # absent: fine
    with pytest.raises(InputError, match="notes.txt"):  # the save itself checks too (a file added mid-run)
        checkpoint.save(model, tok, str(mine), {"step": 1})
    assert (mine / "notes.txt").exists() and (mine / "sub").is_dir()
    with pytest.raises(InputError, match="is a file"):
        checkpoint.check_out_dir(str(mine / "notes.txt"), fresh=True)


def test_on_bad_record_skip_reports_and_goes_on(tmp_path):
    good = record([[0.1, 0.1, 0.3, 0.3]])
    path = write_dataset(tmp_path, [good, record([[0.3, 0.1, 0.3, 0.3]]), good, record([[0.1, 0.1, 0.3, 0.3]],
                                                                                       image="missing.png")])
    out = str(tmp_path / "out")
    common = [*SMALL, "--max_iters", "2", "--eval_interval", "2", "--data_path", path, "--image_root",
              str(tmp_path), "--out_dir", out]
    r = run_here("train_sft.py", *common)
    assert r.returncode == 1 and "record 1: bbox" in r.stderr and "Traceback" not in r.stderr
    r = run_here("train_sft.py", *common, "--on_bad_record", "skip")
    assert r.returncode == 0, r.stderr
    assert "step 2: training-set accuracy" in r.stdout  # no --eval_data_path: the print says what it measured
    assert "skipping" in r.stderr and "record 1: bbox" in r.stderr and "record 3: image not found" in r.stderr
    assert "skipped 2 bad records" in r.stdout and "[1, 3]" in r.stdout
    # the stream is deterministic: bad records are replaced by the next good one in the epoch's order
    skipped = {}
    convert = lambda rec, where: data.record_example(rec, str(tmp_path), where)  # noqa: E731
    records = data.load_records(path)
    a = [data.stream_example(records, i, 5, convert, "d", skipped)["bboxes"] for i in range(8)]
    b = [data.stream_example(records, i, 5, convert, "d", {})["bboxes"] for i in range(8)]
    assert a == b and sorted(skipped) == [1, 3]


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # (the untrusted file, written here)
def test_resume_after_a_kill_and_untrusted_train_state(tmp_path):
    import pickle
    import signal
    import time
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = [*SMALL, "--max_iters", "12", "--eval_interval", "2"]  # room for a late kill: steps 2..10
    r = run_here("train_sft.py", *common, "--out_dir", a)
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen(
        [sys.executable, "train_sft.py", *common, "--max_iters", "1000", "--out_dir", b],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 300
    while not os.path.exists(os.path.join(b, "train_state.pt")) and time.time() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGKILL)  # no chance to save: the last checkpoint (step 2, 4, ...) is what is left
    p.wait()
    assert state(b)["step"] < 12
    r = run_here("train_sft.py", *common, "--out_dir", b, "--resume", "true")
    assert r.returncode == 0, r.stderr
    changed = "max_iters 1000 -> 12, lr_decay_iters 1000 -> 12"  # (auto: the schedule follows max_iters)
    assert f"resuming with changed settings: {changed}\n" in r.stdout
    assert torch.allclose(torch.tensor(losses(a)), torch.tensor(losses(b)), rtol=1e-5, atol=1e-6)

    class Evil:  # a pickle that would run code when loaded
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    with open(os.path.join(b, "train_state.pt"), "wb") as f:
        pickle.dump({"step": Evil()}, f)
    r = run_here("train_sft.py", *common, "--out_dir", b, "--resume", "true")
    assert r.returncode == 1 and "cannot resume from" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "pwned")


def test_sft_compute_is_counted_and_bounds_the_run(tmp_path):
    """The run's multiply-accumulates, summed step by step from its own batches (train_sft.sft_macs, on
    qwen's count), are in train_state.pt; --max_macs stops at the step that reaches them, saved."""
    import train_sft
    out, out2 = str(tmp_path / "a"), str(tmp_path / "b")
    args = [*SMALL, "--max_iters", "3", "--eval_interval", "3", "--eval_examples", "0", "--data_workers", "0"]
    train_sft.main([*args, "--out_dir", out])
    model, tok = qwen.load(out)
    ids = lvr.find_latent_ids(model, tok)
    batches = train_sft.MicroBatches(tok, ids, None, 0, 1)
    per_step = [train_sft.sft_macs(model, batches[k][0]) for k in range(3)]
    one = model.macs(1)  # one token through the decoder layers: every layer's weights once
    assert one == sum(p.numel() for p in model.model.layers.parameters())
    tokens = int(batches[0][0]["attention_mask"].sum())  # forward and backward: 3x a forward, at least
    assert math.isclose(state(out)["macs"], sum(per_step)) and per_step[0] >= 3 * one * tokens
    train_sft.main([*args, "--out_dir", out2, "--max_macs", str(per_step[0] + per_step[1] / 2)])
    assert state(out2)["step"] == 2 and math.isclose(state(out2)["macs"], per_step[0] + per_step[1])


def test_a_run_stopped_part_way_on_its_schedule_resumes_to_the_whole_run(tmp_path):
    """--lr_decay_iters (nanoGPT's): a run of 4 steps on an 8-step schedule, resumed to 8, is the 8-step run
    (the same learning rates, losses and weights); the schedule's length is what the lr follows."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = [*SMALL, "--eval_interval", "4", "--lr_decay_iters", "8"]
    ra = run_here("train_sft.py", *common, "--max_iters", "8", "--out_dir", a)
    rb = run_here("train_sft.py", *common, "--max_iters", "4", "--out_dir", b)
    assert ra.returncode == 0 and rb.returncode == 0, ra.stderr + rb.stderr
    assert state(b)["step"] == 4
    rb = run_here("train_sft.py", *common, "--max_iters", "8", "--out_dir", b, "--resume", "true")
    assert rb.returncode == 0, rb.stderr
    lrs = [x["lr"] for x in checkpoint.read_log(a) if "lr" in x]
    assert lrs == [x["lr"] for x in checkpoint.read_log(b) if "lr" in x] and lrs[-1] < lrs[2]
    assert torch.allclose(torch.tensor(losses(a)), torch.tensor(losses(b)), rtol=1e-5, atol=1e-6)
    helpers.assert_same_weights(qwen.Qwen2_5_VL.from_pretrained(a), b)
    short = run_here("train_sft.py", *SMALL, "--eval_interval", "4", "--max_iters", "4", "--out_dir",
                     str(tmp_path / "c"))
    assert [x["lr"] for x in checkpoint.read_log(str(tmp_path / "c")) if "lr" in x] != lrs[:4]  # (auto: 4)


# The default run's first steps as they were before study v5's code (commit ad896bd), by
# `python train_sft.py --max_iters 3 --eval_interval 3 --eval_examples 0` there: its losses, and
# each saved tensor's (sum, L1 norm, L2 norm) in tests/default_run.json. Bytes differ between CPU
# kernels, so the tensors are held to tolerances measured across them (docs/tests.md): the sum
# to 1e-4 of the tensor's L1 norm (the worst seen: 1.8e-5), the L2 norm to 2e-5 relative (3.2e-6).
DEFAULT_RUN_STATS = os.path.join(os.path.dirname(__file__), "default_run.json")
SUM_TOL, NORM_TOL = 1e-4, 2e-5
# each step's (ce, latent, switch) losses
DEFAULT_RUN_LOSSES = [(6.172074317932129, 1.089306116104126, 0.6444435715675354),
                      (6.121831893920898, 1.070618748664856, 0.6505392789840698),
                      (6.018949031829834, 1.058609962463379, 0.6535705924034119)]


def tensor_stats(path):
    """A checkpoint's tensors -> {name: (sum, L1 norm, L2 norm)}, in float64."""
    w = safetensors.torch.load_file(os.path.join(path, "model.safetensors"))
    return {k: tuple(float(f(v.double())) for f in (torch.sum, lambda x: x.abs().sum(), torch.norm))
            for k, v in w.items()}


def test_the_default_run_is_the_one_before_study_v5s_code(tmp_path):
    """Refactors keep the default run: its first 3 steps give ad896bd's losses to 1e-5 and its
    tensors to the tolerances that hold across CPU kernels, on any CPU."""
    out = str(tmp_path / "out")
    r = run_here("train_sft.py", "--max_iters", "3", "--eval_interval", "3", "--eval_examples", "0",
                 "--out_dir", out)
    assert r.returncode == 0, r.stderr

    assert torch.allclose(torch.tensor(losses(out)), torch.tensor(DEFAULT_RUN_LOSSES), rtol=1e-5)
    with open(DEFAULT_RUN_STATS) as f:
        want = json.load(f)
    got = tensor_stats(out)
    assert sorted(got) == sorted(want)
    for name, (total, l1, norm) in want.items():
        assert abs(got[name][0] - total) <= SUM_TOL * l1, (name, got[name], want[name])
        assert abs(got[name][2] - norm) <= NORM_TOL * norm, (name, got[name], want[name])
