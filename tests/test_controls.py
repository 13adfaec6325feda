"""The controls: pause tokens (the slots read one learned vector) and LIVR's bottleneck (the answer sees the
image only through the slots); and VSP's maps split by identity."""
import random
import re

import pytest
import torch

import data
import lvr
import qwen
import tasks
import vision
from helpers import tiny_model
from launch import run_here

PIXELS = (3136, 50176)


def pause_model(tmp_path, count=3):
    model, tok, ids = tiny_model(tmp_path)
    model.cfg.extra["latent_targets"] = {"method": "pause", "max_latents": count, "k": 4, "vsp": ""}
    return model, tok, ids


def two_examples():
    """Two examples of different lengths (so the batch pads), the second with two spans."""
    exs = [tasks.synthetic_example(s) for s in (1, 2)]
    exs[1].update(assistant="<lvr> then <lvr>\nred", bboxes=[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.7, 0.7]])
    return exs


def layer_input(model, batch, fn):
    """fn(model, batch), recording what the first decoder layer reads -> (its input (B, T, C), fn's value)."""
    seen = []
    hook = model.model.layers[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        out = fn(model, batch)
    finally:
        hook.remove()
    return seen[0], out


def test_pause_slots_read_one_learned_vector_and_no_target(tmp_path):
    model, tok, ids = pause_model(tmp_path)
    spans = data.LatentTargets("pause", max_latents=3)
    enc = [data.encode(e, tok, ids, spans, pixels=PIXELS) for e in two_examples()]
    assert [len(e["latent_pos"]) for e in enc] == [3, 6]  # a fixed count a span, whatever the ROI
    assert enc[1]["latent_slot"] == [0, 1, 2, 0, 1, 2]
    batch = data.collate(enc, tok.endoftext)
    x, (loss, ce, lat, switch) = layer_input(model, batch,
                                             lambda m, b: lvr.sft_loss(m, b, lvr.LossTerms(switch=0.0)))
    b, t = batch["latent_pos"]
    emb = model.model.embed_tokens.weight[ids.latent].detach()
    assert torch.equal(x[b, t], emb.expand(len(b), -1))  # every slot: the <|lvr|> row
    assert float(lat) == 0.0 and torch.equal(loss, ce)
    loss.backward()
    grad = model.model.embed_tokens.weight.grad
    assert float(grad[ids.latent].abs().sum()) > 0  # the pause vector learns
    # no latent target reaches the loss: other targets (the image under the ROI) give the same loss
    model.zero_grad()
    batch["target_avg"] = torch.rand_like(batch["target_avg"])
    assert torch.equal(lvr.sft_loss(model, batch, lvr.LossTerms(switch=0.0))[0], loss.detach())


def test_pause_rollout_feeds_the_vector_and_ends_spans_by_count(tmp_path):
    model, tok, ids = pause_model(tmp_path, count=3)
    decoding, steps = lvr.span_count(model.cfg, "auto", None)
    assert (decoding, steps) == ("steps", 3)
    exs = two_examples()
    p = data.prompt_batch(exs, tok, *PIXELS)
    prompt = lvr.Prompt(p["input_ids"], p["attention_mask"], p["pixel_values"], p["grid_thw"])
    start = torch.full((2, 1), ids.start)  # (every row opens a span at once)
    prompt.input_ids = torch.cat([prompt.input_ids, start], 1)
    prompt.attention_mask = torch.cat([prompt.attention_mask, torch.ones_like(start)], 1)
    r = lvr.rollout(model, ids, prompt, lvr.Decode(decoding, steps, max_new_tokens=12))
    emb = model.model.embed_tokens.weight[ids.latent]
    assert r.is_latent[:, :3].all() and not r.is_latent[:, 3].any()  # three latents, then <|lvr_end|>
    assert (r.tokens[:, prompt.input_ids.shape[1] + 3] == ids.end).all()
    assert torch.equal(r.latents[r.is_latent], emb.expand(int(r.is_latent.sum()), -1))


def slow_bottleneck_mask(valid, blind, image):
    """The mask by hand, one (query, key) at a time: causal, no padding key, a blind query no image key;
    every query sees itself."""
    B, T = valid.shape
    mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for q in range(T):
            for k in range(T):
                seen = k <= q and bool(valid[b, k]) and not (bool(blind[b, q]) and bool(image[b, k]))
                mask[b, 0, q, k] = seen or k == q
    return mask


def bottleneck_batch(tmp_path):
    """A left-padded LVR batch of two rows: row 0 has two images and two spans, row 1 one image."""
    model, tok, ids = tiny_model(tmp_path)
    exs = two_examples()
    exs[1]["images"] = exs[1]["images"] + [tasks.synthetic_example(3, 112)["images"][0]]
    exs[1]["bbox_images"] = [0, 1]
    enc = [data.encode(e, tok, ids, data.LatentTargets("lvr"), pixels=PIXELS) for e in exs]
    batch = data.collate(enc[::-1], tok.endoftext)  # (the two-image row first)
    for k in ("input_ids", "labels", "attention_mask"):  # right padding -> left padding
        lengths = batch["attention_mask"].sum(1)
        pad = batch[k].shape[1] - lengths
        batch[k] = torch.stack([row.roll(int(n)) for row, n in zip(batch[k], pad)])
    b, t = batch["latent_pos"]
    batch["latent_pos"] = torch.stack([b, t + pad[b]])
    batch["latent_end_pos"] = batch["latent_end_pos"].new_zeros(2, 0)
    assert int(pad.max()) > 0 and (batch["grid_thw"].shape[0] == 3) and (b == 0).sum() >= 2
    return model, batch


def test_bottleneck_mask_equals_the_slow_reference(tmp_path):
    model, batch = bottleneck_batch(tmp_path)
    ids, valid = batch["input_ids"], batch["attention_mask"].bool()
    blind = lvr.blind_positions(batch, model.cfg.image_token_id)
    image = ids == model.cfg.image_token_id
    b, t = batch["latent_pos"]
    assert not blind[b, t].any() and not blind[image].any() and blind[valid & ~image].sum() > len(b)
    fast = qwen.causal_mask(valid, 0, ids.shape[1], "cpu", lvr.bottleneck_attend(blind, image))
    assert torch.equal(fast, slow_bottleneck_mask(valid, blind, image))
    assert torch.equal(qwen.causal_mask(valid, 0, ids.shape[1], "cpu"),
                       slow_bottleneck_mask(valid, torch.zeros_like(blind), image))


def text_logits(model, batch, blind, pixel_values):
    """Every real text position's logits (not the image's), the slots fed their targets."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    x = model.embed(ids, pixel_values, batch["grid_thw"])
    b, t = batch["latent_pos"]
    x = x.index_put((b, t), torch.randn(len(b), x.shape[-1], generator=torch.Generator().manual_seed(0)))
    pos = qwen.get_rope_index(ids, batch["grid_thw"], mask, model.cfg.image_token_id)
    image = ids == model.cfg.image_token_id
    h = model(ids, inputs_embeds=x, attention_mask=mask, position_ids=pos,
              attend=lvr.bottleneck_attend(blind, image))
    text = mask.bool() & (ids != model.cfg.image_token_id)
    return model.lm_head(h[text])


@torch.no_grad()
def test_under_the_bottleneck_the_answer_reads_the_image_only_through_the_slots(tmp_path):
    model, batch = bottleneck_batch(tmp_path)
    other = batch["pixel_values"].flip(0)  # other pixels, the same grids
    blind = lvr.blind_positions(batch, model.cfg.image_token_id)
    b, t = batch["latent_pos"]
    all_blind = blind.index_put((b, t), torch.tensor(True))  # the slots masked from the image as well
    same = text_logits(model, batch, all_blind, batch["pixel_values"])
    assert torch.equal(same, text_logits(model, batch, all_blind, other))
    moved = text_logits(model, batch, blind, batch["pixel_values"])
    assert (moved - text_logits(model, batch, blind, other)).abs().max() > 1e-3


@pytest.mark.parametrize("level", [3, 4, 5, 6])
def test_vsp_splits_share_no_map(level):
    splits = {}
    for split in ("train", "grpo", "eval", "test"):
        rng = random.Random(level)
        maps = {tuple(map(tuple, tasks.vsp_map(rng, level, split))) for _ in range(300)}
        splits[split] = maps
        assert all(tasks.map_split(m) == ("train" if split == "grpo" else split) for m in maps)
    assert not splits["train"] & splits["test"] and not splits["train"] & splits["eval"]
    assert not splits["eval"] & splits["test"] and not splits["grpo"] & (splits["test"] | splits["eval"])
    assert len(splits["test"]) > 50  # (the held-out splits are real sets of maps, not a handful)


def test_the_controls_reach_every_script(tmp_path):
    """train_sft --method pause with and without --bottleneck (VSP, search), then evaluate.py's rows
    and a GRPO step on it; evaluate.py says how many of its maps the built-in task trains on (none
    of the test split's)."""
    out, livr = str(tmp_path / "pause"), str(tmp_path / "livr")
    small = ["--batch_size", "2", "--eval_examples", "2", "--warmup_iters", "1", "--max_iters", "2",
             "--eval_interval", "2"]
    r = run_here("train_sft.py", *small, "--task", "search", "--image_size", "168", "--method", "pause",
                 "--out_dir", out)
    assert r.returncode == 0 and "max_latents=1" in r.stdout and "held-out accuracy" in r.stdout, r.stderr
    r = run_here("train_sft.py", *small, "--task", "vsp", "--method", "pause", "--bottleneck", "true",
                 "--max_latents", "2", "--out_dir", livr)
    assert r.returncode == 0 and "held-out accuracy" in r.stdout, r.stderr
    ev = run_here("evaluate.py", "--init_from", livr, "--task", "vsp", "--n_examples", "3",
                  "--max_new_tokens", "6")
    assert ev.returncode == 0 and "decoding=steps lvr_steps=2" in ev.stdout, ev.stderr
    rows = re.findall(r"^(with latents|latents disabled|dummy latents|oracle latents) ", ev.stdout, re.M)
    assert rows == ["with latents", "latents disabled"], ev.stdout  # (the rows that apply to a pause model)
    assert "VSP maps: 0 of 3 are maps the built-in task trains on" in ev.stdout
    gr = run_here("train_grpo.py", "--init_from", livr, "--task", "vsp", "--batch_size", "2", "--group_size",
                  "2", "--max_iters", "1", "--max_new_tokens", "6", "--out_dir", str(tmp_path / "g"))
    assert gr.returncode == 0 and "decoding=steps lvr_steps=2" in gr.stdout, gr.stderr
    bad = run_here("train_sft.py", "--method", "none", "--bottleneck", "true", "--out_dir",
                   str(tmp_path / "x"))
    assert bad.returncode == 1 and "--bottleneck true needs latent slots" in bad.stderr


def test_the_bottleneck_trains_its_share_of_the_steps_then_normal_attention(monkeypatch):
    """--bottleneck_share of max_iters under the mask, the first steps; the run ends with normal attention."""
    import train_sft
    seen = []
    monkeypatch.setattr(lvr, "sft_loss", lambda *a, bottleneck, **k: seen.append(bottleneck))
    monkeypatch.setattr(train_sft, "method", "pause")
    for on, share, iters in [(True, 0.5, 10), (True, 0.3, 7), (False, 0.5, 4)]:
        monkeypatch.setattr(train_sft, "bottleneck", on)
        monkeypatch.setattr(train_sft, "bottleneck_share", share)
        monkeypatch.setattr(train_sft, "max_iters", iters)
        monkeypatch.setattr(train_sft, "lr_decay_iters", iters)  # (what resolve makes of auto)
        seen.clear()
        for step in range(iters):
            train_sft.loss_of(None, {}, step < train_sft.blinded_steps(), lvr.LossTerms(), stage=1,
                              freeze_vision=True)
        assert seen == [i < round(share * iters) for i in range(iters)] if on else not any(seen)


@torch.no_grad()
def test_the_rollout_under_the_bottleneck_is_the_masked_forward(tmp_path):
    """Decode(bottleneck=True): the cached rollout's latents and greedy tokens are those of one forward over
    its output with the training mask (lvr.blind_positions); with no latent step, other pixels leave the
    completion unchanged (the answer sees the image only through the slots), with latent steps they do not."""
    model, tok, ids = tiny_model(tmp_path)
    pv, grid = vision.preprocess(tasks.synthetic_example(0)["images"][0], max_pixels=30000)
    prompt = torch.tensor([tok.prompt("What colour is the square?", [int(grid.prod()) // 4]) + [ids.start]])
    T = prompt.shape[1]
    r = lvr.rollout(model, ids, lvr.Prompt(prompt, None, pv, grid),
                    lvr.Decode("steps", lvr_steps=3, max_new_tokens=9, bottleneck=True),
                    lvr.Sampling(stop_ids=[-1]))
    out, slots = r.tokens, torch.nonzero(r.is_latent[0])[:, 0] + T
    x = model.embed(out, pv, grid)
    x[0, slots] = r.latents[0, r.is_latent[0]]
    batch = {"input_ids": out, "attention_mask": torch.ones_like(out),
             "latent_pos": torch.stack([torch.zeros_like(slots), slots])}
    blind = lvr.blind_positions(batch, model.cfg.image_token_id)
    pos = qwen.get_rope_index(out, grid, None, model.cfg.image_token_id)
    h = model(out, inputs_embeds=x, position_ids=pos,
              attend=lvr.bottleneck_attend(blind, out == model.cfg.image_token_id))
    assert len(slots) == 3 and torch.allclose(h[0, slots - 1], r.latents[0, r.is_latent[0]], atol=1e-4)
    text = torch.arange(T + 4, out.shape[1])  # after the forced <|lvr_end|>: greedy text tokens
    assert out[0, text].tolist() == model.lm_head(h[0, text - 1]).argmax(-1).tolist()
    plain = lvr.rollout(model, ids, lvr.Prompt(prompt, None, pv, grid),
                        lvr.Decode("steps", lvr_steps=3, max_new_tokens=9), lvr.Sampling(stop_ids=[-1]))
    assert not torch.allclose(plain.latents[0, 1:3], r.latents[0, 1:3])  # (the mask is on)

    def completion(pixels, n):
        return lvr.rollout(model, ids, lvr.Prompt(prompt, None, pixels, grid),
                           lvr.Decode("steps", lvr_steps=n, max_new_tokens=8, bottleneck=True),
                           lvr.Sampling(stop_ids=[-1])).tokens
    other = torch.rand_like(pv)
    assert torch.equal(completion(pv, 0), completion(other, 0))
    assert not torch.equal(completion(pv, 3), completion(other, 3))
