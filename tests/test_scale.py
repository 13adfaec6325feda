"""The paths a real Qwen2.5-VL checkpoint takes on GPUs, tested on CPU with a tiny checkpoint shaped like the
official one (helpers.real_shaped): the defaults it resolves, the latent tokens' rows, resuming a state saved
on another device, FSDP2 loading without any rank holding the whole model, ranks that decode different
lengths, and the failures a real run meets first (NaN from a masked position, out of memory)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import checkpoint
import cli
import data
import evaluate as evaluation
import grpo
import helpers
import lvr
import qwen
import tasks
from cli import InputError
from helpers import photo, real_shaped
from launch import ROOT, run, run_here
from helpers import SMALL, state


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real-shaped checkpoint and a one-record LVR JSON file with a 640 x 480 photo."""
    d = tmp_path_factory.mktemp("real")
    real_shaped(str(d / "ckpt"))
    photo(640, 480).save(d / "p.jpg")
    rec = {"image": "p.jpg", "conversations": [{"from": "human", "value": "<image>\nWhat is left?"},
                                               {"from": "gpt", "value": "<lvr>\n<answer>red</answer>"}],
           "bboxes": [[100, 100, 300, 260]]}
    (d / "d.json").write_text(json.dumps([rec]))
    return d


def test_a_real_checkpoint_resolves_the_official_settings_and_keeps_the_images_large(real):
    # with no other flag than the two a user must give (run where the data is, so out/ lands there)
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sft.py"), "--init_from",
                          str(real / "ckpt"), "--data_path", "d.json"], cwd=str(real),
                         stdout=subprocess.PIPE, text=True)
    lines = []
    while not (lines and lines[-1].startswith("first example:")):
        lines.append(p.stdout.readline())
        assert lines[-1], "train_sft.py ended before it printed its first example"
    p.kill()
    p.wait()
    line = next(x for x in lines if x.startswith("resolved:"))
    assert "lr=1e-05 min_lr=0.0 warmup_iters=60" in line, line
    assert "min_pixels=100352 max_pixels=4014080" in line, line
    assert "dtype=float32" in line  # (CPU; bfloat16 on CUDA: test_train.test_loss_defaults_follow_the_papers)
    # 23 x 17, not 6 x 6 (168 px)
    assert lines[-1].strip() == "first example: 1 image(s) of 391 merged tokens"
    out = str(real / "out1")
    r = run_here("train_sft.py", "--init_from", str(real / "ckpt"), "--data_path", str(real / "d.json"),
                 "--image_root", str(real), "--max_iters", "1", "--batch_size", "1", "--eval_examples", "1",
                 "--out_dir", out)
    assert r.returncode == 0, r.stderr
    r = run_here("evaluate.py", "--init_from", out, "--data_path", str(real / "d.json"), "--image_root",
                 str(real), "--max_new_tokens", "4", "--max_latent_steps", "2")
    assert r.returncode == 0, r.stderr
    assert "min_pixels=100352 max_pixels=4014080" in r.stdout, r.stdout  # the bounds it was trained with
    # an official checkpoint records none: evaluated at the processor's own bounds (the official inference)
    assert data.trained_pixels(str(real / "ckpt"), data.PROCESSOR_PIXELS) == data.PROCESSOR_PIXELS


def test_latent_tokens_take_the_spare_rows_at_the_mean_embedding(real):
    model, tok = qwen.load(str(real / "ckpt"))
    before, rows = len(tok), model.cfg.vocab_size
    w = model.model.embed_tokens.weight.detach().clone()
    ids = lvr.add_latent_tokens(model, tok)
    assert model.cfg.vocab_size == rows and len(tok) == before + 4  # no growth: the rows were there
    new = model.model.embed_tokens.weight.detach()
    assert sorted(vars(ids).values()) == list(range(before, before + 4))
    assert torch.allclose(new[before:before + 4], w[:before].mean(0).expand(4, -1))
    assert torch.equal(new[:before], w[:before]) and torch.equal(new[before + 4:], w[before + 4:])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied


def test_a_state_saved_on_a_gpu_resumes_on_the_cpu(tmp_path, monkeypatch):
    """torch.save records each tensor's device; a GPU run's Adam state would load onto cuda:0 (and here, with
    no GPU, fail) without map_location."""
    out = tmp_path / "ckpt"
    out.mkdir()
    real_tag = torch.serialization.location_tag
    monkeypatch.setattr(torch.serialization, "location_tag", lambda s: "cuda:0")
    torch.save({"step": 3, "exp_avg": torch.ones(4)}, out / "train_state.pt")
    monkeypatch.setattr(torch.serialization, "location_tag", real_tag)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(out / "train_state.pt", weights_only=True)  # what load_train_state did
    s = checkpoint.load_train_state(str(out))
    assert s["step"] == 3 and s["exp_avg"].device.type == "cpu" and torch.equal(s["exp_avg"], torch.ones(4))


SHARDED = """
import os, sys, torch
sys.path[:0] = [{root!r}, {root!r} + "/tests"]
import helpers, lvr, parallel, qwen, checkpoint
rank, world, dev, _ = parallel.setup("cpu", True)
loaded = []
real_load = qwen.Qwen2_5_VL.from_pretrained
qwen.Qwen2_5_VL.from_pretrained = lambda *a, **k: loaded.append(1)  # nobody loads the whole model
tok = checkpoint.load_tokenizer({path!r})
before = len(tok)
fix = lambda n, w: lvr.latent_rows(w, before, len(tok)) if n == "model.embed_tokens.weight" else w
add = lambda m: lvr.add_latent_tokens(m, tok)  # on the meta model, before sharding
root, model, ids = parallel.load_sharded({path!r}, torch.float32, dev, add, fix)
assert not loaded
full = real_load({path!r})
lvr.add_latent_tokens(full, checkpoint.load_tokenizer({path!r}))
for (name, p), q in zip(model.named_parameters(), full.parameters()):
    local, rows = p.to_local(), -(-q.shape[0] // world)
    assert local.shape[0] <= rows < q.shape[0] or q.shape[0] == 1, name  # this rank's rows only
    assert torch.equal(local, q.detach()[rank * rows:rank * rows + local.shape[0]]), name
# ranks decode different numbers of steps with the weights gathered: no collective per step, no hang
prompt = torch.tensor([tok.prompt("What is left?") + [ids.start]])
n = 3 + 5 * rank
with torch.no_grad(), parallel.gathered(root, True):
    got = root(lambda m: helpers.roll(m, ids, prompt, max_new_tokens=n, decoding="token", max_latent_steps=2,
                                     stop_ids=[-1]).tokens)
    want = helpers.roll(full, ids, prompt, max_new_tokens=n, decoding="token", max_latent_steps=2,
                        stop_ids=[-1])
assert got.shape[1] == prompt.shape[1] + n and torch.equal(got, want.tokens), (got, want.tokens)
print("rank", rank, "ok")
"""


def test_fsdp_loads_each_rank_its_part_and_ranks_decode_different_lengths(real, tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SHARDED.format(root=ROOT, path=str(real / "ckpt")))
    r = run("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29544", str(script))
    assert r.returncode == 0 and "rank 0 ok" in r.stdout and "rank 1 ok" in r.stdout, r.stderr[-3000:]


def test_a_masked_position_never_makes_the_loss_nan():
    logp = torch.tensor([[-1.0, -2.0, -1e4]], requires_grad=True)  # the last position: padding, weight 0
    ref = torch.tensor([[-1.1, -2.1, 0.0]])  # exp(ref - logp) overflows there
    w = torch.tensor([[0.5, 0.5, 0.0]])
    kl = grpo.k3(logp, ref, w > 0)
    loss = grpo.grpo_loss(logp, logp.detach(), torch.tensor([1.0]), w, kl, beta=0.04)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and logp.grad[0, 2] == 0
    d = ref[0, :2] - logp[0, :2].detach()
    assert torch.allclose(kl[0, :2], torch.exp(d) - d - 1) and kl[0, 2] == 0


def tiny_lvr(seed=0, head=False):
    tok = qwen.QwenTokenizer.__new__(qwen.QwenTokenizer)
    raw = tasks.build_tokenizer(special=qwen.SPECIAL + tasks.LATENT_SPECIAL)
    tok.tok = raw
    tok.endoftext, tok.im_start, tok.im_end, tok.vision_start, tok.vision_end, tok.image_pad = (
        raw.token_to_id(s) for s in qwen.SPECIAL[:6])
    cfg = qwen.Config.from_dict(tasks.tiny_config(raw))
    cfg.extra["lvr_head"] = head
    torch.manual_seed(seed)
    model = qwen.Qwen2_5_VL(cfg)
    model.init_weights()
    return model.eval(), tok, lvr.add_latent_tokens(model, tok)


def test_the_latent_exit_takes_at_least_one_latent():
    model, tok, ids = tiny_lvr()
    prompt = torch.tensor([tok.prompt("What colour is the square?") + [ids.start]])
    # every hidden state is "near" the end: only the guard keeps the first latent
    r = helpers.roll(model, ids, prompt, max_new_tokens=6, decoding="latent", max_latent_steps=4,
                     end_threshold=1e9, stop_ids=[-1])
    assert evaluation.span_lengths(r.is_latent[0])[0] == 1
    assert r.tokens[0, prompt.shape[1] + 1] == ids.latent_end


def test_the_latent_head_takes_part_in_a_micro_batch_without_latents():
    """DDP refuses a step in which a trainable parameter got no gradient."""
    model, tok, ids = tiny_lvr(head=True)
    model.train()
    ex = tasks.synthetic("train", 0, 0, 112)
    # no latent slot
    batch = data.collate([data.encode(ex, tok, ids, data.LatentTargets("none"), pixels=(3136, 12544))],
                         tok.endoftext)
    loss, *_ = lvr.sft_loss(model, batch)
    loss.backward()
    assert all(p.grad is not None for p in model.lvr_head.parameters())


def test_the_rollout_cache_is_in_the_autocast_dtype(monkeypatch):
    model, tok, ids = tiny_lvr()
    made = []
    real_cache = qwen.KVCache
    monkeypatch.setattr(qwen, "KVCache", lambda *a, **k: made.append(real_cache(*a, **k)) or made[-1])
    prompt = torch.tensor([tok.prompt("What colour is the square?")])
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        helpers.roll(model, ids, prompt, max_new_tokens=3, decoding="token", stop_ids=[-1])
    assert made[0].k[0].dtype == torch.bfloat16 and made[0].cos.dtype == torch.float32
    helpers.roll(model, ids, prompt, max_new_tokens=3, decoding="token", stop_ids=[-1])
    assert made[1].k[0].dtype == torch.float32


def test_chunked_completion_logprobs_equal_the_whole_ones(monkeypatch):
    model, tok, ids = tiny_lvr()
    N, T, L = 4, 6, 5
    torch.manual_seed(1)
    seqs = torch.randint(0, 300, (N, T + L))
    is_latent = torch.zeros(N, L, dtype=torch.bool)
    is_latent[:, 1] = True
    latents = torch.randn(N, L, model.cfg.hidden_size)
    grads = []
    # every position at once; then 1 row (7 // 5) at a time, recomputed in backward
    for chunk in (10 ** 9, 7):
        monkeypatch.setattr(grpo, "LOGIT_CHUNK", chunk)
        model.zero_grad()
        rows = grpo.Completions(seqs, torch.ones(N, T + L, dtype=torch.long), T, latents, is_latent)
        lp = grpo.completion_logprobs(model, rows, 0.9, [ids.end]).token
        lp.sum().backward()
        grads.append((lp.detach(), model.lm_head.weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


def test_out_of_memory_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch, capsys):
    import train_sft
    out = str(tmp_path / "o")
    calls = []
    real_loss = lvr.sft_loss

    def loss(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_loss(*a, **k)
    monkeypatch.setattr(lvr, "sft_loss", loss)
    args = [*SMALL, "--max_iters", "4", "--eval_interval", "2", "--eval_examples", "0", "--data_workers", "0",
            "--out_dir", out]
    with pytest.raises(InputError) as e:
        train_sft.main(args)
    msg = str(e.value)
    assert msg.startswith("out of memory in an SFT step: lower --batch_size") and "\n" not in msg
    assert "--grad_checkpointing true" in msg and f"{out} keeps its last checkpoint" in msg
    assert state(out)["step"] == 2 and qwen.load(out)  # the last checkpoint, whole
    with pytest.raises(InputError,
                       match="out of memory in a GRPO rollout: lower --batch_size or --group_size"):
        with cli.out_of_memory("a GRPO rollout", __import__("train_grpo").ROLLOUT_OOM, out):
            raise torch.OutOfMemoryError("CUDA out of memory")


def test_an_official_latent_end_checkpoint_loads_and_exits_by_its_own_vector(tmp_path):
    """Official LVR's latent-end mode learns a separate end vector, `lvr_latent_end_emb`: its decoding ends a
    span when mse(hidden, that vector) < threshold, and that vector is the input at <|lvr_latent_end|>."""
    path = tmp_path / "ckpt"
    real_shaped(str(path))
    tok = qwen.QwenTokenizer(str(path))
    for t in lvr.LVR_TOKENS.values():  # as the official code adds them
        tok.tok.add_special_tokens([t])
    tok.tok.save(str(path / "tokenizer.json"))
    ids = lvr.latent_ids(tok)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(lvr_id=ids.latent, lvr_start_id=ids.start, lvr_end_id=ids.end,
               lvr_latent_end_id=ids.latent_end)
    (path / "config.json").write_text(json.dumps(cfg))
    model, tok = qwen.load(str(path))
    prompt = torch.tensor([tok.prompt("What is left?") + [ids.start]] * 2)
    # the end vector: row 0's first latent, so row 0 (only) is at distance 0 after one step
    with torch.no_grad():
        first = helpers.roll(model, ids, prompt, max_new_tokens=3, decoding="steps", lvr_steps=2,
                             stop_ids=[-1])
        end = first.latents[0, 1].clone()  # (the state after the first latent: the one the exit tests)
    weights = load_file(str(path / "model.safetensors"))
    weights["lvr_latent_end_emb"] = end
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({**cfg, "latent_end_token": True}))
    model, tok = qwen.load(str(path))  # before: "unexpected key lvr_latent_end_emb"
    assert torch.equal(model.lvr_latent_end_emb, end)
    assert torch.equal(model.token_embeds(torch.tensor([[ids.latent_end]]))[0, 0], end)
    prompt = torch.cat([prompt[:1], prompt[:1] + 0], 0)
    prompt[1, -3] = tok.encode("x")[0]  # row 1: another question, another hidden state
    with torch.no_grad():
        r = helpers.roll(model, ids, prompt, max_new_tokens=8, decoding="latent", max_latent_steps=4,
                        end_threshold=1e-6, end_metric="mse", stop_ids=[-1])
    assert evaluation.span_lengths(r.is_latent[0])[0] == 1 and evaluation.span_lengths(r.is_latent[1])[0] == 4
    model.save_pretrained(str(tmp_path / "b"))  # written back under its official name
    assert "lvr_latent_end_emb" in load_file(str(tmp_path / "b" / "model.safetensors"))


def test_the_process_group_outwaits_a_big_checkpoint(monkeypatch):
    """Rank 0 writes a 3B checkpoint while the others wait in a barrier: more than NCCL's 10 minutes."""
    import parallel
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda backend, timeout: seen.update(t=timeout))
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)
    assert parallel.setup("cpu") == (0, 2, "cpu", True)
    assert seen["t"].total_seconds() >= 3600
