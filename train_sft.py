"""
Supervised training of latent visual reasoning: LVR, Mirage stage 1 and 2, plain SFT, or the
controls.

    python train_sft.py                                   # tiny model from scratch, synthetic task, CPU
    python train_sft.py --init_from Qwen/Qwen2.5-VL-3B-Instruct --data_path lvr.json --image_root imgs/
    torchrun --nproc_per_node 8 train_sft.py --init_from ... # DDP; --fsdp true: FSDP2 (parallel.py)

Every setting below is a `--name value` flag. The global batch of one optimizer step is
batch_size * grad_accum * world_size examples, taken in a fixed order from the data, so N
processes give the same run as one process with N times the accumulation.
Checkpoints are Hugging Face Qwen2.5-VL directories plus train_state.pt, written atomically.
A run can stop part-way on a longer schedule and go on later (nanoGPT's lr_decay_iters):
`--max_iters 500 --lr_decay_iters 4000`, then the same with `--max_iters 1000 --resume true`, and so
on, is the run of `--max_iters 4000`.
"""

import contextlib
import functools
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import cli
import data
import evaluate
import lvr
import parallel
import qwen
import tasks
import vision
from cli import Auto, InputError

# -----------------------------------------------------------------------------
# I/O
init_from = "scratch"  # "scratch" (tiny model + tokenizer), a checkpoint directory or a hub id ORG/NAME[@REV]
out_dir = "out"  # checkpoint directory
resume = False  # continue from out_dir/train_state.pt
eval_interval = 500  # [1, inf) evaluate and checkpoint every this many steps
eval_examples = 128  # [0, inf) held-out examples per evaluation (0: checkpoints only)
# data
data_path = "synthetic"  # "synthetic" or an LVR JSON/JSONL or Mirage JSONL file
eval_data_path = ""  # held-out records (data_path's format) to evaluate on; "" with a file: its first records
image_root = ""  # directory the dataset's image paths are relative to (they may not leave it)
on_bad_record = "fail"  # {fail, skip} a record with a bad image, bbox or text stops the run, or is skipped
task = "colour"  # {colour, search, relation, imagine, hops, vsp} the synthetic task (tasks.py)
level = "3"  # VSP's map size: 3 to 6 cells a side, a list (3,4) or a range (3-6) to mix them
hops = 1  # [1, 5] --task hops: the moves from the anchor (one look each, after the anchor's)
vsp_targets = "box+goal"  # {box+goal, box+path, moves+goal, moves+path} VSP: LVR's regions + Mirage's helper
image_size = Auto(int)  # [28, inf) synthetic image side, a multiple of 28 (auto: the task's, 168; search 336)
min_pixels = Auto(int)  # [1, inf) smallest image area after resizing (auto: as trained, else 100352)
max_pixels = Auto(int)  # [1, inf) largest image area (auto: as trained, else 4014080; synthetic: its own)
data_workers = 2  # [0, inf) DataLoader processes preparing batches (0: on the training thread)
seed = 1337  # [0, inf) seeds the model init and the synthetic data
# method
method = "lvr"  # {lvr, mirage, none, pause, box, crop} none: plain SFT; box: bbox as text; crop: + region
stage = 1  # [1, 2] 1: teacher-forced latents; 2: its own latents fed back (LVR: + their latent loss)
ce_weight = Auto(float)  # [0, inf) weight of the text CE (auto: Mirage from a checkpoint 0.1, else 1)
latent_weight = Auto(float)  # [0, inf) weight of the latent loss (auto: Mirage from a checkpoint 1, else 0.1)
latent_loss = "auto"  # {auto, mse, cosine, l1} auto: official LVR mse, Mirage cosine; tiny model cosine
switch_weight = 0.1  # [0, inf) mode-switch loss: BCE on <|lvr_end|> at in-span states (spans end as trained)
max_latents = Auto(int)  # [0, inf) latents per ROI, 0: all; pause: per span (auto: VSP 16, else 0; pause 1)
mirage_k = Auto(int)  # [1, inf) Mirage: latents per helper image (auto: VSP 16, else 4)
latent_head = False  # learn a head hidden -> latent (else identity)
latent_end = False  # train the `latent` exit mode (<|lvr_latent_end|> after the latents)
end_threshold = 0.1  # (0, inf) `latent` exit threshold, recorded in the checkpoint (zero vector at 1)
bottleneck = False  # LIVR: tokens after the image but the latent slots cannot see it, then normal attention
bottleneck_share = 0.5  # (0, 1) with --bottleneck: the share of the schedule under it (the first steps)
freeze_vision = True  # keep the vision tower and merger fixed (targets never get gradient)
# optimisation
batch_size = 16  # [1, inf) examples per micro-batch per process
grad_accum = 1  # [1, inf) micro-batches per optimizer step
lr = Auto(float)  # (0, inf) peak learning rate (auto: 1e-5 from a checkpoint, official LVR; scratch 1e-3)
min_lr = Auto(float)  # [0, inf) learning rate at the end of the cosine (auto: 0 from a checkpoint; 1e-4)
warmup_iters = Auto(int)  # [0, inf) linear warmup steps (auto: 3% of the schedule from a checkpoint; 50)
max_iters = 2000  # [1, inf) optimizer steps
lr_decay_iters = Auto(int)  # [1, inf) the schedule's length: warmup, cosine, bottleneck (auto: max_iters)
max_macs = 0.0  # [0, inf) also stop once the run's compute reaches this many multiply-accumulates (0: off)
weight_decay = 0.0  # [0, inf) AdamW weight decay
grad_clip = 1.0  # [0, inf) clip the gradient norm (0 = off)
# system
dtype = "auto"  # {auto, float32, bfloat16} bfloat16: autocast, fp32 master weights (auto: bf16 on CUDA)
device = "cuda" if torch.cuda.is_available() else "cpu"
grad_checkpointing = False  # recompute decoder layers in backward to save memory
fsdp = False  # under torchrun: shard with FSDP2 (fully_shard) instead of DDP, for models one GPU can't hold
# -----------------------------------------------------------------------------
SKIPPED = {}  # bad records skipped so far: index -> why
SFT_OOM = ("lower --batch_size (raise --grad_accum to keep the batch), --max_pixels; "
           "or --grad_checkpointing true, or --fsdp true under torchrun")
EVAL_OOM = "lower --batch_size (the evaluation's rows per rollout) or --max_pixels"


def loss_terms(method, stage, ce_weight, latent_weight, switch_weight, latent_loss):
    """The settings -> the step's LossTerms: stage 2 trains the text CE (LVR: + its latent loss on
    its own latents); pause and crop spans end by count (no mode-switch loss)."""
    if stage == 2:  # the model's own latents, with gradients through the chain (Mirage: text only)
        return lvr.LossTerms(latent=latent_weight if method == "lvr" else 0.0,
                             switch=switch_weight, latent_loss=latent_loss)
    return lvr.LossTerms(ce_weight, latent=latent_weight, latent_loss=latent_loss,
                         switch=0.0 if method in ("pause", "crop") else switch_weight)


def loss_of(model, batch, blinded, terms, stage, freeze_vision):
    """One micro-batch's (loss, ce, latent, switch): run through parallel.Root, so DDP and FSDP see
    it. stage 2: the model's own latents (lvr.own_latents_loss); blinded: under LIVR's bottleneck
    (lvr.blind_positions)."""
    if stage == 2:
        return lvr.own_latents_loss(model, batch, terms, freeze_vision=freeze_vision)
    return lvr.sft_loss(model, batch, terms, freeze_vision=freeze_vision, bottleneck=blinded)


def blinded_steps():
    """The steps trained under the bottleneck: the first bottleneck_share of the schedule (0
    without it)."""
    return round(bottleneck_share * lr_decay_iters) if bottleneck else 0


def resolve(config):
    """The settings left at auto -> their values (cli.configure writes and prints them). From a real
    checkpoint, the official recipes: LVR mse with CE 1 / latent 0.1 (official LVR), Mirage cosine
    with CE 0.1 / latent 1 (official Mirage); lr 1e-5 with a cosine to 0 after 3% warmup (official
    LVR SFT). The tiny scratch model keeps what trains it in minutes (cosine, CE 1 / latent 0.1, lr
    1e-3 to 1e-4 after 50 steps: see the README). Images: a data file's between the official LVR
    bounds, a synthetic task's at its own size. dtype: bf16 autocast on CUDA. A hub id: its snapshot
    in the Hugging Face cache."""
    real = init_from != "scratch"
    vsp = task == "vsp" and data_path == "synthetic"  # (its latents: what VSP's study chose)
    auto = {"latent_loss": "cosine" if method == "mirage" or not real else "mse",
            "ce_weight": 0.1 if method == "mirage" and real else 1.0,
            "latent_weight": 1.0 if method == "mirage" and real else 0.1,
            "lr": 1e-5 if real else 1e-3,
            "min_lr": 0.0 if real else 1e-4,
            "warmup_iters": round(0.03 * (cli.given(lr_decay_iters) or max_iters)) if real else 50,
            "lr_decay_iters": max_iters,
            "max_latents": 16 if vsp else 1 if method == "pause" else 0,
            "mirage_k": 16 if vsp else 4,
            "dtype": parallel.autocast_dtype(dtype, device)}
    out = {k: v if isinstance(config[k], Auto) or config[k] == "auto" else config[k]
           for k, v in auto.items()}

    # a data file's images: as the checkpoint trained, else official LVR's bounds (Mirage: the
    # processor's)
    path = checkpoint.locate(init_from) if real else init_from
    start = out_dir if resume else path
    bounds = data.trained_pixels(
        start, data.PROCESSOR_PIXELS if method == "mirage" else data.LVR_PIXELS
    )
    images = data.image_settings(
        task, image_size, min_pixels, max_pixels=max_pixels, synthetic=data_path == "synthetic",
        bounds=bounds,
    )
    out.update(zip(("image_size", "min_pixels", "max_pixels"), images))
    return {**out, "init_from": path} if real else out


def scratch(tmp):
    """The tiny model and tokenizer, written to tmp as a checkpoint (loaded back as a real one is)
    -> tmp."""
    special = qwen.SPECIAL + tasks.LATENT_SPECIAL
    tok = tasks.build_tokenizer(os.path.join(tmp, "tokenizer.json"), special=special)
    cfg = qwen.Config.from_dict(tasks.tiny_config(tok))
    cfg.extra["lvr_head"] = latent_head
    torch.manual_seed(seed)
    model = qwen.Qwen2_5_VL(cfg)
    model.init_weights()
    model.save_pretrained(tmp)
    return tmp


def build(tmp, dev):
    """-> (the Root every forward runs through, the model, tokenizer, latent ids). Scratch writes a
    tiny checkpoint first, so loading is the real path. FSDP: built on the meta device, sharded,
    then each rank loads its part (parallel.load_sharded); else loaded whole, onto the device."""
    path = out_dir if resume else scratch(tmp) if init_from == "scratch" else init_from
    tok = checkpoint.load_tokenizer(path)

    # the tokenizer's tokens before the latent ones: their rows start at the mean of these
    before = len(tok)
    names = lvr.MIRAGE_TOKENS if method == "mirage" else lvr.LVR_TOKENS

    # the latent head and tokens, and what evaluate.py needs to know of the training
    def init(model):
        if freeze_vision:  # (before DDP or FSDP wrap the model: they keep what trains)
            model.visual.requires_grad_(False)
        if latent_head and not hasattr(model, "lvr_head"):
            model.cfg.extra["lvr_head"] = True
            model.lvr_head = qwen.latent_head(model.cfg)
        vocab = model.cfg.vocab_size
        ids = lvr.add_latent_tokens(model, tok, names)
        if fsdp and len(tok) > vocab:
            raise InputError(
                f"{path}: the embedding has {vocab} rows, too few for the latent tokens; "
                f"--fsdp loads into its rows: add them first (train once without --fsdp)"
            )
        # what the latents reconstruct, so that evaluate.py can build the same targets (its oracle
        # row)
        model.cfg.extra["latent_targets"] = {
            "method": method,
            "max_latents": max_latents,
            "k": mirage_k,
            "vsp": vsp_targets,
        }
        # the image sizes evaluate.py uses, and (synthetic data) the task it scores by default
        model.cfg.extra["lvr_image_pixels"] = [min_pixels, max_pixels]
        if data_path == "synthetic":
            model.cfg.extra["lvr_task"] = {
                "task": task, "hops": hops, "level": level, "image_size": image_size
            }
        # the `latent` exit's distance (the one its embedding is trained with) and threshold
        if latent_end:
            model.cfg.extra.update(
                latent_end_metric=latent_loss, latent_end_threshold=end_threshold
            )
        return ids

    if fsdp:
        def fix(name, w):  # the latent tokens' rows, on the full CPU tensor
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                return lvr.latent_rows(w, before, len(tok))
            return w
        root, model, ids = parallel.load_sharded(
            path, dtype=torch.float32, device=dev, init=init, fix=fix
        )
        return root, model, tok, ids

    model = checkpoint.load(path)[0]
    ids = init(model)
    model.to(dev)
    root = parallel.Root(model)
    if dist.is_initialized():
        root = torch.nn.parallel.DistributedDataParallel(root)
    return root, model, tok, ids


def collated(exs, tok, ids):
    """Examples -> one padded SFT batch (data.collate's fields)."""
    spans = data.LatentTargets(method, max_latents, k=mirage_k, latent_end=latent_end)
    rows = [data.encode(e, tok, ids, targets=spans, pixels=(min_pixels, max_pixels)) for e in exs]
    return data.collate(rows, tok.endoftext)


def examples(start, n, records, split="train"):
    """Examples [start, start + n) of the training stream, or of the held-out one (split "eval":
    synthetic seeds training never draws, or the records of --eval_data_path)."""
    if records is None:
        return [
            tasks.synthetic(
                split, i, seed, size=image_size, task=task, level=level, vsp_targets=vsp_targets,
                hops=hops,
            )
            for i in range(start, start + n)
        ]

    def convert(rec, where):
        return data.record_example(rec, image_root, where)

    path, skipped = (data_path, SKIPPED) if split == "train" else (eval_data_path, {})
    return [
        data.stream_example(
            records, i, seed, convert=convert, where=path,
            skipped=skipped if on_bad_record == "skip" else None,
        )
        for i in range(start, start + n)
    ]


def first_batch(root, model, tok, ids, records, rank, dev):
    """What the image bounds make of the data (the first example's images, as encoded), and, for a
    cosine-trained latent, the targets' mean norm recorded from the first batch (lvr.latent_input
    feeds latents back at it)."""
    if rank == 0:
        sizes = [vision.merged_tokens(vision.preprocess(im, min_pixels, max_pixels)[1])
                 for im in examples(0, 1, records)[0]["images"]]
        print(f"first example: {len(sizes)} image(s) of {', '.join(map(str, sizes))} merged tokens")

    if (latent_loss == "cosine" and method in ("lvr", "mirage") and stage == 1
            and "latent_norm" not in model.cfg.extra):
        # (FSDP: resharded after, so the optimizer gets the shards)
        with parallel.gathered(root, fsdp):
            first = data.to_device(collated(examples(0, batch_size, records), tok, ids), dev)
            root(lvr.record_latent_norm, first)


def get_lr(step):
    """Linear warmup, then a cosine from lr down to min_lr."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    progress = (step - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def as_is(item):
    """The DataLoader's conversion: none (its default turns the batch's tuples into lists)."""
    return item


class MicroBatches(torch.utils.data.Dataset):
    """Micro-batch k of this rank's training stream, collated on a DataLoader worker (image resizing
    and normalisation off the training thread) -> (batch, the bad records skipped so far). The
    step's examples are the same whatever the process layout: N ranks take turns through the global
    batch."""

    def __init__(self, tok, ids, records, rank, world):
        self.tok, self.ids, self.records, self.rank, self.world = tok, ids, records, rank, world

    def __len__(self):
        return max_iters * grad_accum

    def loader(self, step):
        """The DataLoader over this rank's micro-batches from `step` on (workers collate them)."""
        return torch.utils.data.DataLoader(
            self, batch_size=None, sampler=range(step * grad_accum, max_iters * grad_accum),
            num_workers=data_workers, generator=torch.Generator(), collate_fn=as_is,
        )

    def __getitem__(self, k):
        step, micro = divmod(k, grad_accum)
        start = (
            step * batch_size * grad_accum * self.world
            + (micro * self.world + self.rank) * batch_size
        )
        batch = collated(examples(start, batch_size, self.records), self.tok, self.ids)
        return batch, dict(SKIPPED)  # (a worker's SKIPPED is its own copy)


def next_batches(stream):
    """The step's grad_accum micro-batches from the DataLoader (and the bad records its workers
    skipped, into SKIPPED)."""
    batches = []
    for _ in range(grad_accum):
        batch, skipped = next(stream)
        batches.append(batch)
        SKIPPED.update(skipped)

    return batches


def sft_macs(model, batch):
    """A micro-batch's compute (multiply-accumulates, counted as qwen's Qwen2_5_VL.macs counts
    them): the forward and backward (3x a forward) of every pass through the LM (stage 2: one per
    latent of the longest row, and one more), lm_head at the supervised positions, the tower's
    forward on the images (3x when it trains) and on Mirage's helper images."""
    tokens = int(batch["attention_mask"].sum())
    heads = int((batch["labels"] != -100).sum())
    rows = batch["latent_pos"][0]
    passes = int(torch.bincount(rows).max()) + 1 if stage == 2 and len(rows) else 1
    patches = batch["pixel_values"].shape[0] * (1 if freeze_vision else 3)
    patches += batch["helper_pixel_values"].shape[0] if "helper_pixel_values" in batch else 0
    return 3 * passes * model.macs(tokens) + 3 * model.macs(0, heads) + model.macs(0, 0, patches)


def train_step(root, batches, loss_fn, dev, autocast, blinded=False):
    """Forward and backward over the step's grad_accum micro-batches -> the summed (ce, latent,
    switch) losses on the device (read once per step: no host sync per micro-batch). loss_fn:
    loss_of with its settings; blinded: LIVR's bottleneck."""
    ddp = dist.is_initialized()
    sums = torch.zeros(3, device=dev)
    for micro, batch in enumerate(batches):
        batch = data.to_device(batch, dev)
        # DDP all-reduces once, after the last micro-batch (FSDP reduce-scatters every one)
        sync = (
            contextlib.nullcontext()
            if not ddp or fsdp or micro == grad_accum - 1
            else root.no_sync()
        )
        with sync, autocast:
            loss, ce, lat, sw = root(loss_fn, batch, blinded)
            (loss / grad_accum).backward()
        sums += torch.stack([ce, lat, sw]).float() / grad_accum

    return sums


def held_out_accuracy(root, model, tok, ids, records, held_out, dev, step):
    """evaluate.py's accuracy with the latent rollout on held-out examples: --eval_data_path's, or
    the synthetic task's (seeds training never draws). A data file without --eval_data_path is
    scored on its first training examples, and the print says so: that measures fit, not
    generalisation. Under torchrun each rank decodes its share (FSDP: with the full weights
    gathered, since ranks decode different lengths). -> the history's line of it ([] without
    examples)."""
    if held_out is not None:
        exs, what = held_out, "held-out"
    elif records is None:
        exs, what = examples(0, n=eval_examples, records=None, split="eval"), "held-out"
    else:
        exs, what = examples(0, min(eval_examples, len(records)), records), "training-set"

    if not exs:  # --eval_examples 0: checkpoints only
        return []
    rank, world = parallel.rank_world()
    model.eval()

    # the longest span and the longest completion (a box is ~27 tokens), and some
    rows = [collated([e], tok, ids) for e in exs]
    budget = max(len(r["latent_slot"]) for r in rows) + 4
    longest = max(int((r["labels"] != -100).sum()) + len(r["latent_slot"]) for r in rows)
    right = torch.zeros(1, device=dev)
    with parallel.gathered(root, fsdp), cli.out_of_memory("an evaluation", EVAL_OOM, out_dir):
        if exs[rank::world]:
            # Mirage spans are always k long, pause spans max_latents; LVR spans differ per row: the
            # model ends them
            # (crop: each span as long as its box's region)
            by_count = method in ("mirage", "pause", "crop")
            decoding = "latent" if latent_end else "steps" if by_count else "token"
            count = max_latents if method == "pause" else mirage_k
            decode = lvr.Decode(
                decoding, lvr_steps=count, max_latent_steps=budget, force_end=True,
                end_metric=latent_loss, end_threshold=end_threshold,
                max_new_tokens=max(48, longest + 16),
                bottleneck=step <= blinded_steps(),  # (as the model was last trained)
            )
            pixels = (min_pixels, max_pixels)
            r = evaluate.evaluate(
                model, tok, ids, exs=exs[rank::world], decode=decode, pixels=pixels,
                batch_size=batch_size,
            )
            right += sum(r["right"])

    right = parallel.all_reduce(right)
    if rank == 0:
        print(
            f"\nstep {step}: {what} accuracy {float(right) / len(exs):.3f} on {len(exs)} examples"
        )

    model.train()
    return [{"step": step, "eval_accuracy": float(right) / len(exs), "eval_examples": len(exs)}]


def check():
    """The settings that rule each other out, and the output directory: one line each, before any
    work."""
    cli.require(not (latent_end and method == "mirage"),
                "--latent_end true needs a latent-end token, and Mirage's tokens have none")
    cli.require(
        not (stage == 2 and init_from == "scratch" and not resume),
        "--stage 2 continues a stage-1 checkpoint (LVR or Mirage): give it with --init_from "
        "(or --resume true on a copy of its run, to keep its optimizer and data stream)",
    )
    cli.require(not (stage == 2 and method in ("none", "pause", "box", "crop")),
                f"--stage 2 trains latents: --method {method} has none")
    cli.require(not (bottleneck and (method in ("none", "box", "crop") or stage == 2)),
                "--bottleneck true needs latent slots to pass the image through, in stage 1 "
                "(--method lvr, mirage or pause)")
    cli.require(
        not (method in ("pause", "box", "crop") and (latent_head or latent_end)),
        f"--method {method} produces no latent: it has no latent head and no `latent` exit",
    )
    cli.require(min_lr <= lr, f"--min_lr {min_lr} is above --lr {lr}")
    cli.require(method != "pause" or max_latents > 0,
                "--method pause ends its spans by count: --max_latents 1 or more")
    checkpoint.check_out_dir(out_dir, fresh=not resume)


def step_stats(sums, batches, model, signalled, dev, step):
    """Step `step`'s numbers, the same on every rank -> (losses {ce, latent, switch}: the global
    means; whether any rank was asked to stop, so all stop together; the step's compute, all
    ranks')."""
    ddp = dist.is_initialized()
    world = dist.get_world_size() if ddp else 1
    step_macs = float(sum(sft_macs(model, b) for b in batches))
    stats = torch.cat([sums, torch.tensor([float(len(signalled)), step_macs], device=dev)])
    if ddp:
        dist.all_reduce(stats)
        stats = stats / world
    ce, lat, switch, stopping, mean_macs = stats.tolist()
    loss = {"ce": ce, "latent": lat, "switch": switch}
    if not (math.isfinite(ce) and math.isfinite(lat)):
        raise InputError(
            f"loss is not finite at step {step} (ce {ce}, latent {lat}); stopped, {out_dir} keeps "
            f"the last good checkpoint"
        )
    return loss, bool(stopping), mean_macs * world


def log_step(bar, history, step, loss, macs, times):
    """One step in log.jsonl's history (losses, lr, times, the run's compute so far) and on the
    bar. times: (the step's start, its wait for data)."""
    t0, t_data = times
    history.append({"step": step, **loss, "lr": get_lr(step - 1), "step_s": time.time() - t0,
                    "data_s": t_data, "macs": macs})
    bar.update(1)
    bar.set_postfix(
        **{k: f"{v:.4f}" for k, v in loss.items()}, lr=f"{get_lr(step - 1):.1e}",
        ms=f"{1000 * (time.time() - t0):.0f}", data_ms=f"{1000 * t_data:.0f}",
    )


def main(argv):
    # 1) settings, checked before any work
    config = cli.configure(globals(), argv, resolve)
    rank, world, dev, ddp = parallel.setup(device, fsdp)
    check()

    # 2) data and model (a data file's bad held-out record stops the run here, not at evaluation)
    records = None if data_path == "synthetic" else data.load_records(data_path)
    held_out = None
    if eval_data_path:
        recs = data.load_records(eval_data_path)
        held_out = examples(0, n=min(eval_examples, len(recs)), records=recs, split="eval")
    with tempfile.TemporaryDirectory() as tmp:
        root, model, tok, ids = build(tmp, dev)
    model.train()
    model.grad_checkpointing = grad_checkpointing
    first_batch(root, model, tok, ids=ids, records=records, rank=rank, dev=dev)

    # 3) optimizer, and the saved state when resuming
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    step, history, macs = 0, [], 0.0  # macs: the run's compute so far (Qwen2_5_VL.macs)
    if resume:
        state = checkpoint.load_train_state(out_dir, config)
        parallel.load_optimizer(model, opt, state, fsdp=fsdp)
        step, history, macs = state["step"], checkpoint.read_log(out_dir), state.get("macs", 0.0)
        torch.set_rng_state(state["rng"])

    # 4) the loop, its loss resolved once
    terms = loss_terms(method, stage, ce_weight, latent_weight, switch_weight, latent_loss)
    loss_fn = functools.partial(loss_of, terms=terms, stage=stage, freeze_vision=freeze_vision)
    autocast = torch.autocast(dev.split(":")[0], torch.bfloat16, enabled=dtype == "bfloat16")
    stream = iter(MicroBatches(tok, ids, records, rank=rank, world=world).loader(step))
    signalled = cli.stop_flag()  # Ctrl-C / SIGTERM: finish the step, save it, exit
    bar = tqdm(total=max_iters, initial=step, disable=rank != 0, dynamic_ncols=True)
    with parallel.finishing(ddp, skipped=SKIPPED, data_path=data_path, device=dev, rank=rank), bar:
        while step < max_iters and not (max_macs and macs >= max_macs):
            t0 = time.time()
            for g in opt.param_groups:
                g["lr"] = get_lr(step)
            batches = next_batches(stream)
            t_data = time.time() - t0  # (the time the device idles for data)
            with cli.out_of_memory("an SFT step", SFT_OOM, out_dir):
                sums = train_step(root, batches, loss_fn, dev, autocast=autocast,
                                  blinded=step < blinded_steps())
            loss, stopping, step_macs = step_stats(
                sums, batches, model, signalled=signalled, dev=dev, step=step
            )
            macs += step_macs
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            log_step(bar, history, step, loss=loss, macs=macs, times=(t0, t_data))

            # 5) evaluate and checkpoint (on the way out: only the checkpoint)
            spent = max_macs and macs >= max_macs
            if stopping or step % eval_interval == 0 or step == max_iters or spent:
                if not stopping:
                    history += held_out_accuracy(
                        root, model, tok, ids=ids, records=records, held_out=held_out, dev=dev,
                        step=step,
                    )
                state = {"step": step, "macs": macs, "config": config, "rng": torch.get_rng_state()}
                parallel.save(
                    model, tok, opt, out_dir=out_dir, train_state=state, history=history,
                    fsdp=fsdp, rank=rank, signalled=signalled if stopping else None,
                )


if __name__ == "__main__":
    cli.run(main)
