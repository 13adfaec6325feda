"""GRPO_latent: advantages, the text mask, the loss under each normalisation, k3, the training
forward against the rollout's log-probs, rewards, and train_grpo.py end to end."""
import json
import math
import os

import pytest
import torch

import checkpoint
import grpo
import helpers
import lvr
import parallel
import qwen
import tasks
import vision
from helpers import tiny_model
from launch import SIGNALLED, run, run_here, run_signalled
from helpers import IDS, IM_END, SMALL


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5])
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 1, 0]
    a = grpo.group_advantages(r, 4)
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-4))
    assert torch.equal(a[4:], torch.zeros(4))  # no spread: no signal, and no division blow-up
    flat = 1.0 * torch.ones(8) + 0.2 * torch.ones(8)  # train_grpo's accuracy + format: a mean off by an ulp
    assert torch.equal(grpo.group_advantages(flat, 8), torch.zeros(8))
    assert torch.allclose(grpo.group_advantages(r, 4, scale=False)[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]))


def test_loss_mask_is_the_rollouts_record_of_sampled_decisions(tmp_path):
    """A stray <|lvr_end|> sampled in text mode opens nothing; a later span's <|lvr_start|> is a sampled
    decision (it counts, with its log-prob), its latents and the forced <|lvr_end|> carry nothing.
    Counting tokens would get this wrong: [end, x, start, lvr, lvr, end, ...] balances the counts."""
    model, tok, ids = tiny_model(tmp_path)
    prompt = torch.tensor([tok.prompt("What colour is the square?")])
    with torch.no_grad():
        g = model.generate(prompt, max_new_tokens=8, sampling=qwen.Sampling(stop_ids=[-1]))
    g = g[0, prompt.shape[1]:].tolist()
    k = next(i for i in range(2, 8) if g[i] not in g[:i])
    # g[0]: a stray end
    ids = lvr.LatentIds(start=g[k], latent=ids.latent, end=g[0], latent_end=ids.latent_end)
    r = helpers.roll(model, ids, prompt, max_new_tokens=k + 6, decoding="steps", lvr_steps=2, stop_ids=[-1])
    comp = r.tokens[0, prompt.shape[1]:].tolist()
    assert comp[:k + 1] == g[:k + 1] and comp[0] == ids.end and comp[k] == ids.start
    assert comp[k + 1:k + 4] == [ids.latent, ids.latent, ids.end]  # two latents, then the forced end
    want = [True] * (k + 1) + [False, False, False] + [True] * 2
    assert r.sampled[0].tolist() == want
    assert r.is_latent[0].tolist() == [False] * (k + 1) + [True, True] + [False] * 3
    # the weights follow the mask: nothing forced or latent is normalised over
    w = grpo.loss_weights(r.sampled, "token")
    assert torch.equal(w[0] > 0, r.sampled[0]) and math.isclose(float(w.sum()), 1.0, rel_tol=1e-6)
    # stop tokens: the first one is sampled and counts, the padding after it does not
    stop = comp[k + 4]
    r = helpers.roll(model, ids, prompt, max_new_tokens=k + 6, decoding="steps", lvr_steps=2, stop_ids=[stop])
    assert r.sampled[0].tolist()[k + 4] and not r.sampled[0, k + 5:].any()


@pytest.mark.parametrize("norm,want", [("token", -1 / 3), ("sequence", 0.0), ("fixed", -1 / 8)])
def test_grpo_loss_and_gradient_sign(norm, want):
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0])
    old = torch.log(torch.tensor([[0.5, 0.2, 0.3], [0.4, 0.4, 0.2]]))
    logp = old.clone().requires_grad_()
    w = grpo.loss_weights(mask, norm, max_len=4)
    loss = grpo.grpo_loss(logp, old, adv, w)
    # ratio 1: each text token contributes -A; rows [1, 1] and [-1]
    assert math.isclose(float(loss.detach()), want, abs_tol=1e-6)
    loss.backward()
    g = logp.grad
    assert g[0, 0] < 0 and g[0, 1] < 0 and g[1, 0] > 0  # raise good tokens, lower bad ones
    assert torch.equal(g[~mask], torch.zeros(3))  # masked tokens get nothing
    kl = grpo.k3(logp.detach(), logp.detach(), mask)  # a reference equal to the policy: KL 0, the same loss
    assert torch.equal(kl, torch.zeros_like(kl)) and torch.equal(grpo.grpo_loss(logp, old, adv, w, kl), loss)


def test_grpo_clip_and_k3():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)]], requires_grad=True)
    w = grpo.loss_weights(torch.ones(1, 2, dtype=torch.bool), "token")
    loss = grpo.grpo_loss(logp, old, torch.tensor([1.0]), w, clip_eps=0.2)
    # token 0: min(1.5, 1.2) * 1 = 1.2, clipped, no gradient; token 1: min(0.5, 0.8) = 0.5, gradient flows
    assert math.isclose(float(loss.detach()), -(1.2 + 0.5) / 2, rel_tol=1e-6)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0
    # k3 is zero when policy equals reference, and e^d - d - 1 otherwise (d = ref - logp)
    kl = grpo.k3(logp.detach(), logp.detach(), w > 0)
    assert torch.equal(kl, torch.zeros_like(kl))
    ref = logp.detach() + 0.5
    kl = grpo.k3(logp.detach(), ref, w > 0)
    loss = grpo.grpo_loss(logp.detach(), logp.detach(), torch.tensor([0.0]), w, kl, beta=0.04)
    assert torch.allclose(kl, torch.full((1, 2), math.exp(0.5) - 1.5))
    assert math.isclose(float(loss), 0.04 * (math.exp(0.5) - 1.5), rel_tol=1e-6)


@pytest.mark.parametrize("decoding", ["steps", "token"])
def test_training_forward_equals_rollout_logprobs(tmp_path, decoding):
    """One batched forward with the recorded latents gives the rollout's log-probs (temperature 0.7), for
    sampled tokens and, under the token exit, for the sampled "continue" decisions at latent steps."""
    model, tok, ids = tiny_model(tmp_path)
    pvs, grids, prompts = [], [], []
    for i in range(2):
        pv, grid = vision.preprocess(tasks.synthetic_example(i)["images"][0], max_pixels=20000)
        pvs.append(pv)
        grids.append(grid)
        question = "What colour is the square?" + " yes" * i
        prompts.append(tok.prompt(question, [int(grid.prod()) // 4]) + [ids.start])
    G = 3
    grid = torch.cat(grids).repeat_interleave(G, 0)
    with torch.no_grad():
        per_image = model.visual(torch.cat(pvs), torch.cat(grids)).split([int(g.prod()) // 4 for g in grids])
        feats = [f for f in per_image for _ in range(G)]
    input_ids, mask = qwen.left_pad(prompts, tok.endoftext)
    input_ids, mask = input_ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)
    gen = torch.Generator().manual_seed(0)
    kw = dict(max_new_tokens=10, decoding=decoding, lvr_steps=3, max_latent_steps=3, temperature=0.7,
              stop_ids=[tok.im_end])
    rolled, logp = helpers.roll_with_logprobs(model, ids, input_ids, None, grid, mask, generator=gen,
                                              feats=torch.cat(feats), **kw)
    seqs, lats, is_lat, act = rolled
    assert is_lat.any() and not is_lat.all()
    # one prefill per prompt, its cache copied to G rows: the same rows as prefilling every copy
    one_ids, one_mask = qwen.left_pad(prompts, tok.endoftext)
    shared, shared_logp = helpers.roll_with_logprobs(
        model,
        ids,
        one_ids,
        None,
        torch.cat(grids),
        one_mask,
        generator=torch.Generator().manual_seed(0),
        feats=torch.cat(feats[::G]),
        group_size=G,
        **kw,
    )
    assert (torch.equal(shared.tokens, seqs) and torch.equal(shared.is_latent, is_lat) and
            torch.equal(shared.sampled, act))
    assert torch.allclose(shared.latents, lats, atol=1e-5) and torch.allclose(shared_logp, logp, atol=1e-5)
    T = input_ids.shape[1]
    attn = torch.cat([mask, torch.ones_like(seqs[:, T:])], 1)
    exits = lvr.exit_tokens(ids, decoding) if decoding == "token" else []
    with torch.no_grad():
        rows = grpo.Completions(seqs, attn, T, lats, is_lat, grid, torch.cat(feats))
        got = grpo.completion_logprobs(model, rows, 0.7, exits).token
    assert act.sum() > 6
    assert torch.allclose(got[act], logp[act], atol=1e-4), (got[act] - logp[act]).abs().max()
    # latent steps: none sampled under `steps`; under `token` every one but a span's first is a "continue"
    n_continue = int((act & is_lat).sum())
    assert n_continue == (0 if decoding == "steps" else int(is_lat.sum()) - len(seqs))
    # and the temperature matters: at 1.0 they differ
    with torch.no_grad():
        other = grpo.completion_logprobs(model, rows, 1.0, exits).token
    assert not torch.allclose(other[act], logp[act], atol=1e-3)


@pytest.mark.parametrize("decoding", ["steps", "token"])
def test_latent_sigma_samples_latents_with_the_training_forwards_logprob(tmp_path, decoding, monkeypatch):
    """--latent_sigma S > 0: the rollout feeds z = mu + S * eps and records z; the training forward's
    log-prob of the step's decisions (its token's, where one was sampled, plus log N(z; mu', S^2 I), mu' from
    the state that produced z) equals the rollout's, so the ratio is 1 at the first update. S = 0 draws no
    noise at all: the rollout is the one without the option."""
    import train_grpo
    model, tok, ids = tiny_model(tmp_path)
    prompts = [tok.prompt("What colour is the square?" + " yes" * i) + [ids.start] for i in range(2)]
    input_ids, mask = qwen.left_pad(prompts, tok.endoftext)
    kw = dict(max_new_tokens=8, decoding=decoding, lvr_steps=3, max_latent_steps=3, temperature=0.7,
              stop_ids=[tok.im_end], group_size=3)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    r, r_logp = helpers.roll_with_logprobs(model, ids, input_ids, attention_mask=mask, generator=gens,
                                           latent_sigma=0.5, **kw)
    mu = helpers.roll(model, ids, input_ids, attention_mask=mask, generator=[torch.Generator().manual_seed(i)
                                                                             for i in range(2)], **kw)
    assert r.is_latent.sum() >= 6 and not torch.allclose(r.latents[r.is_latent][:2],
                                                         mu.latents[mu.is_latent][:2])
    seqs, mask_g = r.tokens, mask.repeat_interleave(3, 0)
    attn = torch.cat([mask_g, torch.ones_like(seqs[:, input_ids.shape[1]:])], 1)
    exits = lvr.exit_tokens(ids, decoding) if decoding == "token" else []
    with torch.no_grad():
        rows = grpo.Completions(seqs, attn, input_ids.shape[1], r.latents, r.is_latent)
        d = grpo.completion_logprobs(model, rows, 0.7, exits, latent_sigma=0.5)
    joint = grpo.joint_logprob(d, r.sampled, latent_sigma=0.5)
    drawn = r.sampled | r.is_latent
    assert torch.allclose(joint[drawn], r_logp[drawn], atol=1e-4), (joint[drawn] - r_logp[drawn]).abs().max()
    assert torch.equal(joint[~drawn], torch.zeros_like(joint[~drawn]))
    # the reference equal to the policy: KL 0 at every decision, latents included (the closed form)
    kl = grpo.reference_kl(d, d, r.sampled, r.is_latent, drawn, latent_sigma=0.5)
    assert torch.equal(kl, torch.zeros_like(kl))
    # S = 0: no noise drawn, the same rollout as before the option
    monkeypatch.setattr(lvr, "latent_noise", lambda *a:
                        (_ for _ in ()).throw(AssertionError("noise at S = 0")))
    again = helpers.roll(model, ids, input_ids, attention_mask=mask,
                         generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw)
    assert torch.equal(again.tokens, mu.tokens) and torch.equal(again.latents, mu.latents)


def test_the_latent_gradient_points_along_advantage_times_the_noise():
    """d(loss)/d(mu') under the clipped objective: descending it moves mu' along A * (z - mu'); the KL between
    two Gaussians of equal sigma is the closed form."""
    torch.manual_seed(0)
    z, sigma = torch.randn(1, 5), 0.3
    for a in (1.0, -2.0):
        mu = torch.randn(1, 5, requires_grad=True)
        lp = lvr.gaussian_logprob(z, mu, sigma)[None]  # (1, 1): one latent decision
        loss = grpo.grpo_loss(lp, lp.detach(), torch.tensor([a]), torch.ones(1, 1))
        loss.backward()
        step = -mu.grad[0]
        want = a * (z - mu.detach())[0]
        assert torch.allclose(step, want / sigma ** 2, atol=1e-5)
    p, q = torch.randn(3, 5), torch.randn(3, 5)
    normal = torch.distributions.Normal
    exact = torch.distributions.kl_divergence(normal(p, sigma), normal(q, sigma))
    assert torch.allclose(grpo.gaussian_kl(p, q, sigma), exact.sum(-1), atol=1e-5)


def test_grpo_first_update_ratio_one_kl_zero_and_the_tower_trains(tmp_path, monkeypatch):
    """At step 0 the old log-probs are the training forward's own (ratio exactly 1) and the reference's
    forward equals the policy's (KL exactly 0), in fp32 and under bf16 autocast; with --freeze_vision
    false the vision tower gets gradient and changes."""
    import train_grpo
    sft = tmp_path / "sft"
    model, _, _ = tiny_model(sft)
    seen = []
    real_loss = grpo.grpo_loss

    def spy(logp, **k):
        seen.append((logp.detach(), k["old_logp"], k["kl"], k["adv"]))
        return real_loss(logp, **k)
    monkeypatch.setattr(grpo, "grpo_loss", spy)
    # a reward with spread on a random model: the parity of the first completion token
    monkeypatch.setitem(grpo.REWARDS, "accuracy",
                        lambda text, tokens, *a: float(tokens[0] % 2 if tokens else 0))
    # the second run reads a file whose prompts carry two images each
    for i in range(2):
        tasks.synthetic_example(i, 112)["images"][0].save(tmp_path / f"{i}.png")
    (tmp_path / "g.jsonl").write_text(json.dumps({"image": ["0.png", "1.png"], "question": "Which?",
                                                  "answer": "red"}))
    two_images = ["--data_path", str(tmp_path / "g.jsonl"), "--image_root", str(tmp_path)]
    saved = dict(vars(train_grpo))
    try:
        for i, (dtype, freeze, extra) in enumerate([("bfloat16", "true", []),
                                                    ("float32", "false", two_images),
                                                    ("float32", "true", ["--ppo_epochs", "2"])]):
            seen.clear()
            train_grpo.main([*extra, "--init_from", str(sft), "--out_dir", str(tmp_path / f"g{i}"),
                             "--batch_size", "2", "--group_size", "4", "--image_size", "112",
                             "--max_pixels", "12544", "--max_new_tokens", "6", "--max_iters", "1",
                             "--temperature", "1.5", "--lr", "1e-2", "--dtype", dtype,
                             "--freeze_vision", freeze, "--micro_batch_tokens", "200"])
            # micro-batches of at most 200 tokens, every row once per epoch
            epochs = 1 + ("--ppo_epochs" in extra)
            assert len(seen) % epochs == 0 and len(seen) // epochs > 1
            assert sum(len(x[0]) for x in seen) == 8 * epochs
            first = seen[:len(seen) // epochs]
            for logp, old, kl, adv in first:
                # ratio 1, KL 0
                assert torch.equal(logp, old) and torch.equal(kl, torch.zeros_like(kl)), dtype
            # a second epoch: the same old log-probs, a moved policy
            for logp, old, ref, adv in seen[len(first):]:
                assert not torch.equal(logp, old) and any(torch.equal(old, o) for _, o, _, _ in first)
            assert any(a.abs().sum() > 0 for *_, a in seen)  # the reward had spread: a real update
        trained = qwen.Qwen2_5_VL.from_pretrained(str(tmp_path / "g1"))
        frozen = qwen.Qwen2_5_VL.from_pretrained(str(tmp_path / "g0"))
        for m, changes in ((trained, True), (frozen, False)):
            moved = not torch.equal(m.visual.blocks[0].mlp.up_proj.weight,
                                    model.visual.blocks[0].mlp.up_proj.weight)
            assert moved == changes
    finally:
        vars(train_grpo).update(saved)


def test_rewards():
    s, lat, e = IDS.start, IDS.latent, IDS.end
    assert grpo.accuracy_reward("<answer>Red.</answer>", [], "red", IDS, [IM_END]) == 1.0
    assert grpo.accuracy_reward("(C) a dog", [], "B", IDS, [IM_END]) == 0.0  # a wrong letter
    assert grpo.accuracy_reward("b) a cat", [], "(B)", IDS, [IM_END]) == 1.0
    assert grpo.format_reward("red", [s, lat, e, 20, IM_END], "red", IDS, [IM_END]) == 1.0
    assert grpo.format_reward("red", [20, IM_END], "red", IDS, [IM_END]) == 0.0  # no latent span
    assert grpo.format_reward("", [s, lat, e, IM_END], "red", IDS, [IM_END]) == 0.0  # no answer
    assert grpo.format_reward("red", [s, lat, e, 20, 21], "red", IDS, [IM_END]) == 0.0  # never ended
    # two looks
    assert grpo.format_reward("red", [s, lat, e, s, lat, e, 20, IM_END], "red", IDS, [IM_END]) == 1.0
    # then reopened
    assert grpo.format_reward("red", [s, lat, e, 20, s, lat, IM_END], "red", IDS, [IM_END]) == 0.0


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    """Enough SFT that sampled completions sometimes have the format, so groups carry a signal."""
    out = str(tmp_path_factory.mktemp("grpo") / "sft")
    r = run_here("train_sft.py", *SMALL, "--max_iters", "60", "--eval_interval", "60", "--lr", "3e-3",
                 "--out_dir", out)
    assert r.returncode == 0, r.stderr
    return out


def grpo_flags(sft):
    return ["--init_from", sft, "--batch_size", "2", "--group_size", "4", "--image_size", "112",
            "--max_pixels", "12544", "--max_new_tokens", "12", "--save_interval", "2", "--lr", "1e-3",
            "--decoding", "steps", "--lvr_steps", "2", "--temperature", "1.5"]


def test_compute_is_counted_and_bounds_the_run(tmp_path, sft):
    """Each step's multiply-accumulates are logged (the rollout's and the update's, over the ranks), and
    --max_macs stops the run at the step that reaches them, saved."""
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    r = run_here("train_grpo.py", *grpo_flags(sft), "--max_iters", "3", "--filter_groups", "false",
                 "--out_dir", a)
    assert r.returncode == 0, r.stderr
    log = checkpoint.read_log(a)
    assert all(x["macs"] > 0 for x in log)
    budget = log[0]["macs"] + 0.5 * log[1]["macs"]  # reached during step 2
    r = run_here("train_grpo.py", *grpo_flags(sft), "--max_iters", "3", "--filter_groups", "false",
                 "--out_dir", b, "--max_macs", str(budget))
    assert r.returncode == 0, r.stderr
    log_b = torch.load(os.path.join(b, "train_state.pt"), weights_only=True)
    assert log_b["step"] == 2 and [x["macs"] for x in checkpoint.read_log(b)] == [x["macs"] for x in log[:2]]


def test_train_grpo_end_to_end_and_resume(tmp_path, sft):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = [*grpo_flags(sft), "--latent_sigma", "0.2"]  # (latents explored: their noise resumes too)
    r = run_here("train_grpo.py", *common, "--max_iters", "4", "--out_dir", a, "--micro_batch_tokens", "200",
                 "--ppo_epochs", "2")
    assert r.returncode == 0, r.stderr
    assert "reward" in r.stdout and "flat_groups" in r.stdout and "rollout_tok_s" in r.stdout
    # Ctrl-C in step 2's second update (zero_grad call 4): the step finishes, is saved, and the run exits
    r = run_signalled(tmp_path, "train_grpo.py", 4, 0, ["SIGINT"], [
        *common, "--max_iters", "4", "--out_dir", b, "--micro_batch_tokens", "200", "--ppo_epochs", "2"])
    assert r.returncode == 130 and f"stopped: saved step 2 to {b}" in r.stdout, r.stderr
    r = run_here("train_grpo.py", *common, "--max_iters", "4", "--out_dir", b, "--micro_batch_tokens", "200",
                 "--ppo_epochs", "2", "--resume", "true")
    assert r.returncode == 0, r.stderr
    assert "resuming with changed settings" not in r.stdout  # the same flags as the interrupted run
    la = checkpoint.read_log(a)
    lb = checkpoint.read_log(b)
    assert len(la) == len(lb) == 4
    for x, y in zip(la, lb):
        assert math.isclose(x["loss"], y["loss"], rel_tol=1e-4, abs_tol=1e-7) and x["reward"] == y["reward"]
    m1 = qwen.Qwen2_5_VL.from_pretrained(a)
    helpers.assert_same_weights(m1, b)
    assert min(x["flat_groups"] for x in la) < 1 and max(x["kl"] for x in la) > 0
    m0 = qwen.Qwen2_5_VL.from_pretrained(sft)
    assert not torch.equal(m0.model.layers[0].mlp.up_proj.weight, m1.model.layers[0].mlp.up_proj.weight)


def test_filter_groups_trains_only_on_groups_with_signal(tmp_path, monkeypatch):
    """DAPO's dynamic sampling: groups whose rewards are all equal are dropped, and more prompts are drawn
    (at most max_draws rounds) until B groups have signal; without it, one round with every group."""
    import train_grpo
    sft = tmp_path / "sft"
    tiny_model(sft)
    # spread only on prompts whose answer is red, green or blue (by the parity of the first sampled token)
    monkeypatch.setitem(grpo.REWARDS, "accuracy", lambda text, tokens, answer, *a: float(
        answer in ("red", "green", "blue") and bool(tokens) and tokens[0] % 2))
    monkeypatch.setitem(grpo.REWARDS, "format", lambda *a: 0.0)
    trained = []
    real_update = train_grpo.update
    monkeypatch.setattr(train_grpo, "update", lambda run, rounds, **k: (
        trained.append([r.reward.view(-1, train_grpo.group_size) for r in rounds]),
        real_update(run, rounds, **k))[1])
    saved = dict(vars(train_grpo))
    try:
        logs = {}
        for flag in ("true", "false"):
            trained.clear()
            out = tmp_path / f"g_{flag}"
            train_grpo.main(
                [
                    "--init_from",
                    str(sft),
                    "--out_dir",
                    str(out),
                    "--batch_size",
                    "4",
                    "--group_size",
                    "4",
                    "--image_size",
                    "112",
                    "--max_pixels",
                    "12544",
                    "--max_new_tokens",
                    "8",
                    "--max_iters",
                    "2",
                    "--temperature",
                    "2.0",
                    "--filter_groups",
                    flag,
                    "--max_draws",
                    "3",
                    "--beta",
                    "0",
                ]
            )
            logs[flag] = {**torch.load(out / "train_state.pt", weights_only=True),
                          "log": checkpoint.read_log(out)}
            for groups in (g for step in trained for g in step):
                spread = groups.max(1).values != groups.min(1).values
                assert spread.all() if flag == "true" else len(groups) == 4  # only signal / every group
        on, off = logs["true"], logs["false"]
        assert off["drawn"] == 2 and all(x["draws"] == 1 for x in off["log"])
        assert on["drawn"] == sum(x["draws"] for x in on["log"]) > 2  # it drew more to find signal
        assert all(x["kept_groups"] <= 4 for x in on["log"]) and any(x["kept_groups"] > 0 for x in on["log"])
    finally:
        vars(train_grpo).update(saved)


def test_micro_batch_tokens_and_checkpointing_give_the_unsplit_gradient(tmp_path, monkeypatch):
    """A batch split by --micro_batch_tokens (and recomputed by --grad_checkpointing) sums to the gradient
    of the whole batch at once."""
    import train_grpo
    model, tok, ids = tiny_model(tmp_path, seed=3)
    monkeypatch.setitem(grpo.REWARDS, "accuracy",
                        lambda text, tokens, *a: float(tokens[0] % 2 if tokens else 0))
    exs = [tasks.synthetic("grpo", i, 0, 112) for i in range(2)]
    for k, v in dict(group_size=4, batch_size=2, max_new_tokens=6, temperature=1.5, min_pixels=3136,
                     # (main resolves auto)
                     max_pixels=12544, beta=0.0, decoding="token", lvr_steps=8).items():
        monkeypatch.setattr(train_grpo, k, v)
    params = [p for p in model.parameters() if p.requires_grad]
    run = train_grpo.Learner(parallel.Root(model), None, tok, ids=ids, records=None, opt=None, params=params,
                             autocast=torch.autocast("cpu", enabled=False))
    rnd = train_grpo.rollout_round(run, exs, [torch.Generator().manual_seed(i) for i in range(2)])
    assert rnd.reward.view(2, 4).std(1).max() > 0  # a reward with spread: a real gradient

    class Grads:  # an optimizer that keeps the gradient it is given
        def step(self):
            self.g = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

        def zero_grad(self, set_to_none=True):
            model.zero_grad(set_to_none=True)
    got = {}
    for tokens, ckpt in ((0, False), (2 * rnd.seqs.shape[1], False), (rnd.seqs.shape[1], True)):
        monkeypatch.setattr(train_grpo, "micro_batch_tokens", tokens)  # all rows; 2 rows; 1 row at a time
        model.grad_checkpointing = ckpt
        run.opt = Grads()
        train_grpo.update(run, [rnd], filler=rnd)
        got[(tokens, ckpt)] = run.opt.g
    whole, *split = got.values()
    assert any(g.abs().sum() > 0 for g in whole)
    for other in split:
        for a, b in zip(whole, other):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


RECORDED = """
import atexit, os, sys, torch
sys.path.insert(0, os.getcwd())
import lvr
seen, rollout = [], lvr.rollout
def recorded(*a, **k):  # every rollout's completions, cut at their stop token
    r = rollout(*a, **k)
    stop = k["sampling"].stop_ids
    seen.append([row[:next((j + 1 for j, t in enumerate(row) if t in stop), len(row))]
                 for row in r.tokens[:, a[2].input_ids.shape[1]:].tolist()])
    return r
lvr.rollout = recorded
atexit.register(lambda: torch.save(seen, {out!r} + ".rank" + os.environ.get("RANK", "0")))
"""


def test_grpo_two_processes_match_one(tmp_path, sft):
    """torchrun with 2 processes gives the 1-process run: the same completions, rewards, kept groups, losses
    and weights, under DDP to the end; under FSDP2 until Ctrl-C reaches rank 1 in its second update: the flag
    is summed with the statistics, so both ranks stop after step 2 and save it together (a collective), and
    that checkpoint resumes in 1 process onto the 1-process curve and weights."""
    common = [*grpo_flags(sft), "--max_iters", "3", "--save_interval", "3", "--micro_batch_tokens", "120"]

    def launch(out, procs, port, *extra, sigs=()):  # (the signal: in rank 1's 2nd zero_grad)
        script = tmp_path / f"{os.path.basename(out)}.py"
        script.write_text(RECORDED.format(out=out) + SIGNALLED.format(
            script="train_grpo.py", at=2, rank=1, sigs=list(sigs), args=[*common, *extra, "--out_dir", out]))
        r = (run(str(script)) if procs == 1 else
             run("-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", port,
                 str(script)))
        rounds = [torch.load(f"{out}.rank{i}", weights_only=True) for i in range(procs)]
        return r, [sum(rows, []) for rows in zip(*rounds)]  # per round: every prompt's rows, in stream order

    def same(log, log1):
        for x, y in zip(log1, log, strict=True):
            assert {k: x[k] for k in ("accuracy", "kept_groups", "draws", "length")} == \
                   {k: y[k] for k in ("accuracy", "kept_groups", "draws", "length")}
            assert math.isclose(x["reward"], y["reward"], rel_tol=1e-9)
            assert math.isclose(x["loss"], y["loss"], rel_tol=1e-4, abs_tol=1e-6)
            assert math.isclose(x["kl"], y["kl"], rel_tol=1e-3, abs_tol=1e-7)

    one, two, four = (str(tmp_path / x) for x in ("one", "two", "four"))
    r, rows1 = launch(one, 1, None)
    assert r.returncode == 0, r.stderr
    log1 = checkpoint.read_log(one)
    # rounds filtered, kept
    assert sum(x["draws"] for x in log1) > 3 and sum(x["kept_groups"] for x in log1) > 0
    m1 = qwen.Qwen2_5_VL.from_pretrained(one)
    r, rows = launch(two, 2, "29541")
    assert r.returncode == 0, r.stderr
    assert rows == rows1  # the same completions, token for token
    same(checkpoint.read_log(two), log1)
    helpers.assert_same_weights(m1, two)
    r, rows = launch(four, 2, "29543", "--fsdp", "true", sigs=["SIGINT"])
    state = torch.load(os.path.join(four, "train_state.pt"), weights_only=True)
    assert f"stopped: saved step 2 to {four}" in r.stdout and state["step"] == 2, r.stderr
    assert rows == rows1[:sum(x["draws"] for x in log1[:2])]  # (a round per draw) steps 1 and 2's
    r = run_here("train_grpo.py", *common, "--out_dir", four, "--resume", "true")
    assert r.returncode == 0, r.stderr
    same(checkpoint.read_log(four), log1)
    helpers.assert_same_weights(m1, four)
