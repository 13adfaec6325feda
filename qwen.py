"""
Qwen2.5-VL from scratch: config, the Qwen2 decoder with M-RoPE and a KV cache, the VL model that
puts image features at <|image_pad|>, loading and saving weights, the tokenizer and chat prompt,
and batched generation.

Module names follow the official safetensors keys (`model.layers.0.self_attn.q_proj.weight`,
`visual.blocks.0.attn.qkv.weight`, `lm_head.weight`), so loading is a prefix fix-up plus a
strict load_state_dict(assign=True) on a model built on the meta device.
Departures from the reference: positions during decoding come from a per-row counter
(`next_pos`) instead of rope_deltas + attention-mask cumsum (same numbers, no recomputation);
the KV cache is preallocated; padded query rows always see themselves so SDPA never makes NaN.
"""
import functools
import json
import os
from dataclasses import dataclass, field, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open, SafetensorError
from safetensors.torch import save_file
from tokenizers import Tokenizer

from cli import InputError
from vision import MLP, RMSNorm, VisionConfig, VisionTransformer, cos_sin, merged_tokens, rope

# every Qwen2.5-VL tokenizer has these; the tiny one adds them in this order
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|image_pad|>", "<|video_pad|>"]


# the fields that have no default: the model's shape
REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads",
)


def set_fields(*layers):
    """Config dicts merged, a later one over an earlier one, without their nulls (a null: not set
    here)."""
    return {k: v for layer in layers for k, v in layer.items() if v is not None}


@dataclass
class Config:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 11008
    num_hidden_layers: int = 36
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    mrope_section: list = field(default_factory=lambda: [16, 24, 24])
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: object = 151645
    vision: VisionConfig = field(default_factory=VisionConfig)
    extra: dict = field(default_factory=dict)  # fields we keep but do not use (e.g. LVR token ids)

    @classmethod
    def from_dict(cls, d):
        """Every layout a Qwen2.5-VL config.json is written in: the official flat one (LM fields on
        top, rope_scaling), transformers 4.54's (LM fields on top and again in text_config, where
        the image and video token ids are null) and 5.x's (text_config, rope_parameters). A null
        means "not set here": it never overrides a value set elsewhere. A shape field set nowhere is
        an error naming it."""
        text = set_fields(d, d.get("text_config") or {})
        rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
        v = set_fields(d.get("vision_config") or {})
        for name in REQUIRED:
            if name not in text:
                raise InputError(
                    f"config.json: {name} is missing (set neither on top nor in text_config)"
                )

        if "hidden_size" not in v:
            raise InputError("config.json: vision_config.hidden_size is missing")
        vision = VisionConfig(**{k: v[k] for k in VisionConfig.__dataclass_fields__ if k in v})
        vision.in_channels = v.get("in_channels", v.get("in_chans", 3))
        vision.rope_theta = (v.get("rope_parameters") or {}).get("rope_theta", vision.rope_theta)
        for act in (text.get("hidden_act", "silu"), v.get("hidden_act", "silu")):
            if act != "silu":
                raise InputError(
                    f"config.json: hidden_act {act!r} is not supported (Qwen2.5-VL uses silu)"
                )

        names = [
            k
            for k in cls.__dataclass_fields__
            if k not in ("vision", "extra", "rope_theta", "mrope_section")
        ]
        cfg = cls(**{k: text[k] for k in names if k in text}, vision=vision)
        cfg.rope_theta = rope.get("rope_theta", text.get("rope_theta", cfg.rope_theta))
        cfg.mrope_section = list(rope.get("mrope_section", cfg.mrope_section))

        # (the top level's)
        cfg.tie_word_embeddings = set_fields(text, d).get("tie_word_embeddings", False)
        cfg.extra = {k: d[k] for k in d if k.startswith("lvr_") or k.startswith("latent_")}
        return cfg

    def to_dict(self):
        """The official flat layout, which every transformers version reads."""
        d = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("vision", "extra", "rope_theta", "mrope_section")
        }
        vision = {
            k: v for k, v in asdict(self.vision).items() if k not in ("rope_theta", "in_channels")
        }
        return {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            **d,
            "hidden_act": "silu",
            "rope_theta": self.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": self.mrope_section},
            "vision_config": {**vision, "in_chans": self.vision.in_channels, "hidden_act": "silu"},
            **self.extra,
        }


# -----------------------------------------------------------------------------
# the language model

class KVCache:
    """Preallocated keys/values for every layer, plus per-row key validity and next M-RoPE
    position."""

    def __init__(self, cfg, batch, max_len, device, dtype, rope_dtype=None):
        """dtype: the keys' and values' (under autocast, its dtype: half the memory, and SDPA reads
        them without a cast); rope_dtype: the rope tables', the activations' dtype (default:
        dtype)."""
        shape = (
            batch, cfg.num_key_value_heads, max_len, cfg.hidden_size // cfg.num_attention_heads,
        )

        # per layer, in a list: no indexing op per step
        self.k = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)
        ]
        self.v = [
            torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)
        ]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # False at padding

        # M-RoPE position of the next token
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)

        # decoded tokens have text positions (equal rows), never past their slot: one table,
        # (max_len, hd)
        cos, sin = mrope(
            cfg, torch.arange(max_len, device=device).expand(3, 1, -1), rope_dtype or dtype
        )
        self.cos, self.sin = cos[0, 0], sin[0, 0]
        self.len = 0  # slots written so far
        self.padded = False  # whether any key is padding (then every step needs a mask)

    def repeat_rows(self, G):
        """Each row copied to G consecutive rows: G samples of one prompt share its prefill."""
        self.k = [t.repeat_interleave(G, 0) for t in self.k]
        self.v = [t.repeat_interleave(G, 0) for t in self.v]
        self.valid = self.valid.repeat_interleave(G, 0)
        self.next_pos = self.next_pos.repeat_interleave(G, 0)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.n_head, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.hd = cfg.hidden_size // cfg.num_attention_heads
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:  # write this chunk, attend over everything so far
            s, ck, cv = cache.len, cache.k[self.layer_idx], cache.v[self.layer_idx]
            ck[:, :, s:s + T], cv[:, :, s:s + T] = k, v
            k, v = ck[:, :, :s + T], cv[:, :, :s + T]

        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=True
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, checkpointing=False):
        """(B, T, C) input embeddings -> final-norm hidden states (B, T, C): the layers, then the
        norm. checkpointing: recompute each layer in backward instead of keeping its activations."""
        for layer in self.layers:
            x = (
                torch.utils.checkpoint.checkpoint(
                    layer, x, cos, sin, mask, cache, use_reentrant=False
                )
                if checkpointing
                else layer(x, cos, sin, mask, cache)
            )

        return self.norm(x)


def causal_mask(valid, start, T, device, attend=None):
    """(B, S) key validity (False at padding) -> (B, 1, T, S) bool mask for T queries at positions
    start..start+T-1: each sees the valid keys up to itself, and always itself (no all -inf rows).
    attend (B, T, S) bool: the caller's own limit on which keys each query may see, on top.

    Prompts are left-padded, so a row's first real token sits at a different column in each row: the
    causal triangle alone would let a real token attend to the padding before it, and `valid` takes
    those keys away. A padding query has no valid key at all; SDPA would turn its all -inf row into
    NaN, which then spreads through the batch, so every query also sees itself (its output is never
    used)."""
    keys, queries = torch.arange(start + T, device=device), torch.arange(
        start, start + T, device=device
    )
    d = keys[None] - queries[:, None]  # (T, S)
    see = (d <= 0)[None] & valid[:, None]  # (B, T, S)
    if attend is not None:
        see = see & attend
    return (see | (d == 0)[None])[:, None]


@functools.lru_cache(maxsize=16)
def rope_tables(hd, theta, section, device):
    """Inverse frequencies (hd/2,) and which position row (t, h, w) each frequency slot reads."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=device) / hd))
    return inv_freq, torch.repeat_interleave(
        torch.arange(3, device=device), torch.tensor(section, device=device)
    )


def mrope(cfg, position_ids, dtype):
    """(3, B, T) positions -> cos, sin (B, 1, T, head_dim) for vision.rope: frequency slots split
    over t/h/w rows.

    M-RoPE (multimodal rotary embedding) gives each token three positions instead of one: a time row
    t, a height row h and a width row w (get_rope_index). A text token has t = h = w, so for text
    this is plain RoPE; the merged image token at (r, c) of an image starting at s has (s, s + r, s
    + c), so attention sees the image as a 2-D grid. Each head's rotary frequencies are shared out
    between the rows: mrope_section (16, 24, 24 for the real model, in frequency pairs) says how
    many of the head's frequency slots read t, then h, then w."""
    inv_freq, rows = rope_tables(cfg.hidden_size // cfg.num_attention_heads, theta=cfg.rope_theta,
                                 section=tuple(cfg.mrope_section), device=position_ids.device)

    # (B, T, hd/2), slot j uses row rows[j]
    freqs = position_ids[rows].permute(1, 2, 0).float() * inv_freq
    return tuple(t.to(dtype) for t in cos_sin(torch.cat([freqs, freqs], -1)[:, None]))


class LatentHead(nn.Module):
    """The official LVR latent head, `simple` (keys lvr_head.ln_q, lvr_head.mlp.0/2): hidden ->
    latent."""

    def __init__(self, C):
        super().__init__()
        self.ln_q = nn.LayerNorm(C, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(C, C), nn.GELU(), nn.Linear(C, C))

    def forward(self, x):
        return self.mlp(self.ln_q(x))


def latent_head(cfg):
    """The optional latent head named by the config (official fields lvr_head, lvr_head_type)."""
    kind = cfg.extra.get("lvr_head_type", "simple")
    if kind not in ("simple", "glu"):
        raise InputError(f"config lvr_head_type must be simple or glu, got {kind!r}")

    # glu: the official LVRHeadGLU is a SwiGLU with biases, MLP-wide like the LM's
    return (
        LatentHead(cfg.hidden_size)
        if kind == "simple"
        else MLP(cfg.hidden_size, cfg.intermediate_size, bias=True)
    )


def get_rope_index(input_ids, grid_thw, attention_mask, image_token_id, merge=2):
    """M-RoPE positions (3, B, T).

    Text advances all three rows by 1; an image of merged grid (H', W') starting at position s puts
    token (r, c) at (s, s+r, s+c), the text after it continues at s + max(H', W'); padding gets 0
    (masked anyway).
    """
    B, T = input_ids.shape
    mask = (
        torch.ones_like(input_ids, dtype=torch.bool)
        if attention_mask is None
        else attention_mask.bool()
    )
    pos = torch.zeros(3, B, T, dtype=torch.long, device=input_ids.device)
    grids = iter([] if grid_thw is None else grid_thw.tolist())
    for b in range(B):
        ids = input_ids[b][mask[b]].tolist()
        out, s, i = [], 0, 0
        while i < len(ids):
            if ids[i] == image_token_id:
                t, h, w = next(grids, (0, 0, 0))
                h, w = h // merge, w // merge
                if t * h * w == 0:
                    raise InputError(f"row {b}: more images in the prompt than grid_thw rows")
                tt, rr, cc = torch.meshgrid(
                    torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"
                )
                out.append(torch.stack([tt, rr, cc]).view(3, -1) + s)
                i, s = i + t * h * w, s + max(h, w)
            else:
                j = next((k for k in range(i, len(ids)) if ids[k] == image_token_id), len(ids))
                out.append(torch.arange(s, s + j - i).expand(3, -1))
                i, s = j, s + j - i
        row = torch.cat(out, 1) if out else torch.zeros(3, 0, dtype=torch.long)
        pos[:, b, mask[b]] = row[:, :len(ids)].to(pos.device)

    return pos


def position_rope(cfg, x, input_ids, grid_thw, attention_mask, position_ids, cache):
    """The forward's rotary tables -> cos, sin (B, 1, T, hd) and each row's next position: from
    position_ids when given, from get_rope_index on a first call, from the cache's per-row counter
    (and rope table) while decoding."""
    B, T, _ = x.shape
    if position_ids is None and (cache is None or cache.len == 0):
        ids = (
            input_ids
            if input_ids is not None
            else torch.zeros(B, T, dtype=torch.long, device=x.device)
        )
        position_ids = get_rope_index(
            ids, grid_thw, attention_mask, image_token_id=cfg.image_token_id,
            merge=cfg.vision.spatial_merge_size,
        )

    if position_ids is None:
        pos = cache.next_pos[:, None] + torch.arange(T, device=x.device)  # (B, T)
        return cache.cos[pos][:, None], cache.sin[pos][:, None], pos[:, -1] + 1

    position_ids = position_ids.to(x.device)
    cos, sin = mrope(cfg, position_ids, x.dtype)
    return cos, sin, position_ids.amax(dim=(0, 2)) + 1  # (padding sits at 0)


class Qwen2_5_VL(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.grad_checkpointing = False  # recompute decoder layers in backward to save memory
        self.visual = VisionTransformer(cfg.vision)
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if cfg.extra.get("lvr_head"):
            self.lvr_head = latent_head(cfg)

        # official LVR's latent-end mode: its learned end vector
        if cfg.extra.get("latent_end_token"):
            if "lvr_latent_end_id" not in cfg.extra:
                raise InputError("config.json: latent_end_token without lvr_latent_end_id")
            self.lvr_latent_end_emb = nn.Parameter(torch.zeros(cfg.hidden_size))

    def init_weights(self):
        """A fresh model (train_sft's tiny scratch one): norms 1 (biases 0), other biases 0, weights
        N(0, 0.02)."""
        for name, p in self.named_parameters():
            if "norm" in name or "ln_q" in name:
                torch.nn.init.ones_(p) if name.endswith("weight") else torch.nn.init.zeros_(p)
            elif name.endswith("bias"):
                torch.nn.init.zeros_(p)
            else:
                torch.nn.init.normal_(p, std=0.02)

    def token_embeds(self, input_ids):
        """(B, T) ids -> (B, T, C) their embeddings. An official LVR checkpoint trained in its
        latent-end mode has a learned vector `lvr_latent_end_emb` that stands in for
        <|lvr_latent_end|>'s embedding row."""
        x = self.model.embed_tokens(input_ids)
        if hasattr(self, "lvr_latent_end_emb"):
            at = (input_ids == self.cfg.extra["lvr_latent_end_id"])[..., None]
            x = torch.where(at, self.lvr_latent_end_emb.to(x.dtype), x)

        return x

    def embed(self, input_ids, pixel_values=None, grid_thw=None, feats=None):
        """Token embeddings with the merged image tokens (`feats`, or the tower's) at
        <|image_pad|>."""
        x = self.token_embeds(input_ids)  # (B, T, C)
        is_img = input_ids == self.cfg.image_token_id
        n_tok = int(is_img.sum())
        if pixel_values is None and feats is None:
            if n_tok:
                raise InputError(
                    f"the prompt has {n_tok} <|image_pad|> tokens but no image was given"
                )
            return x

        n_feat = merged_tokens(grid_thw, self.cfg.vision.spatial_merge_size)
        if n_tok != n_feat:
            raise InputError(
                f"image tokens and image features do not match: {n_tok} <|image_pad|> tokens, "
                f"{n_feat} features from grid_thw {grid_thw.tolist()}"
            )

        feats = self.visual(pixel_values, grid_thw) if feats is None else feats
        return x.masked_scatter(is_img[..., None], feats.to(x.dtype))

    def forward(self, input_ids=None, pixel_values=None, grid_thw=None, attention_mask=None,
                inputs_embeds=None, position_ids=None, cache=None, attend=None):
        """-> final-norm hidden states (B, T, C). Callers apply lm_head only where they need logits
        (it is the costliest matmul, V ~ 152k). attention_mask (B, T): 1 real, 0 padding; with a
        cache, the new tokens'. attend (B, T, S) bool: which keys each query may see, on top of
        causality and padding (S: every key, the cached ones included; the method's controls)."""
        x = self.embed(input_ids, pixel_values, grid_thw) if inputs_embeds is None else inputs_embeds
        B, T, _ = x.shape
        start = 0 if cache is None else cache.len
        if start + T > self.cfg.max_position_embeddings:
            raise InputError(
                f"{start + T} tokens exceed the model's context of {self.cfg.max_position_embeddings}"
            )

        cos, sin, next_pos = position_rope(
            self.cfg, x, input_ids, grid_thw=grid_thw, attention_mask=attention_mask,
            position_ids=position_ids, cache=cache,
        )

        # the mask: None means causal (SDPA's is_causal), or, for one new token, every cached key.
        # The cache remembers whether its prompt had padding; then every step needs one.
        valid = None if attention_mask is None else attention_mask.bool()
        if attend is not None and valid is None:  # (a mask for every row)
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if cache is not None:
            if valid is not None:
                cache.valid[:, start:start + T] = valid
                # a host sync, but only with a mask
                cache.padded = cache.padded or not bool(valid.all())
            masked = cache.padded or (start > 0 and T > 1) or attend is not None
            valid = cache.valid[:, :start + T] if masked else None

        mask = None if valid is None else causal_mask(
            valid, start, T, device=x.device, attend=attend
        )

        h = self.model(
            x, cos, sin, mask, cache,
            self.grad_checkpointing and self.training and torch.is_grad_enabled(),
        )
        if cache is not None:
            cache.len, cache.next_pos = start + T, next_pos
        return h

    def generate(self, input_ids, pixel_values=None, grid_thw=None, attention_mask=None,
                 max_new_tokens=16, sampling=None):
        """Batched KV-cached sampling; prompts left-padded. -> (B, T + n) tokens, prompt included.

        sampling: a Sampling (default: greedy, the model's stop ids). A row that emits a stop id is
        done; later slots repeat that id.
        """
        B, T = input_ids.shape
        sampling = sampling or Sampling()
        stop = torch.tensor(
            list(sampling.stop_ids) or self.default_stop_ids(), device=input_ids.device
        )

        # lighter than no_grad; the result is built outside, as a normal tensor
        with torch.inference_mode():
            cache = KVCache(
                self.cfg, batch=B, max_len=T + max_new_tokens, device=input_ids.device,
                dtype=self.lm_head.weight.dtype,
            )
            h = self(input_ids, pixel_values, grid_thw, attention_mask=attention_mask, cache=cache)
            logits = self.lm_head(h[:, -1])  # (B, V)
            out, dones, done = [], [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            for i in range(max_new_tokens):
                tok = torch.where(
                    done, stop[0],
                    sample(logits, sampling.temperature, sampling.top_k, top_p=sampling.top_p,
                           generator=sampling.generator),
                )
                out.append(tok)
                done = done | torch.isin(tok, stop)
                dones.append(done)
                # a host sync every 16 steps
                if i == max_new_tokens - 1 or (i % 16 == 15 and bool(done.all())):
                    break
                h = self(inputs_embeds=self.model.embed_tokens(tok[:, None]), cache=cache)
                logits = self.lm_head(h[:, -1])

        # up to the step the last row stopped
        n = min(int((~torch.stack(dones).all(1)).sum()) + 1, len(out))
        return torch.cat([input_ids, torch.stack(out[:n], 1)], 1)

    def macs(self, tokens, head_positions=0, patches=0):
        """Multiply-accumulates of one forward (a deterministic measure of compute): `tokens`
        through the decoder layers, `head_positions` through lm_head, `patches` through the vision
        tower. Attention's own products are left out, as is usual; a backward costs about twice its
        forward."""
        if not hasattr(self, "_sizes"):  # (counted once: DTensor shards count as their whole)
            layers = sum(p.numel() for p in self.model.layers.parameters())
            tower = (
                sum(p.numel() for p in self.visual.parameters()) if hasattr(self, "visual") else 0
            )
            self._sizes = (layers, self.lm_head.weight.numel(), tower)

        layers, head, tower = self._sizes
        return tokens * layers + head_positions * head + patches * tower

    def default_stop_ids(self):
        return (
            list(self.cfg.eos_token_id)
            if isinstance(self.cfg.eos_token_id, (list, tuple))
            else [self.cfg.eos_token_id]
        )

    # -------------------------------------------------------------------------
    # checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu"):
        """Load a Hugging Face Qwen2.5-VL directory: strict, memory-mapped, no doubled memory."""
        cfg = read_config(path)
        with torch.device("meta"):
            model = cls(cfg)
        where = weight_index(path, cfg.tie_word_embeddings)
        check_keys(path, {k: v.shape for k, v in model.state_dict().items()}, where)
        state = read_weights(where, names=model.state_dict(), dtype=dtype, device=device)
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:
            # assign=True made two Parameters
            model.lm_head.weight = model.model.embed_tokens.weight

        return model.eval()

    def save_pretrained(self, path, state=None):
        """config.json + model.safetensors in the official key layout (tied head not written).
        `state`: a full state dict to write instead of self.state_dict() (FSDP gathers one)."""
        os.makedirs(path, exist_ok=True)
        index = os.path.join(path, "model.safetensors.index.json")

        # an older sharded copy: drop it, as transformers does (we write one file)
        if os.path.isfile(index):
            for f in [*index_shards(index), index]:
                if os.path.isfile(f):
                    os.remove(f)

        state = {k: v.detach().contiguous() for k, v in (state or self.state_dict()).items()}
        if self.cfg.tie_word_embeddings:
            state.pop("lm_head.weight")
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        d = {
            **self.cfg.to_dict(),
            "torch_dtype": str(self.lm_head.weight.dtype).replace("torch.", ""),
        }
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(d, f, indent=2)


def read_config(path):
    """config.json of a checkpoint directory -> Config, or a one-line InputError."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise InputError(f"no config.json in {path}")
    try:
        with open(cfg_path) as f:
            return Config.from_dict(json.load(f))
    except (json.JSONDecodeError, TypeError) as e:
        raise InputError(f"{cfg_path}: not a valid Qwen2.5-VL config ({e})") from None


def weight_index(path, tied):
    """Our parameter name -> (file, its key there, its shape), for every tensor of the checkpoint's
    safetensors: the official keys, or transformers 5's `model.language_model.` / `model.visual.`; a
    tied head reads the embedding (`tied`). Only the headers are read."""
    where = {}
    for file in safetensors_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    name = key.replace("model.language_model.", "model.").replace(
                        "model.visual.", "visual."
                    )
                    where[name] = (file, key, tuple(f.get_slice(key).get_shape()))
        except (SafetensorError, OSError) as e:
            raise InputError(
                f"{file}: cannot read safetensors (truncated or corrupted?): {e}"
            ) from None

    if tied and "lm_head.weight" not in where and "model.embed_tokens.weight" in where:
        where["lm_head.weight"] = where["model.embed_tokens.weight"]
    return where


def check_keys(path, expected, where):
    """The checkpoint holds exactly the model's tensors: `expected` {name: shape}, `where`
    (weight_index)."""
    bad = [f"checkpoint is missing key {k}" for k in expected if k not in where] + [
        f"checkpoint has unexpected key {where[k][1]}" for k in sorted(where) if k not in expected
    ]
    if bad:
        raise InputError(f"{path}: {bad[0]}")
    for name, shape in expected.items():
        if where[name][2] != tuple(shape):
            got = where[name][2]
            raise InputError(
                f"{path}: key {name} has shape {got}, the config expects {tuple(shape)}"
            )


def read_weights(where, names, dtype, device="cpu"):
    """{name: tensor} for `names` (keys of weight_index's `where`), in `dtype` on `device`: each
    file opened once, each stored tensor read once (a tied head shares the embedding's)."""
    by_file, out = {}, {}
    for name in names:
        by_file.setdefault(where[name][0], []).append(name)
    for file, file_names in by_file.items():
        read = {}  # key -> tensor
        try:
            with safe_open(file, framework="pt", device=str(device)) as f:
                for name in file_names:
                    key = where[name][1]
                    if key not in read:
                        read[key] = f.get_tensor(key)
                        if not read[key].is_floating_point():
                            dtype_ = read[key].dtype
                            raise InputError(
                                f"{file}: {key} has dtype {dtype_}, weights must be floats"
                            )
                        read[key] = read[key].to(dtype)
                    out[name] = read[key]
        except (SafetensorError, OSError) as e:
            raise InputError(
                f"{file}: cannot read safetensors (truncated or corrupted?): {e}"
            ) from None

    return out


def safetensors_files(path):
    """The weight files, in transformers' order: model.safetensors, else the shards of the index."""
    single, index = os.path.join(path, "model.safetensors"), os.path.join(
        path, "model.safetensors.index.json"
    )
    if os.path.isfile(single):
        return [single]
    if not os.path.isfile(index):
        raise InputError(f"no model.safetensors or model.safetensors.index.json in {path}")
    return index_shards(index)


def index_shards(index):
    """The shards a model.safetensors.index.json names: plain .safetensors names beside it, nowhere
    else."""
    try:
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(os.path.dirname(index), s) for s in names
                if s == os.path.basename(s) and s.endswith(".safetensors")]
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # truncated, or not an index
        raise InputError(
            f"{index}: not a valid safetensors index ({type(e).__name__}: {e})"
        ) from None


@dataclass
class Sampling:
    """How each row draws its decisions."""
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # keep the k most likely tokens (0: off)
    top_p: float = 1.0  # nucleus mass (1: off)
    generator: object = None  # a torch.Generator, or a list of them, one per prompt (latent_noise)
    stop_ids: tuple = ()  # tokens that end a row (none given: the model's own)
    latent_sigma: float = 0.0  # the latent rollout: > 0 explores the latents (lvr.explore)


def sample(logits, temperature=0.0, top_k=0, top_p=1.0, generator=None):
    """(B, V) logits -> (B,) tokens. Order as in transformers: temperature, top-k, top-p.
    `generator`: one, or a list, one per equal block of rows (GRPO: per prompt), each block drawn
    from its own alone."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))

    if top_p < 1.0:
        # ascending; drop the low tail holding 1 - top_p of the mass
        sorted_logits, order = logits.sort(-1)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))

    # the exponential race: argmax p / E with E ~ Exp(1) draws from p
    if isinstance(generator, list):
        e = torch.cat(
            [
                torch.empty(
                    len(logits) // len(generator), logits.shape[-1], device=logits.device
                ).exponential_(generator=g)
                for g in generator
            ]
        )
        return (logits.softmax(-1) / e).argmax(-1)

    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# tokenizer and prompt

class QwenTokenizer:
    """tokenizers.Tokenizer plus the Qwen special-token ids, looked up by string."""

    def __init__(self, path):
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        try:
            self.tok = Tokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception
            raise InputError(f"cannot read tokenizer {file}: {e}") from None

        missing = [s for s in SPECIAL if self.tok.token_to_id(s) is None]
        if missing:
            raise InputError(f"tokenizer {file} lacks the Qwen special tokens {' '.join(missing)}")
        (
            self.endoftext, self.im_start, self.im_end, self.vision_start, self.vision_end,
            self.image_pad,
        ) = (self.tok.token_to_id(s) for s in SPECIAL[:6])

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def prompt(self, question, n_image_tokens=(), system="You are a helpful assistant."):
        """Token ids of one user turn and the assistant header. The images stand where the question
        has one `<image>` per image (as Mirage's records place them), else before the question (the
        chat template's order for an image-then-text turn)."""
        ids = [self.im_start] + self.encode(f"system\n{system}") + [self.im_end] + self.encode("\n")
        ids += [self.im_start] + self.encode("user\n")
        placed = question.count("<image>") == len(n_image_tokens) > 0
        texts = question.split("<image>") if placed else ["", question]
        for i, n in enumerate(n_image_tokens):
            ids += self.encode(texts[i]) if placed else []
            ids += [self.vision_start] + [self.image_pad] * n + [self.vision_end]

        ids += self.encode(texts[-1]) + [self.im_end] + self.encode("\n")
        return ids + [self.im_start] + self.encode("assistant\n")


def left_pad(rows, pad_id):
    """list of token lists -> input_ids (B, T), attention_mask (B, T), padded on the left."""
    T = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def load(path, dtype=torch.float32, device="cpu"):
    """Model + tokenizer from one directory, checking that their special-token ids agree."""
    model, tok = Qwen2_5_VL.from_pretrained(path, dtype, device), QwenTokenizer(path)
    for name, tok_id in (
        ("image_token_id", tok.image_pad), ("vision_start_token_id", tok.vision_start),
        ("vision_end_token_id", tok.vision_end),
    ):
        if getattr(model.cfg, name) != tok_id:
            raise InputError(
                f"{path}: config.json {name} = {getattr(model.cfg, name)} but the tokenizer says {tok_id}"
            )

    if len(tok) > model.cfg.vocab_size:
        raise InputError(
            f"{path}: the tokenizer has {len(tok)} tokens, the embedding only {model.cfg.vocab_size} rows"
        )

    return model, tok
