"""
Speed and memory: ours vs the reference transformers Qwen2.5-VL, same random weights.

    python -m tools.bench                                  # tiny + 0.5B-shaped, CPU fp32 (~6 min on 2 cores)
    python -m tools.bench --sizes 3b --device cuda --dtype bfloat16 --peak_tflops 989 --sft_batch 16  # a GPU
Random checkpoints written by our save_pretrained (nothing is downloaded). A time is the median of
`repeats` rounds after a warm-up, ours and the reference's taking turns; a ratio is our speed over
its (> 1: faster). Decode tok/s = (time for n tokens - for 1) / (n - 1): no prefill; its floor is
the copy bandwidth over the LM bytes a step reads. GRPO rollout: B x G rows in one call vs one at a
time; GRPO step: train_grpo on 2 processes vs 1. Load memory: a fresh process reading every weight,
over the file size. SFT FLOPs: 6 per LM weight per token (no embedding, no attention) + the tower's
forward.
"""

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import checkpoint
import cli
import data
import lvr
import qwen
import tasks
import vision

# -----------------------------------------------------------------------------
sizes = "tiny,0.5b"  # comma-separated: tiny | 0.5b | 3b
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "float32"  # {float32, bfloat16}
repeats = 3  # [1, inf) timed rounds per measurement (the median is reported)
decode_tokens = 32  # [2, inf) tokens per decode measurement
small_image = 224  # [28, inf) side of the photo in the latent, GRPO and SFT prompts (64 image tokens)
group_size = 8  # [1, inf) G rows per prompt in the GRPO rollout measurement
sft_batch = 2  # [1, inf) examples in the SFT step (on a GPU use more, e.g. 16, or MFU measures launches)
reference = True  # also time transformers' implementation (when it is installed)
peak_tflops = 0.0  # [0, inf) the device's dense peak for `dtype` (989 for H100 bf16): also report SFT MFU
# -----------------------------------------------------------------------------

# the language models' and towers' shapes (Qwen2.5-VL-3B's official config; 0.5B: Qwen2.5-0.5B's LM)
LM = {
    "0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        intermediate_size=4864, vocab_size=151936,
        rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
    ),
    "3b": dict(
        hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
        intermediate_size=11008, vocab_size=151936,
        rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
    ),
}
VISION = {"0.5b": dict(depth=8, fullatt_block_indexes=[3, 7]),
          "3b": dict(depth=32, fullatt_block_indexes=[7, 15, 23, 31])}


def timed(*fns, n=None, warmup=True):
    """Median seconds of each fn over `repeats` rounds, after a warm-up round. The fns take turns
    within a round, so a slow patch of a shared machine hits ours and the reference's alike."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)  # noqa: E731
    times = [[] for _ in fns]
    for r in range(int(warmup) + (n or repeats)):
        for fn, ts in zip(fns, times):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            if r >= int(warmup):
                ts.append(time.perf_counter() - t0)

    medians = [statistics.median(ts) for ts in times]
    return medians if len(fns) > 1 else medians[0]


def make_checkpoint(size, path):
    """A random checkpoint of the given shape (tiny tokenizer; the special-token ids come from
    it)."""
    special = qwen.SPECIAL + tasks.LATENT_SPECIAL
    tok = tasks.build_tokenizer(os.path.join(path, "tokenizer.json"), special=special)
    d = tasks.tiny_config(tok)
    if size != "tiny":
        d.update(LM[size], rope_theta=1e6, max_position_embeddings=32768)
        d["vision_config"].update(
            VISION[size], hidden_size=1280, intermediate_size=3420, num_heads=16,
            out_hidden_size=d["hidden_size"], window_size=112,
        )

    cfg = qwen.Config.from_dict(d)
    torch.manual_seed(0)
    model = qwen.Qwen2_5_VL(cfg)
    model.init_weights()
    model.save_pretrained(path)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def peak_rss(setup, work):
    """Peak resident-memory growth (bytes) of the Python source `work` in a fresh process, once
    `setup` has run: /proc's VmHWM, reset after setup (clear_refs 5), over the VmRSS then."""
    code = "\n".join(
        [
            f"import re, sys; sys.path.insert(0, {ROOT!r})",
            "def kb(k): return int(re.search(k + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1))",
            setup, "open('/proc/self/clear_refs', 'w').write('5'); base = kb('VmRSS')", work,
            "print((kb('VmHWM') - base) * 1024)",
        ]
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        raise cli.InputError(f"a memory measurement failed: {r.stderr.strip().splitlines()[-1]}")
    return int(r.stdout.split()[-1])


def peak_load_rss(path, ours):
    """Peak resident-memory growth (bytes) of a fresh process loading the checkpoint and reading
    every weight once (a memory-mapped load costs nothing until the weights are touched)."""
    if ours:
        load = "import qwen; m = qwen.Qwen2_5_VL.from_pretrained(p)"
    else:
        load = ("from transformers import Qwen2_5_VLForConditionalGeneration as M; "
                "m = M.from_pretrained(p, dtype='float32')")

    return peak_rss(f"import torch, transformers; p = {path!r}",
                    f"{load}; sum(float(q.detach().sum()) for q in m.parameters())")


# the GRPO step's memory, the rollout and the update's log-probs, before and after their fixes: the
# rollout's KV cache in the autocast dtype (before: fp32), and the completion logits LOGIT_CHUNK
# positions at a time, recomputed in backward (before: every position at once)
ROLLOUT_SETUP = """
import torch, qwen, lvr
model, tok = qwen.load(P)
ids = lvr.latent_ids(tok)
prompt = torch.tensor([tok.prompt("What colour is the square?")] * 2)
if BEFORE:  # the cache in the activations' dtype, as it was
    real = qwen.KVCache
    qwen.KVCache = lambda cfg, b, n, dev, dtype, rope_dtype=None: real(cfg, b, n, dev, rope_dtype or dtype)
"""
ROLLOUT_WORK = """
with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
    lvr.rollout(model, ids, lvr.Prompt(prompt), lvr.Decode("token", max_new_tokens=N),
                lvr.Sampling(0.9, stop_ids=[-1]), group_size=8)
"""
LOGPROB_SETUP = """
import torch, grpo
torch.manual_seed(0)
head = torch.nn.Linear(C, V, bias=False)
h = torch.randn(ROWS, L, C, requires_grad=True)
comp = torch.randint(0, V, (ROWS, L))
latent = torch.zeros(ROWS, L, dtype=torch.bool)
chunk = 10 ** 9 if BEFORE else grpo.LOGIT_CHUNK
"""
LOGPROB_WORK = """
out = []
rows = max(1, chunk // L)
for i in range(0, ROWS, rows):
    args = (head, h[i:i + rows], comp[i:i + rows], latent[i:i + rows], 0.9, [])
    out.append(torch.utils.checkpoint.checkpoint(grpo.decision_logprobs, *args, use_reentrant=False)
               if chunk < ROWS * L else grpo.decision_logprobs(*args))
torch.cat(out).sum().backward()
"""


def grpo_memory(path, cfg):
    """-> ((rollout before, after), (log-probs before, after)) peak bytes: a 16-row rollout of 64
    tokens under bf16 autocast on the checkpoint at `path`; the log-probs and their backward over 16
    rows of 256 completion tokens at cfg's width and vocabulary (the part of the update the chunking
    changes)."""
    rollout = [peak_rss(f"P, BEFORE, N = {path!r}, {before}, 64" + ROLLOUT_SETUP, ROLLOUT_WORK)
               for before in (True, False)]
    shape = f"C, V, ROWS, L = {cfg.hidden_size}, {cfg.vocab_size}, 16, 256"
    logprobs = [peak_rss(f"{shape}; BEFORE = {before}" + LOGPROB_SETUP, LOGPROB_WORK)
                for before in (True, False)]
    return rollout, logprobs


def data_wait(path, workers):
    """The fraction of train_sft's step time spent waiting for data, from scratch on 1-megapixel
    photos (batch 4 of 1000 x 1000, resized to the official LVR bounds), with `workers` DataLoader
    workers; the first step (the workers' start) left out; `repeats` + 1 steps measured."""
    steps = repeats + 2
    records = []
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (1000, 1000, 3), np.uint8)).save(
            os.path.join(path, f"{i}.jpg"))
        turns = [{"from": "human", "value": "<image>\nWhat colour is it?"},
                 {"from": "gpt", "value": "<lvr>\nred"}]
        records.append(
            {"image": f"{i}.jpg", "bboxes": [[0.4, 0.4, 0.45, 0.45]], "conversations": turns}
        )

    with open(os.path.join(path, "d.json"), "w") as f:
        json.dump(records, f)
    out = os.path.join(path, f"out{workers}")
    args = ["--data_path", os.path.join(path, "d.json"), "--image_root", path, "--batch_size", "4",
            "--max_iters", str(steps), "--eval_examples", "0", "--eval_interval", str(steps),
            "--data_workers", str(workers), "--out_dir", out]
    r = subprocess.run(
        [sys.executable, "train_sft.py", *args], capture_output=True, text=True, cwd=ROOT
    )
    if r.returncode:
        raise cli.InputError(
            f"train_sft.py failed in the bench: {r.stderr.strip().splitlines()[-1]}"
        )

    steps = [x for x in checkpoint.read_log(out) if "ce" in x][1:]  # (the run's history, log.jsonl)
    return sum(x["data_s"] for x in steps) / sum(x["step_s"] for x in steps)


@torch.no_grad()
# long: one measured row after another, each a few lines, in the order docs/speed.md prints them
def bench_size(size, rows):
    tmp = tempfile.mkdtemp(prefix="bench-")
    make_checkpoint(size, tmp)
    file_bytes = os.path.getsize(os.path.join(tmp, "model.safetensors"))
    dt = getattr(torch, dtype)
    model, tok = qwen.load(tmp, dt, device)
    model.eval()
    ids = lvr.latent_ids(tok)
    ref = None
    if reference and importlib.util.find_spec("transformers"):  # (when it is installed)
        from transformers import Qwen2_5_VLForConditionalGeneration
        ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, dtype=dt).to(device).eval()

    def image_prompt(side):  # a random side x side photo and a prompt around it
        photo = np.random.default_rng(0).integers(0, 255, (side, side, 3), np.uint8)
        pv, grid = vision.preprocess(Image.fromarray(photo))
        prompt = tok.prompt("What colour is the square?", [vision.merged_tokens(grid)])
        return pv.to(device, dt), grid, torch.tensor([prompt], device=device)

    pv, grid, prompt = image_prompt(448)

    def kw(p, g, i):  # the reference's image inputs
        return dict(pixel_values=p, image_grid_thw=g, mm_token_type_ids=(i == tok.image_pad).int())

    def add(name, ours, theirs=None, unit="s", higher_better=False):
        ratio = (
            "" if theirs is None else f"{(ours / theirs if higher_better else theirs / ours):.2f}x"
        )
        rows.append((size, name, ours, theirs, unit, ratio))

    def both(f, g):  # (ours, reference) seconds, interleaved; reference None when not installed
        return timed(f, g) if ref is not None else (timed(f), None)

    # image encode and prefill at 448x448
    add("image encode 448x448",
        *both(lambda: model.visual(pv, grid), lambda: ref.model.visual(pv, grid_thw=grid)))
    add(
        f"prefill ({prompt.shape[1]} tokens)",
        *both(
            lambda: model.lm_head(model(prompt, pv, grid)),
            lambda: ref(input_ids=prompt, **kw(pv, grid, prompt)),
        ),
    )

    # the rest on a small photo, so prefill does not drown the per-step times
    pv, grid, prompt = image_prompt(small_image)
    n = decode_tokens

    # decode at batch 1 and 8: (time for n tokens - time for 1) / (n - 1), so prefill is excluded; a
    # text prompt, so the prefill that is subtracted out is small (the per-token work is the same)
    text = torch.tensor([tok.prompt("What colour is the square?")], device=device)
    for B, m in ((1, n), (8, n // 2)):  # (batch 8: fewer tokens, it is 8x the work)
        p = text.repeat(B, 1)
        def ours_gen(k):
            greedy = qwen.Sampling(stop_ids=[-1])
            return lambda: model.generate(p, max_new_tokens=k, sampling=greedy)

        def ref_gen(k):
            return lambda: ref.generate(
                input_ids=p, attention_mask=torch.ones_like(p), max_new_tokens=k, min_new_tokens=k,
                do_sample=False, pad_token_id=tok.endoftext,
            )
        t = timed(ours_gen(m), ours_gen(1), *((ref_gen(m), ref_gen(1)) if ref is not None else ()))
        ours = B * (m - 1) / (t[0] - t[1])
        add(f"decode batch {B}", ours, ref and B * (m - 1) / (t[2] - t[3]), "tok/s", True)
        if B == 1 and size != "tiny":
            lm_bytes = sum(q.numel() * q.element_size() for k, q in model.named_parameters()
                           if not k.startswith("visual"))
            # 1 GiB: beyond any cache; written, since untouched pages all read one zero page
            a = torch.randn(2**28, device=device)
            b = torch.randn_like(a)
            # copy bandwidth / bytes a step
            floor = 2 * a.numel() * 4 / timed(lambda: b.copy_(a), n=5) / lm_bytes
            rows.append(
                (
                    size, "decode batch 1 / bandwidth floor", ours / floor, floor,
                    "frac, floor tok/s", "",
                )
            )

    # latent steps vs text steps: the same rollout, all-latent (prompt ends in <|lvr_start|>) or
    # all-text
    lat_prompt = torch.cat([prompt, torch.tensor([[ids.start]], device=device)], 1)

    # never enters
    text_ids = lvr.LatentIds(start=-5, latent=ids.latent, latent_end=ids.latent_end, end=ids.end)

    def roll(p, n, ids_):
        return lambda: lvr.rollout(
            model, ids=ids_,
            prompt=lvr.Prompt(p, attention_mask=None, pixel_values=pv, grid_thw=grid),
            decode=lvr.Decode("steps", n, max_new_tokens=n), sampling=lvr.Sampling(stop_ids=[-1]),
        )

    # a ratio of two small differences: more rounds
    t = timed(roll(lat_prompt, n, ids), roll(lat_prompt, 1, ids), roll(prompt, n, text_ids),
              roll(prompt, 1, text_ids), n=max(repeats, 5))
    lat, txt = (n - 1) / (t[0] - t[1]), (n - 1) / (t[2] - t[3])
    add("latent steps/s vs text tokens/s", lat, txt, "step/s", True)

    # GRPO rollout at train_grpo's default B x G: one batched rollout (one prefill per prompt) vs
    # one row at a time, whose throughput is the same for every row, so a few rows measure it
    B, G, n, few = 8, group_size, 16, 2
    feats = model.visual(pv, grid)
    gen = torch.Generator(device).manual_seed(0)

    def grpo(rows_, g):
        prompts = lvr.Prompt(prompt.repeat(rows_, 1), grid_thw=grid.repeat(rows_, 1),
                             feats=feats.repeat(rows_, 1))
        return lvr.rollout(model, ids, prompt=prompts, decode=lvr.Decode("steps", max_new_tokens=n),
                           sampling=lvr.Sampling(0.9, generator=gen, stop_ids=[-1]), group_size=g)

    # one round, no warm-up (warm from above): these are the slowest measurements
    big = size != "tiny"
    t = timed(lambda: grpo(B, G), lambda: [grpo(1, 1) for _ in range(few)], n=1 if big else None,
              warmup=not big)
    batched, single = B * G * n / t[0], few * n / t[1]
    add(
        f"GRPO rollout {B}x{G} rows, {n} tokens: batched vs one at a time", batched, single,
        "tok/s", True,
    )

    # one SFT step: forward + backward with the LVR loss vs the reference's forward + backward (CE)
    if size != "3b" or device != "cpu":
        with torch.enable_grad():
            model.train()
            examples = [tasks.synthetic_example(i, small_image) for i in range(sft_batch)]
            encoded = [data.encode(e, tok, ids, pixels=(3136, small_image ** 2)) for e in examples]
            batch = data.to_device(data.collate(encoded, tok.endoftext), device)
            batch["pixel_values"] = batch["pixel_values"].to(dt)
            def ours_step():
                loss = lvr.sft_loss(model, batch, lvr.LossTerms(ce=1.0, latent=0.1))[0]
                loss.backward()
                model.zero_grad(set_to_none=True)

            def ref_step():
                i = batch["input_ids"]
                ref(input_ids=i, attention_mask=batch["attention_mask"], labels=batch["labels"],
                    **kw(batch["pixel_values"], batch["grid_thw"], i)).loss.backward()
                ref.zero_grad(set_to_none=True)
            if ref is not None:
                ref.train()
                ref.model.visual.requires_grad_(False)
            t = both(ours_step, ref_step)
            add(f"SFT step (fwd+bwd, batch {sft_batch} x {batch['input_ids'].shape[1]} tokens)", *t)
            # model FLOPs: 6 per LM weight per token (embedding table excluded) + the frozen tower's
            # forward
            n_lm = sum(q.numel() for k, q in model.named_parameters() if not k.startswith("visual"))
            n_lm -= 0 if model.cfg.tie_word_embeddings else model.model.embed_tokens.weight.numel()
            n_vis = sum(q.numel() for q in model.visual.parameters())
            flops = (
                6 * n_lm * batch["input_ids"].numel() + 2 * n_vis * batch["pixel_values"].shape[0]
            )
            tflops = [None if x is None else flops / x / 1e12 for x in t]
            rows.append((size, "SFT step model TFLOP/s", *tflops, "TFLOP/s", ""))
            if peak_tflops > 0:
                mfu = [tflops[0] / peak_tflops, tflops[1] and tflops[1] / peak_tflops]
                add("SFT step MFU", *mfu, f"of {peak_tflops} TFLOP/s", True)

    # loading: resident memory growth over the file size
    if size != "tiny":  # (the tiny file is smaller than the resident-set granularity that matters)
        rows.append(
            (
                size, "peak RSS growth loading / file size", peak_load_rss(tmp, True) / file_bytes,
                peak_load_rss(tmp, False) / file_bytes if ref is not None else None, "x file", "",
            )
        )

    # GRPO on 2 processes vs 1
    if size == "tiny" and (device == "cpu" or torch.cuda.device_count() > 1):
        add("GRPO step, 2 processes (reference: 1 process)", *grpo_step_seconds(tmp))
    if size == "0.5b" and device == "cpu":  # (peak memory read from /proc: CPU only)
        (cache_fp32, cache_bf16), (whole, chunked) = grpo_memory(tmp, model.cfg)
        add(
            "GRPO rollout 16 rows x 64: peak MB, bf16 cache (ref: fp32)", cache_bf16 / 1e6,
            cache_fp32 / 1e6, "MB",
        )
        add(
            "GRPO log-probs 16 x 256 + bwd: peak MB, chunked (ref: whole)", chunked / 1e6,
            whole / 1e6, "MB",
        )

    # SFT on 1-megapixel photos: the step's wait for data, with workers and without
    if size == "tiny":
        wait = [data_wait(tmp, workers) for workers in (2, 0)]
        add("SFT step waiting for data, 1 MP: 2 workers (ref: 0)", *wait, "of the step")

    shutil.rmtree(tmp)


def grpo_step_seconds(path):
    """Median seconds of a train_grpo step (default B x G, every group trained, after a warm-up
    step) on the checkpoint at `path`: 2 processes (torchrun; CPU: the cores shared out; GPU: two),
    then 1."""
    out, tmp = [], tempfile.mkdtemp(prefix="bench-grpo-")
    threads = {"OMP_NUM_THREADS": str(max(1, torch.get_num_threads() // 2))}

    # (a free port)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    for launch, env in ((torchrun, threads), ([], {})):
        d = os.path.join(tmp, str(len(launch)))
        args = [
            "--init_from", path, "--device", device, "--dtype", dtype, "--filter_groups", "false",
            "--max_iters", str(repeats + 1), "--out_dir", d,
        ]
        r = subprocess.run(
            [sys.executable, *launch, "train_grpo.py", *args], capture_output=True, text=True,
            env={**os.environ, **env}, cwd=ROOT,
        )
        if r.returncode:
            raise cli.InputError(
                f"train_grpo.py failed in the bench: {r.stderr.strip().splitlines()[-1]}"
            )
        out.append(statistics.median(x["step_s"] for x in checkpoint.read_log(d)[1:]))

    shutil.rmtree(tmp)
    return out


def main(argv):
    cli.configure(globals(), argv)
    cli.require(set(sizes.split(",")) <= {"tiny", "0.5b", "3b"},
                f"--sizes must be a comma-separated list of tiny, 0.5b, 3b; got {sizes!r}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, {dtype}")
    rows = []
    for size in sizes.split(","):
        bench_size(size, rows)
        print(
            f"\n{'size':6}{'measurement':52}{'ours':>12}{'reference':>12}  {'unit':18}{'ratio':>7}"
        )
        for r in rows:
            theirs = "" if r[3] is None else f"{r[3]:.4g}"
            print(f"{r[0]:6}{r[1]:52}{r[2]:>12.4g}{theirs:>12}  {r[4]:18}{r[5]:>7}")
        rows.clear()


if __name__ == "__main__":
    cli.run(main)
