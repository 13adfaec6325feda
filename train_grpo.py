"""
GRPO_latent: reinforcement learning on the text of an LVR (or Mirage) SFT checkpoint.

    python train_sft.py && python train_grpo.py            # tiny default: synthetic task, CPU
    python train_grpo.py --init_from sft_ckpt --data_path grpo.jsonl --image_root imgs/ --dtype bfloat16

Per step: B prompts, G sampled completions each, all B*G rows in one batched KV-cached latent
rollout (lvr.rollout) that records every latent vector and every token's log-prob. Rewards ->
group-relative advantages -> the clipped objective with a k3 KL to the frozen SFT model, on the
decisions the policy sampled (the rollout records which): latent vectors and forced tokens carry no
ratio, KL or normaliser (lvr.py's docstring says what counts as a decision). The training forward is
one batched forward with the recorded latents put back at the latent positions; its own detached
log-probs are the old policy's (TRL's convention: the ratio is exactly 1 at the first update), and
the frozen reference holds its matmul weights in the run's dtype and everything else (norms,
embeddings) as the policy does, so under autocast its forward equals the policy's at step 0.
Data: synthetic (default) or a JSON/JSONL of {image, question, answer} (LVR JSON works too).
N processes (torchrun, parallel.py) give the one-process run: each rank rolls out its B / N prompts
(a group never spans ranks: advantages stay local), each prompt sampling from its own generator,
seeded by its place in the stream; what is global (kept groups, the normaliser, the gradient, the
statistics) is summed over ranks. DDP's sum is by hand: ranks run different numbers of micro-batches.
"""
import math
import os
import signal
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import cli
import data
import grpo
import lvr
import parallel
import tasks
from cli import InputError

# -----------------------------------------------------------------------------
init_from = "out"  # the SFT checkpoint to start from (also the frozen KL reference)
data_path = "synthetic"  # "synthetic" or a JSON/JSONL of {image, question, answer}
image_root = ""  # directory the dataset's image paths are relative to (they may not leave it)
on_bad_record = "fail"  # {fail, skip} a record with a bad image or text stops the run, or is skipped
batch_size = 8  # [1, inf) prompts per step (B), over all processes
group_size = 8  # [2, inf) completions per prompt (G): advantages are relative to the group
temperature = 0.9  # (0, inf) sampling temperature; the loss divides logits by it too
max_new_tokens = 32  # [1, inf) completion budget (latent steps included)
decoding = "token"  # {token, steps, latent} latent exit: own <|lvr_end|> | a count | the learned end
lvr_steps = 8  # [1, inf) latent steps in `steps` mode
max_latent_steps = 16  # [1, inf) latent budget in `token` / `latent` modes
force_end = True  # force <|lvr_end|> after a span (false: the model's own next token, as the official code)
end_metric = "checkpoint"  # {checkpoint, mse, cosine, l1} `latent` exit distance (checkpoint: as trained)
end_threshold = 0.0  # [0, inf) `latent` exit threshold (0 = the checkpoint's, else 0.1)
ppo_epochs = 1  # [1, inf) updates per rollout batch; > 1 makes the clip bite
filter_groups = True  # keep only groups whose rewards differ (DAPO's dynamic sampling), drawing more prompts
max_draws = 4  # [1, inf) with filter_groups: at most this many rounds of B prompts per step to find B groups
micro_batch_tokens = 0  # [0, inf) tokens (rows x padded length) per training forward (0: all rows at once)
grad_checkpointing = False  # recompute decoder layers in backward to save memory
clip_eps = 0.2  # (0, 1) PPO clip range
beta = 0.04  # [0, inf) weight of the k3 KL to the reference (0 = no reference model is loaded)
scale_rewards = True  # divide advantages by the group std (False = Dr. GRPO)
loss_norm = "token"  # {token, sequence, fixed} fixed: Dr. GRPO, divide by rows * max_new_tokens
accuracy_weight = 1.0  # [0, inf) reward: the answer matches
format_weight = 0.2  # [0, inf) reward: an LVR span followed by an answer, then the end of turn
lr = 2e-5  # (0, inf) learning rate (constant after warmup)
warmup_iters = 5  # [1, inf) linear warmup steps
max_iters = 60  # [1, inf) optimizer steps (each on a fresh rollout batch)
weight_decay = 0.0  # [0, inf) AdamW weight decay
grad_clip = 1.0  # [0, inf) clip the gradient norm (0 = off)
eval_interval = 20  # [1, inf) checkpoint every this many steps
task = "colour"  # {colour, search, relation, imagine} the synthetic task (tasks.py)
image_size = 0  # [0, inf) synthetic image side, a multiple of 28 (0: the task's own, 168; search 336)
min_pixels = 0  # [0, inf) smallest image area after resizing (0: a data file's 128*28*28, as official LVR)
max_pixels = 0  # [0, inf) largest image area (0: a data file's 5120*28*28; a synthetic image's own area)
dtype = "auto"  # {auto, float32, bfloat16} bfloat16: autocast, fp32 master weights (auto: bf16 on CUDA)
device = "cuda" if torch.cuda.is_available() else "cpu"
fsdp = False  # under torchrun: shard policy and reference with FSDP2, for models one GPU can't hold
freeze_vision = True  # the vision tower stays fixed (false: it trains; the reference keeps a frozen copy)
out_dir = "out_grpo"  # checkpoint directory
resume = False  # continue from out_dir/train_state.pt
seed = 1337  # [0, inf) seeds the prompts and the sampling
# -----------------------------------------------------------------------------
SKIPPED = {}  # bad records skipped so far: index -> why
ROLLOUT_OOM = "lower --batch_size or --group_size (rows per rollout), --max_pixels or --max_new_tokens"
UPDATE_OOM = ("set or lower --micro_batch_tokens, lower --max_pixels; or --grad_checkpointing true, "
              "or --fsdp true under torchrun")


def prompts(n, records, mine):
    """This rank's share (slice `mine`) of round n's B prompts (the synthetic grpo split, which SFT never
    draws, or the shuffled records) -> (examples, one generator per prompt, seeded by its place in the
    stream)."""
    index = range(n * batch_size, (n + 1) * batch_size)[mine]
    gens = [
        torch.Generator(device).manual_seed(((seed << 32) + i) % 2**64) for i in index
    ]  # (seed, i) -> its own
    if records is None:
        return [tasks.synthetic("grpo", i, seed, image_size, task) for i in index], gens

    def convert(rec, where):
        return data.grpo_example(rec, image_root, where)
    return [
        data.stream_example(records, i, seed, convert, data_path, on_bad_record, SKIPPED) for i in index
    ], gens


def main(argv):
    # 1) settings, checked before any work
    config = cli.configure(globals(), argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cli.require(
        batch_size % world == 0, f"--batch_size {batch_size} is not a multiple of the {world} processes"
    )
    images = data.image_settings(task, image_size, min_pixels, max_pixels, data_path == "synthetic",
                                 data.LVR_PIXELS)  # 0: auto
    globals().update(zip(("image_size", "min_pixels", "max_pixels"), images))
    config.update(zip(("image_size", "min_pixels", "max_pixels"), images))
    cli.require(
        accuracy_weight + format_weight > 0, "--accuracy_weight and --format_weight are both 0: no reward"
    )
    checkpoint.check_out_dir(out_dir, fresh=not resume)
    # 2) processes, data, the policy and its frozen reference
    rank, world, dev, ddp = parallel.setup(device, fsdp)
    globals()["device"] = dev  # this rank's
    config["dtype"] = globals()["dtype"] = parallel.autocast_dtype(dtype, dev)
    if rank == 0:
        print(
            "resolved: "
            + " ".join(f"{k}={config[k]}" for k in ("dtype", "image_size", "min_pixels", "max_pixels"))
        )
    records = None if data_path == "synthetic" else data.load_records(data_path)
    model, tok = checkpoint.load(out_dir if resume else init_from, device=dev)
    ids = lvr.find_latent_ids(model, tok)  # the tokens it was trained with
    if ids is None:
        raise InputError(f"{init_from} has no latent tokens: train it with train_sft.py first")
    ref = None
    if beta > 0:  # the frozen reference: always the SFT checkpoint, also when resuming
        ref = grpo.reference(
            checkpoint.load(init_from, device=dev)[0], getattr(torch, dtype), not freeze_vision
        )
        ref = parallel.shard(ref) if fsdp else parallel.Root(ref)
    model.train()
    model.grad_checkpointing = grad_checkpointing
    model.visual.requires_grad_(not freeze_vision)
    policy = parallel.shard(model, sum_grads=True) if fsdp else parallel.Root(model)
    # 3) optimizer, and the saved state when resuming
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
    step, log, drawn = 0, [], 0  # drawn: rounds of B prompts taken from the stream so far
    if resume:
        state = checkpoint.load_train_state(out_dir, config)
        parallel.load_optimizer(model, opt, state, fsdp)
        step, log, drawn = state["step"], state["log"], state.get("drawn", state["step"])
    # 4) the loop
    autocast = torch.autocast(dev.split(":")[0], torch.bfloat16, enabled=dtype == "bfloat16")
    bar = tqdm(total=max_iters, initial=step, disable=rank != 0, dynamic_ncols=True)
    signalled = cli.stop_flag()  # Ctrl-C / SIGTERM on any rank: every rank finishes the step, saves it, exits
    try:
        while step < max_iters:
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / warmup_iters)  # linear warmup, then constant
            stats, drawn, stopping = train_step(
                policy, ref, tok, ids, records, drawn, opt, params, autocast, signalled
            )
            if not math.isfinite(stats["loss"]):
                raise InputError(
                    f"loss is not finite at step {step}; stopped, {out_dir} keeps the last good checkpoint"
                )
            step += 1
            log.append(stats)
            bar.update(1)
            bar.set_postfix(
                reward=f"{stats['reward']:.3f}", acc=f"{stats['accuracy']:.2f}", kl=f"{stats['kl']:.4f}"
            )
            if stopping or step % eval_interval == 0 or step == max_iters:
                if rank == 0:
                    tqdm.write(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in stats.items()))
                parallel.save(
                    model,
                    tok,
                    opt,
                    out_dir,
                    {"step": step, "log": log, "config": config, "drawn": drawn},
                    fsdp,
                    rank,
                )
            if stopping:
                if rank == 0:
                    print(f"\nstopped: saved step {step} to {out_dir}")
                raise SystemExit(
                    128 + (signalled[0] if signalled else signal.SIGINT)
                )  # 130 for Ctrl-C, 143 for SIGTERM
    finally:
        bar.close()
        if SKIPPED:
            print(f"skipped {len(SKIPPED)} bad records of {data_path}: {sorted(SKIPPED)}")
        if ddp:
            dist.destroy_process_group()


def rollout_round(policy, tok, ids, exs, gens, autocast):
    """B prompts (this rank's), G sampled completions each, scored -> one `round`: what the update needs,
    per row (B*G) or per prompt (B). 1) each image encoded once for its G rows; 2) the rollout: the B
    prompts prefilled once, G rows each (both run through the policy's Root); 3) the rewards."""
    G, dev, model, stop = group_size, device, policy.model, [tok.im_end, tok.endoftext]
    p = data.prompt_batch(exs, tok, min_pixels, max_pixels)  # with all of each example's images
    metric, threshold = lvr.end_rule(model, end_metric, end_threshold)

    def encode_and_roll(m):
        feats = m.visual(p["pixel_values"].to(dev), p["grid_thw"])
        return feats, lvr.rollout(
            m,
            ids,
            p["input_ids"].to(dev),
            None,
            p["grid_thw"],
            p["attention_mask"].to(dev),
            max_new_tokens,
            decoding,
            lvr_steps,
            force_end,
            max_latent_steps,
            threshold,
            metric,
            temperature,
            stop_ids=stop,
            generator=gens,
            feats=feats,
            group_size=G,
        )
    t0 = time.time()
    model.eval()
    with torch.no_grad(), autocast, parallel.gathered(policy, fsdp):  # (FSDP: ranks decode different lengths)
        feats, r = policy(encode_and_roll)
    model.train()
    T = p["input_ids"].shape[1]
    comp = r.tokens[:, T:]
    rows = [row[:next((j + 1 for j, t in enumerate(row) if t in stop), len(row))] for row in comp.tolist()]
    texts = [tok.decode(row) for row in rows]  # each completion up to its stop token, decoded once
    scores = {
        k: torch.tensor([fn(texts[i], row, exs[i // G]["answer"], ids, stop) for i, row in enumerate(rows)])
        for k, fn in grpo.REWARDS.items()
    }
    return {
        "T": T,
        "seqs": r.tokens,
        "latents": r.latents,
        "is_latent": r.is_latent,
        "act": r.sampled,
        "attn": torch.cat([p["attention_mask"].repeat_interleave(G, 0).to(dev), torch.ones_like(comp)], 1),
        "reward": accuracy_weight * scores["accuracy"] + format_weight * scores["format"],
        **scores,
        "lengths": torch.tensor([len(row) for row in rows]),
        "latent_steps": r.is_latent.sum(1).cpu(),
        "rollout_s": time.time() - t0,
        "feats": list(feats.split(p["n_image_tokens"])),
        "n_tok": p["n_image_tokens"],  # per prompt:
        "pvs": [
            torch.cat([pv for pv, _ in ims]) for ims in p["images"]
        ],  # its images, for a tower that trains
        "grids": [torch.cat([g for _, g in ims]) for ims in p["images"]],
    }


def keep_groups(rnd, keep):
    """The round restricted to the groups (prompts) in the bool mask `keep` (B,)."""
    rows = keep.repeat_interleave(group_size)
    out = {
        k: (v[rows.to(v.device)] if torch.is_tensor(v) and len(v) == len(rows) else v) for k, v in rnd.items()
    }
    out.update(
        {k: [x for x, kept in zip(rnd[k], keep.tolist()) if kept] for k in ("feats", "n_tok", "pvs", "grids")}
    )
    return out


def decision_logprobs(m, r, rows, frozen, exits):
    """(rows, L) log-probs of round r's decisions at `rows` under model m (run through its Root). frozen: the
    rollout's image features; else m's own tower encodes the rows' prompts (a tower that trains, or the
    reference's).
    """
    of = (rows // group_size).tolist()  # each row's prompt
    if frozen:
        f = r["feats"]
    else:
        u = sorted(set(of))
        f = m.visual(torch.cat([r["pvs"][i] for i in u]).to(device), torch.cat([r["grids"][i] for i in u]))
        f = dict(zip(u, f.split([r["n_tok"][i] for i in u])))
    return grpo.completion_logprobs(
        m,
        r["seqs"][rows],
        r["attn"][rows],
        r["T"],
        torch.cat([r["grids"][i] for i in of]),
        torch.cat([f[i] for i in of]),
        r["latents"][rows],
        r["is_latent"][rows],
        temperature,
        exits,
    )


def update(policy, ref, ids, rounds, filler, opt, params, autocast):
    """4) the training forward over this rank's kept groups of every round, micro-batch by micro-batch, one
    optimizer step per PPO epoch -> (this rank's loss, its KL sum, the step's sampled decisions). The
    normaliser is the step's, over every round and rank; `filler`: a round to pad FSDP's micro-batches with.
    """
    G, dev = group_size, device
    exits = (
        lvr.exit_tokens(ids, decoding) if decoding == "token" else []
    )  # a sampled "continue" at latent steps
    total = torch.tensor(
        [float(sum(len(r["seqs"]) for r in rounds)), float(sum(int(r["act"].sum()) for r in rounds))]
    )
    n_rows, n_act = parallel.all_reduce(total.to(dev)).tolist()
    work = []  # (round, its advantages, its loss weights, a micro-batch of its rows)
    for r in rounds:
        adv = grpo.group_advantages(r["reward"], G, scale_rewards).to(dev)
        weights = grpo.loss_weights(r["act"], loss_norm, max_new_tokens, total=(n_rows, n_act))
        rows = (
            max(1, micro_batch_tokens // r["seqs"].shape[1]) if micro_batch_tokens else len(r["seqs"])
        )  # a token budget
        work += [(r, adv, weights, c) for c in torch.arange(len(r["seqs"]), device=dev).split(rows)]
    if (
        fsdp
    ):  # each micro-batch's forward is a collective: every rank runs as many, the extra ones weigh nothing
        n = int(parallel.all_reduce(torch.tensor(len(work), device=dev), dist.ReduceOp.MAX))
        nothing = (torch.zeros(len(filler["seqs"]), device=dev), torch.zeros(filler["act"].shape, device=dev))
        work += [(filler, *nothing, torch.arange(1, device=dev))] * (n - len(work))
    ref_logp, old_logp = [None] * len(work), [None] * len(work)
    with torch.no_grad(), autocast:
        if ref is not None:
            ref_logp = [ref(decision_logprobs, r, c, freeze_vision, exits) for r, _, _, c in work]
        if ppo_epochs > 1:  # the old policy of every epoch: this policy before its first update
            old_logp = [policy(decision_logprobs, r, c, freeze_vision, exits) for r, _, _, c in work]
    kl_sum, loss_sum = 0.0, 0.0  # become device tensors, read once at the end: no host sync per micro-batch
    for _ in range(ppo_epochs):
        for (r, adv, weights, c), ref_lp, old_lp in zip(work, ref_logp, old_logp):
            with autocast:
                logp = policy(decision_logprobs, r, c, freeze_vision, exits)
                old = logp.detach() if old_lp is None else old_lp  # one update: ratio exactly 1 (TRL)
                loss, kl = grpo.grpo_loss(logp, old, adv[c], weights[c], ref_lp, clip_eps, beta)
            loss.backward()
            loss_sum += loss.detach() / ppo_epochs
            kl_sum += (kl.detach() * (weights[c] > 0)).sum() / ppo_epochs  # over the sampled decisions
        if dist.is_initialized() and not fsdp:  # DDP: the gradient summed over the ranks, once per update
            parallel.all_reduce_grads(params)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return loss_sum, kl_sum, n_act


def train_step(policy, ref, tok, ids, records, drawn, opt, params, autocast, signalled):
    """Roll out rounds of B prompts (one, or with filter_groups until B groups over all ranks have reward
    spread, at most max_draws), then update on the kept groups -> (the step's statistics over all ranks,
    prompt rounds drawn so far, whether any rank was asked to stop)."""
    t0, (rank, world) = time.time(), parallel.rank_world()
    mine = slice(
        rank * batch_size // world, (rank + 1) * batch_size // world
    )  # this rank's prompts of a round
    rounds, seen, kept = [], [], 0
    while True:
        with cli.out_of_memory("a GRPO rollout", ROLLOUT_OOM, out_dir):
            rnd = rollout_round(policy, tok, ids, *prompts(drawn, records, mine), autocast)
        drawn += 1
        seen.append(rnd)
        spread = torch.zeros(batch_size, device=device)  # every rank's groups, in the stream's order
        spread[mine] = torch.ne(*rnd["reward"].view(-1, group_size).aminmax(dim=1)).float().to(device)
        has = parallel.all_reduce(spread).cpu().bool()
        keep = has & (torch.cumsum(has, 0) <= batch_size - kept) if filter_groups else torch.ones_like(has)
        kept += int(keep.sum())
        if keep[mine].any():
            rounds.append(keep_groups(rnd, keep[mine]))
        if not filter_groups or kept >= batch_size or len(seen) == max_draws:
            break
    with cli.out_of_memory("a GRPO update", UPDATE_OOM, out_dir):
        loss, kl, n_act = (
            update(policy, ref, ids, rounds, seen[0], opt, params, autocast) if kept else (0.0, 0.0, 0)
        )
    # 5) statistics: sums over this rank's rows, then over the ranks (with the stop flag)
    means = ("reward", "accuracy", "format", "lengths", "latent_steps")
    rows = [float(torch.cat([r[k] for r in seen]).double().sum()) for k in means]
    flat = torch.cat([torch.eq(*r["reward"].view(-1, group_size).aminmax(dim=1)) for r in seen])
    *rows, loss, kl, n_flat, n, secs, stopping = parallel.all_reduce(
        torch.tensor(
            [
                *rows,
                float(loss),
                float(kl),
                float(flat.sum()),
                len(flat),
                sum(r["rollout_s"] for r in seen),
                len(signalled),
            ],
            dtype=torch.float64,
            device=device,
        )
    ).tolist()
    return {"loss": loss, **{k.replace("lengths", "length"): v / n / group_size for k, v in zip(means, rows)},
            "flat_groups": n_flat / n, "kept_groups": kept, "draws": len(seen), "kl": kl / max(1, n_act),
            "rollout_tok_s": rows[3] / (secs / world), "step_s": time.time() - t0}, drawn, stopping > 0


if __name__ == "__main__":
    cli.run(main)
