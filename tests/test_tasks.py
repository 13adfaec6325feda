"""The synthetic tasks: each bbox covers the object the question names, the helper image is what it claims
to be, and --task reaches every script."""
import re

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import data
import tasks
from test_lvr import tiny_model
from test_train import SMALL, run_all

SEEDS = range(12)


def crop(img, bbox):
    w, h = img.size
    return np.asarray(img.crop((round(bbox[0] * w), round(bbox[1] * h), round(bbox[2] * w), round(bbox[3] * h))))


def drawn(shape, colour, bbox, size):
    """The named object alone, drawn where its bbox says: what the image must hold there."""
    img = Image.new("RGB", (size, size), (235, 235, 235))
    tasks.draw_shape(ImageDraw.Draw(img), shape, [round(v * size) for v in bbox], tasks.COLOURS[colour])
    return crop(img, bbox)


@pytest.mark.parametrize("task", ["colour", "search"])
def test_the_bbox_holds_the_named_shape_in_the_answer_colour(task):
    for s in SEEDS:
        e = tasks.synthetic("train", s, 1, task=task)
        shape = re.match(r"What colour is the (\w+)\?", e["question"]).group(1)
        size = e["images"][0].size[0]
        assert size == tasks.TASKS[task][1] and len(e["bboxes"]) == 1
        assert np.array_equal(crop(e["images"][0], e["bboxes"][0]), drawn(shape, e["answer"], e["bboxes"][0], size))
    e = tasks.synthetic("train", 0, 1, task="search")
    colours = [tuple(c) for c in np.asarray(e["images"][0]).reshape(-1, 3)]
    counts = {k: sum(np.array_equal(c, v) for c in colours[::7]) for k, v in tasks.COLOURS.items()}
    assert e["images"][0].size == (336, 336) and min(counts.values()) > 0  # every colour worn: no colour prior


def test_relation_bboxes_are_the_anchor_then_its_neighbour(tmp_path):
    for s in SEEDS:
        e = tasks.synthetic("train", s, 1, task="relation")
        where, colour, shape = re.match(r"What colour is the shape (right of|left of|above|below) the (\w+) (\w+)\?",
                                        e["question"]).groups()
        anchor, target = e["bboxes"]
        assert np.array_equal(crop(e["images"][0], anchor), drawn(shape, colour, anchor, 168))
        dx, dy = round((target[0] - anchor[0]) * 6), round((target[1] - anchor[1]) * 6)
        assert (dx, dy) == {"right of": (1, 0), "left of": (-1, 0), "above": (0, -1), "below": (0, 1)}[where]
        pixels = crop(e["images"][0], target).reshape(-1, 3)
        assert (pixels == tasks.COLOURS[e["answer"]]).all(1).any()  # the target wears the answer's colour
        assert e["assistant"].count("<lvr>") == 2
    model, tok, ids = tiny_model(tmp_path)
    lvr_rows = data.encode(e, tok, ids, "lvr", max_pixels=28224)
    mirage_rows = data.encode(e, tok, ids, "mirage", k=3, max_pixels=28224)
    assert lvr_rows["latent_slot"] == [0, 0] and mirage_rows["latent_slot"] == [0, 1, 2]  # two looks; one imagining


def test_imagine_bbox_is_where_the_moves_end_and_the_helper_draws_the_path():
    for s in SEEDS:
        e = tasks.synthetic("train", s, 1, task="imagine")
        img, helper = np.asarray(e["images"][0]), np.asarray(e["helper"]).astype(int)
        plain = np.asarray(e["images"][0].resize((112, 112), Image.BICUBIC)).astype(int)  # the image, as the helper

        def darker(y, x):  # the helper drew black at (y, x) of the 168-px grid, where the image has none
            y, x = y * 2 // 3, x * 2 // 3
            return helper[y, x].sum() < plain[y, x].sum() - 150
        dot = np.argwhere((img == 0).all(-1)).mean(0)  # the black dot: the start cell
        r, c = int(dot[0] // 28), int(dot[1] // 28)
        for m in re.match(r"Start at the dot and move (.*)\. What", e["question"]).group(1).split(", "):
            (pr, pc), (r, c) = (r, c), (r + {"up": -1, "down": 1}.get(m, 0), c + {"left": -1, "right": 1}.get(m, 0))
        x0, y0 = round(e["bboxes"][0][0] * 168), round(e["bboxes"][0][1] * 168)
        assert (y0 // 28, x0 // 28) == (r, c)  # the bbox is the cell where the moves end
        assert (img[y0 + 2, x0 + 2] == tasks.COLOURS[e["answer"]]).all()  # and the answer is its colour
        # the helper image is the imagined state: the end cell framed and the path drawn, on the same grid
        assert darker(r * 28 + 1, c * 28 + 14) and darker(r * 28 + 14, c * 28 + 1)  # the end cell framed,
        assert darker((r + pr) * 14 + 14, (c + pc) * 14 + 14)  # the path, on its last move into that cell
        assert helper.shape == (112, 112, 3) and np.abs(helper - plain).mean() < 40  # the same grid otherwise


def test_task_reaches_every_script(tmp_path):
    out = str(tmp_path / "out")
    r, = run_all(["train_sft.py", *SMALL, "--task", "relation", "--max_iters", "2", "--eval_interval", "2",
                  "--out_dir", out])
    assert r.returncode == 0 and "held-out accuracy" in r.stdout, r.stderr
    small = ["--image_size", "168", "--max_pixels", "28224"]
    ev, gr = run_all(
        ["eval.py", "--init_from", out, "--task", "search", "--n_examples", "4", *small, "--max_new_tokens", "6"],
        [
            "train_grpo.py",
            "--init_from",
            out,
            "--task",
            "imagine",
            "--batch_size",
            "2",
            "--group_size",
            "2",
            "--max_iters",
            "1",
            "--max_new_tokens",
            "6",
            "--out_dir",
            str(tmp_path / "g"),
        ],
    )
    assert ev.returncode == 0 and "with latents" in ev.stdout, ev.stderr
    assert gr.returncode == 0 and "step 1:" in gr.stdout, gr.stderr
    saved = torch.load(str(tmp_path / "g" / "train_state.pt"), weights_only=True)["config"]
    assert (saved["image_size"], saved["max_pixels"]) == (168, 28224)  # 0: imagine's own side, unresized


def test_no_example_is_drawn_by_two_seeds_or_two_splits(monkeypatch):
    """The study's seeds (0 to 5) draw a run's stream and more (the first and last of each seed's block, and
    examples on the way): every id drawn is drawn by one (split, seed) alone; past the block is an error."""
    seen = {}

    def record(example_id, size):
        seen.setdefault(example_id, set()).add(owner)
        return example_id
    monkeypatch.setitem(tasks.TASKS, "colour", (record, 168))
    for split in tasks.SPLITS:
        for seed in [*range(6), 1337]:
            owner = (split, seed)
            for i in [*range(0, 40_000, 7), tasks.STREAM - 1]:
                tasks.synthetic(split, i, seed)
    assert all(len(owners) == 1 for owners in seen.values())
    assert len({o for owners in seen.values() for o in owners}) == len(tasks.SPLITS) * 7
    with pytest.raises(Exception, match="draws examples 0 to 999999"):
        tasks.synthetic("train", tasks.STREAM, 0)
    a, b = tasks.synthetic_example(tasks.example_id("train", 0, 1)), tasks.synthetic_example(
        tasks.example_id("train", 0, 2))  # (the real drawing: neighbouring seeds differ)
    assert not np.array_equal(np.asarray(a["images"][0]), np.asarray(b["images"][0]))
