"""The explicit rivals of the latent: --method box (the bbox written as text) and --method crop (the
box, then one span fed the region it names), from the encoded row to the rollout and evaluate's
rows."""
import json
import re

import torch

import data
import evaluate as evaluation
import lvr
import qwen
import tasks
import vision
from helpers import SMALL, tiny_model
from launch import run_here

PIXELS = (3136, 336 * 336)


def search_example(i=0):
    return tasks.synthetic("train", i, 1337, task="search")


def assistant_text(tok, row):
    return tok.decode(row["input_ids"][row["n_prompt"]:], skip_special_tokens=False)


def test_box_text_is_the_bbox_in_qwen25_pixels_and_parses_back(tmp_path):
    model, tok, ids = tiny_model(tmp_path)
    ex = search_example()
    row = data.encode(ex, tok, ids, data.LatentTargets("box"), pixels=PIXELS)
    grid = row["grid_thw"]
    w, h = data.image_pixels(grid)
    assert (w, h) == (336, 336)  # the image as the processor resized it (here: as drawn)
    m = data.BOX.search(assistant_text(tok, row))
    x0, y0, x1, y1 = ex["bboxes"][0]
    assert json.loads(m.group(0)) == {"bbox_2d": [round(x0 * w), round(y0 * h), round(x1 * w),
                                                  round(y1 * h)]}
    (back,) = data.written_boxes(tok.decode(row["input_ids"][row["n_prompt"]:]), grid)
    assert max(abs(a - b) for a, b in zip(back, ex["bboxes"][0])) <= 0.5 / w  # (pixel rounding)
    assert assistant_text(tok, row).endswith("\n" + ex["answer"] + "<|im_end|>")

    # CE on the box and the answer, no latent slot; a resized image gets its own pixels
    assert not row["latent_pos"] and ids.start not in row["input_ids"]
    assert all(t != -100 for t in row["labels"][row["n_prompt"]:])
    small = data.encode(ex, tok, ids, data.LatentTargets("box"), pixels=(3136, 168 * 168))
    assert data.BOX.search(assistant_text(tok, small)).group(0) == data.box_text(
        ex["bboxes"][0], small["grid_thw"])
    assert data.image_pixels(small["grid_thw"]) == (168, 168)


def test_crop_span_reads_exactly_the_true_region_in_training(tmp_path):
    model, tok, ids = tiny_model(tmp_path)
    model.cfg.extra["latent_targets"] = {"method": "crop", "max_latents": 0, "k": 4}
    ex = tasks.synthetic("train", 3, 1337, task="hops", hops=2)  # three looks: three boxes, three spans
    row = data.encode(ex, tok, ids, data.LatentTargets("crop"), pixels=(3136, 168 * 168))
    text = assistant_text(tok, row)
    assert text.count('{"bbox_2d"') == 3 and text.count("<|lvr_start|>") == 3
    assert text.index('{"bbox_2d"') < text.index("<|lvr_start|>")  # each box, then its span
    grid = row["grid_thw"][0]
    want = [j for bb in ex["bboxes"] for j in lvr.roi_indices(bb, grid)]  # every ROI token, in order
    assert [g for gs in row["latent_groups"] for g in gs] == want
    assert all(row["labels"][t] == -100 for t in row["latent_pos"])

    batch = data.collate([row], tok.endoftext)
    seen = {}
    forward = model.forward

    def spy(*args, **kw):
        seen["x"] = kw["inputs_embeds"]
        return forward(*args, **kw)

    model.forward = spy
    with torch.no_grad():
        loss, ce, lat, switch = lvr.sft_loss(model, batch, lvr.LossTerms())
        feats = model.visual(batch["pixel_values"], batch["grid_thw"])
    b, t = batch["latent_pos"]
    assert torch.allclose(seen["x"][b, t], feats[want], atol=1e-6)  # the true region, token by token
    assert float(lat) == 0.0 and torch.allclose(loss, ce)  # nothing to reconstruct: CE alone


def crop_setup(tmp_path):
    """A tiny crop model, three search prompts that end in a written box (one that does not parse),
    and the start logit raised so that each row opens its span at once."""
    model, tok, ids = tiny_model(tmp_path)
    model.cfg.extra["latent_targets"] = {"method": "crop", "max_latents": 0, "k": 4}
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.cfg.vocab_size))
    with torch.no_grad():
        model.lm_head.bias[ids.start] = 1e3
    exs = [search_example(i) for i in range(3)]
    images = [[vision.preprocess(e["images"][0], *PIXELS)] for e in exs]
    grids = [ims[0][1] for ims in images]
    boxes = [data.box_text(exs[0]["bboxes"][0], grids[0]),
             data.box_text([0.5, 0.25, 0.75, 0.5], grids[1]),
             '{"bbox_2d": [10, 20, 30']  # (does not parse)
    prompts = [tok.prompt(e["question"], [vision.merged_tokens(g)]) + tok.encode(bx)
               for e, g, bx in zip(exs, grids, boxes)]
    with torch.no_grad():
        feats = [model.visual(pv, g) for pv, g in (ims[0] for ims in images)]
    crop = evaluation.region_reader(tok, ids, exs, list(zip(images, feats)), max_latents=0)
    return model, tok, ids, exs, images, feats, prompts, crop


def test_a_written_box_is_parsed_and_fed_its_region_in_both_rollouts(tmp_path):
    model, tok, ids, exs, images, feats, prompts, crop = crop_setup(tmp_path)
    decode = lvr.Decode("steps", lvr_steps=8, max_latent_steps=16, max_new_tokens=12)
    grid = images[0][0][1]
    true = lvr.roi_indices(exs[0]["bboxes"][0], grid[0])
    half = lvr.roi_indices([0.5, 0.25, 0.75, 0.5], grid[0])
    ones = []
    with torch.no_grad():
        for b, p in enumerate(prompts):
            one_crop = (lambda b: lambda _, tokens: crop(b, tokens))(b)
            seq, latents = lvr.rollout_one(model, ids, p, images[b][0][0], images[b][0][1], decode,
                                           stop_ids=[-1], crop=one_crop)
            ones.append((seq[len(p):], latents))
    # row 0 reads its true region, row 1 the box it wrote, row 2 (no box) none: its span ends at once
    assert torch.allclose(torch.stack(ones[0][1]), feats[0][true], atol=1e-6)
    assert torch.allclose(torch.stack(ones[1][1]), feats[1][half], atol=1e-6)
    assert ones[2][1] == [] and ones[2][0][:2] == [ids.start, ids.end]
    first = ones[0][0]
    assert first[:len(true) + 2] == [ids.start] + [ids.latent] * len(true) + [ids.end]
    # a second span opens at once (the raised logit), its text since the last span holds no box
    assert first[len(true) + 2:len(true) + 4] == [ids.start, ids.end]

    input_ids, mask = qwen.left_pad(prompts, tok.endoftext)
    with torch.no_grad():
        feat_all = torch.cat(feats)
        r = lvr.rollout(model, ids, lvr.Prompt(input_ids, mask, grid_thw=torch.cat(
            [ims[0][1] for ims in images]), feats=feat_all), decode=decode,
            sampling=lvr.Sampling(stop_ids=[-1]), crop=crop)
    for b, (seq, latents) in enumerate(ones):
        assert r.tokens[b, input_ids.shape[1]:].tolist() == seq
        fed = r.latents[b, r.is_latent[b]]
        assert len(fed) == len(latents)
        if latents:
            assert torch.allclose(fed, torch.stack(latents), atol=1e-5)


def test_a_box_that_does_not_parse_is_a_format_failure():
    grid = torch.tensor([[1, 24, 24]])  # 336 px
    stop = [7]
    e = {"bboxes": [[0.25, 0.25, 0.5, 0.5]], "answer": "red"}
    good = evaluation.score_boxes(e, [1, 7], '{"bbox_2d": [84, 84, 168, 168]}\nred', [grid], stop)
    assert good.right and good.format and good.hits == 1 and good.iou == [1.0]
    for text in ('{"bbox_2d": [84, 84, 168\nred',  # cut off
                 '{"bbox_2d": [84, 84, "x", 168]}\nred',  # not numbers
                 '{"bbox_2d": [500, 500, 600, 600]}\nred',  # clipped to nothing: outside the image
                 'red'):  # no box at all
        bad = evaluation.score_boxes(e, [1, 7], text, [grid], stop)
        assert not bad.format, text
        assert bad.looks == 0 and bad.iou == []
    # a box partly outside is clipped to the image
    assert data.written_boxes('{"bbox_2d": [-10, 168, 400, 336]}', grid) == [[0.0, 0.5, 1.0, 1.0]]
    # a crop completion must open one span per box
    two = evaluation.score_boxes(e, [1, 7], '{"bbox_2d": [84, 84, 168, 168]}\nred', [grid], stop,
                                 crop_ids=lvr.LatentIds(start=1, latent=2, end=3))
    assert two.format
    assert not evaluation.score_boxes(e, [5, 7], '{"bbox_2d": [84, 84, 168, 168]}\nred', [grid],
                                      stop, crop_ids=lvr.LatentIds(start=1, latent=2, end=3)).format
    # half the box: IoU 0.5, centre inside
    half = evaluation.score_boxes(e, [1, 7], '{"bbox_2d": [84, 84, 126, 168]}\nred', [grid], stop)
    assert abs(half.iou[0] - 0.5) < 1e-9 and half.hits == 1


def test_box_rows_value_and_produced_from_known_rows():
    def rows(own, swapped, oracle):
        return {"with own boxes": {"accuracy": own}, "swapped boxes": {"accuracy": swapped},
                "oracle boxes": {"accuracy": oracle}}

    c = evaluation.conditions(rows(0.5, 0.1, 0.9))
    assert abs(c.value - 0.8) < 1e-9 and abs(c.produced - 0.5) < 1e-9 and c.base == "swapped"
    assert c.lines() == ["target value: oracle - swapped = +0.800",
                         "produced: (own - swapped) / (oracle - swapped) = 0.500"]
    assert evaluation.conditions(rows(0.3, 0.29, 0.3)).produced is None  # value under MIN_VALUE


def test_box_and_crop_train_and_evaluate_with_their_rows(tmp_path):
    for method in ("box", "crop"):
        out = str(tmp_path / method)
        r = run_here("train_sft.py", *SMALL, "--task", "hops", "--hops", "3", "--method", method,
                     "--max_iters", "2", "--eval_interval", "2", "--out_dir", out)
        assert r.returncode == 0, r.stderr
        r = run_here("evaluate.py", "--init_from", out, "--task", "hops", "--hops", "3",
                     "--image_size", "112", "--n_examples", "4", "--max_new_tokens", "40")
        assert r.returncode == 0, r.stderr
        for name in ("with own boxes", "oracle boxes", "swapped boxes"):
            assert re.search(rf"^{name}\s+[\d.]+\s+[\d.]+", r.stdout, re.M), r.stdout
        assert "target value: oracle - swapped = " in r.stdout and "\nproduced: " in r.stdout
        assert "decoding=" + ("steps" if method == "crop" else "token") in r.stdout  # (crop: by count)
        tasks.synthetic_example(0, 112)["images"][0].save(tmp_path / "a.png")
        r = run_here("sample.py", "--init_from", out, "--image", str(tmp_path / "a.png"), "--q",
                     "What colour is the circle?", "--max_new_tokens", "40")
        assert r.returncode == 0 and "latent steps: " in r.stdout, r.stderr


def test_box_trains_on_an_lvr_json_file(tmp_path):
    recs = []
    for i in range(2):
        ex = tasks.synthetic_example(i, 112)
        ex["images"][0].save(tmp_path / f"{i}.png")
        recs.append({"image": f"{i}.png", "bboxes": [[v * 112 for v in ex["bboxes"][0]]],
                     "conversations": [{"from": "human", "value": "<image>\n" + ex["question"]},
                                       {"from": "gpt", "value": "<lvr>\n" + ex["answer"]}]})
    path = tmp_path / "x.json"
    path.write_text(json.dumps(recs))
    r = run_here("train_sft.py", *SMALL, "--method", "box", "--data_path", str(path),
                 "--image_root", str(tmp_path), "--max_iters", "2", "--eval_interval", "2",
                 "--out_dir", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "held-out accuracy" in r.stdout or "training-set accuracy" in r.stdout


def test_grpo_on_box_and_crop_scores_the_answer_after_the_box():
    """The box rewards: the answer after the last box; the format every box parsed (crop: one span
    each)."""
    import grpo
    grid = torch.tensor([[1, 24, 24]])
    ids = lvr.LatentIds(start=1, latent=2, end=3)
    text = '{"bbox_2d": [84, 84, 168, 168]}\nred'
    box, crop = grpo.box_rewards(grid), grpo.box_rewards(grid, crop=True)
    assert box["accuracy"](text, [5, 7], "red", ids, [7]) == 1.0
    assert box["accuracy"]('{"bbox_2d": [84, 84, 168, 168]}\nblue', [5, 7], "red", ids, [7]) == 0
    assert box["format"](text, [5, 7], "red", ids, [7]) == 1.0
    assert box["format"]('{"bbox_2d": [84, 84\nred', [5, 7], "red", ids, [7]) == 0.0
    assert crop["format"](text, [5, 7], "red", ids, [7]) == 0.0  # no span opened
    assert crop["format"](text, [5, 1, 2, 3, 7], "red", ids, [7]) == 1.0
    assert set(box) == set(grpo.REWARDS)


def test_grpo_trains_box_and_crop_checkpoints(tmp_path):
    for method in ("box", "crop"):
        out = str(tmp_path / method)
        r = run_here("train_sft.py", *SMALL, "--task", "relation", "--method", method, "--max_iters",
                     "2", "--eval_interval", "2", "--eval_examples", "0", "--out_dir", out)
        assert r.returncode == 0, r.stderr
        r = run_here("train_grpo.py", "--init_from", out, "--batch_size", "2", "--group_size", "2",
                     "--max_iters", "1", "--max_new_tokens", "40", "--out_dir", out + "_grpo")
        assert r.returncode == 0, r.stderr
        assert "task=relation(checkpoint)" in r.stdout and "step 1:" in r.stdout, r.stdout


def test_a_forced_box_is_the_training_rows_box_tokens(tmp_path):
    """The oracle and swapped rows of --method box open the answer with the boxes' text: exactly
    the tokens training put before the answer, for one box (search) and four (hops K = 3)."""
    _, tok, ids = tiny_model(tmp_path)
    for task, hops, side in [("search", 1, 336), ("hops", 3, 168)]:
        ex = tasks.synthetic("test", 0, 1337, task=task, hops=hops)
        pixels = (3136, side * side)
        row = data.encode(ex, tok, ids, data.LatentTargets("box"), pixels=pixels)
        grids = [vision.preprocess(ex["images"][0], *pixels)[1]]
        forced = evaluation.box_prefix(tok, ex, grids, ex["bboxes"])
        turn = row["input_ids"][row["n_prompt"]:]
        assert turn[:len(forced)] == forced
        assert tok.decode(turn[len(forced):]) == ex["answer"]  # (then the answer, and its end)


def test_the_forced_boxes_grid_is_the_one_preprocess_makes():
    """vision.grid_of (evaluate's forced boxes, without resampling the image) gives preprocess's
    grid, at the bounds of a synthetic task, the processor's and official LVR's."""
    for ex in (search_example(), tasks.synthetic("test", 0, 1337, task="vsp")):
        for pixels in ((3136, 336 * 336), (3136, 12845056), (100352, 4014080)):
            im = ex["images"][0]
            assert torch.equal(vision.grid_of(im, *pixels), vision.preprocess(im, *pixels)[1])
