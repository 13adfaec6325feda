"""
Data: the LVR JSON format, the Mirage JSONL format, the built-in synthetic task, the tiny
tokenizer and config, and collation into padded batches with labels and latent slots.

An example is a dict: images (PIL), question, assistant (text with one `<lvr>` placeholder per
latent span), bboxes (one per `<lvr>`, normalised), helper (Mirage's helper image or None).
encode() turns it into token ids, labels and the latent slots with their target groups;
collate() pads a list of those (right padding) and builds the batch-wide target matrix.

The tiny tokenizer is a byte-level BPE, like Qwen's, trained in a fraction of a second on a
small corpus, so it can encode any text; it holds every Qwen special token, and the
checkpoint code looks them up by string exactly as it does for the real tokenizer.
"""
import functools
import json
import os
import random
import sys

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import lvr
import vision
from cli import InputError

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
LATENT_SPECIAL = list(lvr.LVR_TOKENS.values()) + list(lvr.MIRAGE_TOKENS.values())

CORPUS = [
    "system\nYou are a helpful assistant.", "user\n", "assistant\n",
    "What colour is the small circle? red green blue yellow purple orange white black",
    "What shape is left of the square? circle square triangle star cross diamond",
    "Which object is above, below, left of, right of the other one? The answer is: yes no",
    "What shape is the red object? What colour is the triangle?",
    "<answer> </answer> 0 1 2 3 4 5 6 7 8 9 A B C D a b c d e f g h i j k l m n o p q r s t u v w x y z",
]


def build_tokenizer(path=None, vocab_size=512, special=QWEN_SPECIAL, corpus=CORPUS):
    """Byte-level BPE with the given special tokens; written to `path` (tokenizer.json) if given."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    if path:
        tok.save(path)
    return tok


def tiny_config(tok, image_size=224):
    """A Qwen2.5-VL-shaped config small enough to train on a CPU in minutes."""
    sid = tok.token_to_id
    return {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
            "vocab_size": tok.get_vocab_size(), "hidden_size": 128, "intermediate_size": 384,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "rope_scaling": {"type": "mrope", "mrope_section": [4, 6, 6]},
            "max_position_embeddings": 4096, "tie_word_embeddings": True, "hidden_act": "silu",
            "image_token_id": sid("<|image_pad|>"), "video_token_id": sid("<|video_pad|>"),
            "vision_start_token_id": sid("<|vision_start|>"), "vision_end_token_id": sid("<|vision_end|>"),
            "bos_token_id": sid("<|endoftext|>"), "eos_token_id": sid("<|im_end|>"),
            "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                              "out_hidden_size": 128, "fullatt_block_indexes": [1], "window_size": 112,
                              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                              "in_chans": 3, "hidden_act": "silu"}}


# -----------------------------------------------------------------------------
# the synthetic task: one small object among distractors, a question about it, its bbox

COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230), "yellow": (235, 200, 20),
           "purple": (140, 50, 180), "orange": (245, 130, 20)}
SHAPES = ["circle", "square", "triangle"]


def draw_shape(d, shape, box, fill):
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def synthetic_example(seed, size=168, n_objects=5, obj=20, cell=28):
    """A seeded image of small shapes and a question answerable only by looking at one of them.

    The shapes sit centred in distinct cells of a 28-pixel grid, the size of one merged image
    token, so the object the question names is exactly one token. "What colour is the <shape>?":
    that shape occurs once; the answer is its colour (one word), the bbox its box. The helper
    image (Mirage) is the object's neighbourhood, enlarged.
    """
    rng = random.Random(seed)
    n = size // cell
    img = Image.new("RGB", (size, size), (235, 235, 235))
    d = ImageDraw.Draw(img)
    shape = rng.choice(SHAPES)
    objects = [(shape, rng.choice(list(COLOURS)))]
    objects += [(rng.choice([s for s in SHAPES if s != shape]), rng.choice(list(COLOURS))) for _ in range(n_objects - 1)]
    boxes = []
    for (s, c), k in zip(objects, rng.sample(range(n * n), n_objects)):
        x, y = (k % n) * cell + (cell - obj) // 2, (k // n) * cell + (cell - obj) // 2
        boxes.append((x, y, x + obj, y + obj))
        draw_shape(d, s, boxes[-1], COLOURS[c])
    x0, y0, x1, y1 = boxes[0]
    pad = obj // 2
    helper = img.crop((max(0, x0 - pad), max(0, y0 - pad), min(size, x1 + pad), min(size, y1 + pad)))
    colour = objects[0][1]
    return {"images": [img], "question": f"What colour is the {shape}?", "assistant": "<lvr>\n" + colour,
            "answer": colour, "bboxes": [[x0 / size, y0 / size, x1 / size, y1 / size]],
            "helper": helper.resize((112, 112), Image.BICUBIC)}


# -----------------------------------------------------------------------------
# files: LVR JSON / JSONL (LLaVA conversations + bboxes) and Mirage JSONL

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
    """A dataset's image, `path` relative to `root`; with a root given, the path may not leave it."""
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


def stream_example(records, i, seed, convert, where, on_bad="fail", skipped=None):
    """Example i of an endless stream over `records`, reshuffled each epoch (seed + epoch).

    on_bad "fail": a record that fails `convert(rec, where)` raises its error; "skip": it is
    reported once (and kept in the `skipped` dict) and the next record in the order stands in."""
    epoch, j = divmod(i, len(records))
    order = epoch_order(len(records), seed + epoch)
    for r in order[j:] + order[:j]:
        try:
            return convert(records[r], f"{where} record {r}")
        except InputError as e:
            if on_bad != "skip":
                raise
            if r not in skipped:
                skipped[r] = str(e)
                print(f"skipping {e}", file=sys.stderr)
    raise InputError(f"{where}: every record is bad")


def record_example(rec, image_root, where):
    """One LVR or Mirage record -> an example. `where` names the record in errors."""
    def image(p):
        return open_image(image_root, p, where)
    if "image_output" in rec:  # Mirage: the helper image is the latent target
        for k in ("text_input", "text_output", "image_input"):
            if not isinstance(rec.get(k), str):
                raise InputError(f"{where}: Mirage record needs a string field {k!r}")
        return {"images": [image(rec["image_input"])], "question": rec["text_input"].replace("<image>", "").strip(),
                "assistant": "<lvr>\n" + rec["text_output"], "answer": rec["text_output"], "bboxes": [],
                "helper": image(rec["image_output"])}
    conv = rec.get("conversations")
    if not isinstance(conv, list) or len(conv) < 2 or not all(isinstance(c, dict) and isinstance(c.get("value"), str)
                                                             for c in conv[:2]):
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
    on = rec.get("bbox_images", [0] * len(bboxes) if len(images) == 1 else None)
    if bboxes and (not isinstance(on, list) or len(on) != len(bboxes)
                   or not all(isinstance(k, int) and 0 <= k < len(images) for k in on)):
        raise InputError(f"{where}: {len(images)} images and {len(bboxes)} bboxes: 'bbox_images' must give each "
                         f"bbox the index of its image (0 to {len(images) - 1}), got {on!r}")
    bboxes = [lvr.normalise_bbox(b if isinstance(b, list) else [], *images[k].size, f"{where}: ")
              for b, k in zip(bboxes, on or [])]
    answer = assistant.split("<answer>")[-1].split("</answer>")[0].replace("<lvr>", "").strip()
    return {"images": images, "question": question, "assistant": assistant, "answer": answer, "bboxes": bboxes,
            "bbox_images": on or [], "helper": None}


# -----------------------------------------------------------------------------
# encoding and collation

def encode(ex, tok, ids, method="lvr", max_latents=0, k=4, latent_end=False, min_pixels=3136,
           max_pixels=12845056):
    """Example -> token ids, labels, latent slots and their target groups (indices into its own features).

    method none drops the latent spans (plain SFT); mirage takes the k targets from the helper image.
    """
    pvs, grids = zip(*[vision.preprocess(im, min_pixels, max_pixels) for im in ex["images"]])
    n_tok = [int(g.prod()) // 4 for g in grids]
    prompt = tok.prompt(ex["question"], n_tok)
    if latent_end and ids.latent_end is None:
        raise InputError("latent_end needs a latent-end token, and these latent tokens have none")
    helper = vision.preprocess(ex["helper"], min_pixels, max_pixels) if method == "mirage" else None
    pieces = ex["assistant"].split("<lvr>")
    seq, groups, slots, end_at = list(prompt), [], [], []
    for i, text in enumerate(pieces):
        if i > 0 and method != "none":
            if method == "mirage":
                span = lvr.chunk_groups(int(helper[1].prod()) // 4, k)
            else:  # indices into the example's features: its images' merged tokens, one image after another
                im = ex.get("bbox_images", [0] * i)[i - 1]
                span = [[sum(n_tok[:im]) + j for j in g] for g in lvr.roi_groups(ex["bboxes"][i - 1], grids[im][0], max_latents)]
            seq.append(ids.start)
            slots += [(len(seq) + j, j) for j in range(len(span))]
            groups += span
            seq += [ids.latent] * len(span)
            if latent_end:
                end_at.append(len(seq))
                seq.append(ids.latent_end)
            seq.append(ids.end)
        seq += tok.encode(text.lstrip("\n") if i > 0 and method == "none" else text)
    seq.append(tok.im_end)
    labels = [-100] * len(prompt) + seq[len(prompt):]
    for t in [t for t, _ in slots] + end_at:
        labels[t] = -100  # latent slots are trained by the latent loss, not CE
    return {"input_ids": seq, "labels": labels, "n_prompt": len(prompt), "pixel_values": torch.cat(pvs), "grid_thw": torch.cat(grids),
            "slots": slots, "groups": groups, "latent_end_at": end_at,
            "helper": helper, "n_feat": int(torch.cat(grids).prod(-1).sum()) // 4}


def collate(encoded, pad_id):
    """Right-pad a list of encoded examples into one batch (see lvr.sft_loss for the fields)."""
    B, T = len(encoded), max(len(e["input_ids"]) for e in encoded)
    input_ids = torch.full((B, T), pad_id)
    labels = torch.full((B, T), -100)
    mask = torch.zeros(B, T, dtype=torch.long)
    lb, lt, slot, groups, eb, et = [], [], [], [], [], []
    offset = 0
    mirage = encoded[0]["helper"] is not None
    for b, e in enumerate(encoded):
        n = len(e["input_ids"])
        input_ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
        lb += [b] * len(e["slots"])
        lt += [t for t, _ in e["slots"]]
        slot += [j for _, j in e["slots"]]
        groups += [[offset + i for i in g] for g in e["groups"]]
        eb += [b] * len(e["latent_end_at"])
        et += e["latent_end_at"]
        offset += int(e["helper"][1].prod()) // 4 if mirage else e["n_feat"]
    batch = {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
             "pixel_values": torch.cat([e["pixel_values"] for e in encoded]),
             "grid_thw": torch.cat([e["grid_thw"] for e in encoded]),
             "latent_pos": (torch.tensor(lb, dtype=torch.long), torch.tensor(lt, dtype=torch.long)),
             "latent_slot": torch.tensor(slot, dtype=torch.long),
             "latent_end_pos": (torch.tensor(eb, dtype=torch.long), torch.tensor(et, dtype=torch.long)),
             "target_w": lvr.averaging_matrix(groups, offset)}
    if mirage:
        batch["helper_pixel_values"] = torch.cat([e["helper"][0] for e in encoded])
        batch["helper_grid_thw"] = torch.cat([e["helper"][1] for e in encoded])
    return batch


def to_device(batch, device):
    return {k: (tuple(t.to(device) for t in v) if isinstance(v, tuple) else v.to(device)) for k, v in batch.items()}


def grpo_example(rec, image_root, where):
    """A GRPO record {image (a path or a list), question, answer} (or an LVR JSON record) -> an example without targets."""
    if "conversations" in rec:
        return record_example(rec, image_root, where)
    for k in ("question", "answer"):
        if not isinstance(rec.get(k), str) or not rec[k].strip():
            raise InputError(f"{where}: needs a non-empty string field {k!r}")
    paths = rec.get("image")
    paths = paths if isinstance(paths, list) and paths else [paths]
    return {"images": [open_image(image_root, p, where) for p in paths], "question": rec["question"],
            "answer": rec["answer"]}
