"""
GRPO_latent: reinforcement learning on the text of an LVR (or Mirage) SFT checkpoint.

    python train_sft.py && python train_grpo.py            # tiny default: synthetic task, CPU
    python train_grpo.py --init_from sft_ckpt --data_path grpo.jsonl --image_root imgs/ --dtype bfloat16

Per step: B prompts, G sampled completions each, all B*G rows in one batched KV-cached latent
rollout (lvr.rollout) that records every latent vector and which decisions it sampled (with
--filter_groups, more rounds of B prompts until B groups have reward spread). Rewards ->
group-relative advantages -> the clipped objective with a k3 KL to the frozen SFT model, on the
decisions the policy sampled (the rollout records which): forced tokens carry no ratio, KL or
normaliser, and neither do latent vectors unless --latent_sigma explores them (grpo.py's docstring
says what counts as a decision and how an explored latent's log-prob is taken). The training forward
is one batched forward with the recorded latents put back at the latent positions; its own detached
log-probs are the old policy's (TRL's convention: the ratio is exactly 1 at the first update), and
the frozen reference holds its matmul weights in the run's dtype and everything else (norms,
embeddings) as the policy does, so under autocast its forward equals the policy's at step 0. Data:
synthetic (default) or a JSON/JSONL of {image, question, answer} (LVR JSON works too). N processes
(torchrun, parallel.py) give the one-process run: each rank rolls out its B / N prompts (a group
never spans ranks: advantages stay local), each prompt sampling from its own generator, seeded by
its place in the stream; what is global (kept groups, the normaliser, the gradient, the statistics)
is summed over ranks. DDP's sum is by hand: ranks run different numbers of micro-batches.
"""

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import cli
import data
import evaluate
import grpo
import lvr
import parallel
import tasks
from cli import Auto, InputError

# -----------------------------------------------------------------------------
# I/O
init_from = "out"  # the SFT checkpoint to start from (also the frozen KL reference): a directory or ORG/NAME
out_dir = "out_grpo"  # checkpoint directory
resume = False  # continue from out_dir/train_state.pt
save_interval = 20  # [1, inf) save a checkpoint every this many steps
# data
data_path = "synthetic"  # "synthetic" or a JSON/JSONL of {image, question, answer}
image_root = ""  # directory the dataset's image paths are relative to (they may not leave it)
on_bad_record = "fail"  # {fail, skip} a record with a bad image or text stops the learner, or is skipped
# (task, level, hops, image_size at auto: the checkpoint's, as train_sft recorded them)
task = "auto"  # {auto, colour, search, relation, imagine, hops, vsp} the synthetic task (else colour)
level = "auto"  # VSP's map size: 3 to 6 cells a side, a list (3,4) or a range (3-6) (else 3)
hops = Auto(int)  # [1, 5] --task hops: the moves from the anchor, one look each (else 1)
image_size = Auto(int)  # [28, inf) synthetic image side, a multiple of 28 (else the task's: 168; search 336)
min_pixels = Auto(int)  # [1, inf) smallest image area after resizing (auto: as trained, else 100352)
max_pixels = Auto(int)  # [1, inf) largest image area (auto: as trained, else 4014080; synthetic: its own)
seed = 1337  # [0, inf) seeds the prompts and the sampling
# rollout
batch_size = 8  # [1, inf) prompts per step (B), over all processes
group_size = 8  # [2, inf) completions per prompt (G): advantages are relative to the group
temperature = 0.9  # (0, inf) sampling temperature; the loss divides logits by it too
latent_sigma = 0.0  # [0, inf) explore latents: feed z = mu + sigma * eps, log N(z; mu) (0: GRPO_latent)
decoding = "auto"  # {auto, token, steps, latent} latent exit (auto: a pause checkpoint's steps, else token)
lvr_steps = Auto(int)  # [0, inf) latent steps in `steps` mode (auto: a pause checkpoint's count, else 8)
max_latent_steps = 16  # [1, inf) latent budget in `token` / `latent` modes
max_new_tokens = 32  # [1, inf) completion budget (latent steps included)
force_end = True  # force <|lvr_end|> after a span (false: the model's own next token, as the official code)
end_metric = "checkpoint"  # {checkpoint, mse, cosine, l1} `latent` exit distance (checkpoint: as trained)
end_threshold = Auto(float)  # (0, inf) `latent` exit threshold (auto: the checkpoint's, else 0.1)
# GRPO
ppo_epochs = 1  # [1, inf) updates per rollout batch; > 1 makes the clip bite
filter_groups = True  # keep only groups whose rewards differ (DAPO's dynamic sampling), drawing more prompts
max_draws = 4  # [1, inf) with filter_groups: at most this many rounds of B prompts per step to find B groups
clip_eps = 0.2  # (0, 1) PPO clip range
beta = 0.04  # [0, inf) weight of the k3 KL to the reference (0 = no reference model is loaded)
scale_rewards = True  # divide advantages by the group std (False = Dr. GRPO)
loss_norm = "token"  # {token, sequence, fixed} fixed: Dr. GRPO, divide by rows * max_new_tokens
accuracy_weight = 1.0  # [0, inf) reward: the answer matches
format_weight = 0.2  # [0, inf) reward: an LVR span followed by an answer, then the end of turn
freeze_vision = True  # the vision tower stays fixed (false: it trains; the reference keeps a frozen copy)
# optimisation
lr = 2e-5  # (0, inf) learning rate (constant after warmup)
warmup_iters = 5  # [0, inf) linear warmup steps
max_iters = 60  # [1, inf) optimizer steps (each on a fresh rollout batch)
max_macs = 0.0  # [0, inf) also stop once the run's compute reaches this many multiply-accumulates (0: off)
weight_decay = 0.0  # [0, inf) AdamW weight decay
grad_clip = 1.0  # [0, inf) clip the gradient norm (0 = off)
# system
micro_batch_tokens = 0  # [0, inf) tokens (rows x padded length) per training forward (0: all rows at once)
grad_checkpointing = False  # recompute decoder layers in backward to save memory
dtype = "auto"  # {auto, float32, bfloat16} bfloat16: autocast, fp32 master weights (auto: bf16 on CUDA)
device = "cuda" if torch.cuda.is_available() else "cpu"
fsdp = False  # under torchrun: shard policy and reference with FSDP2, for models one GPU can't hold
# -----------------------------------------------------------------------------
SKIPPED = {}  # bad records skipped so far: index -> why
ROLLOUT_OOM = (
    "lower --batch_size or --group_size (rows per rollout), --max_pixels or --max_new_tokens"
)
UPDATE_OOM = (
    "set or lower --micro_batch_tokens, lower --max_pixels; or --grad_checkpointing true, "
    "or --fsdp true under torchrun"
)


def prompts(n, records, mine):
    """This rank's share (slice `mine`) of round n's B prompts (the synthetic grpo split, which SFT
    never draws, or the shuffled records) -> (examples, one generator per prompt, seeded by its
    place in the stream)."""
    index = range(n * batch_size, (n + 1) * batch_size)[mine]

    # (seed, i): its own
    gens = [torch.Generator(device).manual_seed(((seed << 32) + i) % 2**64) for i in index]
    if records is None:
        return [
            tasks.synthetic("grpo", i, seed, size=image_size, task=task, level=level, hops=hops)
            for i in index
        ], gens

    def convert(rec, where):
        return data.grpo_example(rec, image_root, where)

    return [
        data.stream_example(
            records, i, seed, convert=convert, where=data_path,
            skipped=SKIPPED if on_bad_record == "skip" else None,
        )
        for i in index
    ], gens


@dataclass
class Round:
    """One round of this rank's rollouts, B prompts x G completions: what the update needs. Per row
    (B*G) the tensors named in ROW_FIELDS; per prompt (B) the lists at the end."""
    n_prompt: int  # T: the padded prompt length
    seqs: torch.Tensor  # (B*G, T + L) prompt and completion tokens
    attn: torch.Tensor  # (B*G, T + L) 1 on real tokens
    latents: torch.Tensor  # (B*G, L, C) the vector fed at each latent step
    is_latent: torch.Tensor  # (B*G, L)
    # (B*G, L) the token decisions the policy drew (latent_sigma > 0: latents too)
    sampled: torch.Tensor
    reward: torch.Tensor  # (B*G,) the weighted sum of the rewards
    accuracy: torch.Tensor  # (B*G,) each reward function's score
    format: torch.Tensor
    lengths: torch.Tensor  # (B*G,) completion tokens up to the stop
    latent_steps: torch.Tensor  # (B*G,)
    rollout_s: float  # seconds the rollout took
    # its compute: the prefill, the image encode, every decode step of every row
    rollout_macs: float
    feats: list  # per prompt: its merged image tokens, from the rollout's tower
    n_tok: list  # per prompt: how many those are
    pixel_values: list  # per prompt: its images, for a tower that trains
    grids: list

    ROW_FIELDS = ("seqs", "attn", "latents", "is_latent", "sampled", "reward", "accuracy", "format",
                  "lengths", "latent_steps")

    def groups(self, keep):
        """The round restricted to the prompts (groups) in the bool mask `keep` (B,)."""
        rows = keep.repeat_interleave(group_size)
        per_row = {k: getattr(self, k)[rows.to(getattr(self, k).device)] for k in self.ROW_FIELDS}
        per_prompt = {k: [x for x, kept in zip(getattr(self, k), keep.tolist()) if kept]
                      for k in ("feats", "n_tok", "pixel_values", "grids")}
        return dataclasses.replace(self, **per_row, **per_prompt)


@dataclass
class Learner:
    """What every step works with, made once by main."""
    policy: torch.nn.Module  # the policy through its Root (DDP / FSDP see every forward)
    ref: object  # the frozen reference through its Root (None: beta 0)
    tok: object  # the tokenizer
    ids: lvr.LatentIds  # its latent tokens
    records: list  # the data file's records (None: the synthetic task)
    opt: torch.optim.Optimizer
    params: list  # the parameters the optimizer steps
    autocast: object  # bf16 autocast (disabled in fp32)


def rewarded(method, completions, ids, stop):
    """Each completion (text, tokens, its example, its first image's grid) -> {reward name: (N,)
    rewards}: grpo.REWARDS, or (box, crop) grpo.box_rewards on the completion's image."""
    out = {k: [] for k in grpo.REWARDS}
    for text, tokens, e, grid in completions:
        boxed = method in ("box", "crop")
        rewards = grpo.box_rewards(grid, crop=method == "crop") if boxed else grpo.REWARDS
        for k, fn in rewards.items():
            out[k].append(fn(text, tokens, e["answer"], ids, stop, e.get("map_desc")))

    return {k: torch.tensor(v) for k, v in out.items()}


def rollout_round(learner, exs, gens):
    """The step's a)-c): B prompts (this rank's), G sampled completions each, scored -> a Round. a)
    each image encoded once for its G rows; b) the rollout: the B prompts prefilled once, G rows
    each (both run through the policy's Root); c) the rewards."""
    G, dev, tok, model = group_size, device, learner.tok, learner.policy.model
    stop = [tok.im_end, tok.endoftext]
    method = lvr.method_of(model.cfg)

    # with all of each example's images
    p = data.prompt_batch(exs, tok, min_pixels, max_pixels=max_pixels)
    metric, threshold = lvr.end_rule(model, end_metric, cli.given(end_threshold))

    def encode_and_roll(m):
        feats = m.visual(p["pixel_values"].to(dev), p["grid_thw"])
        prompt = lvr.Prompt(
            p["input_ids"].to(dev), p["attention_mask"].to(dev), grid_thw=p["grid_thw"], feats=feats
        )
        decode = lvr.Decode(
            decoding, lvr_steps, max_latent_steps, force_end=force_end, end_metric=metric,
            end_threshold=threshold, max_new_tokens=max_new_tokens,
        )
        sampling = lvr.Sampling(temperature, generator=gens, stop_ids=stop, latent_sigma=latent_sigma)
        crop = None
        if method == "crop":  # (the prompts' reader: the rollout asks it for row b's prompt, b // G)
            crop = evaluate.region_reader(
                tok, learner.ids, exs, list(zip(p["images"], feats.split(p["n_image_tokens"]))),
                max_latents=model.cfg.extra["latent_targets"]["max_latents"],
            )
        r = lvr.rollout(m, learner.ids, prompt, decode=decode, sampling=sampling, group_size=G,
                        crop=crop)
        return feats, r

    t0 = time.time()
    model.eval()

    # (FSDP: ranks decode different lengths)
    with torch.no_grad(), learner.autocast, parallel.gathered(learner.policy, fsdp):
        feats, r = learner.policy(encode_and_roll)
    model.train()
    T = p["input_ids"].shape[1]
    comp = r.tokens[:, T:]
    rows = [data.until_stop(row, stop) for row in comp.tolist()]
    texts = [tok.decode(row) for row in rows]  # each completion up to its stop token, decoded once
    golds = [exs[i // G] for i in range(len(rows))]
    grids = [p["images"][i // G][0][1] for i in range(len(rows))]  # (a box: on the first image)
    scores = rewarded(method, list(zip(texts, rows, golds, grids)), learner.ids, stop)
    prompt_mask = p["attention_mask"].repeat_interleave(G, 0).to(dev)
    return Round(
        n_prompt=T,
        seqs=r.tokens,
        attn=torch.cat([prompt_mask, torch.ones_like(comp)], 1),
        latents=r.latents,
        is_latent=r.is_latent,
        sampled=r.sampled,
        reward=accuracy_weight * scores["accuracy"] + format_weight * scores["format"],
        accuracy=scores["accuracy"],
        format=scores["format"],
        lengths=torch.tensor([len(row) for row in rows]),
        latent_steps=r.is_latent.sum(1).cpu(),
        rollout_s=time.time() - t0,
        feats=list(feats.split(p["n_image_tokens"])),
        rollout_macs=float(
            model.macs(int(p["attention_mask"].sum()), 0, p["pixel_values"].shape[0])
            + model.macs(comp.numel(), comp.numel())
        ),
        n_tok=p["n_image_tokens"],
        pixel_values=[torch.cat([pv for pv, _ in ims]) for ims in p["images"]],
        grids=[torch.cat([g for _, g in ims]) for ims in p["images"]],
    )


class Scoring(NamedTuple):
    """How the training forward scores a round's decisions (update makes it once a step)."""
    frozen: bool  # the tower is frozen, so the rollout's image features (rnd.feats) serve
    exits: list  # the `token` exit's tokens, for its "continue" decisions ([] under the others)
    temperature: float  # the rollout's: the log-probs are those of what it sampled from
    latent_sigma: float  # > 0: the explored latents' Gaussian log-probs too
    group_size: int  # row r samples prompt r // group_size
    device: str


def round_logprobs(m, rnd, rows, how):
    """(rows, L) log-probs of the round's decisions at `rows` under model m (run through its Root),
    scored as `how` (Scoring) says: with the rollout's image features where the tower is frozen,
    else m's own tower encodes the rows' prompts (a tower that trains, or the reference's)."""
    of = (rows // how.group_size).tolist()  # each row's prompt
    if how.frozen:
        f = rnd.feats
    else:
        u = sorted(set(of))
        f = m.visual(
            torch.cat([rnd.pixel_values[i] for i in u]).to(how.device),
            torch.cat([rnd.grids[i] for i in u]),
        )
        f = dict(zip(u, f.split([rnd.n_tok[i] for i in u])))

    grids, feats = torch.cat([rnd.grids[i] for i in of]), torch.cat([f[i] for i in of])
    scored = grpo.Completions(rnd.seqs[rows], rnd.attn[rows], rnd.n_prompt,
                              latents=rnd.latents[rows], is_latent=rnd.is_latent[rows],
                              grid_thw=grids, feats=feats)
    return grpo.completion_logprobs(m, scored, how.temperature, exits=how.exits,
                                    latent_sigma=how.latent_sigma)


class Chunk(NamedTuple):
    """One micro-batch of the update: rows `rows` of round `rnd`, with the round's advantages and
    weights."""
    rnd: "Round"
    adv: torch.Tensor  # (B*G,) the round's group-relative advantages
    weights: torch.Tensor  # (B*G, L) the round's loss weights (grpo.loss_weights)
    rows: torch.Tensor  # (n,) the micro-batch's rows


def chunks(learner, rounds, filler):
    """d) the update's micro-batches: this rank's kept groups of every round, each round with its
    advantages and loss weights -> (Chunks, the step's sampled decisions over every round and
    rank: the normaliser). `filler`: a round to pad FSDP's micro-batches with."""
    G, dev = group_size, device
    rows_here = sum(len(rnd.seqs) for rnd in rounds)
    drawn_here = sum(int(grpo.decision_mask(rnd.sampled, rnd.is_latent, latent_sigma).sum())
                     for rnd in rounds)
    total = torch.tensor([float(rows_here), float(drawn_here)], device=dev)
    n_rows, n_act = parallel.all_reduce(total).tolist()
    work = []  # Chunks: every round's micro-batches
    for rnd in rounds:
        adv = grpo.group_advantages(rnd.reward, G, scale_rewards).to(dev)
        weights = grpo.loss_weights(
            grpo.decision_mask(rnd.sampled, rnd.is_latent, latent_sigma), loss_norm,
            max_new_tokens, total=(n_rows, n_act)
        )
        rows = len(rnd.seqs)  # per micro-batch: all, or a token budget's worth
        if micro_batch_tokens:
            rows = max(1, micro_batch_tokens // rnd.seqs.shape[1])
        work += [
            Chunk(rnd, adv, weights, rows=c)
            for c in torch.arange(len(rnd.seqs), device=dev).split(rows)
        ]

    if fsdp:  # (a micro-batch of no weight: one row of the filler round)
        nothing = (torch.zeros(len(filler.seqs), device=dev),
                   torch.zeros(filler.sampled.shape, device=dev))
        work = parallel.as_many_as_any_rank(
            work, pad=Chunk(filler, *nothing, torch.arange(1, device=dev)), device=dev)
    return work, n_act


def update(learner, rounds, filler):
    """d) the training forward over the step's Chunks, micro-batch by micro-batch, one optimizer
    step per PPO epoch -> (this rank's loss, its KL sum, the step's sampled decisions, this rank's
    compute in multiply-accumulates). The normaliser is the step's, over every round and rank."""
    work, n_act = chunks(learner, rounds, filler)

    # (a sampled "continue" at latent steps under the token exit)
    exits = lvr.exit_tokens(learner.ids, decoding) if decoding == "token" else []
    how = Scoring(freeze_vision, exits, temperature, latent_sigma, group_size, device)
    refs, olds = [None] * len(work), [None] * len(work)
    with torch.no_grad(), learner.autocast:
        if learner.ref is not None:
            refs = [learner.ref(round_logprobs, w.rnd, w.rows, how) for w in work]
        if ppo_epochs > 1:  # the old policy of every epoch: this policy before its first update
            olds = [learner.policy(round_logprobs, w.rnd, w.rows, how) for w in work]

    # become device tensors, read once at the end: no host sync per micro-batch
    kl_sum, loss_sum = 0.0, 0.0

    # compute: the policy's forward and backward (3x a forward) per epoch, the reference's and the
    # old policy's forwards; the head at the completion positions (the tower's re-encode is not
    # counted)
    forwards = 3 * ppo_epochs + (learner.ref is not None) + (ppo_epochs > 1)
    model = learner.policy.model
    macs = sum(
        model.macs(w.rnd.seqs[w.rows].numel(), (w.rnd.seqs.shape[1] - w.rnd.n_prompt) * len(w.rows))
        for w in work
    )
    for _ in range(ppo_epochs):
        for (rnd, adv, weights, c), ref_d, old_d in zip(work, refs, olds):  # (each Chunk's fields)
            with learner.autocast:
                d = learner.policy(round_logprobs, rnd, c, how)
                sampled, is_latent = rnd.sampled[c], rnd.is_latent[c]
                logp = grpo.joint_logprob(d, sampled, latent_sigma)
                # one update: the ratio is exactly 1 (TRL's convention)
                old = logp.detach() if old_d is None else grpo.joint_logprob(
                    old_d, sampled, latent_sigma)
                kl = None if ref_d is None else grpo.reference_kl(
                    d, ref_d, sampled, is_latent, used=weights[c] > 0, latent_sigma=latent_sigma)
                loss = grpo.grpo_loss(
                    logp, old_logp=old, adv=adv[c], weights=weights[c], kl=kl, clip_eps=clip_eps,
                    beta=beta,
                )
            loss.backward()
            loss_sum += loss.detach() / ppo_epochs
            if kl is not None:
                # over the sampled decisions
                kl_sum += (kl.detach() * (weights[c] > 0)).sum() / ppo_epochs
        # DDP: the gradient summed over the ranks, once per update
        if dist.is_initialized() and not fsdp:
            parallel.all_reduce_grads(learner.params)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(learner.params, grad_clip)
        learner.opt.step()
        learner.opt.zero_grad(set_to_none=True)

    return loss_sum, kl_sum, n_act, float(forwards * macs)


def train_step(learner, drawn, signalled):
    """One step: roll out rounds of B prompts (a)-c), rollout_round: one, or with filter_groups until
    B groups over all ranks have reward spread, at most max_draws), d) update on the kept groups, e)
    the statistics -> (the step's statistics over
    all ranks, prompt rounds drawn so far, whether any rank was asked to stop)."""
    t0, (rank, world) = time.time(), parallel.rank_world()

    # this rank's prompts of a round
    mine = slice(rank * batch_size // world, (rank + 1) * batch_size // world)
    rounds, seen, kept = [], [], 0
    while True:
        with cli.out_of_memory("a GRPO rollout", ROLLOUT_OOM, out_dir):
            exs, gens = prompts(drawn, learner.records, mine)
            rnd = rollout_round(learner, exs, gens)
        drawn += 1
        seen.append(rnd)
        lo, hi = rnd.reward.view(-1, group_size).aminmax(dim=1)
        has = parallel.every_ranks((lo != hi).to(device), mine, batch_size)  # (every rank's groups)
        keep = (
            has & (torch.cumsum(has, 0) <= batch_size - kept)
            if filter_groups
            else torch.ones_like(has)
        )
        kept += int(keep.sum())
        if keep[mine].any():
            rounds.append(rnd.groups(keep[mine]))
        if not filter_groups or kept >= batch_size or len(seen) == max_draws:
            break

    with cli.out_of_memory("a GRPO update", UPDATE_OOM, out_dir):
        loss, kl, n_act, update_macs = 0.0, 0.0, 0, 0.0
        if kept:
            loss, kl, n_act, update_macs = update(learner, rounds, filler=seen[0])

    # e) statistics: sums over this rank's rows, then over the ranks (with the stop flag)
    sums = {k: float(torch.cat([getattr(rnd, k) for rnd in seen]).double().sum())
            for k in ("reward", "accuracy", "format", "lengths", "latent_steps")}
    flat = torch.cat([torch.eq(*rnd.reward.view(-1, group_size).aminmax(dim=1)) for rnd in seen])
    macs = update_macs + sum(rnd.rollout_macs for rnd in seen)
    sums.update(loss=float(loss), kl=float(kl), flat=float(flat.sum()), groups=len(flat), macs=macs,
                rollout_s=sum(rnd.rollout_s for rnd in seen), stopping=len(signalled))
    reduced = parallel.all_reduce(
        torch.tensor(list(sums.values()), dtype=torch.float64, device=device)
    )
    total = dict(zip(sums, reduced.tolist()))
    n_rows = total["groups"] * group_size
    per_row = {k: total[k] / n_rows for k in ("reward", "accuracy", "format", "latent_steps")}
    stats = {
        "loss": total["loss"], **per_row, "length": total["lengths"] / n_rows,
        "flat_groups": total["flat"] / total["groups"], "kept_groups": kept, "draws": len(seen),
        "kl": total["kl"] / max(1, n_act), "macs": total["macs"], "step_s": time.time() - t0,
        "rollout_tok_s": total["lengths"] / (total["rollout_s"] / world),
    }
    return stats, drawn, total["stopping"] > 0


def resolve(config):
    """The settings left at auto -> their values (cli.configure writes and prints them): a hub id's
    snapshot, the task the policy trained on (data.task_settings), the images as it trained, this
    process's device and its dtype, and a pause or crop checkpoint's decoding by count
    (lvr.span_count)."""
    path = checkpoint.locate(init_from)
    policy = out_dir if resume else path
    chosen, note = data.task_settings(policy, task, hops, level, image_size, doing="trained")
    if note and data_path == "synthetic" and os.environ.get("RANK", "0") == "0":
        print(note)
    bounds = data.trained_pixels(policy, data.LVR_PIXELS)  # as the policy trained
    size, lo, hi = data.image_settings(
        chosen["task"].value, chosen["image_size"].value, min_pixels, max_pixels=max_pixels,
        synthetic=data_path == "synthetic", bounds=bounds,
    )
    chosen["image_size"] = cli.From(size, chosen["image_size"].source)
    here = parallel.local_device(device)
    how, steps = lvr.span_count(checkpoint.read_config(policy), decoding, cli.given(lvr_steps))
    return {"dtype": parallel.autocast_dtype(dtype, here), **chosen, "min_pixels": lo,
            "max_pixels": hi, "init_from": path, "device": here, "decoding": how,
            "lvr_steps": steps}


def check():
    """The settings that rule each other out, and the output directory: one line each, before any
    work."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cli.require(
        batch_size % world == 0,
        f"--batch_size {batch_size} is not a multiple of the {world} processes",
    )
    cli.require(
        accuracy_weight + format_weight > 0,
        "--accuracy_weight and --format_weight are both 0: no reward",
    )
    checkpoint.check_out_dir(out_dir, fresh=not resume)


def log_step(bar, history, step, stats):
    """One step in log.jsonl's history (its statistics, the compute in multiply-accumulates among
    them: train_step's) and on the bar."""
    history.append({"step": step, **stats})
    bar.update(1)
    bar.set_postfix(
        reward=f"{stats['reward']:.3f}", acc=f"{stats['accuracy']:.2f}", kl=f"{stats['kl']:.4f}",
    )


def main(argv):
    # 1) settings, checked before any work
    config = cli.configure(globals(), argv, resolve)
    check()

    # 2) processes, data, the policy and its frozen reference
    rank, world, dev, ddp = parallel.setup(device, fsdp)
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
    step, history, drawn = 0, [], 0  # drawn: rounds of B prompts taken so far
    if resume:
        state = checkpoint.load_train_state(out_dir, config)
        parallel.load_optimizer(model, opt, state, fsdp=fsdp)
        step, history, drawn = (
            state["step"], checkpoint.read_log(out_dir), state.get("drawn", state["step"]),
        )
    macs = sum(x.get("macs", 0.0) for x in history)  # the run's compute so far, over all processes

    # 4) the loop
    autocast = torch.autocast(dev.split(":")[0], torch.bfloat16, enabled=dtype == "bfloat16")
    learner = Learner(policy, ref, tok, ids=ids, records=records, opt=opt, params=params,
                      autocast=autocast)
    signalled = cli.stop_flag()  # Ctrl-C / SIGTERM on any rank: every rank ends the step, saves
    bar = tqdm(total=max_iters, initial=step, disable=rank != 0, dynamic_ncols=True)
    with parallel.finishing(ddp, skipped=SKIPPED, data_path=data_path, device=dev, rank=rank), bar:
        while step < max_iters and not (max_macs and macs >= max_macs):
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / max(1, warmup_iters))  # warmup, then constant
            stats, drawn, stopping = train_step(learner, drawn, signalled)
            if not math.isfinite(stats["loss"]):
                raise InputError(
                    f"loss is not finite at step {step}; stopped, {out_dir} keeps the last good checkpoint"
                )
            macs += stats["macs"]
            step += 1
            log_step(bar, history, step=step, stats=stats)

            # 5) checkpoint
            spent = max_macs and macs >= max_macs
            if stopping or step % save_interval == 0 or step == max_iters or spent:
                if rank == 0:
                    tqdm.write(
                        f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in stats.items())
                    )
                train_state = {"step": step, "config": config, "drawn": drawn}
                parallel.save(
                    model, tok, opt, out_dir=out_dir, train_state=train_state, history=history,
                    fsdp=fsdp, rank=rank, signalled=signalled if stopping else None,
                )


if __name__ == "__main__":
    cli.run(main)
