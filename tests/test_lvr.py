"""The method: ROI maths, the SFT loss, Mirage stage 2, and the latent rollout vs a slow oracle."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import data
import helpers
from helpers import tiny_model
import lvr
import qwen
import tasks
import vision
from cli import InputError


# -----------------------------------------------------------------------------
# ROI maths, worked by hand (docs/method.md, ROI)

@pytest.mark.parametrize("bbox,grid,want", [
    ([0, 0, 1, 1], (1, 8, 8), list(range(16))),  # whole image: every merged token
    ([0.3, 0.3, 0.45, 0.45], (1, 8, 8), [5]),  # x0g=2, x1g=4 -> merged col 1; same rows: (1, 1)
    ([0.9, 0.0, 1.0, 0.1], (1, 8, 8), [3]),  # top-right corner cell
    ([0.5, 0.5, 0.75, 1.0], (1, 4, 12), [9, 10]),  # non-square 2x6 merged grid: row 1, cols 3-4
    ([0.0, 0.25, 0.1, 0.3], (1, 10, 6), [3]),  # y0g=2, y1g=ceil(3.0)=3 -> rows [1, 2): one row
    ([0.49, 0.0, 0.51, 0.05], (1, 4, 8), [1, 2]),  # straddles a merged boundary: x0g=3, x1g=5 -> cols 1-2
])
def test_roi_indices_hand_worked(bbox, grid, want):
    assert lvr.roi_indices(bbox, torch.tensor(grid)) == want


def test_bbox_validation_and_pixel_boxes():
    assert lvr.normalise_bbox([10, 20, 30, 40], 100, 200) == [0.1, 0.1, 0.3, 0.2]  # original image size
    with pytest.raises(InputError, match="outside the image"):
        lvr.normalise_bbox([-0.1, 0.5, 0.6, 0.9], 100, 100)
    with pytest.raises(InputError, match="outside the image"):
        lvr.normalise_bbox([10, 20, 300, 40], 100, 200)
    with pytest.raises(InputError, match="empty or inverted"):
        lvr.normalise_bbox([0.5, 0.5, 0.5, 0.9], 100, 100)
    with pytest.raises(InputError, match="empty or inverted"):
        lvr.normalise_bbox([0.6, 0.5, 0.4, 0.9], 100, 100)
    with pytest.raises(InputError, match="4 finite numbers"):
        lvr.normalise_bbox([0.1, 0.2, 0.3], 100, 100)


@pytest.mark.parametrize("bbox,K", [([0.1, 0.05, 0.9, 0.7], 4), ([0, 0, 1, 1], 6),
                                    ([0.2, 0.1, 0.35, 0.95], 3)])
def test_roi_pooling_is_adaptive_avg_pool(bbox, K):
    grid = torch.tensor((1, 16, 20))
    feats = torch.randn(8 * 10, 5)
    groups = lvr.roi_groups(bbox, grid, K)
    assert 1 <= len(groups) <= K
    got = lvr.averaging_matrix(groups, 80) @ feats
    y0, y1, x0, x1 = lvr.roi_cells(bbox, grid)
    roi = feats.view(8, 10, 5)[y0:y1, x0:x1].permute(2, 0, 1)  # (C, h, w)
    full = lvr.roi_groups(bbox, grid, 0)
    assert len(full) == (y1 - y0) * (x1 - x0)
    oh = len({tuple(sorted({i // 10 for i in g})) for g in groups})
    want = F.adaptive_avg_pool2d(roi[None], (oh, len(groups) // oh))[0].flatten(1).T
    assert torch.allclose(got, want, atol=1e-6)


def test_chunk_groups():
    assert lvr.chunk_groups(10, 3) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # remainder dropped
    with pytest.raises(InputError, match="fewer than"):
        lvr.chunk_groups(3, 4)


# -----------------------------------------------------------------------------
# sequences and the loss

def test_encode_sequence_and_labels(tmp_path):
    model, tok, ids = tiny_model(tmp_path)
    ex = tasks.synthetic_example(5)
    e = data.encode(ex, tok, ids, data.LatentTargets("lvr"), pixels=(3136, 50176))
    seq, labels = e["input_ids"], e["labels"]
    n = len(e["latent_pos"])
    a = e["n_prompt"]
    assert n == len(lvr.roi_indices(ex["bboxes"][0], e["grid_thw"][0])) > 0
    assert seq[a] == ids.start and seq[a + 1:a + 1 + n] == [ids.latent] * n and seq[a + 1 + n] == ids.end
    assert tok.decode(seq[a + 2 + n:]) == "\n" + ex["answer"] and seq[-1] == tok.im_end
    assert labels[:a] == [-100] * a  # the prompt is not supervised
    assert labels[a] == ids.start and labels[a + 1:a + 1 + n] == [-100] * n and labels[a + 1 + n] == ids.end
    assert e["latent_pos"] == list(range(a + 1, a + 1 + n)) and e["latent_slot"] == list(range(n))
    none = data.encode(ex, tok, ids, data.LatentTargets("none"), pixels=(3136, 50176))
    assert none["latent_pos"] == [] and tok.decode(none["input_ids"][none["n_prompt"]:]) == ex["answer"]
    with_end = data.encode(ex, tok, ids, data.LatentTargets("lvr", latent_end=True), pixels=(3136, 50176))
    t = with_end["latent_end_pos"][0]
    assert with_end["input_ids"][t:t + 2] == [ids.latent_end, ids.end] and with_end["labels"][t] == -100


def test_sft_loss_against_hand_computation(tmp_path):
    """Hidden state before latent i predicts target i; latent positions carry no CE."""
    model, tok, ids = tiny_model(tmp_path)
    exs = [tasks.synthetic_example(s) for s in (1, 2)]
    exs[0]["bboxes"] = [[0.1, 0.1, 0.6, 0.5]]  # 2 latents after pooling
    # two spans
    exs[1].update(assistant="<lvr> then <lvr>\nred", bboxes=[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 0.7, 0.7]])
    spans = data.LatentTargets("lvr", max_latents=2)
    enc = [data.encode(e, tok, ids, spans, pixels=(3136, 50176)) for e in exs]
    batch = data.collate(enc, tok.endoftext)
    loss, ce, lat, switch = lvr.sft_loss(model, batch, lvr.LossTerms(ce=0.7, latent=0.3, switch=0.2))
    # independent recomputation, one example at a time
    ce_terms, lat_terms, sw_terms = [], [], []
    for e in enc:
        with torch.no_grad():
            feats = model.visual(e["pixel_values"], e["grid_thw"])
        x = model.embed(torch.tensor([e["input_ids"]]), grid_thw=e["grid_thw"], feats=feats)[0]
        targets = [feats[g].mean(0) for g in e["latent_groups"]]
        for t, target in zip(e["latent_pos"], targets):
            x[t] = target
        h = model(inputs_embeds=x[None], position_ids=qwen.get_rope_index(
            torch.tensor([e["input_ids"]]), e["grid_thw"], None, model.cfg.image_token_id))
        logits = model.lm_head(h)
        for t in range(1, len(e["input_ids"])):
            if e["labels"][t] != -100:
                ce_terms.append(F.cross_entropy(logits[0, t - 1], torch.tensor(e["labels"][t])))
        for t, target in zip(e["latent_pos"], targets):
            lat_terms.append(((h[0, t - 1] - target) ** 2).mean())
        assert all(e["labels"][t] == -100 for t in e["latent_pos"])
        # mode switch: the states that read <|lvr_start|> and each latent; only the last latent's says "end"
        for t in range(len(e["input_ids"]) - 1):
            if e["input_ids"][t] in (ids.start, ids.latent):
                p_end = torch.sigmoid(logits[0, t, ids.end])
                last = e["input_ids"][t + 1] == ids.end
                sw_terms.append(-torch.log(p_end) if last else -torch.log(1 - p_end))
    assert len(sw_terms) == len(batch["latent_slot"]) + 3 and len(batch["latent_slot"]) >= 4  # 3 spans
    want_ce, want_lat, want_sw = (torch.stack(x).mean() for x in (ce_terms, lat_terms, sw_terms))
    assert torch.allclose(ce, want_ce, rtol=1e-4) and torch.allclose(lat, want_lat, rtol=1e-4)
    assert torch.allclose(switch, want_sw, rtol=1e-4)
    assert torch.allclose(loss, 0.7 * want_ce + 0.3 * want_lat + 0.2 * want_sw, rtol=1e-4)
    # and the same gradients (the side-by-side run with the official code compared these too)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (0.7 * want_ce + 0.3 * want_lat + 0.2 * want_sw).backward()
    assert len(got) > 10
    for n, p in model.named_parameters():
        if n in got:
            assert torch.allclose(got[n], p.grad, rtol=1e-3, atol=1e-6), n


def test_latent_losses():
    p, t = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert lvr.latent_distance(p, t, "mse").item() == pytest.approx((0 + 1 + 0 + 1) / 4)
    assert lvr.latent_distance(p, t, "l1").item() == pytest.approx(0.5)
    assert lvr.latent_distance(p, t, "cosine").item() == pytest.approx(((1 - 2 ** -0.5) + 0) / 2)


def test_mirage_stage2_gradients_reach_latent_chain(tmp_path):
    model, tok, ids = tiny_model(tmp_path, latent_head=True)
    spans = data.LatentTargets("mirage", k=3)
    enc = [data.encode(tasks.synthetic_example(s), tok, ids, spans, pixels=(3136, 50176))
           for s in (3, 4)]
    batch = data.collate(enc, tok.endoftext)
    assert batch["latent_slot"].tolist() == [0, 1, 2, 0, 1, 2]
    loss, _, _, _ = lvr.own_latents_loss(model, batch)
    loss.backward()
    # the head is used only to feed hidden states back into latent slots: it gets gradient only via the chain
    assert model.lvr_head.mlp[0].weight.grad is not None and model.lvr_head.mlp[0].weight.grad.abs().sum() > 0
    loss2, ce, _, switch = lvr.own_latents_loss(model, batch, lvr.LossTerms(latent=0.0, switch=0.5))
    assert switch > 0 and torch.allclose(loss2, ce + 0.5 * switch)
    s1, _, lat, _ = lvr.sft_loss(model, batch, lvr.LossTerms(0.1, 1.0, latent_loss="cosine"))
    assert lat > 0 and torch.isfinite(s1)


@pytest.mark.parametrize("method", ["lvr", "mirage"])
def test_stage2_under_gradient_checkpointing_gives_the_same_loss_and_gradients(tmp_path, method):
    """Stage 2 feeds each slot the previous pass's hidden state, the forward official Mirage's users lost to
    gradient checkpointing (its issue #7): recomputed layers give the same losses and every gradient. LVR
    with its latent loss on a VSP batch of 12-16 latents a row; Mirage's text-only chain with its head."""
    model, tok, ids = tiny_model(tmp_path, latent_head=method == "mirage")
    exs = [tasks.synthetic("train", i, 0, task="vsp") for i in range(2)]
    if method == "mirage":
        ids = lvr.add_latent_tokens(model, tok, lvr.MIRAGE_TOKENS)
    spans = data.LatentTargets(method, max_latents=16, k=4)
    enc = [data.encode(e, tok, ids, spans, pixels=(3136, 50176)) for e in exs]
    batch = data.collate(enc, tok.endoftext)
    weight = 0.1 if method == "lvr" else 0.0
    model.train()
    runs = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        loss, ce, lat, switch = lvr.own_latents_loss(model, batch, lvr.LossTerms(latent=weight, switch=0.1))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        runs.append((torch.stack([loss, ce, lat, switch]).detach(), grads))
    (plain, g0), (ckpt, g1) = runs
    assert (lat > 0) == (method == "lvr") and len(batch["latent_slot"]) >= 8
    assert torch.allclose(plain, ckpt, rtol=1e-6, atol=0) and g0.keys() == g1.keys() and len(g0) > 10
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-9), n

def test_lvr_stage2_trains_every_latent_where_it_is_used(tmp_path):
    """LVR stage 2: the latent loss on the free-running predictions; its gradient reaches every latent slot
    through the chain, and equals a slow one-example recomputation that feeds the latents one by one."""
    model, tok, ids = tiny_model(tmp_path)
    ex = tasks.relation_example(5, 112)  # two spans: slots 0 of each, one latent per span
    e = data.encode(ex, tok, ids, data.LatentTargets("lvr", max_latents=2), pixels=(3136, 12544))
    batch = data.collate([e], tok.endoftext)
    loss, ce, lat, switch = lvr.own_latents_loss(model, batch, lvr.LossTerms(latent=0.1, switch=0.1))
    assert lat > 0 and torch.allclose(loss, ce + 0.1 * lat + 0.1 * switch)
    inputs = []  # each slot's input, kept to read its gradient
    real_input = lvr.latent_input

    def kept(m, h):
        v = real_input(m, h)
        v.retain_grad()
        inputs.append(v)
        return v
    lvr.latent_input = kept
    try:
        lvr.own_latents_loss(model, batch, lvr.LossTerms(latent=0.1))[0].backward()
    finally:
        lvr.latent_input = real_input
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in inputs)  # every slot gets gradient
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    # the slow oracle: one position at a time, the whole sequence recomputed for every latent
    model.zero_grad()
    b, t = batch["latent_pos"]
    feats, targets = lvr.encode_images(model, batch)
    x = model.embed(batch["input_ids"], grid_thw=batch["grid_thw"], feats=feats)[0]
    pos = qwen.get_rope_index(batch["input_ids"], batch["grid_thw"], None, model.cfg.image_token_id)
    preds = []
    for i in range(len(t)):
        h = model(inputs_embeds=x[None], position_ids=pos)[0]
        preds.append(h[t[i] - 1])
        x = torch.cat([x[:t[i]], lvr.latent_input(model, h[t[i] - 1])[None], x[t[i] + 1:]])
    h = model(inputs_embeds=x[None], position_ids=pos)
    ce_slow = lvr.supervised_ce(model, h, batch["labels"])
    lat_slow = lvr.latent_distance(torch.stack(preds), targets, "mse")
    assert torch.allclose(lat_slow, lat, atol=1e-6) and torch.allclose(ce_slow, ce, atol=1e-6)
    (ce_slow + 0.1 * lat_slow).backward()
    for n, p in model.named_parameters():
        if n in got:
            assert torch.allclose(got[n], p.grad, atol=2e-5, rtol=1e-4), (n, (got[n] - p.grad).abs().max())


# -----------------------------------------------------------------------------
# the latent rollout


def one_row(model, ids, prompt, pv, grid, max_new, decoding, lvr_steps, budget, threshold=0.0,
            force_end=True):
    """lvr.rollout_one, the reading version (one row, no cache: the whole sequence recomputed at every step):
    the oracle for lvr.rollout."""
    decode = lvr.Decode(decoding, lvr_steps, budget, force_end=force_end, end_metric="mse",
                        end_threshold=threshold, max_new_tokens=max_new)
    return lvr.rollout_one(model, ids, prompt, pv, grid, decode, stop_ids=[-1])


@pytest.mark.parametrize("decoding,force_end", [("steps", True), ("steps", False), ("token", True),
                                               ("token", False), ("latent", True), ("latent", False)])
def test_cached_rollout_equals_slow_oracle(tmp_path, decoding, force_end):
    model, tok, _ = tiny_model(tmp_path)
    # (these cases also feed the latents back at a recorded norm, as a cosine-trained model does)
    if not force_end:
        model.cfg.extra["latent_norm"] = 2.5
    prompts, pvs, grids = [], [], []
    for i, (w, h) in enumerate([(224, 160), (112, 200), (150, 150)]):
        pv, grid = vision.preprocess(tasks.synthetic_example(i)["images"][0].resize((w, h)), max_pixels=30000)
        prompts.append(tok.prompt("What colour is the circle?" + " really" * i, [int(grid.prod()) // 4]))
        pvs.append(pv)
        grids.append(grid)
    # pick latent token ids so that rows enter (and, in token mode, leave) latent mode at different steps
    with torch.no_grad():
        plain = [model.generate(torch.tensor([p]), pv, g, max_new_tokens=12,
                                  sampling=qwen.Sampling(stop_ids=[-1]))[0, len(p):].tolist()
                 for p, pv, g in zip(prompts, pvs, grids)]
    start = plain[1][3]
    end = next(t for t in plain[0] if t != start)
    ids = lvr.LatentIds(start=start, latent=tok.tok.token_to_id("<|lvr|>"),
                        latent_end=tok.tok.token_to_id("<|lvr_latent_end|>"), end=end)
    prompts[2] = prompts[2] + [start]  # this row starts in latent mode
    input_ids, mask = qwen.left_pad(prompts, tok.endoftext)
    run = lambda threshold, ids: helpers.roll(
        model,
        ids,
        input_ids,
        torch.cat(pvs),
        torch.cat(grids),
        mask,  # noqa: E731
        max_new_tokens=14,
        decoding=decoding,
        lvr_steps=3,
        max_latent_steps=4,
        end_threshold=threshold,
        force_end=force_end,
        stop_ids=[-1],
    )
    threshold = 0.0
    if decoding == "latent":  # a threshold between the distances seen, so some rows exit early and some don't
        r = run(-1.0, ids)
        d = lvr.end_distance(r.latents[r.is_latent], model.model.embed_tokens.weight[ids.latent_end], "mse")
        d = d.detach().sort().values
        threshold = float(d[len(d) // 2 - 1:len(d) // 2 + 1].mean())  # midway between two: no knife edge
    # an official checkpoint's <|lvr_latent_end|> ends a span too: make one row emit it
    if decoding == "token":
        r = run(0.0, ids)
        own = [int(t) for t, lat in zip(r.tokens[2, input_ids.shape[1]:], r.is_latent[2]) if not lat]
        ids = dataclasses.replace(ids, latent_end=own[0])  # row 2's first token after its span
    out, lats, is_lat, _ = run(threshold, ids)
    if decoding == "latent":
        exited = (out == ids.latent_end).any(1)
        assert exited.all(), exited  # every span ends with <|lvr_latent_end|>: by distance or at the budget
    first_latent = []
    with torch.no_grad():
        for b, (p, pv, g) in enumerate(zip(prompts, pvs, grids)):
            seq, latents = one_row(model, ids, p, pv, g, 14, decoding, 3, 4, threshold, force_end)
            got = out[b, input_ids.shape[1]:].tolist()
            assert got == seq[len(p):], (b, got, seq[len(p):])
            assert len(latents) == int(is_lat[b].sum())
            if latents:
                # (fp32 drift over 14 steps)
                assert torch.allclose(lats[b, is_lat[b]], torch.stack(latents), atol=5e-4)
                first_latent.append(int(is_lat[b].float().argmax()))
    if decoding == "latent":  # some spans end by distance, before the budget of 4
        assert 0 < min(int(is_lat[b].sum()) for b in range(3) if is_lat[b].any()) < 4
    else:
        assert len(set(first_latent)) > 1  # rows really entered latent mode at different steps
    if decoding == "token":
        assert (out == ids.latent_end).any()


@pytest.mark.parametrize("decoding", ["steps", "token", "latent"])
def test_span_reopens_at_once_without_force_end(tmp_path, decoding):
    """force_end=False: a <|lvr_start|> emitted right after a span opens the next one (official
    decoding), in every exit mode; the cached rollout equals the one-row oracle on a model whose
    start logit is raised."""
    model, tok, ids = tiny_model(tmp_path)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.cfg.vocab_size))
    with torch.no_grad():
        model.lm_head.bias[ids.start] = 1e3  # every token the model chooses is <|lvr_start|>
    pv, grid = vision.preprocess(tasks.synthetic_example(0)["images"][0], max_pixels=30000)
    prompt = tok.prompt("What colour is the circle?", [int(grid.prod()) // 4])
    r = helpers.roll(model, ids, torch.tensor([prompt]), pv, grid, max_new_tokens=12, decoding=decoding,
                    lvr_steps=2, max_latent_steps=2, end_threshold=1e-9, force_end=False, stop_ids=[-1])
    with torch.no_grad():
        seq, latents = one_row(model, ids, prompt, pv, grid, 12, decoding, 2, 2, 1e-9, False)
    got = r.tokens[0, len(prompt):].tolist()
    assert got == seq[len(prompt):]
    assert len(latents) == int(r.is_latent.sum())
    spans = sum(1 for a, b in zip(got, got[1:]) if a == ids.start and b == ids.latent)
    assert spans >= 3 and len(latents) == 2 * spans  # several spans, each of its 2 latents
    if decoding == "steps":  # the leaving step's own token is <|lvr_start|>: it opens the next span
        assert got[:7] == [ids.start, ids.latent, ids.latent, ids.start, ids.latent, ids.latent, ids.start]


@pytest.mark.parametrize("decoding", ["steps", "token", "latent"])
@pytest.mark.parametrize("case", ["stray <|lvr|>", "zero budget"])
def test_both_rollouts_agree_on_a_stray_latent_token_and_a_zero_budget(tmp_path, decoding, case):
    """A stray <|lvr|> outside a span is a text token: its embedding is fed, no hidden state; a
    span with a budget of 0 takes no latent step, in every exit mode. The one-row oracle and the
    batched rollout agree on both, token for token."""
    model, tok, ids = tiny_model(tmp_path)
    pv, grid = vision.preprocess(tasks.synthetic_example(0)["images"][0], max_pixels=30000)
    prompt = tok.prompt("What colour is the circle?", [int(grid.prod()) // 4])
    budget = 3
    if case == "stray <|lvr|>":  # the model's every token is <|lvr|>, and no span ever opens
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.cfg.vocab_size))
        with torch.no_grad():
            model.lm_head.bias[ids.latent] = 1e3
    else:  # the prompt opens a span that may take no latent step
        prompt, budget = prompt + [ids.start], 0
    r = helpers.roll(model, ids, torch.tensor([prompt]), pv, grid, max_new_tokens=6,
                     decoding=decoding, lvr_steps=budget, max_latent_steps=budget,
                     end_threshold=1e-9, stop_ids=[-1])
    with torch.no_grad():
        seq, latents = one_row(model, ids, prompt, pv, grid, 6, decoding, budget, budget, 1e-9)
    got = r.tokens[0, len(prompt):].tolist()
    assert got == seq[len(prompt):]
    assert latents == [] and not r.is_latent.any()
    if case == "stray <|lvr|>":
        assert got == [ids.latent] * 6
        assert torch.equal(r.latents[0], torch.zeros_like(r.latents[0]))  # (no latent fed)
    else:  # the span ends at once: <|lvr_end|> (the `latent` exit: <|lvr_latent_end|>, then it)
        first = [ids.latent_end, ids.end] if decoding == "latent" else [ids.end]
        assert got[:len(first)] == first


def test_latent_input_rescales_only_cosine_trained_latents(tmp_path):
    model, _, _ = tiny_model(tmp_path, latent_head=True)
    h = torch.randn(3, model.cfg.hidden_size)
    with torch.no_grad():
        assert torch.equal(lvr.latent_input(model, h), model.lvr_head(h))  # no latent_norm recorded: as it is
        model.cfg.extra["latent_norm"] = 0.7
        v = lvr.latent_input(model, h)
    assert torch.allclose(v.norm(dim=-1), torch.full((3,), 0.7)) and torch.allclose(
        F.cosine_similarity(v, model.lvr_head(h).detach(), dim=-1), torch.ones(3))


def test_teacher_forced_positions_equal_rollout(tmp_path):
    """Feeding the rollout's tokens and recorded latents back in one forward reproduces its hidden states."""
    model, tok, ids = tiny_model(tmp_path)
    pv, grid = vision.preprocess(tasks.synthetic_example(0)["images"][0], max_pixels=30000)
    prompt = tok.prompt("What colour is the square?", [int(grid.prod()) // 4]) + [ids.start]
    out, lats, is_lat, _ = helpers.roll(model, ids, torch.tensor([prompt]), pv, grid, max_new_tokens=10,
                                          decoding="steps", lvr_steps=4, stop_ids=[-1])
    T = len(prompt)
    assert is_lat[0, :4].all() and out[0, T + 4] == ids.end
    with torch.no_grad():
        x = model.embed(out, pv, grid)
        x[0, T:][is_lat[0]] = lats[0, is_lat[0]]
        pos = qwen.get_rope_index(out, grid, None, model.cfg.image_token_id)
        h = model(inputs_embeds=x, position_ids=pos)
        logits = model.lm_head(h)
    # the latent fed at step i is the hidden state one position earlier
    assert torch.allclose(h[0, T - 1:T + 3], lats[0, :4], atol=1e-4)
    # after the forced <|lvr_end|>, greedy text tokens are the argmax of the teacher-forced logits
    assert out[0, T + 6:].tolist() == logits[0, T + 5:-1].argmax(-1).tolist()


def test_token_exit_takes_a_latent_first(tmp_path):
    """The state that read <|lvr_start|> has no CE label, so its token is no exit: even when it is
    <|lvr_end|>, the row takes one latent step first."""
    model, tok, ids = tiny_model(tmp_path)
    prompt = torch.tensor([tok.prompt("What colour is the square?") + [ids.start]])
    first = int(model.lm_head(model(prompt))[0, -1].argmax())  # the model's own token after <|lvr_start|>
    ids = dataclasses.replace(ids, end=first)
    _, _, is_lat, _ = helpers.roll(model, ids, prompt, max_new_tokens=4, decoding="token", max_latent_steps=3,
                                  stop_ids=[-1])
    assert is_lat[0, 0]


def test_rollout_stops_when_every_row_has(tmp_path):
    """Rows stop at their own stop token (later slots hold the first stop id); the output ends at the
    step where the last row stopped, though the loop only checks that every 16 steps."""
    model, tok, ids = tiny_model(tmp_path)
    prompts = [tok.prompt("What colour is the square?"), tok.prompt("What colour is the small circle?")]
    input_ids, mask = qwen.left_pad(prompts, tok.endoftext)
    # noqa: E731
    run = lambda stop: helpers.roll(model, ids, input_ids, attention_mask=mask, max_new_tokens=40,
                                   stop_ids=stop)[0][:, input_ids.shape[1]:]
    free = run([-1])
    # pretend these are stop tokens: row 0 stops by step 2, row 1 by 5
    stop = [int(free[0, 2]), int(free[1, 5])]
    first = [next(i for i, t in enumerate(row) if t in stop) for row in free.tolist()]
    out = run(stop)
    assert out.shape[1] == 1 + max(first) < 40  # trimmed to the last row's stop
    for b, f in enumerate(first):
        assert out[b, :f + 1].tolist() == free[b, :f + 1].tolist() and (out[b, f + 1:] == stop[0]).all()


def test_save_load_with_latent_tokens(tmp_path):
    model, tok, ids = tiny_model(tmp_path / "a", latent_head=True)
    model.save_pretrained(str(tmp_path / "b"))
    tok.tok.save(str(tmp_path / "b" / "tokenizer.json"))
    model2, tok2 = qwen.load(str(tmp_path / "b"))
    assert lvr.latent_ids(tok2) == ids and model2.cfg.extra["lvr_token_ids"]["start"] == ids.start
    x = torch.tensor([[ids.start] + tok.encode("red circle") + [ids.end]])
    with torch.no_grad():
        assert torch.equal(model.lm_head(model(x)), model2.lm_head(model2(x)))
        assert torch.equal(model.lvr_head(model(x)), model2.lvr_head(model2(x)))


def test_add_latent_tokens_grows_embedding(tmp_path):
    model, tok, _ = tiny_model(tmp_path)
    n = model.cfg.vocab_size
    before = model.model.embed_tokens.weight[:n].clone()
    ids = lvr.add_latent_tokens(
        model, tok, {"start": "<|a|>", "latent": "<|b|>", "latent_end": "<|c|>", "end": "<|d|>"}
    )
    assert model.cfg.vocab_size == len(tok) == n + 4 and ids.end == n + 3
    assert model.model.embed_tokens.weight.shape[0] == n + 4 and torch.equal(
        model.model.embed_tokens.weight[:n], before
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    logits = model.lm_head(model(torch.tensor([[ids.start, ids.end]])))
    assert logits.shape[-1] == n + 4


def test_sequence_longer_than_the_context_is_a_clear_error(tmp_path):
    model, tok, ids = tiny_model(tmp_path)
    model.cfg.max_position_embeddings = 10
    with pytest.raises(InputError, match="11 tokens exceed the model's context of 10"):
        model(torch.zeros(1, 11, dtype=torch.long))
    with pytest.raises(InputError, match="exceed the model's context"):  # also when the cache grows past it
        helpers.roll(model, ids, torch.zeros(1, 8, dtype=torch.long), max_new_tokens=5, stop_ids=[-1])


# -----------------------------------------------------------------------------
# checkpoints laid out as the official LVR and Mirage code lays them out

def official_checkpoint(path, tokens, head_type=None):
    """A reference-written Qwen2.5-VL checkpoint, then the official code's additions: its tokens added one by
    one in its order, its config fields, and (LVR) its latent head's weights under its key names."""
    import json
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer
    from helpers import tiny_reference
    ref = tiny_reference(str(path))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    for t in tokens:  # as processor.tokenizer.add_tokens(t, special_tokens=True), one at a time
        tok.add_special_tokens([t])
    tok.save(str(path / "tokenizer.json"))
    cfg = json.loads((path / "config.json").read_text())
    head = None
    if head_type:
        C, inner = cfg["text_config"]["hidden_size"], cfg["text_config"]["intermediate_size"]
        torch.manual_seed(1)
        if head_type == "simple":  # src/model/lvr_heads.py LVRHead
            head = torch.nn.Module()
            head.ln_q = torch.nn.LayerNorm(C, eps=1e-6)
            head.mlp = torch.nn.Sequential(torch.nn.Linear(C, C), torch.nn.GELU(), torch.nn.Linear(C, C))
            head.forward = lambda x: head.mlp(head.ln_q(x))
        else:  # LVRHeadGLU: gate/up/down with biases, the LM's intermediate size, silu
            head = torch.nn.Module()
            head.gate_proj, head.up_proj = torch.nn.Linear(C, inner), torch.nn.Linear(C, inner)
            head.down_proj = torch.nn.Linear(inner, C)
            head.forward = lambda x: head.down_proj(F.silu(head.gate_proj(x)) * head.up_proj(x))
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.3)
        weights = load_file(str(path / "model.safetensors"))
        weights.update({f"lvr_head.{k}": v.contiguous() for k, v in head.state_dict().items()})
        save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg.update(lvr_head=True, lvr_head_type=head_type, latent_end_token=False)
    (path / "config.json").write_text(json.dumps(cfg))
    return head, ref


@pytest.mark.parametrize("head_type", ["simple", "glu"])
def test_official_lvr_checkpoint_loads_and_decodes_as_lvr(tmp_path, head_type):
    head, _ = official_checkpoint(tmp_path / "a", list(lvr.LVR_TOKENS.values()), head_type)
    model, tok = qwen.load(str(tmp_path / "a"))
    base = len(tok) - 4
    ids = lvr.find_latent_ids(model, tok)  # no lvr_tokens in its config: found by the official names
    assert ids == lvr.LatentIds(start=base, latent=base + 1, latent_end=base + 2, end=base + 3)
    # small: LayerNorm's eps (1e-6, not torch's 1e-5) matters
    x = 1e-3 * torch.randn(5, model.cfg.hidden_size)
    with torch.no_grad():
        assert torch.allclose(model.lvr_head(x), head(x), atol=1e-6)
        if head_type == "simple":
            wrong = torch.nn.functional.layer_norm(x, (x.shape[-1],), head.ln_q.weight, head.ln_q.bias, 1e-5)
            assert not torch.allclose(head.mlp(wrong), head(x), atol=1e-4)
    model.save_pretrained(str(tmp_path / "b"))  # written back under the official names
    from safetensors import safe_open
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        keys = {k for k in f.keys() if k.startswith("lvr_head.")}
    assert keys == {f"lvr_head.{k}" for k in head.state_dict()}
    # decoding: a span through the head; <|lvr_latent_end|> (what its checkpoints emit) ends it, then
    # <|lvr_end|>
    prompt = torch.tensor([tok.prompt("What colour is the square?") + [ids.start]])
    with torch.no_grad():
        r = helpers.roll(model, ids, prompt, max_new_tokens=4, decoding="steps", lvr_steps=1, stop_ids=[-1])
        assert torch.allclose(r.latents[0, 0], head(model(prompt)[0, -1]), atol=1e-5)


def test_official_mirage_tokenizer_runs_as_mirage(tmp_path):
    official_checkpoint(tmp_path, ["<|latent_pad|>", "<|latent_start|>", "<|latent_end|>"])
    model, tok = qwen.load(str(tmp_path))
    base = len(tok) - 3
    ids = lvr.find_latent_ids(model, tok)
    assert ids == lvr.LatentIds(start=base + 1, latent=base, end=base + 2, latent_end=None)
    prompt = torch.tensor([tok.prompt("What colour is the square?") + [ids.start]])
    r = helpers.roll(model, ids, prompt, max_new_tokens=6, decoding="token", max_latent_steps=4,
                     stop_ids=[-1])
    comp = r.tokens[0, prompt.shape[1]:].tolist()
    # a Mirage span: <|latent_pad|> steps, then <|latent_end|>
    assert comp[0] == ids.latent and ids.end in comp
    with pytest.raises(InputError, match="the `latent` exit needs a latent-end token"):
        helpers.roll(model, ids, prompt, max_new_tokens=6, decoding="latent", stop_ids=[-1])


@pytest.mark.parametrize("force_end", [True, False])
@pytest.mark.parametrize("decoding", ["steps", "token", "latent"])
def test_span_exit_is_the_written_out_rule_row_by_row(tmp_path, decoding, force_end):
    """The batched exit rule (lvr.span_exit) against the one-row one (lvr.exit_one) on 48 rows in and
    out of spans, at every latent count around the budget, with exit tokens sampled and latents near the
    end vector: which rows leave, with which token, and the token forced next (the forced end)."""
    model, tok, ids = tiny_model(tmp_path)
    decode = lvr.Decode(decoding, lvr_steps=2, max_latent_steps=3, force_end=force_end, end_metric="mse",
                        end_threshold=0.5)
    rule = lvr.exit_rule(model, ids, decode)
    g = torch.Generator().manual_seed(0)
    B = 48
    choices = torch.tensor([ids.end, ids.latent_end, ids.start, 5, 7])
    sampled = choices[torch.randint(len(choices), (B,), generator=g)]
    n_lat = torch.randint(0, 5, (B,), generator=g)
    in_lat = torch.rand(B, generator=g) < 0.8
    end = model.model.embed_tokens.weight[ids.latent_end].detach()
    near = torch.rand(B, generator=g) < 0.5  # half the latents close to the end vector
    vec = torch.where(near[:, None], end * 0.9, torch.randn(B, end.shape[0], generator=g))
    with torch.no_grad():
        out = lvr.span_exit(rule, ids, sampled, vec=vec, in_lat=in_lat, n_lat=n_lat)
        for b in range(B):
            if not in_lat[b]:  # (outside a span nothing leaves, nothing is forced)
                assert not out.leave[b] and out.tok[b] == sampled[b] and out.force_next[b] == -1
                continue
            t, force, leave = lvr.exit_one(rule, ids, int(sampled[b]), vec=vec[b:b + 1], n_lat=int(n_lat[b]))
            assert bool(out.leave[b]) == leave, b
            assert int(out.force_next[b]) == (-1 if force is None else force), b
            if leave:
                assert int(out.tok[b]) == t, b
    assert (out.leave & in_lat).any() and (~out.leave & in_lat).any()  # both kinds of row were met
    if force_end and decoding != "steps":  # <|lvr_end|> forced after <|lvr_latent_end|>
        assert (out.force_next >= 0).any()


def test_fed_latent_explores_and_the_diagnostics_feed_replaces():
    """A latent step feeds its own latent; with latent_sigma, mu + sigma * eps from the row's generator;
    with a feed, row b's k-th latent is the given one while it has one left (its own after)."""
    vec = torch.randn(3, 4)
    feed = lvr.Feed(torch.randn(3, 2, 4), torch.tensor([2, 0, 1]))
    k = torch.tensor([1, 0, 1])
    fed = lvr.fed_latent(vec, lvr.Sampling(), feed=feed, k_lat=k)
    assert torch.equal(fed[0], feed.latents[0, 1]) and torch.equal(fed[1:], vec[1:])  # rows 1, 2: none left
    assert torch.equal(lvr.fed_latent(vec, lvr.Sampling(), feed=None, k_lat=k), vec)

    def gen():
        return torch.Generator().manual_seed(3)
    z = lvr.fed_latent(vec, lvr.Sampling(generator=gen(), latent_sigma=0.5), feed=None, k_lat=k)
    assert torch.allclose(z, vec + 0.5 * torch.randn(3, 4, generator=gen()))
