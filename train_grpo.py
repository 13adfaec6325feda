"""
GRPO_latent: reinforcement learning on the text of an LVR (or Mirage) SFT checkpoint.

    python train_sft.py && python train_grpo.py            # tiny default: synthetic task, CPU
    python train_grpo.py --init_from sft_ckpt --data_path grpo.jsonl --image_root imgs/ --dtype bfloat16

Per step: B prompts, G sampled completions each, all B*G rows in one batched KV-cached latent
rollout (lvr.rollout) that records every latent vector and every token's log-prob. Rewards ->
group-relative advantages -> the clipped objective with a k3 KL to the frozen SFT model, on text
tokens only: the latent span carries no ratio, KL or normaliser (DESIGN 3.7). The training forward
is one batched forward with the recorded latents put back at the latent positions.
Data: synthetic (default) or a JSON/JSONL of {image, question, answer} (LVR JSON works too).
Single process (no DDP here): the rollout dominates, and it is one batched call.
"""
import math
import time

import torch
from tqdm import tqdm

import data
import lvr
import qwen
import vision
from vision import InputError

# -----------------------------------------------------------------------------
init_from = "out"  # the SFT checkpoint to start from (also the frozen KL reference)
data_path = "synthetic"  # "synthetic" or a JSON/JSONL of {image, question, answer}
image_root = ""  # directory the dataset's image paths are relative to (they may not leave it)
on_bad_record = "fail"  # fail | skip: a record with a bad image or text stops the run, or is skipped
batch_size = 8  # prompts per step (B)
group_size = 8  # completions per prompt (G)
temperature = 0.9  # sampling temperature; the loss divides logits by it too
max_new_tokens = 32  # completion budget (latent steps included)
decoding = "token"  # latent exit: token (the model's own <|lvr_end|>) | steps | latent
lvr_steps = 8  # latent steps in `steps` mode
max_latent_steps = 16  # latent budget in `token` / `latent` modes
end_threshold = 0.1  # `latent` mode: exit when mse(hidden, end embedding) is below this
ppo_epochs = 1  # updates per rollout batch; > 1 makes the clip bite
micro_batch = 0  # rows per training forward/backward (0 = all B*G at once)
clip_eps = 0.2  # PPO clip range
beta = 0.04  # weight of the k3 KL to the reference (0 = no reference model is loaded)
scale_rewards = True  # divide advantages by the group std (False = Dr. GRPO)
loss_norm = "token"  # token | sequence | fixed (Dr. GRPO: divide by rows * max_new_tokens)
accuracy_weight = 1.0  # reward: the answer matches
format_weight = 0.2  # reward: an LVR span followed by an answer, then the end of turn
lr = 2e-5  # learning rate (constant after warmup)
warmup_iters = 5  # linear warmup steps
max_iters = 60  # optimizer steps (each on a fresh rollout batch)
weight_decay = 0.0  # AdamW weight decay
grad_clip = 1.0  # clip the gradient norm (0 = off)
eval_interval = 20  # checkpoint every this many steps
image_size = 168  # synthetic images: this many pixels square, a 6x6 grid of merged tokens
min_pixels = 3136  # image area bounds after resizing
max_pixels = 28224  # 168*168: the synthetic images unscaled; real data wants more (up to 12845056)
dtype = "float32"  # float32 | bfloat16 (autocast)
device = "cuda" if torch.cuda.is_available() else "cpu"
freeze_vision = True  # the vision tower stays fixed
out_dir = "out_grpo"  # checkpoint directory
resume = False  # continue from out_dir/train_state.pt
seed = 1337  # seeds the prompts and the sampling
# -----------------------------------------------------------------------------
SKIPPED = {}  # bad records skipped so far: index -> why


def accuracy_reward(text, tokens, answer, ids, stop_ids):
    """1 when the answer matches (see lvr.is_correct), else 0."""
    return float(lvr.is_correct(text, answer))


def format_reward(text, tokens, answer, ids, stop_ids):
    """1 when the completion is an LVR span, then a non-empty answer, then a stop token (lvr.is_lvr_format)."""
    return float(lvr.is_lvr_format(tokens, ids, stop_ids, text))


REWARDS = {"accuracy": accuracy_reward, "format": format_reward}


def prompts(step, records):
    """The B examples of a step: synthetic seeds past SFT's streams, or the shuffled records."""
    if records is None:
        return [data.synthetic_example(seed * 7919 + 2 * 10 ** 9 + step * batch_size + i, image_size)
                for i in range(batch_size)]
    convert = lambda rec, where: data.grpo_example(rec, image_root, where)  # noqa: E731
    return [data.stream_example(records, i, seed, convert, data_path, on_bad_record, SKIPPED)
            for i in range(step * batch_size, (step + 1) * batch_size)]


def main(argv):
    config = qwen.configure(globals(), argv)
    if loss_norm not in ("token", "sequence", "fixed") or dtype not in ("float32", "bfloat16") \
            or on_bad_record not in ("fail", "skip"):
        raise InputError("--loss_norm must be token|sequence|fixed, --dtype float32|bfloat16, --on_bad_record fail|skip")
    if decoding not in ("token", "steps", "latent"):
        raise InputError(f"--decoding must be token, steps or latent, got {decoding!r}")
    if group_size < 2:
        raise InputError("--group_size must be at least 2: advantages are relative to the group")
    qwen.check_out_dir(out_dir, fresh=not resume)
    records = None if data_path == "synthetic" else data.load_records(data_path)
    model, tok = qwen.load(out_dir if resume else init_from, device=device)
    ids = lvr.latent_ids(tok, model.cfg.extra.get("lvr_tokens", lvr.LVR_TOKENS))  # the tokens it was trained with
    if ids is None:
        raise InputError(f"{init_from} has no latent tokens: train it with train_sft.py first")
    ref = None
    if beta > 0:  # the frozen reference: always the SFT checkpoint, also when resuming
        ref, _ = qwen.load(init_from, getattr(torch, dtype), device)  # (bf16: its matmuls ran in bf16 anyway)
        ref.eval().requires_grad_(False)
        del ref.visual  # never run: both models read the image features the policy's tower computed once
    model.train()
    if freeze_vision:
        model.visual.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    gen = torch.Generator(device).manual_seed(seed)
    step, log = 0, []
    if resume:
        state = qwen.load_train_state(out_dir, config)
        opt.load_state_dict(state["optimizer"])
        step, log = state["step"], state["log"]
        gen.set_state(state["gen"])
    stop = [tok.im_end, tok.endoftext]
    autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=dtype == "bfloat16")
    bar = tqdm(total=max_iters, initial=step, dynamic_ncols=True)
    stopping = qwen.stop_flag()  # Ctrl-C / SIGTERM: finish the step, save it, exit
    try:
        while step < max_iters:
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup_iters)
            exs = prompts(step, records)
            stats = train_step(model, ref, tok, ids, exs, stop, opt, params, gen, autocast)
            if not math.isfinite(stats["loss"]):
                raise InputError(f"loss is not finite at step {step}; stopped, {out_dir} keeps the last good checkpoint")
            step += 1
            log.append(stats)
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", acc=f"{stats['accuracy']:.2f}", kl=f"{stats['kl']:.4f}")
            if stopping or step % eval_interval == 0 or step == max_iters:
                tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in stats.items()))
                qwen.save_checkpoint(model, tok, out_dir, {"step": step, "optimizer": opt.state_dict(), "log": log,
                                                           "config": config, "gen": gen.get_state()})
            if stopping:
                print(f"\nstopped: saved step {step} to {out_dir}")
                raise SystemExit(128 + stopping[0])  # 130 for Ctrl-C, 143 for SIGTERM
    finally:
        bar.close()
        if SKIPPED:
            print(f"skipped {len(SKIPPED)} bad records of {data_path}: {sorted(SKIPPED)}")


def train_step(model, ref, tok, ids, exs, stop, opt, params, gen, autocast):
    """Roll out B*G completions, score them, and update the policy -> a dict of statistics."""
    G, dev = group_size, device
    pvs, grids = zip(*[vision.preprocess(e["images"][0], min_pixels, max_pixels) for e in exs])
    prompt_ids, mask = qwen.left_pad([tok.prompt(e["question"], [int(g.prod()) // 4]) for e, g in zip(exs, grids)],
                                     tok.endoftext)
    grid = torch.cat(grids)
    with torch.no_grad(), autocast:
        feats = model.visual(torch.cat(pvs).to(dev), grid)  # each image encoded once for its G rows
    row_feats = [f for f in feats.split([int(g.prod()) // 4 for g in grids]) for _ in range(G)]  # B*G rows
    grid_g = grid.repeat_interleave(G, 0)
    mask_g = mask.repeat_interleave(G, 0).to(dev)
    t0 = time.time()
    model.eval()
    with autocast:  # B prompts prefilled once, G rows each
        seqs, latents, is_lat, old_logp = lvr.rollout(
            model, ids, prompt_ids.to(dev), None, grid, mask.to(dev), max_new_tokens, decoding, lvr_steps,
            max_latent_steps=max_latent_steps, end_threshold=end_threshold, temperature=temperature,
            stop_ids=stop, generator=gen, feats=feats, group_size=G)
    model.train()
    rollout_s = time.time() - t0
    T = prompt_ids.shape[1]
    comp = seqs[:, T:]
    tmask = lvr.text_mask(seqs[:, T - 1:], ids, stop)[:, 1:]  # from T - 1, in case a prompt opens the span
    scores, lengths = {k: [] for k in REWARDS}, []
    for r, row in enumerate(comp.tolist()):
        end = next((i + 1 for i, t in enumerate(row) if t in stop), len(row))
        lengths.append(end)
        text = tok.decode(row[:end])
        for k, fn in REWARDS.items():
            scores[k].append(fn(text, row[:end], exs[r // G]["answer"], ids, stop))
    scores = {k: torch.tensor(v) for k, v in scores.items()}
    reward = accuracy_weight * scores["accuracy"] + format_weight * scores["format"]
    adv = lvr.group_advantages(reward, G, scale_rewards).to(dev)
    weights = lvr.loss_weights(tmask, loss_norm, max_new_tokens)
    attn = torch.cat([mask_g, torch.ones_like(comp)], 1)
    args = lambda rows: (seqs[rows], attn[rows], T, grid_g[rows.cpu()],  # noqa: E731
                         torch.cat([row_feats[i] for i in rows.tolist()]), latents[rows], is_lat[rows])
    chunks = torch.arange(len(seqs), device=dev).split(micro_batch or len(seqs))
    ref_logp = None
    if ref is not None:
        with torch.no_grad(), autocast:
            ref_logp = torch.cat([lvr.completion_logprobs(ref, *args(c), temperature) for c in chunks])
    kl_sum, loss_sum = 0.0, 0.0  # become device tensors, read once at the end: no host sync per micro-batch
    for _ in range(ppo_epochs):
        for c in chunks:
            with autocast:
                logp = lvr.completion_logprobs(model, *args(c), temperature)
                loss, kl = lvr.grpo_loss(logp, old_logp[c], adv[c], weights[c],
                                         None if ref_logp is None else ref_logp[c], clip_eps, beta)
            loss.backward()
            loss_sum += loss.detach() / ppo_epochs
            kl_sum += (kl.detach() * tmask[c]).sum() / ppo_epochs
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    groups = reward.view(-1, G)
    return {"loss": float(loss_sum), "reward": float(reward.mean()), "accuracy": float(scores["accuracy"].mean()),
            "format": float(scores["format"].mean()),
            "flat_groups": float((groups.max(1).values == groups.min(1).values).float().mean()),
            "kl": float(kl_sum) / max(1, int(tmask.sum())), "length": sum(lengths) / len(lengths),
            "latent_steps": float(is_lat.sum(1).float().mean()), "rollout_tok_s": sum(lengths) / rollout_s}


if __name__ == "__main__":
    qwen.run(main)
