"""
Evaluate a checkpoint: accuracy, format rate, latent steps and latent hit rate, with the latents
on and with them disabled, side by side.

    python eval.py                                   # out/ on held-out synthetic examples
    python eval.py --init_from out_grpo --n_examples 512
    python eval.py --data_path MMVP/Questions.csv --image_root "MMVP/MMVP Images"   # MMVP layout
    python eval.py --data_path vstar.jsonl --image_root vstar/                         # V* layout

Latent hit rate: the fraction of latent steps whose nearest merged image token (cosine) lies
inside the question's bbox (synthetic data only): do the latents look where they should?
"Latents disabled" forces <|lvr_end|> right after <|lvr_start|> (zero latent steps), so the
answer must come from the text and image alone. Multiple-choice sets are scored as letters.
Held-out synthetic seeds start at 3e9: disjoint from train_sft (train, eval) and train_grpo.
"""
import csv

import torch

import data
import lvr
import qwen
import vision
from vision import InputError

# -----------------------------------------------------------------------------
init_from = "out"  # checkpoint directory
data_path = "synthetic"  # synthetic | an MMVP-style CSV | a V*-style JSONL
image_root = ""  # directory the dataset's images are in (MMVP: the folder of <Index>.jpg)
n_examples = 256  # held-out synthetic examples (or at most this many from a file)
image_size = 168  # synthetic images: this many pixels square, a 6x6 grid of merged tokens
batch_size = 32  # rows per batched rollout
decoding = "token"  # latent exit: token | steps | latent
lvr_steps = 8  # latent steps in `steps` mode
max_latent_steps = 16  # latent budget in `token` / `latent` modes
max_new_tokens = 32  # completion budget
min_pixels = 3136  # image area bounds after resizing
max_pixels = 28224  # 168*168: the synthetic images unscaled; real data wants more (up to 12845056)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "float32"  # float32 | bfloat16
seed = 1337  # the synthetic held-out set
# -----------------------------------------------------------------------------


def latent_hits(latents, feats, roi):
    """(n, C) latent vectors, (N, C) merged image tokens, ROI token indices -> how many latents hit the ROI."""
    if len(latents) == 0:
        return 0
    return sum(c in set(roi) for c in lvr.nearest_cells(latents, feats).tolist())


def load_multiple_choice(path, root):
    """MMVP (CSV: Index, Question, Options, Correct Answer; images <Index>.jpg) or V* (JSONL: image,
    question, options, answer letter) -> examples with the options in the question."""
    out = []
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        for i, r in enumerate(rows):
            if not {"Index", "Question", "Options", "Correct Answer"} <= set(r):
                raise InputError(f"{path} row {i}: needs the columns Index, Question, Options, Correct Answer")
            out.append((f"{r['Index']}.jpg", f"{r['Question']}\n{r['Options']}", r["Correct Answer"], f"{path} row {i}"))
    else:
        for i, r in enumerate(data.load_records(path)):
            opts = r.get("options")
            if not isinstance(opts, list) or not all(k in r for k in ("image", "question", "answer")):
                raise InputError(f"{path} record {i}: needs image, question, options (a list), answer")
            letters = "\n".join(f"({chr(65 + j)}) {o}" for j, o in enumerate(opts))
            out.append((r["image"], f"{r['question']}\n{letters}", r["answer"], f"{path} record {i}"))
    exs = []
    for img, q, a, where in out[:n_examples]:
        exs.append({"images": [data.open_image(root, img, where)], "question": q + "\nAnswer with the option's letter.", "answer": a, "bbox": None})
    return exs


@torch.no_grad()
def evaluate(model, tok, ids, exs, latents_on=True):
    """-> dict of accuracy, format, latent_steps, hit_rate (None without bboxes) over the examples."""
    stop = [tok.im_end, tok.endoftext]
    correct = fmt = steps = hit = n_lat = 0
    for i in range(0, len(exs), batch_size):
        chunk = exs[i:i + batch_size]
        pvs, grids = zip(*[vision.preprocess(e["images"][0], min_pixels, max_pixels) for e in chunk])
        prompt, mask = qwen.left_pad([tok.prompt(e["question"], [int(g.prod()) // 4]) for e, g in zip(chunk, grids)],
                                     tok.endoftext)
        grid = torch.cat(grids)
        feats = model.visual(torch.cat(pvs).to(device), grid)
        out, lats, is_lat, _ = lvr.rollout(
            model, ids, prompt.to(device), None, grid, mask.to(device), max_new_tokens,
            decoding if latents_on else "steps", lvr_steps if latents_on else 0,
            max_latent_steps=max_latent_steps, stop_ids=stop, feats=feats)
        for b, (e, f) in enumerate(zip(chunk, feats.split([int(g.prod()) // 4 for g in grids]))):
            row = out[b, prompt.shape[1]:].tolist()
            end = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
            text = tok.decode(row[:end])
            correct += lvr.is_correct(text, e["answer"])
            fmt += lvr.is_lvr_format(row[:end], ids, stop, text)
            steps += int(is_lat[b].sum())
            if e["bbox"] is not None:
                hit += latent_hits(lats[b, is_lat[b]], f, lvr.roi_indices(e["bbox"], grids[b][0]))
                n_lat += int(is_lat[b].sum())
    n = len(exs)
    return {"accuracy": correct / n, "format": fmt / n, "latent_steps": steps / n,
            "hit_rate": hit / n_lat if n_lat else None}


def main(argv):
    qwen.configure(globals(), argv)
    model, tok = qwen.load(init_from, getattr(torch, dtype), device)
    model.eval()
    ids = lvr.latent_ids(tok, model.cfg.extra.get("lvr_tokens", lvr.LVR_TOKENS))  # the tokens it was trained with
    if ids is None:
        raise InputError(f"{init_from} has no latent tokens: evaluate it with sample.py, or train it with train_sft.py")
    if data_path == "synthetic":
        exs = [data.synthetic_example(seed * 7919 + 3 * 10 ** 9 + i, image_size) for i in range(n_examples)]
        exs = [{**e, "bbox": e["bboxes"][0]} for e in exs]
    else:
        exs = load_multiple_choice(data_path, image_root)
    rows = [("with latents", evaluate(model, tok, ids, exs, True)), ("latents disabled", evaluate(model, tok, ids, exs, False))]
    print(f"{init_from} on {len(exs)} {'held-out synthetic' if data_path == 'synthetic' else data_path} examples")
    print(f"{'':18}{'accuracy':>10}{'format':>9}{'latent steps':>14}{'hit rate':>10}")
    for name, r in rows:
        hr = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        print(f"{name:18}{r['accuracy']:>10.3f}{r['format']:>9.3f}{r['latent_steps']:>14.2f}{hr:>10}")


if __name__ == "__main__":
    qwen.run(main)
