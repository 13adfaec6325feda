"""
Evaluate a checkpoint: accuracy, format rate, latent steps and latent hit rate, with the latents
on and with them disabled, side by side.

    python evaluate.py                                   # out/ on held-out synthetic examples
    python evaluate.py --init_from out_grpo --n_examples 512
    python evaluate.py --data_path val.jsonl --image_root imgs/                      # LVR JSON with bboxes
    python evaluate.py --data_path MMVP/Questions.csv --image_root "MMVP/MMVP Images"   # MMVP layout
    python evaluate.py --data_path vstar/test_questions.jsonl --image_root vstar/        # V* layout

Does the model reason through its latents? One row per way of feeding them (LVR checkpoints,
on synthetic tasks and LVR JSON files; Mirage on synthetic tasks):
  with latents      its own;
  latents disabled  <|lvr_end|> right after <|lvr_start|>: the answer from text and image alone;
  dummy latents     every latent input one fixed vector, the mean of its own latents (no example's
                    content; shorter than they are, unless they are parallel);
  swapped latents   each example fed the next example's own latents;
  oracle latents    the training targets (ROI tokens, helper-image chunks): what a latent can carry.
Under the table, when a latent can pay: its target's value (oracle - dummy: what the target
carries for the answer) and the share of it the model produces ((own - dummy) / (oracle - dummy);
not measured where the value is under 0.02: the target carries nothing to produce).
A box or crop checkpoint (train_sft --method box / crop: the bbox written as text, then for crop
its region fed) has three rows of its own, the same questions with the boxes replaced:
  with own boxes    its own;
  oracle boxes      the true boxes (box: their text opens the answer; crop: their regions fill the
                    spans, the text being its own);
  swapped boxes     the next example's boxes;
with the box IoU and hit rate (a parsed box whose centre lies in the true box), and the two lines
read as oracle - swapped and (own - swapped) / (oracle - swapped).
A pause checkpoint (train_sft --method pause, the control) has the first two rows: its slots read
one learned vector, so dummy and swapped latents would be its own, and it has no targets. With
--bottleneck true every row runs under LIVR's mask (the answer sees the image only through the
slots), where latents disabled leaves the answer blind to the image.
Latent hit rate: the fraction of the fed latents whose nearest merged image token (cosine) lies
inside one of the example's bboxes: do they look where they should? The latent norm over the target
norm shows the norm-regime gap (arXiv 2605.12374), except where the checkpoint feeds its latents at
the targets' norm (cosine-trained: lvr.latent_input), which sets it, and the line says so. Multiple
choice (data.py reads the files) is scored as letters, as the papers do: MMVP per question and per
pair (both right: the LVR paper's 71.67 is per question, its Table 2's 55.8 per pair), V* per
category. Held-out synthetic examples are tasks.py's test
split: never seen by train_sft or train_grpo.
"""

import collections
import dataclasses
import functools
import json
from dataclasses import dataclass

import torch

import checkpoint
import cli
import data
import lvr
import parallel
import tasks
import vision
from cli import Auto, InputError

# -----------------------------------------------------------------------------
# I/O
init_from = "out"  # checkpoint directory, or a Hugging Face hub id ORG/NAME[@REVISION]
save = ""  # also write the rows, each with every example's correctness, to this JSON file ("": print only)
# data
data_path = "synthetic"  # synthetic | an LVR JSON/JSONL with bboxes | an MMVP-style CSV | a V*-style JSONL
image_root = ""  # directory the dataset's images are in (MMVP: the folder of <Index>.jpg)
n_examples = 256  # [1, inf) held-out synthetic examples (or at most this many from a file)
unseen_maps = False  # a VSP data file (Mirage's): score only the maps the built-in task never trains on
# (task, level, hops, image_size at auto: the checkpoint's, as train_sft recorded them)
task = "auto"  # {auto, colour, search, relation, imagine, hops, vsp} the synthetic task (else colour)
level = "auto"  # VSP's map size: 3 to 6 cells a side, a list (3,4) or a range (3-6) (else 3)
hops = Auto(int)  # [1, 5] --task hops: the moves from the anchor, one look each (else 1)
image_size = Auto(int)  # [28, inf) synthetic image side, a multiple of 28 (else the task's: 168; search 336)
min_pixels = Auto(int)  # [1, inf) smallest image area after resizing (auto: as trained, else 3136)
max_pixels = Auto(int)  # [1, inf) largest image area (auto: as trained, else 12845056; synthetic: its own)
seed = 1337  # [0, inf) the synthetic held-out set
split = "test"  # {test, eval} the synthetic split: test, or eval (the validation split the study tunes on)
# decoding
decoding = "auto"  # {auto, token, steps, latent} latent exit (auto: a pause checkpoint's steps, else token)
lvr_steps = Auto(int)  # [0, inf) latent steps in `steps` mode (auto: a pause checkpoint's count, else 8)
max_latent_steps = 16  # [1, inf) latent budget in `token` / `latent` modes
force_end = True  # force <|lvr_end|> after a span (false: the model's own next token, as the official code)
end_metric = "checkpoint"  # {checkpoint, mse, cosine, l1} `latent` exit distance (checkpoint: as trained)
end_threshold = Auto(float)  # (0, inf) `latent` exit threshold (auto: the checkpoint's, else 0.1)
max_new_tokens = Auto(int)  # [1, inf) completion budget (auto: 32; box and crop 192: a box is ~27 tokens)
diagnostics = True  # also the rows that replace the latents (disabled, dummy, swapped, oracle)
bottleneck = False  # every row under LIVR's mask: the answer sees the image only through the slots
# system
batch_size = 32  # [1, inf) rows per batched rollout
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"  # {auto, float32, bfloat16} the weights' dtype (auto: bfloat16 on CUDA)
# -----------------------------------------------------------------------------


def unseen(records, path):
    """--unseen_maps: the records of the VSP file at `path` whose maps the built-in training stream
    never draws (the test and eval maps of tasks.map_split), and a line saying how many of how many
    were kept."""
    where = [f"{path} record {i}" for i in range(len(records))]
    if not all("map_desc" in r for r in records):
        raise InputError(f"--unseen_maps true needs a VSP file: every record with a map_desc, and "
                         f"{where[next(i for i, r in enumerate(records) if 'map_desc' not in r)]} "
                         f"has none")
    kept = [r for r, w in zip(records, where)
            if tasks.map_split(data.vsp_map(r["map_desc"], w)) != "train"]
    print(f"--unseen_maps: kept {len(kept)} of {len(records)} maps, those the built-in task never "
          f"trains on")
    if not kept:
        raise InputError(f"--unseen_maps true: every map of {path} is one the built-in task "
                         f"trains on")
    return kept


def load_examples(trained):
    """The evaluation set: held-out synthetic examples, an LVR JSON file (with bboxes), or MMVP /
    V*. `trained`: the checkpoint's latent_targets."""
    if data_path == "synthetic":
        # (VSP: the targets it was trained on, for the oracle)
        vsp_targets = trained.get("vsp", tasks.VSP_TARGETS[0])
        return [
            tasks.synthetic(
                split, i, seed, size=image_size, task=task, level=level, vsp_targets=vsp_targets,
                hops=hops,
            )
            for i in range(n_examples)
        ]

    if data_path.endswith((".json", ".jsonl")):
        records = data.load_records(data_path)
        records = unseen(records, data_path) if unseen_maps else records
        # LVR, Mirage, Mirage's VSP maps
        if {"conversations", "image_output", "map_desc"} & set(records[0]):
            return [
                data.record_example(r, image_root, f"{data_path} record {i}")
                for i, r in enumerate(records[:n_examples])
            ]

    return data.load_multiple_choice(data_path, image_root, n_examples)


def latent_hits(latents, feats, roi):
    """(n, C) latent vectors, (N, C) merged image tokens, ROI token indices -> how many hit the
    ROI."""
    if len(latents) == 0:
        return 0
    return sum(c in set(roi) for c in lvr.nearest_cells(latents, feats).tolist())


def span_lengths(is_latent):
    """(n,) bool of one row -> the lengths of its runs of latent steps (one per span)."""
    runs, n = [], 0
    for x in is_latent.tolist() + [False]:
        if x:
            n += 1
        elif n:
            runs, n = runs + [n], 0

    return runs


def box_image(e, j):
    """The image index of an example's j-th box (its bbox_images, else the first image)."""
    named = e.get("bbox_images") or []
    return named[j] if j < len(named) else 0


def box_prefix(tok, e, grids, boxes):
    """--method box, a forced row: the boxes' text as it opens the assistant turn (data.encode's
    box method, up to the answer)."""
    return tok.encode("".join(data.box_text(bb, grids[box_image(e, j)]) + "\n"
                              for j, bb in enumerate(boxes)))


def region_reader(tok, ids, exs, rows, max_latents, boxes=None):
    """--method crop, one batch of the rollout -> its crop(row, tokens): row b's j-th span reads
    the region the box its text wrote since its last span names (boxes: boxes[b][j] instead, the
    diagnostics' forced boxes): the merged tokens roi_groups pools, as LVR's targets are made.
    rows: per row (its images' (pixel_values, grid_thw) pairs, its merged tokens (N, C))."""
    images, feats = zip(*rows) if rows else ((), ())

    def crop(b, tokens):
        turn = tokens[len(tokens) - tokens[::-1].index(tok.im_start):]  # the assistant turn
        j = turn.count(ids.start) - 1
        since = turn[len(turn) - turn[::-1].index(ids.end):] if ids.end in turn else turn
        grids = [g for _, g in images[b]]
        k = box_image(exs[b], j)
        if boxes is None:
            written = data.written_boxes(tok.decode(since), grids[k])
            bbox = written[-1] if written else None
        else:
            bbox = boxes[b][j] if j < len(boxes[b]) else None
        if bbox is None:  # (no box: the span ends at once)
            return feats[b].new_zeros(0, feats[b].shape[-1]).float()
        start = vision.token_offsets(grids)[k]
        groups = [[start + i for i in g] for g in lvr.roi_groups(bbox, grids[k][0], max_latents)]
        return lvr.averaging_matrix(groups, len(feats[b])).to(feats[b].device) @ feats[b].float()

    return crop


@dataclass
class Scored:
    """One completion, scored."""
    right: bool
    format: bool
    hits: int  # latents (LVR) or boxes (box, crop) that hit the example's bboxes
    looks: int  # the latents or the boxes counted by hits
    iou: list  # box, crop: each written box's IoU with its true box


def score_boxes(e, row, text, grids, stop, crop_ids=None):
    """A box or crop completion -> Scored: the answer after its last box, the format (every box
    parses; crop: each box opens one span), and each parsed box against the example's bbox in
    order: its IoU and whether its centre lies in it (the hit rate)."""
    written = data.written_boxes(text, grids[0])
    fmt = data.is_box_format(row, text, stop, grids[0])
    if crop_ids is not None:
        fmt = fmt and row.count(crop_ids.start) == len(written)
    pairs = [(data.parse_box(m, grids[box_image(e, j)]), t)
             for j, (m, t) in enumerate(zip(data.BOX.finditer(text), e["bboxes"]))]
    pairs = [(w, t) for w, t in pairs if w is not None]
    return Scored(
        data.is_correct(data.after_boxes(text), e["answer"], e.get("map_desc")), fmt,
        hits=sum(data.centre_in(w, t) for w, t in pairs), looks=len(pairs),
        iou=[data.box_iou(w, t) for w, t in pairs],
    )


def example_roi(e, grids):
    """The merged-token indices (among the example's, image after image) inside its bboxes."""
    start = vision.token_offsets(grids)
    return [start[k] + j for bb, k in zip(e["bboxes"], e.get("bbox_images", [0] * len(e["bboxes"])))
            for j in lvr.roi_indices(bb, grids[k][0])]


# long: one batched rollout a chunk, then each row scored by its method
@torch.no_grad()
def evaluate(model, tok, ids, exs, decode, pixels=(3136, 28224), batch_size=32, feed=None,
             boxes=None):  # wide: evaluate.py's and train_sft's settings, and the forced rows
    """-> dict of accuracy, format, latent_steps, hit_rate (None without bboxes), iou (box, crop),
    the span lengths (a Counter), per-example correctness, and per example the latents fed ((n, C)
    each). `decode`: lvr.Decode; `pixels`: the images' (min_pixels, max_pixels). `feed`: per
    example, vectors to feed at its latent steps instead of its own (the diagnostics); `boxes`:
    per example, the boxes forced instead of its own (box: their text opens the answer; crop:
    their regions fill the spans). train_sft.py's periodic accuracy is this too."""
    stop, device = [tok.im_end, tok.endoftext], model.lm_head.weight.device
    method = lvr.method_of(model.cfg)
    scored, steps, spans, fed = [], 0, collections.Counter(), []
    for i in range(0, len(exs), batch_size):
        chunk = exs[i:i + batch_size]
        forced = None if boxes is None else boxes[i:i + batch_size]
        prefix = None
        if method == "box" and forced is not None:  # (the boxes in each image's resized pixels)
            prefix = [box_prefix(tok, e, [vision.grid_of(im, *pixels) for im in e["images"]], bb)
                      for e, bb in zip(chunk, forced)]
        p = data.prompt_batch(chunk, tok, *pixels, prefix=prefix)
        feats = model.visual(p["pixel_values"].to(device), p["grid_thw"])
        per_row = feats.split(p["n_image_tokens"])
        given = None
        if feed is not None:  # (B, K, C) and (B,): each row's vectors, zero-padded
            rows = [feed[i + b].float() for b in range(len(chunk))]
            given = lvr.Feed(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(device),
                             torch.tensor([len(v) for v in rows], device=device))
        crop = None
        if method == "crop":
            max_latents = model.cfg.extra["latent_targets"]["max_latents"]
            crop = region_reader(tok, ids, chunk, list(zip(p["images"], per_row)), max_latents,
                                 boxes=forced)
        prompt = lvr.Prompt(
            p["input_ids"].to(device), p["attention_mask"].to(device), grid_thw=p["grid_thw"],
            feats=feats,
        )
        r = lvr.rollout(model, ids, prompt, decode=decode, sampling=lvr.Sampling(stop_ids=stop),
                        feed=given, crop=crop)
        for b, (e, f) in enumerate(zip(chunk, per_row)):
            row = data.until_stop(r.tokens[b, p["input_ids"].shape[1]:].tolist(), stop)
            grids = [g for _, g in p["images"][b]]
            lats = r.latents[b, r.is_latent[b]].cpu()
            if method in ("box", "crop"):
                text = tok.decode((prefix[b] if prefix else []) + row)
                scored.append(score_boxes(e, row, text, grids, stop,
                                          crop_ids=ids if method == "crop" else None))
            else:  # LVR, Mirage, pause (a pause slot's input is one learned vector: no hit counted)
                text = tok.decode(row)
                looked = bool(e["bboxes"]) and not lvr.is_pause(model.cfg)
                scored.append(Scored(
                    data.is_correct(text, e["answer"], e.get("map_desc")),
                    data.is_lvr_format(row, ids, stop_ids=stop, text=text),
                    hits=latent_hits(lats, f, example_roi(e, grids)) if looked else 0,
                    looks=len(lats) if looked else 0, iou=[],
                ))
            steps += int(r.is_latent[b].sum())
            spans.update(span_lengths(r.is_latent[b]))
            fed.append(lats)

    n, looks, ious = len(exs), sum(x.looks for x in scored), [v for x in scored for v in x.iou]
    return {
        "accuracy": sum(x.right for x in scored) / n,
        "format": sum(x.format for x in scored) / n,
        "latent_steps": steps / n,
        "hit_rate": sum(x.hits for x in scored) / looks if looks else None,
        "iou": sum(ious) / len(ious) if ious else None,
        "spans": spans,
        "right": [x.right for x in scored],
        "latents": fed,
    }


@torch.no_grad()
def targets_of(model, tok, ids, exs, pixels=(3136, 28224), device="cpu"):
    """Per example, the vectors its latents were trained to reconstruct ((L, C), or None without
    bboxes or a helper image): ROI tokens (LVR) or helper-image chunks (Mirage), made as the
    checkpoint's training made them (config.json's latent_targets; without it, LVR over the whole
    ROI)."""
    trained = model.cfg.extra.get("latent_targets", {"method": "lvr", "max_latents": 0, "k": 4})
    method = trained["method"]
    out = []
    for e in exs:
        has_targets = e.get("helper") if method == "mirage" else e["bboxes"]
        if method in ("none", "pause", "box", "crop") or not has_targets:  # (box, crop: boxes)
            out.append(None)
            continue
        spans = data.LatentTargets(method, max_latents=trained["max_latents"], k=trained["k"])
        row = data.encode(e, tok, ids, targets=spans, pixels=pixels)
        batch = data.to_device(data.collate([row], tok.endoftext), device)
        out.append(lvr.encode_images(model, batch)[1].cpu())

    return out


@dataclass
class Geometry:
    """Where a model's own latents lie against their targets (None where there are no targets)."""
    norm_ratio: float  # mean latent norm / mean target norm (the norm-regime gap)
    distance: float  # mean ||latent_j - target_j|| over the steps both have, in order
    target_norm: float  # mean ||target||: the scale the distance is on


def geometry(own, targets):
    """Own latents ((n, C) per example) against the targets ((L, C) or None) -> Geometry, or
    None."""
    pairs = [(v, t) for v, t in zip(own["latents"], targets) if t is not None and len(v)]
    if not pairs:
        return None
    lats, tgts = torch.cat([v for v, _ in pairs]), torch.cat([t for _, t in pairs])
    dist = torch.cat([(v[:len(t)] - t[:len(v)]).norm(dim=-1) for v, t in pairs])
    norm = float(tgts.norm(dim=-1).mean())
    return Geometry(float(lats.norm(dim=-1).mean()) / norm, float(dist.mean()), norm)


MIN_VALUE = 0.02  # a target worth less accuracy than this over the dummy carries nothing to produce


@dataclass
class Conditions:
    """When a latent pays, read off the rows: its target must carry what the answer needs (value)
    and the model must produce it (the share of that value its own latents recover). For box and
    crop the same with boxes: the true box against another example's (swapped), and the share of
    that its own boxes recover."""
    value: float  # oracle - base: the accuracy the targets add over the base
    produced: float | None  # (own - base) / (oracle - base); None where value < MIN_VALUE
    base: str = "dummy"  # the contentless row: dummy latents, or (box, crop) swapped boxes

    def lines(self):
        out = [f"target value: oracle - {self.base} = {self.value:+.3f}"]
        if self.produced is None:
            return out + [f"produced: none to measure: the target carries nothing to produce "
                          f"(value under {MIN_VALUE})"]
        return out + [
            f"produced: (own - {self.base}) / (oracle - {self.base}) = {self.produced:.3f}"
        ]


def conditions(rows):
    """The rows ({name: {"accuracy": ...}}, evaluate's or a saved file's) -> Conditions, or None
    without both an oracle and a base row (LVR's dummy latents; box and crop's swapped boxes)."""
    if {"oracle boxes", "swapped boxes"} <= set(rows):
        names, base = ("with own boxes", "swapped boxes", "oracle boxes"), "swapped"
    elif {"oracle latents", "dummy latents"} <= set(rows):
        names, base = ("with latents", "dummy latents", "oracle latents"), "dummy"
    else:
        return None
    own, low, oracle = (rows[k]["accuracy"] for k in names)
    value = oracle - low
    return Conditions(value, (own - low) / value if value >= MIN_VALUE else None, base=base)


def box_rows(run, exs):
    """Box and crop's diagnostics, each with every box forced (run: evaluate's, with boxes=):
    oracle (the true boxes) and swapped (the next example's boxes)."""
    true = [e["bboxes"] for e in exs]
    if not any(true):
        return {}
    return {"oracle boxes": run(boxes=true), "swapped boxes": run(boxes=true[1:] + true[:1])}


def replaced_rows(run, cfg, own, targets, budget):
    """The rows that say whether a model reasons through its latents, each with every latent input
    replaced (run: evaluate's, with feed=; cfg: the model's config; own: its own row; targets: per
    example its training targets or None; budget: the most latents a row takes): dummy (one fixed
    vector, the mean of its own latents: no example's content, and shorter than they are unless
    they are parallel), swapped (each row gets the next example's own latents), oracle (the
    training targets: what a latent could carry at best)."""
    rows, lats = {}, [v for v in own["latents"] if len(v)]

    # (dummy and swapped are made of its own latents: a model that makes none has neither row, and
    # the pause control's are all one vector, so both would be its own row again)
    if lats and not lvr.is_pause(cfg):
        mean = torch.cat(lats).mean(0)
        rows["dummy latents"] = run(feed=[mean.expand(budget, -1)] * len(own["latents"]))
        rows["swapped latents"] = run(feed=own["latents"][1:] + own["latents"][:1])

    if all(t is None for t in targets):
        return rows
    oracle = [t if t is not None else torch.zeros(0, cfg.hidden_size) for t in targets]
    rows["oracle latents"] = run(feed=oracle)
    return rows


def by_group(exs, right, key):
    """Accuracy per value of an example field (V*'s category), or per MMVP pair (both questions
    right)."""
    groups = collections.defaultdict(list)
    for e, ok in zip(exs, right):
        if e.get(key) is not None:
            groups[e[key]].append(ok)

    return groups


def resolve(config):
    """The settings left at auto -> their values (cli.configure writes and prints them): a hub id's
    snapshot, the task the checkpoint trained on (data.task_settings; a flag given wins, and a task
    other than its own is said), the images as it trained (else the processor's bounds), the
    dtype, a pause or crop checkpoint's decoding by count (lvr.span_count), the completion budget."""
    cli.require(not unseen_maps or data_path.endswith((".json", ".jsonl")),
                "--unseen_maps true filters a VSP data file (Mirage's JSONL); the built-in test maps "
                "are all unseen already")
    path = checkpoint.locate(init_from)
    chosen, note = data.task_settings(path, task, hops, level, image_size)
    if note and data_path == "synthetic":
        print(note)
    bounds = data.trained_pixels(path, data.PROCESSOR_PIXELS)
    size, lo, hi = data.image_settings(
        chosen["task"].value, chosen["image_size"].value, min_pixels, max_pixels=max_pixels,
        synthetic=data_path == "synthetic", bounds=bounds,
    )
    chosen["image_size"] = cli.From(size, chosen["image_size"].source)
    cfg = checkpoint.read_config(path)
    how, steps = lvr.span_count(cfg, decoding, cli.given(lvr_steps))
    boxes = lvr.method_of(cfg) in ("box", "crop")
    return {"dtype": parallel.autocast_dtype(dtype, device), **chosen, "min_pixels": lo,
            "max_pixels": hi, "init_from": path, "decoding": how, "lvr_steps": steps,
            "max_new_tokens": cli.given(max_new_tokens) or (192 if boxes else 32)}


def report(rows, exs, geo, rescaled, title, budget):
    """Print `title`, the rows, the geometry and the two conditions, the span lengths (budget: a
    span's most latent steps), and V*'s categories or MMVP's pairs. rescaled: the latents are fed
    at the targets' norm (latent_input), which then sets the norm line."""
    print(title)
    maps = [e["map_desc"] for e in exs if e.get("map_desc")]
    if maps:  # (the built-in VSP task trains on the maps tasks.map_split puts in its train split)
        seen = sum(tasks.map_split(m) == "train" for m in maps)
        print(f"VSP maps: {seen} of {len(maps)} are maps the built-in task trains on")

    print(f"{'':18}{'accuracy':>10}{'format':>9}{'latent steps':>14}{'hit rate':>10}")
    for name, r in rows.items():
        hr = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        print(
            f"{name:18}{r['accuracy']:>10.3f}{r['format']:>9.3f}{r['latent_steps']:>14.2f}{hr:>10}"
        )

    if geo is not None:
        print(f"latent norm / target norm (own latents): {geo.norm_ratio:.3f}" + (
            " (set by the rescale: a cosine-trained latent is fed at the targets' mean norm)"
            if rescaled else ""))
        print(f"latent distance to its target (own latents): {geo.distance:.3f} "
              f"(target norm {geo.target_norm:.3f})")
    own = next(iter(rows.values()))  # (the model's own row: with latents, or with own boxes)
    if own.get("iou") is not None:
        print(f"box IoU with the true box (own boxes): {own['iou']:.3f}; hit rate: the share of "
              f"parsed boxes whose centre lies in the true box")
    if conditions(rows) is not None:
        print("\n".join(conditions(rows).lines()))

    if own["spans"] and "with latents" in rows:  # (crop's spans are its regions' lengths)
        print(
            "latent steps per span (with latents): "
            + ", ".join(f"{k}: {v}" for k, v in sorted(own["spans"].items()))
            + f"; {own['spans'][budget]} of {sum(own['spans'].values())} spans ran to the budget "
            f"of {budget}"
        )
    for name, ok in sorted(by_group(exs, own["right"], "category").items()):
        print(f"category {name}: accuracy {sum(ok) / len(ok):.3f} on {len(ok)}")
    pairs = by_group(exs, own["right"], "pair")
    if pairs:
        print(
            f"per pair (both questions right): "
            f"{sum(all(ok) for ok in pairs.values()) / len(pairs):.3f} on {len(pairs)} pairs; "
            f"per question {own['accuracy']:.3f}"
        )


def save_rows(save, rows, geo):
    """--save (a path, or ""): the rows, each with every example's correctness (tools/study.py's
    paired comparisons need it), and the geometry."""
    if save:
        keep = ("accuracy", "format", "latent_steps", "hit_rate", "iou", "right")
        out = {"rows": {name: {k: r[k] for k in keep} for name, r in rows.items()},
               "geometry": None if geo is None else dataclasses.asdict(geo)}
        with open(save, "w") as f:
            json.dump(out, f)


def main(argv):
    cli.configure(globals(), argv, resolve)
    model, tok = checkpoint.load(init_from, getattr(torch, dtype), device)  # (in eval mode)
    ids = lvr.find_latent_ids(model, tok)  # the tokens it was trained with
    if ids is None:
        raise InputError(
            f"{init_from} has no latent tokens: evaluate it with sample.py, or train it with train_sft.py"
        )

    exs = load_examples(model.cfg.extra.get("latent_targets", {}))
    metric, threshold = lvr.end_rule(model, end_metric, cli.given(end_threshold))
    decode = lvr.Decode(
        decoding, lvr_steps, max_latent_steps, force_end=force_end, end_metric=metric,
        end_threshold=threshold, max_new_tokens=max_new_tokens, bottleneck=bottleneck,
    )

    # end at once
    disabled = dataclasses.replace(decode, decoding="steps", lvr_steps=0, force_end=True)
    run = functools.partial(evaluate, model, tok, ids, exs, pixels=(min_pixels, max_pixels),
                            batch_size=batch_size)
    title = (f"{init_from} on {len(exs)} "
             f"{'held-out synthetic' if data_path == 'synthetic' else data_path} examples")
    budget = lvr_steps if decoding == "steps" else max_latent_steps
    if lvr.method_of(model.cfg) in ("box", "crop"):  # (the box, written, is what they produce)
        rows = {"with own boxes": run(decode)}
        rows.update(box_rows(functools.partial(run, decode), exs) if diagnostics else {})
        report(rows, exs, geo=None, rescaled=False, title=title, budget=budget)
        return save_rows(save, rows, geo=None)
    rows = {"with latents": run(decode)}  # each row's name -> evaluate's result

    # (the geometry needs them)
    targets = targets_of(model, tok, ids, exs=exs, pixels=(min_pixels, max_pixels), device=device)
    if diagnostics:
        rows["latents disabled"] = run(disabled)
        rows.update(replaced_rows(
            functools.partial(run, decode), model.cfg, own=rows["with latents"], targets=targets,
            budget=max(decode.lvr_steps, decode.max_latent_steps),
        ))

    geo = geometry(rows["with latents"], targets)
    report(rows, exs, geo, rescaled="latent_norm" in model.cfg.extra, title=title, budget=budget)
    save_rows(save, rows, geo)


if __name__ == "__main__":
    cli.run(main)
