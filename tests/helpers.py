"""Shared test helpers: tiny random Qwen2.5-VL checkpoints written by the reference transformers."""
import json
import os

import numpy as np
import torch
from PIL import Image

import lvr
import qwen
import tasks


def assert_same_weights(model, out, atol=1e-5):
    """Every weight of `model` within `atol` of the checkpoint at `out`'s (a failure names the weight)."""
    theirs = qwen.Qwen2_5_VL.from_pretrained(out).state_dict()
    for k, p in model.state_dict().items():
        assert torch.allclose(p, theirs[k], atol=atol), (out, k)


def photo(w, h, seed=0):
    """A smooth, photo-like RGB image (gradients plus blobs), so resampling matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack(
        [np.sin(6 * x + rng.uniform(0, 6)) + np.cos(5 * y * rng.uniform(1, 3)) for _ in range(3)], -1)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, w / max(h, w)), rng.uniform(0, h / max(h, w)), rng.uniform(0.05, 0.2)
        img += rng.uniform(-1, 1, 3) * (((x - cx) ** 2 + (y - cy) ** 2) < r * r)[..., None]
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return Image.fromarray(img.astype(np.uint8))


# the tiny references' M-RoPE: 64 wide, 4 heads (16 a head: sections of 2, 3, 3 pairs)
ROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}


def tiny_reference(path, tie=True, seed=0, vocab_size=None):
    """Write tokenizer.json + a random reference Qwen2.5-VL checkpoint to `path`; return the model."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    os.makedirs(path, exist_ok=True)
    tok = tasks.build_tokenizer(os.path.join(path, "tokenizer.json"))
    sid = tok.token_to_id
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=vocab_size or tok.get_vocab_size() + 8, hidden_size=64,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rms_norm_eps=1e-6, rope_parameters=dict(ROPE),
                         bos_token_id=sid("<|endoftext|>"), eos_token_id=sid("<|im_end|>")),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1]),
        image_token_id=sid("<|image_pad|>"), video_token_id=sid("<|video_pad|>"),
        vision_start_token_id=sid("<|vision_start|>"), vision_end_token_id=sid("<|vision_end|>"),
        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    ref = Qwen2_5_VLForConditionalGeneration(cfg)
    with torch.no_grad():  # the default init is tiny; larger weights make every mismatch visible
        for name, p in ref.named_parameters():
            p.normal_(0, 0.3 if p.ndim > 1 else 0.1).add_(1.0 if "norm" in name or "ln_q" in name else 0.0)
    ref.save_pretrained(path)
    return ref.eval()


def flatten_config(path):
    """Rewrite config.json in the official flat layout (LM fields on top, rope_scaling)."""
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    text = d.pop("text_config")
    rope = text.pop("rope_parameters")
    d.update(text)
    d["rope_theta"] = rope["rope_theta"]
    d["rope_scaling"] = {"type": "mrope", "mrope_section": rope["mrope_section"]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)


def reference_inputs(tok, ims, question="What colour is the small circle?", max_pixels=40000):
    """Our prompt + pixel values, and the kwargs the reference model needs (mm_token_type_ids)."""
    import vision
    pvs, grids = zip(*[vision.preprocess(im, max_pixels=max_pixels) for im in ims])
    pv, grid = torch.cat(pvs), torch.cat(grids)
    ids = torch.tensor([tok.prompt(question, [int(g.prod()) // 4 for g in grid])])
    kw = dict(pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=(ids == tok.image_pad).int())
    return ids, pv, grid, kw


# Qwen2.5-VL's own special tokens, in its tokenizer's order (151643 on): a real tokenizer has all of them
OFFICIAL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                    "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>",
                    "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
                    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
                    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]


def real_shaped(path, extra_rows=40):
    """A tiny checkpoint shaped like an official Qwen2.5-VL one, as `transformers` writes it and then
    flattened to the official layout: every official special token, no latent tokens, the official config
    fields, and an embedding with `extra_rows` rows past the tokenizer (151,936 rows for 151,665 tokens)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    os.makedirs(path, exist_ok=True)
    tok = tasks.build_tokenizer(os.path.join(path, "tokenizer.json"), special=OFFICIAL_SPECIAL)
    sid = tok.token_to_id
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=tok.get_vocab_size() + extra_rows, hidden_size=64,
                         intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, rms_norm_eps=1e-6, rope_parameters=dict(ROPE),
                         bos_token_id=sid("<|endoftext|>"), eos_token_id=sid("<|im_end|>"),
                         sliding_window=32768, max_window_layers=70, use_sliding_window=False,
                         max_position_embeddings=128000),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=[1], window_size=112, tokens_per_second=2),
        image_token_id=sid("<|image_pad|>"), video_token_id=sid("<|video_pad|>"),
        vision_start_token_id=sid("<|vision_start|>"), vision_end_token_id=sid("<|vision_end|>"),
        tie_word_embeddings=True)
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(cfg).save_pretrained(path)
    flatten_config(path)
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    d.update(torch_dtype="bfloat16", use_cache=True, attention_dropout=0.0, initializer_range=0.02)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f)
    return tok.get_vocab_size()


def config_as_454(path):
    """Rewrite config.json as transformers 4.54 (the official LVR pin) writes it: the LM fields on top
    (rope_scaling's rope_type "default"), and again in a nested text_config whose image_token_id and
    video_token_id are null; vision_config whole, with in_channels. (Read off 4.54's save_pretrained.)"""
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    text = d.pop("text_config")
    rope = text.pop("rope_parameters")
    scaling = {"mrope_section": rope["mrope_section"], "rope_type": "default", "type": "default"}
    text.update(rope_theta=rope["rope_theta"], rope_scaling=scaling, image_token_id=None, video_token_id=None,
                model_type="qwen2_5_vl_text")
    shape = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
             "num_key_value_heads", "vocab_size")
    ids = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    top = {"architectures": d["architectures"], **{k: text[k] for k in shape},
           **{k: d[k] for k in ids}, "model_type": "qwen2_5_vl", "rope_scaling": scaling,
           "text_config": text, "torch_dtype": "float32", "transformers_version": "4.54.0",
           "tie_word_embeddings": d["tie_word_embeddings"],
           "vision_config": {**d["vision_config"], "in_channels": 3, "model_type": "qwen2_5_vl"}}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(top, f)


def roll(model, ids, input_ids, pixel_values=None, grid_thw=None, attention_mask=None, feats=None,
         group_size=1, latents_in=None, n_in=None, **settings):
    """lvr.rollout with its settings given flat, as keywords: each goes to the Decode or the Sampling field of
    its name (the tests' shorthand)."""
    import dataclasses
    import lvr
    names = {f.name for f in dataclasses.fields(lvr.Decode)}
    decode = lvr.Decode(**{k: v for k, v in settings.items() if k in names})
    sampling = lvr.Sampling(**{k: v for k, v in settings.items() if k not in names})
    feed = lvr.Feed(latents_in, n_in) if latents_in is not None else None
    return lvr.rollout(model, ids, lvr.Prompt(input_ids, attention_mask, pixel_values, grid_thw, feats),
                       decode, sampling, group_size, feed)


def tiny_model(tmp_path, latent_head=False, seed=0):
    """A 2-layer tiny Qwen2.5-VL with LVR's tokens, weights drawn large enough to matter -> (model,
    tok, ids)."""
    os.makedirs(tmp_path, exist_ok=True)
    tok = tasks.build_tokenizer(str(tmp_path / "tokenizer.json"), special=qwen.SPECIAL + tasks.LATENT_SPECIAL)
    cfg = qwen.Config.from_dict(tasks.tiny_config(tok))
    cfg.num_hidden_layers = 2
    cfg.extra["lvr_head"] = latent_head
    torch.manual_seed(seed)
    model = qwen.Qwen2_5_VL(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.ndim > 1 else 0.05).add_(1.0 if "norm" in name or "ln_q" in name else 0.0)
    model.save_pretrained(str(tmp_path))
    model, tok = qwen.load(str(tmp_path))
    return model, tok, lvr.add_latent_tokens(model, tok)


# the scripts' settings small enough for a test: 112-px images, batches of 4
SMALL = ["--batch_size", "4", "--eval_examples", "4", "--image_size", "112", "--max_pixels", "12544",
         "--warmup_iters", "2"]
IDS = lvr.LatentIds(start=100, latent=101, latent_end=102, end=103)  # latent ids of hand-made sequences
IM_END = 7  # the end-of-turn id of hand-made sequences


def state(out):
    """A checkpoint's train_state.pt."""
    return torch.load(os.path.join(out, "train_state.pt"), weights_only=True)


def roll_with_logprobs(model, ids, *args, **settings):
    """roll, and the log-prob of every decision the rollout sampled, from the very logits it sampled from
    (and, exploring its latents, the Gaussian each z was drawn from) -> (Rollout, (B, n) log-probs, 0 where
    nothing was sampled): the oracle of grpo.completion_logprobs, which recomputes them in one forward."""
    import lvr
    import qwen
    seen, drawn = [], []
    sample, explore = qwen.sample, lvr.explore

    def sampling(logits, *a, **k):
        seen.append(logits.float().clone())
        return sample(logits, *a, **k)

    def exploring(vec, how, device):
        z = explore(vec, how, device)
        drawn.append(lvr.gaussian_logprob(z, vec, how.latent_sigma))
        return z
    qwen.sample, lvr.explore = sampling, exploring
    try:
        r = roll(model, ids, *args, **settings)
    finally:
        qwen.sample, lvr.explore = sample, explore
    n = r.sampled.shape[1]
    lp = (torch.stack(seen[:n], 1) / (settings.get("temperature") or 1.0)).log_softmax(-1)  # (B, n, V)
    token = lp.gather(-1, r.tokens[:, -n:, None])[..., 0]
    out = torch.where(r.sampled, torch.where(r.is_latent, lvr.continue_logprob(
        lp, lvr.exit_tokens(ids, settings["decoding"])), token), 0.0)
    if drawn:
        out = out + torch.where(r.is_latent, torch.stack(drawn[:n], 1), 0.0)
    return r, out
