"""
Answer a question about one or more images with a Qwen2.5-VL checkpoint.

    python sample.py --init_from DIR --image x.jpg --q "What colour is the car?"

A plain Qwen2.5-VL checkpoint (official or one we saved) runs as in the reference: the chat
prompt of one user turn, batched KV-cached generation, stop on <|im_end|> / <|endoftext|>.
"""
import torch

import qwen
import vision

# -----------------------------------------------------------------------------
init_from = "out"  # checkpoint directory (Hugging Face Qwen2.5-VL layout)
image = ""  # image file(s), comma-separated, placed before the question in this order
q = "What is in the image?"  # the question
max_new_tokens = 64  # generate at most this many tokens
temperature = 0.0  # 0 means greedy
top_k = 0  # keep the k most likely tokens (0 = off)
top_p = 1.0  # nucleus sampling mass (1.0 = off)
seed = 1337  # sampling seed
min_pixels = 3136  # smallest image area after resizing
max_pixels = 12845056  # largest image area after resizing (fewer pixels = fewer image tokens)
device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu, cuda, cuda:1, mps
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # float32, bfloat16, float16
# -----------------------------------------------------------------------------


def main(argv):
    qwen.configure(globals(), argv)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise vision.InputError(f"--dtype must be float32, bfloat16 or float16, got {dtype!r}")
    model, tok = qwen.load(init_from, getattr(torch, dtype), device)
    images = [vision.preprocess(path, min_pixels, max_pixels) for path in image.split(",") if path]
    pixel_values = torch.cat([p for p, _ in images]).to(device) if images else None
    grid_thw = torch.cat([g for _, g in images]) if images else None
    n_tokens = [int(g.prod()) // model.cfg.vision.spatial_merge_size ** 2 for _, g in images]
    ids = tok.prompt(q, n_tokens)
    if len(ids) + max_new_tokens > model.cfg.max_position_embeddings:
        raise vision.InputError(f"prompt of {len(ids)} tokens + {max_new_tokens} new exceeds the context of "
                                f"{model.cfg.max_position_embeddings}; lower --max_pixels or --max_new_tokens")
    generator = torch.Generator(device).manual_seed(seed)
    out = model.generate(torch.tensor([ids], device=device), pixel_values, grid_thw, max_new_tokens=max_new_tokens,
                         temperature=temperature, top_k=top_k, top_p=top_p,
                         stop_ids=[tok.im_end, tok.endoftext], generator=generator)
    print(tok.decode(out[0, len(ids):].tolist()))


if __name__ == "__main__":
    qwen.run(main)
