"""Seeded fuzzing of the dataset loader and the image preprocessor: every case ends in a valid
example or a one-line InputError, never another exception or a hang."""
import json
import random

import torch

import data
import vision
from helpers import photo
from cli import InputError

TURNS = [{"from": "human", "value": "<image>\nq?"}, {"from": "gpt", "value": "<lvr>\nred"}]
VALUES = [None, 0, -1, 1.5, 1e30, float("nan"), "", "a.png", "../a.png", "x" * 300, [], {},
          [0.1, 0.1, 0.5, 0.5], [0, 0, 1], [[0.1, 0.1, 0.5, 0.5]], [["a", 1, 2, 3]], [[5, 5, 60, 60]],
          [[2, 2, 1, 1]], True, TURNS,
          [{"from": "human", "value": 3}], [{"value": "<image>"}, {"value": "<lvr><lvr>"}], "<lvr>"]
KEYS = ["image", "conversations", "bboxes", "question", "answer", "image_input", "image_output", "text_input",
        "text_output"]


def random_record(rng):
    rec = {k: rng.choice(VALUES) for k in rng.sample(KEYS, rng.randint(0, len(KEYS)))}
    if rng.random() < 0.5:  # often a nearly valid record, so the deeper checks run too
        rec = {"image": "a.png", "bboxes": [[0.1, 0.1, 0.5, 0.5]],
               "conversations": TURNS,
               **rec}
    return rec


def test_fuzz_dataset_records(tmp_path):
    photo(64, 48).save(tmp_path / "a.png")
    rng = random.Random(0)
    ok = bad = 0
    for i in range(400):
        rec = random_record(rng)
        for convert in (data.record_example, data.grpo_example):
            try:
                ex = convert(rec, str(tmp_path), f"record {i}")
                assert ex["images"] and isinstance(ex["question"], str)
                ok += 1
            except InputError as e:
                assert "\n" not in str(e) and f"record {i}" in str(e), str(e)
                bad += 1
    assert ok > 20 and bad > 100


def test_fuzz_dataset_files(tmp_path):
    rng = random.Random(1)
    for i in range(100):
        path = tmp_path / f"d{i}.jsonl"
        kind = i % 3
        if kind == 0:
            path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        elif kind == 1:
            path.write_text(json.dumps([random_record(rng) for _ in range(3)])[:rng.randrange(1, 400)])
        else:
            path.write_text(rng.choice(["", "[]", "{}", "3", "null", '["a"]', "\n\n", '{"a": 1}\n[1]']))
        try:
            records = data.load_records(str(path))
            assert records and all(isinstance(r, dict) for r in records)
        except InputError as e:
            assert str(path) in str(e) and "\n" not in str(e)


def test_fuzz_images(tmp_path):
    rng = random.Random(2)
    photo(40, 30).save(tmp_path / "ok.png")
    good = (tmp_path / "ok.png").read_bytes()
    for i in range(150):
        path = tmp_path / f"im{i}"
        kind = i % 3
        if kind == 0:  # random bytes
            blob = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 500)))
        elif kind == 1:  # a real PNG, truncated
            blob = good[:rng.randrange(0, len(good))]
        else:  # a real PNG with flipped bytes
            b = bytearray(good)
            for _ in range(rng.randint(1, 20)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            blob = bytes(b)
        path.write_bytes(blob)
        try:
            pv, grid = vision.preprocess(str(path))
            assert pv.shape[0] == int(grid.prod()) and torch.isfinite(pv).all()
        except InputError as e:
            assert "\n" not in str(e)
