"""
Qwen2.5-VL vision side: image preprocessing and the vision tower (the `visual.*` keys).

preprocess() reproduces the reference processor's PIL path bit for bit: smart resize to a
multiple of 28, PIL bicubic on uint8, x/255 in float64 then float32, CLIP normalisation,
one frame repeated twice in time, patches laid out in 2x2 merge-block order.

The tower is a ViT with 2-D RoPE (float32), window attention (4x4 merged tokens = 112 px)
in most blocks and full attention in `fullatt_block_indexes`, then a patch merger that
concatenates each 2x2 block and projects it to the LLM width.
Departures from the reference, for speed, same maths: window attention is one batched SDPA
call over windows padded to the same length (the reference loops over windows in Python on
non-flash backends); the patch-embed Conv3d (kernel == stride) runs as a matmul.
"""
import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from cli import InputError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_IMAGE_PIXELS = 16384 * 16384  # refuse decompression bombs above this many pixels


# -----------------------------------------------------------------------------
# preprocessing

def load_image(path):
    """Open an image file as RGB, turning every failure into one clear InputError."""
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we check the size ourselves:
    try:
        # open reads the header only, so the check comes before decoding
        with Image.open(path) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError
            im.load()
            return to_rgb(im)
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except Image.DecompressionBombError:
        raise InputError(f"image too large (over {MAX_IMAGE_PIXELS} pixels): {path}") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's "not an image / truncated"
        raise InputError(f"cannot read image {path}: {e}") from None


def to_rgb(im):
    """RGB, with transparency composited onto white (as the reference processor does)."""
    if "A" in im.getbands() or im.info.get("transparency") is not None:
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")

    return im.convert("RGB")


def smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=12845056):
    """Nearest size with both sides multiples of `factor` and area in [min_pixels, max_pixels]."""
    if min(height, width) < 1:
        raise InputError(f"image has an empty side: {width}x{height}")
    if max(height, width) / min(height, width) > 200:
        raise InputError(f"image aspect ratio must be at most 200, got {width}x{height}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor

    return h, w


def merged_tokens(grid_thw, merge_size=2):
    """(3,) or (N, 3) grid_thw -> how many merged image tokens (the LLM's <|image_pad|>s) it makes,
    in all."""
    return int(grid_thw.prod(-1).sum()) // merge_size ** 2


def token_offsets(grids):
    """An example's images' grids -> where each image's merged tokens start among the example's (its
    images' tokens one image after another): a bbox's region tokens are offset by its image's
    start."""
    sizes = [merged_tokens(g) for g in grids]
    return [sum(sizes[:k]) for k in range(len(sizes))]


def grid_of(image, min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2):
    """A PIL image -> the grid_thw (1, 3) preprocess gives it, without resampling it."""
    h, w = smart_resize(image.height, width=image.width, factor=patch_size * merge_size,
                        min_pixels=min_pixels, max_pixels=max_pixels)
    return torch.tensor([[1, h // patch_size, w // patch_size]], dtype=torch.int64)


def preprocess(
    image, min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2
):
    """PIL image (or path) -> pixel_values float32 (gh*gw, 3*2*14*14), grid_thw int64 (1, 3)."""
    image = load_image(image) if not isinstance(image, Image.Image) else to_rgb(image)
    h, w = smart_resize(
        image.height, width=image.width, factor=patch_size * merge_size, min_pixels=min_pixels,
        max_pixels=max_pixels,
    )
    x = np.asarray(image.resize((w, h), Image.BICUBIC)).transpose(2, 0, 1)  # (C, H, W) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = ((x.T - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)).T
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size

    # (bh, bw, r, c, C, py, px)
    x = x.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)

    # repeat in time
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))
    pixel_values = torch.from_numpy(x.reshape(gh * gw, -1).copy())
    return pixel_values, torch.tensor([[1, gh, gw]], dtype=torch.int64)


# -----------------------------------------------------------------------------
# the vision tower

@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 2048
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    in_channels: int = 3
    rope_theta: float = 10000.0


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        if x.dtype == torch.float32:  # one fused op: the same maths as below
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * x32.to(x.dtype)  # normalise in fp32, scale in the input dtype


def rope(x, cos, sin):
    """Rotary embedding in roll form: x * cos + rotate_half(x) * sin == x * cos + x.roll(D/2) * sin,
    with sin's first half negated once in cos_sin (one roll per call instead of two slices, a neg, a
    cat)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def cos_sin(angles):
    """(..., D) angles, cat(freqs, freqs) -> cos, sin with its first half negated, for rope()."""
    half = angles.shape[-1] // 2
    return angles.cos(), torch.cat([-angles[..., :half], angles[..., half:]], -1).sin()


def pack(cu_seqlens):
    """Sequence boundaries -> (idx (S, L), mask (S, L) or None): token index per padded slot."""
    lens = cu_seqlens[1:] - cu_seqlens[:-1]
    offs = torch.arange(int(lens.max()), device=cu_seqlens.device)
    mask = offs[None] < lens[:, None]
    idx = torch.where(mask, cu_seqlens[:-1, None] + offs[None], 0)
    return idx, (None if bool(mask.all()) else mask)


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin, seqs):
        N, C = x.shape
        qkv = self.qkv(x).view(N, 3, self.n_head, -1)  # (N, 3, H, D)
        qk = rope(qkv[:, :2].float(), cos, sin).to(x.dtype)  # q and k together, in float32
        q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]  # each (N, H, D)
        idx, mask = seqs  # all windows (or images) at once, padded to the longest
        if mask is None:  # all the same length: the packing is a reshape, no gather
            # (S, H, L, D)
            q, k, v = (t.view(*idx.shape, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        else:
            q, k, v = (t[idx].transpose(1, 2) for t in (q, k, v))

        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask[:, None, None]
        )
        y = y.transpose(1, 2)  # (S, L, H, D)
        y = y.reshape(N, C) if mask is None else y[mask].reshape(N, C)
        return self.proj(y)


class MLP(nn.Module):
    """SwiGLU; the vision tower's has biases, the language model's does not."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=True)

    def forward(self, x, cos, sin, seqs):
        x = x + self.attn(self.norm1(x), cos, sin, seqs)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel, stride=kernel, bias=False)

    def forward(self, x):  # (N, 3*2*14*14) -> (N, C)
        # kernel == stride: the Conv3d is a matmul over each patch's (C, T, py, px) values, and a
        # plain matmul is ~6x faster than the CPU conv kernel (the weight keeps the Conv3d shape,
        # for the keys)
        w = self.proj.weight
        return x.to(w.dtype) @ w.view(w.shape[0], -1).T


class PatchMerger(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        dim = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size)
        self.mlp = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, cfg.out_hidden_size)
        )

    def forward(self, x):  # (N, C) -> (N/4, out): each 2x2 block is 4 consecutive rows
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def rotary(self, grid_thw):
        """(N, head_dim) float32 angles: row index on the first half of the slots, column on the
        second."""
        cfg, m = self.cfg, self.cfg.spatial_merge_size
        dim = cfg.hidden_size // cfg.num_heads // 2
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        pos = []
        for t, h, w in grid_thw.tolist():
            r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            # merge-block order
            rc = torch.stack([r, c], -1).view(h // m, m, w // m, m, 2).transpose(1, 2)
            pos.append(rc.reshape(-1, 2).repeat(t, 1))

        freqs = (torch.cat(pos)[..., None].float() * inv_freq).flatten(1)  # (N, 2*dim/2)
        return torch.cat([freqs, freqs], -1)

    def windows(self, grid_thw):
        """Merged-token permutation that groups tokens window by window, and window bounds in
        patches."""
        m = self.cfg.spatial_merge_size
        win = self.cfg.window_size // m // self.cfg.patch_size  # window side in merged tokens (4)
        index, cu, offset = [], [0], 0
        for t, h, w in grid_thw.tolist():
            gh, gw = h // m, w // m
            idx = torch.arange(t * gh * gw).view(t, gh, gw)
            # like the reference: a whole empty window when divisible
            ph, pw = win - gh % win, win - gw % win
            idx = F.pad(idx, (0, pw, 0, ph), value=-1)
            idx = (
                idx.view(t, (gh + ph) // win, win, (gw + pw) // win, win)
                .transpose(2, 3)
                .reshape(-1, win * win)
            )
            lens = (idx >= 0).sum(1)
            index.append(idx[idx >= 0] + offset)
            cu += (cu[-1] + lens[lens > 0].cumsum(0) * m * m).tolist()  # empty windows dropped
            offset += t * gh * gw

        return torch.cat(index), torch.tensor(cu)

    def forward(self, pixel_values, grid_thw):
        """(N, 1176) patches, (n_images, 3) grids -> (N/4, out_hidden_size) merged tokens,
        row-major."""
        unit = self.cfg.spatial_merge_size ** 2
        dev = pixel_values.device
        window_index, cu_window = self.windows(grid_thw)
        cu_full = F.pad(
            (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]).cumsum(0), (1, 0)
        )
        window_seqs, full_seqs = pack(cu_window.to(dev)), pack(cu_full.to(dev))
        x = self.patch_embed(pixel_values)  # (N, C)

        # patch permutation
        order = (window_index[:, None] * unit + torch.arange(unit)).flatten().to(dev)
        x = x[order]

        # (N, 1, 1, D)
        cos, sin = (t[:, None, None] for t in cos_sin(self.rotary(grid_thw).to(dev)[order]))
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, full_seqs if i in self.cfg.fullatt_block_indexes else window_seqs)
        return self.merger(x)[torch.argsort(window_index).to(dev)]
