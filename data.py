"""
Data: the LVR JSON and Mirage JSONL formats (and MMVP / V* for evaluate.py), the image bounds, and
the batches made from examples: SFT batches (encode, collate: right-padded, with labels and latent
slots) and prompt batches (left-padded, for the rollout). The synthetic tasks and the tiny tokenizer
live in tasks.py.

An example is a dict (tasks.py's docstring says what each field is). Read encode and collate first:
the assistant turn and the batch the losses read; the file formats come after, then answer scoring
and the bbox as text (--method box and crop: Qwen2.5-VL's `{"bbox_2d": [x1, y1, x2, y2]}` in the
resized image's pixels, parsed back and clipped, a box that does not parse a format failure).
"""

import csv
import functools
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass

import torch

import cli
import lvr
import qwen
import tasks
import vision
from cli import InputError

# -----------------------------------------------------------------------------
# encoding and collation


@dataclass
class LatentTargets:
    """What a method's latent spans hold (train_sft's flags; a checkpoint's config.json records them
    as latent_targets, so that evaluate.py builds the same targets)."""
    # lvr | mirage | none (plain SFT: no spans) | pause (the control) | box (the bbox as text) |
    # crop (the bbox as text, then a span fed the region it names)
    method: str = "lvr"
    max_latents: int = 0  # LVR: latents per ROI, pooled to at most this many (0: all); pause: per span
    k: int = 4  # Mirage: latents per helper image
    latent_end: bool = False  # <|lvr_latent_end|> after each span's latents (the `latent` exit)


def image_pixels(grid_thw):
    """An image's (1, 3) grid of 14-pixel patches -> (width, height) as the model sees it."""
    return int(grid_thw[0, 2]) * 14, int(grid_thw[0, 1]) * 14


def box_text(bbox, grid_thw):
    """A normalised bbox -> its text: {"bbox_2d": [x1, y1, x2, y2]} in the resized image's pixels."""
    w, h = image_pixels(grid_thw)
    x0, y0, x1, y1 = (round(v * s) for v, s in zip(bbox, (w, h, w, h)))
    return json.dumps({"bbox_2d": [x0, y0, x1, y1]})


def encode(ex, tok, ids, targets=LatentTargets(), pixels=(3136, 12845056)):
    """Example -> one row of an SFT batch, unpadded: input_ids, labels, n_prompt, pixel_values,
    grid_thw, helper, n_feat, and the latent slots (collate's fields, per row: positions, not (row,
    position)).

    `targets`: LatentTargets. Method none drops the latent spans (plain SFT); mirage takes the k
    targets from the helper image; pause (the control) gives every span max_latents slots and no
    targets; box writes each span's bbox as text instead (box_text); crop writes it, then a span
    whose slots read the region it names (LVR's targets, fed, never reconstructed). pixels: the
    images' (min_pixels, max_pixels).
    """
    method = targets.method
    pvs, grids = zip(*[vision.preprocess(im, *pixels) for im in ex["images"]])
    n_tok = [vision.merged_tokens(g) for g in grids]
    prompt = tok.prompt(ex["question"], n_tok)
    if targets.latent_end and ids.latent_end is None:
        raise InputError("latent_end needs a latent-end token, and these latent tokens have none")
    helper = vision.preprocess(ex["helper"], *pixels) if method == "mirage" else None
    seq, latent_pos, latent_slot, latent_groups, latent_end_pos = list(prompt), [], [], [], []

    # Mirage imagines one helper image: one span where the example puts it (a Mirage record: at its
    # <output_image>), and at the start when an LVR answer looks several times
    assistant = ex["assistant"]
    if method == "mirage" and assistant.count("<lvr>") != 1:
        assistant = "<lvr>\n" + assistant.replace("<lvr>", "").lstrip("\n")
    for i, text in enumerate(assistant.split("<lvr>")):
        if i > 0 and method in ("box", "crop"):  # the bbox as text, in the image's own pixels
            im = ex.get("bbox_images", [0] * i)[i - 1]
            seq += tok.encode(box_text(ex["bboxes"][i - 1], grids[im]))
        if i > 0 and method not in ("none", "box"):  # a span, for the <lvr> before this text
            if method == "mirage":
                span = lvr.chunk_groups(vision.merged_tokens(helper[1]), targets.k)
            elif method == "pause":  # a fixed count, so that the rollout can end its spans by count
                span = [[]] * targets.max_latents
            else:  # indices into the example's features: its images' merged tokens, image by image
                im = ex.get("bbox_images", [0] * i)[i - 1]
                start = vision.token_offsets(grids)[im]
                pooled = lvr.roi_groups(ex["bboxes"][i - 1], grids[im][0], targets.max_latents)
                span = [[start + j for j in g] for g in pooled]
            seq.append(ids.start)
            latent_pos += range(len(seq), len(seq) + len(span))
            latent_slot += range(len(span))
            latent_groups += span
            seq += [ids.latent] * len(span)
            if targets.latent_end:
                latent_end_pos.append(len(seq))
                seq.append(ids.latent_end)
            seq.append(ids.end)
        seq += tok.encode(text.lstrip("\n") if i > 0 and method == "none" else text)

    seq.append(tok.im_end)
    labels = [-100] * len(prompt) + seq[len(prompt):]
    for t in latent_pos + latent_end_pos:
        labels[t] = -100  # latent slots are trained by the latent loss, not CE
    return {
        "input_ids": seq,
        "labels": labels,
        "n_prompt": len(prompt),
        "pixel_values": torch.cat(pvs),
        "grid_thw": torch.cat(grids),
        "latent_pos": latent_pos,
        "latent_slot": latent_slot,
        "latent_groups": latent_groups,
        "latent_end_pos": latent_end_pos,
        "helper": helper,
        "n_feat": vision.merged_tokens(torch.cat(grids)),
    }


def collate(encoded, pad_id):
    """Right-pad a list of encoded examples into one SFT batch (lvr.sft_loss, lvr.own_latents_loss):

    input_ids       (B, T)     token ids, padded with pad_id (<|endoftext|>)
    attention_mask  (B, T)     1 for real tokens, 0 for padding
    labels          (B, T)     the next-token CE targets; -100 on the prompt, latent slots and padding
    pixel_values    (P, 1176)  every image's patches, example by example; grid_thw (N, 3) their grids
    latent_pos      (2, L)     (row, position) of every latent slot, spans in order
    latent_slot     (L,)       each latent's index within its span (0 opens a span)
    latent_end_pos  (2, E)     (row, position) of every <|lvr_latent_end|> (the `latent` exit trained)
    target_avg      (L, F)     targets = target_avg @ features: row i averages the merged image tokens
                               (of the prompt images, or Mirage's helper images) that latent i
                               reconstructs
    helper_pixel_values, helper_grid_thw   Mirage only: the helper images
    """
    B, T = len(encoded), max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((B, T), pad_id)
    labels = torch.full((B, T), -100)
    mask = torch.zeros(B, T, dtype=torch.long)
    rows, pos, slot, groups, end_rows, end_pos = [], [], [], [], [], []
    offset = 0  # where this example's features start among the batch's
    mirage = encoded[0]["helper"] is not None
    for b, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[b, :n] = torch.tensor(e["input_ids"])
        labels[b, :n] = torch.tensor(e["labels"])
        mask[b, :n] = 1
        rows += [b] * len(e["latent_pos"])
        pos += e["latent_pos"]
        slot += e["latent_slot"]
        groups += [[offset + i for i in g] for g in e["latent_groups"]]
        end_rows += [b] * len(e["latent_end_pos"])
        end_pos += e["latent_end_pos"]
        offset += vision.merged_tokens(e["helper"][1]) if mirage else e["n_feat"]

    as_long = functools.partial(torch.tensor, dtype=torch.long)
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
        "grid_thw": torch.cat([e["grid_thw"] for e in encoded]),
        "latent_pos": as_long([rows, pos]),
        "latent_slot": as_long(slot),
        "latent_end_pos": as_long([end_rows, end_pos]),
        "target_avg": lvr.averaging_matrix(groups, offset),
    }
    if mirage:
        batch["helper_pixel_values"] = torch.cat([e["helper"][0] for e in encoded])
        batch["helper_grid_thw"] = torch.cat([e["helper"][1] for e in encoded])

    return batch


# -----------------------------------------------------------------------------
# files: LVR JSON / JSONL (LLaVA conversations + bboxes), Mirage JSONL, MMVP / V* (evaluate.py)

def load_records(path):
    """A JSON list or a JSONL file -> list of dicts."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read dataset {path}: {e}") from None

    try:
        if text.lstrip().startswith("["):
            records = json.loads(text)
        else:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON/JSONL ({e})") from None

    if not records or not all(isinstance(r, dict) for r in records):
        raise InputError(f"{path}: expected a non-empty list of JSON objects")
    return records


def open_image(root, path, where):
    """A dataset's image, `path` relative to `root`; with a root given, the path may not leave
    it."""
    if not isinstance(path, str) or not path:
        raise InputError(f"{where}: image path must be a non-empty string, got {path!r}")
    full = os.path.realpath(os.path.join(root, path))
    if root and os.path.commonpath([full, os.path.realpath(root)]) != os.path.realpath(root):
        raise InputError(f"{where}: image path {path!r} leaves --image_root {root}")
    try:
        return vision.load_image(full)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


@functools.lru_cache(maxsize=4)
def epoch_order(n, seed):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return order


def stream_example(records, i, seed, convert, where, skipped=None):
    """Example i of an endless stream over `records`, reshuffled each epoch (seed + epoch).

    skipped None (--on_bad_record fail): a record that fails `convert(rec, where)` raises its
    error; a dict (skip): it is reported once (and kept there) and the next record in the order
    stands in."""
    epoch, j = divmod(i, len(records))
    order = epoch_order(len(records), seed + epoch)
    for r in order[j:] + order[:j]:
        try:
            return convert(records[r], f"{where} record {r}")
        except InputError as e:
            if skipped is None:
                raise
            if r not in skipped:
                skipped[r] = str(e)
                print(f"skipping {e}", file=sys.stderr)

    raise InputError(f"{where}: every record is bad")


def vsp_map(desc, where):
    """A Mirage map_desc, checked: a square grid of 1 (start), 2 (goal), -1 (hole), 0 (ice); one
    start, one goal."""
    rows = isinstance(desc, list) and all(isinstance(r, list) for r in desc)
    flat = [v for row in desc for v in row] if rows else []
    if (not flat or any(len(r) != len(desc) for r in desc) or not set(flat) <= {0, 1, 2, -1}
            or flat.count(1) != 1 or flat.count(2) != 1):
        raise InputError(
            f"{where}: map_desc must be a square grid of 1 (start), 2 (goal), -1 (hole) and "
            f"0 (ice), one start and one goal"
        )

    return desc


def mirage_example(rec, image, where):
    """A Mirage record -> an example; image(path) opens one of its images."""
    for k in ("text_input", "text_output", "image_input"):
        if not isinstance(rec.get(k), str):
            raise InputError(f"{where}: Mirage record needs a string field {k!r}")
    out = rec["text_output"]
    if out.count("<output_image>") > 1 or rec["text_input"].count("<image>") > 1:
        raise InputError(
            f"{where}: a Mirage record has one <image> and at most one <output_image>"
        )

    # official Mirage: the latent span where <output_image> stands (else at the start of the
    # answer), the input image where <image> stands in the question (tok.prompt; else before it),
    # both texts verbatim
    return {
        "images": [image(rec["image_input"])],
        "question": rec["text_input"],
        "assistant": (
            out.replace("<output_image>", "<lvr>") if "<output_image>" in out else "<lvr>" + out
        ),
        "answer": out.replace("<output_image>", ""),
        "bboxes": [],
        "helper": image(rec["image_output"]),
        **({"map_desc": vsp_map(rec["map_desc"], where)} if "map_desc" in rec else {}),
    }


def lvr_example(rec, image, where):
    """An LVR record (LLaVA conversations, one bbox per <lvr>) -> an example; image(path) opens one
    of its images."""
    conv = rec.get("conversations")
    if (
        not isinstance(conv, list)
        or len(conv) < 2
        or not all(isinstance(c, dict) and isinstance(c.get("value"), str) for c in conv[:2])
    ):
        raise InputError(f"{where}: needs 'conversations' with a human and a gpt turn")

    paths = rec.get("image")
    images = [image(p) for p in (paths if isinstance(paths, list) else [paths])]
    question, assistant = conv[0]["value"].replace("<image>", "").strip(), conv[1]["value"]
    if not question:
        raise InputError(f"{where}: the question is empty")
    bboxes = rec.get("bboxes", [])
    if not isinstance(bboxes, list) or assistant.count("<lvr>") != len(bboxes):
        raise InputError(f"{where}: {assistant.count('<lvr>')} <lvr> placeholders but "
                         f"{len(bboxes) if isinstance(bboxes, list) else bboxes!r} bboxes")

    # with several images each bbox names its image: "bbox_images": [index, ...], one per bbox
    bbox_images = rec.get("bbox_images", [0] * len(bboxes) if len(images) == 1 else None)
    if bboxes and (not isinstance(bbox_images, list) or len(bbox_images) != len(bboxes)
                   or not all(isinstance(k, int) and 0 <= k < len(images) for k in bbox_images)):
        raise InputError(
            f"{where}: {len(images)} images and {len(bboxes)} bboxes: 'bbox_images' must give each "
            f"bbox the index of its image (0 to {len(images) - 1}), got {bbox_images!r}"
        )

    bboxes = [lvr.normalise_bbox(b if isinstance(b, list) else [], *images[k].size, f"{where}: ")
              for b, k in zip(bboxes, bbox_images or [])]
    answer = assistant.split("<answer>")[-1].split("</answer>")[0].replace("<lvr>", "").strip()
    return {
        "images": images,
        "question": question,
        "assistant": assistant,
        "answer": answer,
        "bboxes": bboxes,
        "bbox_images": bbox_images or [],
        "helper": None,
    }


def record_example(rec, image_root, where):
    """One LVR or Mirage record -> an example. `where` names the record in errors."""
    def image(p):
        return open_image(image_root, p, where)

    # a Mirage VSP test record: a prompt and its map
    if "map_desc" in rec and "image_output" not in rec:
        if not isinstance(rec.get("text_input"), str) or not isinstance(
            rec.get("image_input"), str
        ):
            raise InputError(
                f"{where}: a VSP record needs string fields 'text_input' and 'image_input'"
            )
        return {"images": [image(rec["image_input"])], "question": rec["text_input"], "answer": "",
                "bboxes": [], "map_desc": vsp_map(rec["map_desc"], where)}

    if "image_output" in rec:  # Mirage: the helper image is the latent target
        return mirage_example(rec, image, where)
    return lvr_example(rec, image, where)


def load_multiple_choice(path, root, limit):
    """MMVP (CSV: Index, Question, Options, Correct Answer; images <Index>.jpg; questions 2k-1 and
    2k are a pair) or V* (JSONL: image, question or text, answer or label, options optional,
    category optional: else the image's folder) -> its first `limit` examples, with the options in
    the question."""
    out = []
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for i, r in enumerate(rows):
            if (
                not {"Index", "Question", "Options", "Correct Answer"} <= set(r)
                or not r["Index"].isdigit()
            ):
                raise InputError(
                    f"{path} row {i}: needs the columns Index (a number), Question, Options, Correct Answer"
                )
            question = f"{r['Question']}\n{r['Options']}"
            pair = {"pair": (int(r["Index"]) - 1) // 2}
            out.append(
                (f"{r['Index']}.jpg", question, r["Correct Answer"], f"{path} row {i}", pair)
            )
    else:
        for i, r in enumerate(load_records(path)):
            q = r.get("question", r.get("text"))
            a = r.get("answer", r.get("label"))
            opts = r.get("options", [])
            if (
                not isinstance(r.get("image"), str)
                or not isinstance(q, str)
                or not isinstance(a, str)
                or not isinstance(opts, list)
            ):
                raise InputError(
                    f"{path} record {i}: needs image, question (or text), answer (or label), "
                    f"and options, when given, as a list"
                )
            letters = "".join(f"\n({chr(65 + j)}) {o}" for j, o in enumerate(opts))
            category = r.get("category") or (os.path.dirname(r["image"]) or None)
            out.append((r["image"], q + letters, a, f"{path} record {i}", {"category": category}))

    return [
        {
            "images": [open_image(root, img, where)],
            "question": q + "\nAnswer with the option's letter.",
            "answer": a,
            "bboxes": [],
            **extra,
        }
        for img, q, a, where, extra in out[:limit]
    ]


# the official LVR training scripts' image bounds (128 to 5120 merged tokens of 28 x 28 pixels), and
# the Qwen2.5-VL processor's own (what its eval and chat use, and official Mirage trains with)
LVR_PIXELS = (128 * 28 * 28, 5120 * 28 * 28)
PROCESSOR_PIXELS = (56 * 56, 28 * 28 * 16384)


def trained_pixels(path, fallback):
    """The image bounds the checkpoint at `path` was trained with (train_sft records them in its
    config as lvr_image_pixels), so that a model is evaluated on images the size it was trained on;
    `fallback` for a checkpoint that records none (an official one, or "scratch")."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return fallback
    return tuple(qwen.read_config(path).extra.get("lvr_image_pixels", fallback))


TASK_DEFAULTS = {"task": "colour", "hops": 1, "level": "3", "image_size": None}  # (None: the task's)


def trained_task(path):
    """The synthetic task the checkpoint at `path` was trained on (train_sft records it in its
    config as lvr_task: task, hops, level, image_size), or {} where it records none (trained on a
    data file, an official checkpoint, "scratch")."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        return {}
    return qwen.read_config(path).extra.get("lvr_task", {})


def task_settings(path, task, hops, level, image_size, doing="scored"):
    """--task, --hops, --level, --image_size, each given or left at auto -> ({name: cli.From},
    note): a flag given wins, else the checkpoint's task (trained_task), else the
    defaults (the checkpoint's hops, level and image size go with its task: another task given
    takes its own); note: the line that says the flags score the checkpoint on a task other than
    its own (`doing`: what the script does with it there), or None."""
    given = {"task": None if task == "auto" else task, "hops": cli.given(hops),
             "level": None if level == "auto" else level, "image_size": cli.given(image_size)}
    own = trained_task(path)
    same_task = given["task"] in (None, own.get("task"))

    def source(k, v):
        if v is not None:
            return cli.From(v, "flag")
        if same_task and k in own:
            return cli.From(own[k], "checkpoint")
        return cli.From(TASK_DEFAULTS[k], "default")

    out = {k: source(k, v) for k, v in given.items()}
    task = out["task"].value
    # (hops matter to the hops task alone, the level to VSP alone)
    matters = ["task", "image_size"] + ["hops"] * (task == "hops") + ["level"] * (task == "vsp")
    differ = [k for k in matters if out[k].source == "flag" and k in own and out[k].value != own[k]]
    if not differ:
        return out, None
    trained = " ".join(f"{k}={v}" for k, v in own.items())
    return out, (f"note: {path} was trained on {trained}; it is {doing} here on "
                 + " ".join(f"{k}={out[k].value}" for k in differ))


def image_settings(task, image_size, min_pixels, max_pixels, synthetic, bounds):
    """--image_size, --min_pixels, --max_pixels (numbers or auto) -> (image_size, min_pixels,
    max_pixels). Synthetic data: the task's own image side, never resized; VSP's maps (drawn by
    gymnasium at their own size) at the processor's bounds, as a Mirage file's. A data file:
    `bounds` (the checkpoint's, else LVR_PIXELS for training, PROCESSOR_PIXELS for eval); an auto
    min_pixels never above max_pixels."""
    size = cli.given(image_size) or tasks.TASKS[task][1]
    lo, hi = (PROCESSOR_PIXELS if not size else (3136, size * size)) if synthetic else bounds
    hi = cli.given(max_pixels) or hi
    lo = cli.given(min_pixels) or min(lo, hi)
    cli.require(lo <= hi, f"--min_pixels {lo} is above --max_pixels {hi}")
    cli.require(
        size % 28 == 0, f"--image_size {size} is not a multiple of 28 (one merged image token)"
    )
    return size, lo, hi


def prompt_batch(exs, tok, min_pixels=3136, max_pixels=12845056, prefix=None):
    """Examples -> the rollout's input: each question with all its images as one user turn,
    left-padded; prefix: per example, token ids that open its assistant turn (a forced box).

    input_ids, attention_mask (B, T); pixel_values, grid_thw: every image, example by example;
    images: per example, its images' (pixel_values, grid_thw); n_image_tokens: per example, its
    merged image tokens in all (where its rows of the tower's output end)."""
    images = [[vision.preprocess(im, min_pixels, max_pixels) for im in e["images"]] for e in exs]
    input_ids, mask = qwen.left_pad(
        [
            tok.prompt(e["question"], [vision.merged_tokens(g) for _, g in ims]) + forced
            for e, ims, forced in zip(exs, images, prefix or [[]] * len(exs))
        ],
        tok.endoftext,
    )
    return {"input_ids": input_ids, "attention_mask": mask, "images": images,
            "pixel_values": torch.cat([pv for ims in images for pv, _ in ims]),
            "grid_thw": torch.cat([g for ims in images for _, g in ims]),
            "n_image_tokens": [sum(vision.merged_tokens(g) for _, g in ims) for ims in images]}


def to_device(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


def grpo_example(rec, image_root, where):
    """A GRPO record {image (a path or a list), question, answer} (or an LVR JSON record, or a
    Mirage VSP record: its map judges the plans) -> an example without targets."""
    if "conversations" in rec or "map_desc" in rec:  # (an LVR record, or a Mirage VSP map)
        return record_example(rec, image_root, where)
    for k in ("question", "answer"):
        if not isinstance(rec.get(k), str) or not rec[k].strip():
            raise InputError(f"{where}: needs a non-empty string field {k!r}")

    paths = rec.get("image")
    paths = paths if isinstance(paths, list) and paths else [paths]
    return {
        "images": [open_image(image_root, p, where) for p in paths],
        "question": rec["question"],
        "answer": rec["answer"],
    }


# -----------------------------------------------------------------------------
# answers: a completion scored against the gold answer (evaluate.py's accuracy, train_grpo.py's
# rewards)

def is_lvr_format(tokens, ids, stop_ids, text):
    """A completion (token list up to its stop) is <|lvr_start|> ... <|lvr_end|> (one span or more:
    the relation task looks twice), then a non-empty answer (`text`: the decoded completion), then a
    stop token.
    """
    if not tokens or tokens[0] != ids.start or ids.end not in tokens or tokens[-1] not in stop_ids:
        return False
    after = tokens[len(tokens) - tokens[::-1].index(ids.end):-1]  # after the last <|lvr_end|>
    return len(after) > 0 and ids.start not in after and bool(text.strip())


def until_stop(tokens, stop_ids):
    """A completion's tokens up to and including its first stop token (all of them if it never
    stopped)."""
    return tokens[:next((j + 1 for j, t in enumerate(tokens) if t in stop_ids), len(tokens))]


def normalise(text):
    """Lower case, no punctuation at the ends, single spaces: for exact-match scoring."""
    return " ".join(text.lower().strip().strip(".!?,;:'\"").split())


def answer_of(completion):
    """The text inside <answer>...</answer> or \\boxed{...} (Mirage's) if present, else the whole
    completion; normalised."""
    if "<answer>" in completion:
        completion = completion.split("<answer>")[-1].split("</answer>")[0]
    elif "\\boxed{" in completion:
        completion = completion.split("\\boxed{")[-1].split("}")[0]

    return normalise(completion)


def letter_of(text):
    """The multiple-choice letter a normalised answer starts with ("b", "(b) cat", "b. cat"), or
    None."""
    m = re.match(r"^\(?([a-z])\)?(?:[.):]|\s|$)", text)
    return m.group(1) if m else None


def is_correct(completion, answer, map_desc=None):
    """Exact match after normalising; when the gold answer is a letter, the letters are compared. A
    VSP plan (the example has a map_desc) is judged by simulation on its map: any plan that reaches
    the goal."""
    if map_desc is not None:
        return tasks.solves(map_desc, answer_of(completion))
    pred, gold = answer_of(completion), answer_of(answer)
    if len(gold.strip("()")) == 1 and gold.strip("()").isalpha():
        return letter_of(pred) == gold.strip("()")
    return pred == gold


# -----------------------------------------------------------------------------
# the bbox as text (--method box and crop): Qwen2.5-VL's grounding format, absolute pixels of the
# image as the processor resized it (Qwen2-VL's 0-1000 scale and <|box_start|> are not 2.5's)

BOX = re.compile(r'\{"bbox_2d":\s*\[([^\[\]{}]*)\]\}')  # one written box
BOX_OPEN = '{"bbox_2d"'  # where a box begins, whether it parses or not


def parse_box(match, grid_thw):
    """One BOX match -> the normalised bbox it names, clipped to the image, or None where it is not
    four numbers or clips to nothing (a written box is untrusted text)."""
    try:
        vals = [float(v) for v in match.group(1).split(",")]
    except ValueError:
        return None
    w, h = image_pixels(grid_thw)
    if len(vals) != 4 or not all(map(math.isfinite, vals)):
        return None
    x0, y0, x1, y1 = (min(max(v / s, 0.0), 1.0) for v, s in zip(vals, (w, h, w, h)))
    return [x0, y0, x1, y1] if x0 < x1 and y0 < y1 else None


def written_boxes(text, grid_thw):
    """Every box a completion writes, in order -> list of normalised bboxes, None where one does
    not parse (a box begun, BOX_OPEN, that is not a whole box counts as one that does not)."""
    boxes = [parse_box(m, grid_thw) for m in BOX.finditer(text)]
    return boxes + [None] * max(0, text.count(BOX_OPEN) - len(boxes))


def after_boxes(text):
    """The answer of a box or crop completion: the text after its last box."""
    ends = [m.end() for m in BOX.finditer(text)]
    return text[ends[-1]:] if ends else text


def is_box_format(tokens, text, stop_ids, grid_thw):
    """A box or crop completion (its tokens up to the stop; `text`: decoded) writes at least one
    box, every box parses, a non-empty answer follows the last, and it stops."""
    boxes = written_boxes(text, grid_thw)
    return (bool(tokens) and tokens[-1] in stop_ids and bool(boxes) and None not in boxes
            and bool(after_boxes(text).strip()))


def box_iou(a, b):
    """Intersection over union of two normalised bboxes."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def centre_in(a, b):
    """Whether bbox a's centre lies in bbox b (the box hit rate)."""
    x, y = (a[0] + a[2]) / 2, (a[1] + a[3]) / 2
    return b[0] <= x <= b[2] and b[1] <= y <= b[3]
