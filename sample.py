"""
Answer a question about one or more images with a Qwen2.5-VL checkpoint.

    python sample.py --init_from DIR --image x.jpg --q "What colour is the car?"

A plain Qwen2.5-VL checkpoint (official or one we saved) runs as in the reference: the chat
prompt of one user turn, batched KV-cached generation, stop on <|im_end|> / <|endoftext|>.
A checkpoint with latent tokens decodes with the latent rollout and shows, for each latent
step, the merged image cell (28x28 px) its vector is most cosine-similar to; --viz draws them.
"""
import torch
from PIL import ImageDraw

import checkpoint
import cli
import data
import evaluate
import lvr
import vision
from cli import Auto, InputError

# -----------------------------------------------------------------------------
# I/O
init_from = "out"  # checkpoint directory (Hugging Face Qwen2.5-VL layout), or a hub id ORG/NAME[@REVISION]
image = ""  # image file(s), comma-separated, placed before the question in this order
q = "What is in the image?"  # the question
viz = ""  # write the image with each latent step's nearest cell drawn on it to this file (png)
# sampling
max_new_tokens = 64  # [1, inf) generate at most this many tokens
temperature = 0.0  # [0, inf) 0 means greedy
top_k = 0  # [0, inf) keep the k most likely tokens (0 = off)
top_p = 1.0  # (0, 1] nucleus sampling mass (1.0 = off)
seed = 1337  # [0, inf) sampling seed
# decoding
decoding = "auto"  # {auto, token, steps, latent} latent exit (auto: a pause checkpoint's steps, else token)
lvr_steps = Auto(int)  # [0, inf) `steps`: latents a span, else the budget (auto: a pause model's count, 8)
force_end = True  # force <|lvr_end|> after a span (false: the model's own next token, as the official code)
end_metric = "checkpoint"  # {checkpoint, mse, cosine, l1} `latent` exit distance (checkpoint: as trained)
end_threshold = Auto(float)  # (0, inf) `latent` exit threshold (auto: the checkpoint's, else 0.1)
# images and system
min_pixels = Auto(int)  # [1, inf) smallest image area after resizing (auto: as trained, else 3136)
max_pixels = Auto(int)  # [1, inf) largest image area (auto: as trained, else 12845056)
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda, cuda:1, mps
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # {float32, bfloat16, float16}
# -----------------------------------------------------------------------------


def resolve(config):
    """The settings left at auto -> their values (cli.configure writes and prints them): the image
    sizes the model was trained on (else the processor's), a hub id's snapshot, and a pause
    checkpoint's decoding by count (lvr.span_count)."""
    path = checkpoint.locate(init_from)
    lo, hi = data.trained_pixels(path, data.PROCESSOR_PIXELS)
    hi = cli.given(max_pixels) or hi
    how, steps = lvr.span_count(checkpoint.read_config(path), decoding, cli.given(lvr_steps))
    return {"min_pixels": cli.given(min_pixels) or min(lo, hi), "max_pixels": hi, "init_from": path,
            "decoding": how, "lvr_steps": steps}


def main(argv):
    cli.configure(globals(), argv, resolve)
    cli.require(
        min_pixels <= max_pixels, f"--min_pixels {min_pixels} is above --max_pixels {max_pixels}"
    )
    if not q.strip():
        raise InputError("--q is empty: ask a question")
    model, tok = checkpoint.load(init_from, getattr(torch, dtype), device)
    images = [vision.preprocess(path, min_pixels, max_pixels) for path in image.split(",") if path]
    pixel_values = torch.cat([p for p, _ in images]).to(device) if images else None
    grid_thw = torch.cat([g for _, g in images]) if images else None
    n_tokens = [vision.merged_tokens(g, model.cfg.vision.spatial_merge_size) for _, g in images]
    ids = tok.prompt(q, n_tokens)
    if len(ids) + max_new_tokens > model.cfg.max_position_embeddings:
        raise InputError(
            f"prompt of {len(ids)} tokens + {max_new_tokens} new exceeds the context of "
            f"{model.cfg.max_position_embeddings}; lower --max_pixels or --max_new_tokens"
        )

    generator = torch.Generator(device).manual_seed(seed)
    input_ids = torch.tensor([ids], device=device)
    sampling = lvr.Sampling(temperature, top_k, top_p=top_p, generator=generator,
                            stop_ids=[tok.im_end, tok.endoftext])
    latent = lvr.find_latent_ids(model, tok)
    if latent is None:  # plain Qwen2.5-VL
        out = model.generate(
            input_ids, pixel_values, grid_thw, max_new_tokens=max_new_tokens, sampling=sampling
        )
        print(tok.decode(out[0, len(ids):].tolist()))
        return

    metric, threshold = lvr.end_rule(model, end_metric, cli.given(end_threshold))
    with torch.no_grad():
        feats = model.visual(pixel_values, grid_thw) if images else None
    crop = None
    if lvr.method_of(model.cfg) == "crop" and images:  # (its spans read the box it writes)
        crop = evaluate.region_reader(tok, latent, [{}], [(images, feats)],
                                      max_latents=model.cfg.extra["latent_targets"]["max_latents"])
    r = lvr.rollout(
        model,
        ids=latent,
        prompt=lvr.Prompt(input_ids, attention_mask=None, grid_thw=grid_thw, feats=feats),
        decode=lvr.Decode(
            decoding, lvr_steps=lvr_steps, max_latent_steps=lvr_steps, force_end=force_end,
            end_metric=metric, end_threshold=threshold, max_new_tokens=max_new_tokens,
        ),
        sampling=sampling, crop=crop,
    )
    print(tok.decode(r.tokens[0, len(ids):].tolist()))
    print(f"latent steps: {int(r.is_latent[0].sum())}")
    if images:
        show_latents(r, feats[:n_tokens[0]], model.cfg, grid_thw)


def show_latents(r, feats, cfg, grid_thw):
    """The merged cell of the first image (feats: its merged tokens, row-major) nearest each latent
    the rollout r fed, printed, and (--viz) drawn on the image as the model sees it."""
    merge = cfg.vision.spatial_merge_size
    side = cfg.vision.patch_size * merge  # one merged cell: 28 x 28 px
    gw = int(grid_thw[0, 2]) // merge
    cells = lvr.nearest_cells(r.latents[0, r.is_latent[0]], feats).tolist()
    for i, c in enumerate(cells):
        print(f"latent {i}: nearest image cell row {c // gw}, col {c % gw}")
    if viz:
        im = vision.load_image(image.split(",")[0])
        h, w = (int(n) * cfg.vision.patch_size for n in grid_thw[0, 1:])
        im = im.resize((w, h))  # the model's view of the image
        d = ImageDraw.Draw(im)
        for i, c in enumerate(cells):
            x, y = (c % gw) * side, (c // gw) * side
            d.rectangle((x, y, x + side - 1, y + side - 1), outline=(255, 0, 0), width=2)
            d.text((x + 3, y + 2), str(i), fill=(255, 0, 0))
        im.save(viz)
        print(f"wrote {viz}")


if __name__ == "__main__":
    cli.run(main)
