"""
The method: latent visual reasoning on Qwen2.5-VL (LVR, arXiv 2509.24251; Mirage, arXiv 2506.17218).

The assistant turn is  <|lvr_start|> <|lvr|> x N <|lvr_end|> \\n answer <|im_end|>.
At the N latent slots the model does not read a token embedding: in training it reads the
target vector (teacher forcing), at inference its own previous last hidden state. The hidden
state just before latent i is trained to predict target i: the mean of a group of the merged
visual tokens inside the image region that answers the question (LVR: roi_groups), or of a chunk
of a helper image's tokens (Mirage: chunk_groups, k vectors).

The exit from a span is trained, not hoped for: the official LVR's mode-switch loss, a BCE on
the <|lvr_end|> logit at every in-span state (the one that read <|lvr_start|> and each latent),
target 1 only at the last latent (train_sft's --switch_weight 0.1, as in the official code, for
LVR and Mirage; LossTerms' own default is 0, off). Without it only the state after the last
latent has a label, and spans longer than one latent end at random under the `token` exit.

The explicit rival --method crop is a span too: its slots read the region a written box names
(the same pooled tokens as LVR's targets), never a hidden state; the rollout asks its `crop`
reader for the region when a row opens a span (rollout_one, Regions).

The controls live here too, each in one place: the pause control's slots read their token's
embedding, not a vector (slot_inputs); LIVR's bottleneck is a mask the callers hand the model
(bottleneck_attend, blind_positions), so the model file names no control.

Where this departs from the official code and why, and where the official code is wrong:
docs/method.md. The rollout records which decisions it sampled; grpo.py trains on exactly those.
"""
import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import qwen
from cli import InputError
from qwen import Sampling  # (how a row draws its decisions: qwen.generate's too)

# in the order each official code adds them to its tokenizer, so our ids match theirs
LVR_TOKENS = {"start": "<|lvr_start|>", "latent": "<|lvr|>", "latent_end": "<|lvr_latent_end|>",
              "end": "<|lvr_end|>"}
# Mirage has no latent-end token
MIRAGE_TOKENS = {"latent": "<|latent_pad|>", "start": "<|latent_start|>", "end": "<|latent_end|>"}


@dataclass
class LatentIds:
    start: int
    latent: int
    end: int
    latent_end: int = None  # None: no `latent` exit (Mirage's three tokens)


def latent_ids(tok, names=LVR_TOKENS):
    """Ids of the latent tokens, or None when the tokenizer lacks start, latent or end (plain
    Qwen2.5-VL)."""
    ids = {k: tok.tok.token_to_id(v) for k, v in names.items()}
    return (
        None if None in (ids.get("start"), ids.get("latent"), ids.get("end")) else LatentIds(**ids)
    )


def find_latent_ids(model, tok):
    """The latent tokens of a checkpoint: those its config names (ours), else the official LVR
    tokens, else Mirage's; None for a plain Qwen2.5-VL."""
    named = [model.cfg.extra["lvr_tokens"]] if "lvr_tokens" in model.cfg.extra else []
    for names in named + [LVR_TOKENS, MIRAGE_TOKENS]:
        if (ids := latent_ids(tok, names)) is not None:
            return ids

    return None


def latent_rows(w, before, after):
    """The rows of tokens [before, after) start at the mean of the rows of the `before` tokens, as
    Hugging Face's resize starts new rows. A real Qwen2.5-VL embedding has rows past its tokenizer
    (151,936 for 151,665 tokens) that no token ever trained, and the new tokens take them; the
    official code leaves them as they are. The mean gives an input like the ones the model has seen,
    and, tied to lm_head, a logit like the average token's rather than an arbitrary one. In place;
    returns w."""
    w[before:after] = w[:before].mean(0)
    return w


def add_latent_tokens(model, tok, names=LVR_TOKENS):
    """Add the latent tokens to the tokenizer (and embedding rows if needed); record them in the
    config. On a meta model (FSDP's load) only the shapes and the config change: latent_rows does
    the rest."""
    before = len(tok)
    tok.tok.add_special_tokens([n for n in names.values() if tok.tok.token_to_id(n) is None])
    grow = len(tok) - model.cfg.vocab_size
    if grow > 0:  # rows added past the embedding (start at the mean: latent_rows)
        def grown(w):
            return torch.nn.Parameter(torch.cat([w.data, w.data[:1].expand(grow, -1)]))
        model.model.embed_tokens.weight = grown(model.model.embed_tokens.weight)
        model.lm_head.weight = (model.model.embed_tokens.weight if model.cfg.tie_word_embeddings
                                else grown(model.lm_head.weight))
        model.model.embed_tokens.num_embeddings = model.lm_head.out_features = (
            model.cfg.vocab_size
        ) = len(tok)

    with torch.no_grad():
        for w in {
            id(p): p for p in (model.model.embed_tokens.weight, model.lm_head.weight)
        }.values():
            latent_rows(w, before, len(tok))

    ids = latent_ids(tok, names)
    model.cfg.extra.update(lvr_tokens=dict(names), lvr_token_ids=vars(ids).copy())
    return ids


# -----------------------------------------------------------------------------
# ROI -> merged-token indices, and the target vectors

def normalise_bbox(bbox, width, height, where=""):
    """[x0, y0, x1, y1] in [0, 1], accepting pixel boxes (any value > 1) in the original image
    size."""
    if len(bbox) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox):
        raise InputError(f"{where}bbox must be 4 finite numbers, got {bbox}")
    if max(bbox) > 1:
        bbox = [bbox[0] / width, bbox[1] / height, bbox[2] / width, bbox[3] / height]
    x0, y0, x1, y1 = bbox
    if min(bbox) < 0 or max(bbox) > 1:
        raise InputError(f"{where}bbox {bbox} lies outside the image")
    if not (x0 < x1 and y0 < y1):
        raise InputError(f"{where}bbox {bbox} is empty or inverted")
    return bbox


def roi_cells(bbox, grid_thw, merge=2):
    """Normalised bbox -> (y0t, y1t, x0t, x1t): the merged-grid cells it touches
    (docs/method.md)."""
    gh, gw = int(grid_thw[1]), int(grid_thw[2])
    x0, y0, x1, y1 = bbox
    x0g, x1g = min(max(math.floor(x0 * gw), 0), gw - 1), min(max(math.ceil(x1 * gw), 0), gw)
    y0g, y1g = min(max(math.floor(y0 * gh), 0), gh - 1), min(max(math.ceil(y1 * gh), 0), gh)
    return y0g // merge, (y1g + 1) // merge, x0g // merge, (x1g + 1) // merge


def roi_indices(bbox, grid_thw, merge=2):
    """Row-major merged-token indices inside the bbox: token (r, c) is r * (gw/2) + c."""
    y0, y1, x0, x1 = roi_cells(bbox, grid_thw, merge)
    w = int(grid_thw[2]) // merge
    return [r * w + c for r in range(y0, y1) for c in range(x0, x1)]


def roi_groups(bbox, grid_thw, max_latents=0, merge=2):
    """One list of token indices per latent: the ROI tokens, or an adaptive average pool to <= K
    cells."""
    y0, y1, x0, x1 = roi_cells(bbox, grid_thw, merge)
    h, w, gw = y1 - y0, x1 - x0, int(grid_thw[2]) // merge
    oh, ow = h, w
    if max_latents and h * w > max_latents:  # keep the aspect ratio, oh * ow <= K
        oh = min(h, max(1, round(math.sqrt(max_latents * h / w))))
        ow = min(w, max(1, max_latents // oh))
        oh = min(oh, max(1, max_latents // ow))

    # adaptive_avg_pool2d's cells: [floor(i*h/oh), ceil((i+1)*h/oh))
    rows = [range(y0 + (i * h) // oh, y0 + -(-(i + 1) * h // oh)) for i in range(oh)]
    cols = [range(x0 + (j * w) // ow, x0 + -(-(j + 1) * w // ow)) for j in range(ow)]
    return [[r * gw + c for r in rr for c in cc] for rr in rows for cc in cols]


def chunk_groups(n_tokens, k=4):
    """Mirage: the helper image's n tokens in k contiguous chunks (remainder dropped), one latent
    each."""
    if n_tokens < k:
        raise InputError(
            f"helper image has {n_tokens} tokens, fewer than the {k} latents asked for"
        )

    size = n_tokens // k
    return [list(range(i * size, (i + 1) * size)) for i in range(k)]


def averaging_matrix(groups, n_feat):
    """(L, n_feat) matrix whose row i averages the features in groups[i]: targets = W @ feats (an
    empty group, a pause slot's: a zero row)."""
    W = torch.zeros(len(groups), n_feat)
    for i, g in enumerate(groups):
        if g:
            W[i, g] = 1.0 / len(g)

    return W


# -----------------------------------------------------------------------------
# teacher-forced SFT forward and loss

def to_latent(model, h):
    """A hidden state -> its latent: the latent head's output when the model has one, else h."""
    return model.lvr_head(h) if hasattr(model, "lvr_head") else h


def method_of(cfg):
    """The method a checkpoint's config says it was trained with (train_sft's --method; lvr where
    it records none, as an official checkpoint)."""
    return cfg.extra.get("latent_targets", {}).get("method", "lvr")


def is_pause(cfg):
    """Whether a checkpoint's config says it was trained as the pause control (--method pause)."""
    return method_of(cfg) == "pause"


def latent_input(model, h):
    """What a latent step feeds back: to_latent(h), and, when the latents were trained with a cosine loss
    (the config records the targets' mean norm, `latent_norm`), rescaled to that norm. Cosine trains
    only the direction, so the hidden state keeps the LM's scale (RMS ~1 vs ~0.05 for the merged
    image tokens of a random tower): fed back as it is, every state after the first latent reads an
    input it never saw in training, and a span longer than one latent runs past its end."""
    v = to_latent(model, h)
    n = model.cfg.extra.get("latent_norm")
    return v * (n / v.float().norm(dim=-1, keepdim=True).clamp(min=1e-6)).to(v.dtype) if n else v


def slot_inputs(model, x, at, v):
    """What the latent slots read, decided here alone: x (..., C) the inputs, with v at the slots
    `at` (a (B,) bool mask over x's rows, with v (B, C); or a (rows, positions) index, with v (L,
    C)): the targets under teacher forcing, the model's own latents in stage 2 and the rollout. The
    pause control (--method pause) reads no vector: its slots keep their token's embedding
    (<|lvr|>'s), which learns."""
    if is_pause(model.cfg):
        return x
    if isinstance(at, torch.Tensor):
        return torch.where(at[:, None], v.to(x.dtype), x)
    return x.index_put(at, v.to(x.dtype))


def encode_images(model, batch, freeze_vision=True):
    """Merged image tokens for the prompt images and the target vectors (no gradient into
    targets)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_vision):
        feats = model.visual(batch["pixel_values"], batch["grid_thw"])
    src = feats
    if batch.get("helper_pixel_values") is not None:  # Mirage: targets come from the helper image
        with torch.no_grad():
            src = model.visual(batch["helper_pixel_values"], batch["helper_grid_thw"])

    targets = (batch["target_avg"].to(src.device) @ src.detach().float())  # (L, C)
    return feats, targets


@torch.no_grad()
def record_latent_norm(model, batch):
    """Record the mean norm of a batch's targets in the config: a cosine-trained latent's feed-back
    norm."""
    _, targets = encode_images(model, batch)
    if len(targets):
        model.cfg.extra["latent_norm"] = float(targets.norm(dim=-1).mean())


def latent_distance(pred, target, kind="mse", per_row=False):
    """Latent loss in fp32, mean over rows (or per row): mse, cosine (1 - cos) or l1 (means over
    elements)."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        d = ((pred - target) ** 2).mean(-1)
    elif kind == "cosine":
        d = 1 - F.cosine_similarity(pred, target.expand_as(pred), dim=-1)
    elif kind == "l1":
        d = (pred - target).abs().mean(-1)
    else:
        raise InputError(f"latent loss must be mse, cosine or l1, got {kind!r}")

    return d if per_row else d.mean()


def switch_loss(model, h, b, t, slot, end_id):
    """The mode-switch loss (official LVR): BCE on the <|lvr_end|> logit at every in-span state, the
    one that read <|lvr_start|> (position t - 1 of a span's first latent) and each latent's; target
    1 only at a span's last latent. b, t, slot: (L,) the batch's latent slots, spans in order."""
    # the next slot opens a new span
    last = torch.cat([slot[1:] == 0, slot.new_ones(1, dtype=torch.bool)])
    first = slot == 0
    pb, pt = torch.cat([b[first], b]), torch.cat([t[first] - 1, t])  # (S + L,) the decision states
    target = torch.cat([torch.zeros(int(first.sum())), last.float().cpu()]).to(h.device)
    logit = model.lm_head(h[pb, pt]).float()[:, end_id]
    return F.binary_cross_entropy_with_logits(logit, target)


def supervised_ce(model, h, labels):
    """Mean next-token CE over labelled positions; lm_head runs only there (a few % of a long
    image prompt), which saves most of its FLOPs and the (B, T, V) logits' memory."""
    sel = labels[:, 1:] != -100  # position t predicts label t + 1
    return F.cross_entropy(model.lm_head(h[:, :-1][sel]).float(), labels[:, 1:][sel])


def blind_positions(batch, image_token_id):
    """LIVR's bottleneck: (B, T) bool, the positions that may not attend to the image tokens: every
    real token but the image's own and the latent slots, so what the answer learns of the image
    passes through the slots (the question's tokens are blind too: they would carry the image past
    the slots)."""
    ids = batch["input_ids"]
    blind = batch["attention_mask"].bool() & (ids != image_token_id)
    b, t = batch["latent_pos"]
    return blind.index_put((b, t), torch.zeros((), dtype=torch.bool, device=ids.device))


@dataclass
class LossTerms:
    """The SFT loss's terms (train_sft's flags): each one's weight, and the latent distance."""
    ce: float = 1.0  # the text CE (stage 2: always 1)
    latent: float = 0.1  # the latent loss
    switch: float = 0.0  # the mode-switch loss (switch_loss)
    latent_loss: str = "mse"  # mse | cosine | l1 (latent_distance)


def bottleneck_attend(blind, image):
    """LIVR's bottleneck as the forward's `attend`: (B, T) queries that may not see the image, (B,
    S) the image's keys -> (B, T, S) bool."""
    return ~(blind[:, :, None] & image[:, None, :])


def sft_loss(model, batch, terms=LossTerms(), freeze_vision=True, bottleneck=False):
    """-> (loss, ce, latent, switch) for one padded batch (data.collate makes it). The fields read:
    input_ids, attention_mask, labels (B, T); pixel_values, grid_thw (the images); latent_pos (2, L)
    the (row, position) of each latent slot; latent_slot (L,) its index in its span (0 opens one);
    target_avg (L, F) the rows that average the image tokens into targets; latent_end_pos (2, E) the
    `latent` exit's <|lvr_latent_end|> positions. The pause control (is_pause) has no targets, so no
    latent loss. bottleneck: LIVR's attention mask (blind_positions)."""
    input_ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    feats, targets = encode_images(model, batch, freeze_vision)
    x = model.embed(input_ids, grid_thw=batch["grid_thw"], feats=feats)  # (B, T, C)
    b, t = batch["latent_pos"]  # (L,), (L,): where the latent slots are
    x = slot_inputs(model, x, at=(b, t), v=targets)  # teacher forcing: the slots read their targets

    position_ids = qwen.get_rope_index(
        input_ids, grid_thw=batch["grid_thw"], attention_mask=mask,
        image_token_id=model.cfg.image_token_id,
    )
    attend, image_id = None, model.cfg.image_token_id
    if bottleneck:  # (the answer sees the image only through the slots)
        attend = bottleneck_attend(blind_positions(batch, image_id), input_ids == image_id)
    h = model(input_ids, inputs_embeds=x, attention_mask=mask, position_ids=position_ids,
              attend=attend)
    ce = supervised_ce(model, h, labels)
    if method_of(model.cfg) in ("pause", "crop"):  # (pause: no targets; crop's are fed, not made)
        lat = ce.new_zeros(())
    elif len(b):
        lat = latent_distance(to_latent(model, h[b, t - 1]), targets, terms.latent_loss)
    else:  # no latent in this micro-batch: the head still takes part (a zero gradient), as DDP asks
        lat = to_latent(model, h[:0, 0]).float().sum() * 0.0

    # `latent` exit mode: the state before <|lvr_latent_end|> learns it
    eb, et = batch["latent_end_pos"]
    if len(eb):
        end = model.token_embeds(input_ids[eb, et])
        lat = lat + latent_distance(to_latent(model, h[eb, et - 1]), end, terms.latent_loss)

    switch = ce.new_zeros(())
    if terms.switch and len(b):
        switch = switch_loss(
            model, h, b, t=t, slot=batch["latent_slot"],
            end_id=model.cfg.extra["lvr_token_ids"]["end"],
        )

    loss = terms.ce * ce + terms.latent * lat + terms.switch * switch
    return loss, ce.detach(), lat.detach(), switch.detach()


def own_latents_loss(model, batch, terms=LossTerms(latent=0.0), freeze_vision=True):
    """Stage 2: the latent slots read the model's own hidden states, with gradients through the
    chain, so each latent is trained where it is used -> (loss, ce, latent, switch). The loss: CE,
    plus terms.latent x the latent loss on every free-running prediction (LVR's stage 2; Mirage's
    has none), plus the mode-switch loss.

    n + 1 full passes for rows of at most n latents: pass j fills each row's j-th latent (counted
    over all its spans, in order) from pass j-1's hidden state just before it. The last pass sees
    every slot filled with the model's own latents, so its state before latent i is the prediction
    of target i the model makes free-running, as at inference (a later span reads the earlier spans'
    own latents)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    feats, targets = encode_images(model, batch, freeze_vision)
    x = model.embed(ids, grid_thw=batch["grid_thw"], feats=feats)
    position_ids = qwen.get_rope_index(
        ids, grid_thw=batch["grid_thw"], attention_mask=mask,
        image_token_id=model.cfg.image_token_id,
    )
    b, t = batch["latent_pos"]  # (L,) each row's latents in order
    counts = torch.bincount(b, minlength=len(ids))

    # (L,) index in its row
    k = torch.arange(len(b), device=b.device) - (torch.cumsum(counts, 0) - counts)[b]
    for j in range(int(counts.max()) if len(b) else 0):
        h = model(inputs_embeds=x, attention_mask=mask, position_ids=position_ids)
        sel = k == j
        x = slot_inputs(model, x, at=(b[sel], t[sel]), v=latent_input(model, h[b[sel], t[sel] - 1]))

    h = model(inputs_embeds=x, attention_mask=mask, position_ids=position_ids)
    ce = supervised_ce(model, h, labels)

    # (L,) each latent's index within its span (the switch loss reads it)
    slot = batch["latent_slot"]
    lat = ce.new_zeros(())
    if terms.latent and len(b):
        lat = latent_distance(to_latent(model, h[b, t - 1]), targets, terms.latent_loss)
    switch = ce.new_zeros(())
    if terms.switch and len(b):
        switch = switch_loss(
            model, h, b, t=t, slot=slot, end_id=model.cfg.extra["lvr_token_ids"]["end"]
        )

    return (
        ce + terms.latent * lat + terms.switch * switch, ce.detach(), lat.detach(),
        switch.detach(),
    )


# -----------------------------------------------------------------------------
# latent rollout: the reading version (one row, everything recomputed), then the batched one

class Rollout(NamedTuple):
    tokens: torch.Tensor  # (B, T + n) prompt and completion; <|lvr|> at latent steps
    latents: torch.Tensor  # (B, n, C) the vector fed at each latent step (zeros at text steps)
    is_latent: torch.Tensor  # (B, n) bool: a latent step
    sampled: torch.Tensor  # (B, n) bool: the policy drew this token decision; False where forced
    # (with latent_sigma > 0 every latent step is a sampled latent decision too: is_latent says
    # where; grpo.completion_logprobs scores the decisions in the training forward)


class Step(NamedTuple):
    """What the rollout records at one step, for every row (the Rollout's fields, one column of
    each)."""
    tok: torch.Tensor  # (B,) the token recorded (<|lvr|> at a latent step)
    latent: torch.Tensor  # (B, C) the latent fed (zeros at a text step)
    is_latent: torch.Tensor  # (B,) bool
    sampled: torch.Tensor  # (B,) bool
    done: torch.Tensor  # (B,) bool: the row has stopped


@dataclass
class Prompt:
    """The rollout's input: left-padded prompts and their images (data.prompt_batch makes them)."""
    input_ids: torch.Tensor  # (B, T)
    attention_mask: torch.Tensor = None  # (B, T); None: no padding
    pixel_values: torch.Tensor = None  # (P, 1176) every image's patches
    grid_thw: torch.Tensor = None  # (N, 3)
    # merged image tokens already computed (GRPO encodes each image once)
    feats: torch.Tensor = None


@dataclass
class Decode:
    """How a span ends (rollout's docstring) and how long a completion may run."""
    decoding: str = "steps"  # steps | latent | token
    lvr_steps: int = 8  # `steps`: the latents of every span
    max_latent_steps: int = 64  # `token` / `latent`: a span's budget
    # force <|lvr_end|> after a span (False: the model's own next token, as official)
    force_end: bool = True
    end_metric: str = "mse"  # `latent`: the distance to the end embedding
    end_threshold: float = 0.1  # `latent`: leave below this distance
    max_new_tokens: int = 64  # the completion's budget, latent steps included
    # LIVR's mask: the prompt's and the text steps' queries see no image token, latent steps do
    bottleneck: bool = False


@dataclass
class Feed:
    """evaluate.py's diagnostics: row b's latent step k (counted over its spans) reads latents[b, k]
    instead of its own while k < n[b]; the exits still follow the rule."""
    latents: torch.Tensor  # (B, K, C)
    n: torch.Tensor  # (B,)


def exit_tokens(ids, decoding):
    """The tokens that end a span when the model emits them: <|lvr_end|>, and <|lvr_latent_end|>,
    which official LVR checkpoints emit after their last latent (`token` exit only)."""
    return [ids.end] + (
        [ids.latent_end] if decoding == "token" and ids.latent_end is not None else []
    )


def continue_logprob(logits, exits):
    """(N, V) logits -> (N,) log-prob of not emitting any exit token: log(1 - p(exit)), computed
    stably."""
    keep = torch.ones(logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[exits] = False
    return logits[..., keep].logsumexp(-1) - logits.logsumexp(-1)


def end_distance(vec, end_vec, kind, scaled=True):
    """`latent` exit: (B,) distance of each latent to the end embedding, by the metric it was
    trained with, scaled so that the zero vector is at 1 (a threshold then means the same for every
    metric and scale); unscaled: the official rule for its learned end vector (mse < 0.1; that
    vector's RMS starts at 1)."""
    d = latent_distance(vec, target=end_vec[None], kind=kind, per_row=True)
    return (
        d / latent_distance(0 * end_vec[None], target=end_vec[None], kind=kind, per_row=True)
        if scaled
        else d
    )


def end_rule(model, metric="checkpoint", threshold=None):
    """The `latent` exit's metric and threshold: the flags', else the checkpoint's, else mse and
    0.1."""
    return (
        metric if metric != "checkpoint" else model.cfg.extra.get("latent_end_metric", "mse"),
        threshold if threshold is not None else model.cfg.extra.get("latent_end_threshold", 0.1),
    )


@dataclass
class ExitRule:
    """A Decode resolved for the model (exit_rule): what else the span exit reads, fixed for a whole
    rollout."""
    decode: Decode  # the settings: how a span ends, and its budget
    budget: int  # latent steps per span at most (`steps`: lvr_steps; else max_latent_steps)
    exits: list  # `token`: the tokens that end a span when the model emits them (exit_tokens)
    end_vec: torch.Tensor = None  # `latent`: the end vector the hidden state is compared with
    # `latent`: the zero vector at distance 1 (False: official LVR's unscaled rule)
    scaled: bool = True


def exit_one(rule, ids, tok, vec, n_lat):
    """The exit rule for one row in a span, written out -> (the token, the token to force next or
    None, whether the row leaves its span). tok: the model's token; vec (1, C): its latent input;
    n_lat: the span's latent steps so far. span_exit is this for a batch."""
    decoding, force_end = rule.decode.decoding, rule.decode.force_end
    if decoding == "steps" and n_lat >= rule.budget:  # the count: <|lvr_end|> (or the model's own)
        return ids.end if force_end else tok, None, True
    if decoding == "token" and tok in rule.exits and n_lat > 0:  # the model's own exit token
        return tok, ids.end if tok != ids.end and force_end else None, True
    # near the end vector (never before the first latent), or the budget: <|lvr_latent_end|>, then
    # <|lvr_end|>
    if decoding == "latent":
        d = float(end_distance(vec, rule.end_vec, kind=rule.decode.end_metric, scaled=rule.scaled))
        if (n_lat > 0 and d < rule.decode.end_threshold) or n_lat >= rule.budget:
            return ids.latent_end, ids.end if force_end else None, True
    if decoding == "token" and n_lat >= rule.budget:  # the budget
        return ids.end, None, True
    return ids.latent, None, False  # a latent step


def exit_rule(model, ids, decode):
    """Decode, checked and resolved for this model -> the ExitRule the loop applies."""
    if decode.decoding not in ("steps", "latent", "token"):
        raise InputError(f"decoding must be steps, latent or token, got {decode.decoding!r}")
    if decode.decoding == "latent" and ids.latent_end is None:
        raise InputError(
            "the `latent` exit needs a latent-end token, and these latent tokens have none "
            "(Mirage's three): decode with token or steps"
        )

    # official LVR's learned end vector, if any
    official_end = getattr(model, "lvr_latent_end_emb", None)
    budget = decode.lvr_steps if decode.decoding == "steps" else decode.max_latent_steps
    rule = ExitRule(
        decode, budget, exits=exit_tokens(ids, decode.decoding), scaled=official_end is None
    )
    if decode.decoding == "latent":
        emb = model.model.embed_tokens.weight[ids.latent_end]
        rule.end_vec = emb if official_end is None else official_end

    return rule


@torch.no_grad()
# wide: the rollout's inputs for one row (a list prompt, its images) beside rollout's Prompt
def rollout_one(model, ids, prompt, pixel_values, grid_thw, decode, stop_ids=None, crop=None):
    """The rollout to read first: one row, greedy, the whole sequence recomputed at every step ->
    (tokens, the latents fed). `prompt`: a list of ids; `decode`: Decode; stop_ids: the tokens that
    end the row outside a span (None: the model's). crop (--method crop): crop(row, tokens) -> the
    (n, C) region the box written in `tokens` names, read by the span's n slots (then <|lvr_end|>).
    `rollout` below does the same for many rows at once, with a KV cache, sampling and the
    diagnostics; the tests hold it to this one."""
    rule = exit_rule(model, ids, decode)  # (the budget, the exit tokens, the end vector)
    seq, latents, stop = list(prompt), [], stop_ids or model.default_stop_ids()
    x = model.embed(torch.tensor([seq]), pixel_values, grid_thw)[0]  # (T, C)
    prompt_rope = qwen.get_rope_index(  # (3, 1, T) the prompt's M-RoPE positions
        torch.tensor([seq]), grid_thw, None, image_token_id=model.cfg.image_token_id
    )
    in_span, n_lat, force = seq[-1] == ids.start, 0, None
    if crop is not None and in_span:  # (a prompt that ends in a box and <|lvr_start|>)
        region = crop(0, seq)[:decode.max_latent_steps]
        rule = dataclasses.replace(rule, budget=len(region))
    for _ in range(decode.max_new_tokens):
        # generated tokens have text positions (three equal rows), counting on from the prompt's
        n = len(seq) - len(prompt)
        later = (prompt_rope.max() + 1 + torch.arange(n)).expand(3, 1, -1)
        h = model(inputs_embeds=x[None], position_ids=torch.cat([prompt_rope, later], 2))[0, -1]
        tok = int(model.lm_head(h).argmax()) if force is None else force  # (its own, or forced)
        vec, force, latent_step = latent_input(model, h[None]), None, False  # (1, C)
        if in_span:  # the exit rule decides: leave with a token, or take a latent step
            tok, force, leave = exit_one(rule, ids, tok, vec=vec, n_lat=n_lat)
            latent_step = not leave
            if crop is not None and latent_step:  # crop: the slot reads the region its box names
                vec = region[n_lat][None]
            in_span, n_lat = (False, 0) if leave else (True, n_lat + 1)
        opens = not in_span and tok == ids.start  # (also as it leaves: the next span opens at once)
        if crop is not None and opens:
            region = crop(0, seq + [tok])[:decode.max_latent_steps]
            rule = dataclasses.replace(rule, budget=len(region))
        in_span = in_span or opens

        # a latent step reads its own hidden state (crop: its region); any other step its token's
        # embedding, a stray <|lvr|> outside a span included
        fed = slot_inputs(model, model.token_embeds(torch.tensor([tok])),
                          at=torch.tensor([latent_step]), v=vec)  # (1, C)
        latents += [fed[0]] if latent_step else []
        x, seq = torch.cat([x, fed]), seq + [tok]
        if not in_span and tok in stop:
            break

    return seq, latents


class Exit(NamedTuple):
    tok: torch.Tensor  # (B,) the token recorded at this step
    leave: torch.Tensor  # (B,) bool: the row leaves its span now
    forced: torch.Tensor  # (B,) bool: `tok` was not sampled
    force_next: torch.Tensor  # (B,) the token to force at the next step (-1: none)


def span_exit(rule, ids, tok, vec, in_lat, n_lat):
    """The exit rule, one step: which rows in a span leave it now, and with which token -> Exit. tok
    (B,): the step's tokens (sampled, or forced by the step before); vec (B, C): the latent inputs;
    in_lat (B,): in a span; n_lat (B,): its latent steps so far."""
    none = torch.full_like(tok, -1)

    # the count: <|lvr_end|>, or (force_end=False) the model's own token
    if rule.decode.decoding == "steps":
        leave = in_lat & (n_lat >= rule.budget)
        forced = leave & rule.decode.force_end
        return Exit(torch.where(forced, ids.end, tok), leave, forced, force_next=none)

    # near the end vector, or the budget: <|lvr_latent_end|>, then <|lvr_end|>
    if rule.decode.decoding == "latent":
        # (never before its first latent: every trained span has one, as under the `token` exit)
        metric, threshold = rule.decode.end_metric, rule.decode.end_threshold
        distance = end_distance(vec, end_vec=rule.end_vec, kind=metric, scaled=rule.scaled)
        near = (distance < threshold) & (n_lat > 0)
        leave = in_lat & (near | (n_lat >= rule.budget))
        force_next = torch.where(leave & rule.decode.force_end, ids.end, none)
        return Exit(
            torch.where(leave, ids.latent_end, tok), leave, forced=leave, force_next=force_next
        )

    # token: the model's own exit token once a latent step has been taken, or <|lvr_end|> at the
    # budget
    own = in_lat & torch.isin(tok, torch.tensor(rule.exits, device=tok.device)) & (n_lat > 0)
    forced = in_lat & ~own & (n_lat >= rule.budget)

    # <|lvr_end|> after an official checkpoint's <|lvr_latent_end|>
    force_next = torch.where(own & (tok != ids.end) & rule.decode.force_end, ids.end, none)
    return Exit(
        torch.where(forced, ids.end, tok), leave=own | forced, forced=forced, force_next=force_next
    )


def span_count(cfg, decoding, lvr_steps):
    """--decoding and --lvr_steps, where left at auto (None), for a checkpoint's config -> (decoding,
    lvr_steps): a pause checkpoint ends its spans by the count it was trained with (`steps`), a
    crop checkpoint by its region's (`steps`, each span's count set by its box); any other by its
    own token (`token`), `steps` counting official LVR's 8."""
    pause = is_pause(cfg)
    count = cfg.extra["latent_targets"]["max_latents"] if pause else 8
    by_count = pause or method_of(cfg) == "crop"
    how = ("steps" if by_count else "token") if decoding == "auto" else decoding
    return how, count if lvr_steps is None else lvr_steps


def gaussian_logprob(z, mu, sigma):
    """(n, C) vectors z under N(mu, sigma^2 I), summed over the dimensions -> (n,)."""
    norm = z.shape[-1] * math.log(sigma * math.sqrt(2 * math.pi))
    return -0.5 * ((z.float() - mu.float()) ** 2).sum(-1) / sigma ** 2 - norm


def latent_noise(shape, generator, device):
    """(B, C) standard normal noise for the latents: a list of generators (GRPO: one per prompt)
    draws its block of rows each, so the process layout does not change a row's noise; else one
    generator (or none)."""
    if isinstance(generator, list):
        rows = shape[0] // len(generator)
        return torch.cat(
            [torch.randn(rows, shape[1], generator=g, device=device) for g in generator]
        )

    return torch.randn(shape, generator=generator, device=device)


def explore(vec, sampling, device):
    """GRPO that explores latents: (B, C) mu -> z = mu + sigma * eps."""
    eps = latent_noise(vec.shape, sampling.generator, device)
    return vec + (sampling.latent_sigma * eps).to(vec.dtype)


def substitute(vec, feed, k_lat):
    """The diagnostics: (B, C) latent inputs -> each row's given vector instead while it has one
    left."""
    rows = torch.arange(len(vec), device=vec.device)
    given = feed.latents[rows, k_lat.clamp(max=feed.latents.shape[1] - 1)]
    return torch.where((k_lat < feed.n)[:, None], given.to(vec.dtype), vec)


def fed_latent(vec, sampling, feed, k_lat):
    """What a latent step feeds: (B, C) its own latents, explored (latent_sigma > 0) or replaced by
    the diagnostics' vectors (feed)."""
    if sampling.latent_sigma:
        vec = explore(vec, sampling, vec.device)
    return vec if feed is None else substitute(vec, feed, k_lat)


def prefill(model, prompt, max_new_tokens, group_size, bottleneck=False):
    """The rollout's phases 1 and 2: run the prompts once into a fresh KV cache, then copy each
    prompt's rows to its G rows -> (cache, input_ids (B*G, T), the last hidden states (B*G, C),
    their logits, and under the bottleneck the image's keys among the cache's (B*G, T + n), else
    None). bottleneck: no prompt token but the image's own sees the image."""
    (B, T), dev, emb = prompt.input_ids.shape, prompt.input_ids.device, model.model.embed_tokens

    # (then the keys and values come out in its dtype)
    autocast = torch.is_autocast_enabled(dev.type)
    kv_dtype = torch.get_autocast_dtype(dev.type) if autocast else emb.weight.dtype
    cache = qwen.KVCache(
        model.cfg, batch=B, max_len=T + max_new_tokens, device=dev, dtype=kv_dtype,
        rope_dtype=emb.weight.dtype,
    )
    x = model.embed(prompt.input_ids, prompt.pixel_values, prompt.grid_thw, prompt.feats)
    image, attend = None, None
    if bottleneck:
        image = F.pad(prompt.input_ids == model.cfg.image_token_id, (0, max_new_tokens))
        attend = bottleneck_attend(~image[:, :T], image[:, :T])
    h = model(prompt.input_ids, grid_thw=prompt.grid_thw, inputs_embeds=x,
              attention_mask=prompt.attention_mask, cache=cache, attend=attend)[:, -1]
    logits = model.lm_head(h)  # only the last position's: lm_head over the whole prompt is wasted
    input_ids = prompt.input_ids
    if group_size > 1:
        cache.repeat_rows(group_size)
        input_ids, h, logits = (t.repeat_interleave(group_size, 0) for t in (input_ids, h, logits))
        image = None if image is None else image.repeat_interleave(group_size, 0)

    return cache, input_ids, h, logits, image


@dataclass
class Spans:
    """The rollout's per-row state, (B,) each: the mode flag and its counters."""
    in_span: torch.Tensor  # bool: in a latent span
    n_lat: torch.Tensor  # latent steps taken in the current span
    k_lat: torch.Tensor  # latent steps in all spans (the feed's index)
    force: torch.Tensor  # a token to force at the next step (-1: none)
    done: torch.Tensor  # bool: the row has stopped


def advance(s, out, tok, latent_step, start, stop):
    """The modes after a step -> Spans: leave (out.leave), enter on <|lvr_start|> (also as a row
    leaves: the next span opens at once), finish on a stop token outside a span."""
    in_span = (s.in_span & ~out.leave) | ((~s.in_span | out.leave) & (tok == start) & ~s.done)
    return Spans(
        in_span, n_lat=torch.where(latent_step, s.n_lat + 1, torch.where(out.leave, 0, s.n_lat)),
        k_lat=s.k_lat + latent_step, force=out.force_next,
        done=s.done | (~latent_step & ~in_span & torch.isin(tok, stop)),
    )


class Regions:
    """--method crop in the batched rollout: as row b opens a span, crop(its prompt b // G, its
    tokens so far) reads its box -> the (n, C) region its slots read; the n (at most R) is the
    span's budget."""

    def __init__(self, crop, h, most, group_size):
        self.crop, self.group_size = crop, group_size
        self.vectors = h.new_zeros(len(h), most, h.shape[-1])  # (B, R, C)
        self.budget = torch.zeros(len(h), dtype=torch.long, device=h.device)  # (B,)

    def read(self, opened, input_ids, steps):
        """The rows in `opened` (B,) bool read their boxes, in their tokens so far (input_ids (B,
        T) the prompts, steps the rollout's Steps)."""
        for b in opened.nonzero().flatten().tolist():
            tokens = input_ids[b].tolist() + [int(step.tok[b]) for step in steps]
            v = self.crop(b // self.group_size, tokens)[:self.vectors.shape[1]]
            self.vectors[b, :len(v)] = v.to(self.vectors.dtype)
            self.budget[b] = len(v)

    def at(self, n_lat):
        """(B,) each row's slot in its span -> (B, C) the region vector it reads."""
        rows = torch.arange(len(n_lat), device=n_lat.device)
        return self.vectors[rows, n_lat.clamp(max=self.vectors.shape[1] - 1)]


def recorded(input_ids, steps):
    """The steps, stacked -> Rollout, up to the step where the last row stopped."""
    run = Step(*(torch.stack(column, 1) for column in zip(*steps)))  # (B, n) each; latent (B, n, C)
    n = min(int((~run.done.all(0)).sum()) + 1, run.done.shape[1])
    return Rollout(
        torch.cat([input_ids, run.tok[:, :n]], 1), latents=run.latent[:, :n],
        is_latent=run.is_latent[:, :n], sampled=run.sampled[:, :n],
    )


@torch.no_grad()
# wide: the rollout's one entry: what it decodes, how, how many per prompt, what it is fed
def rollout(model, ids, prompt, decode=Decode(), sampling=Sampling(), group_size=1, feed=None,
            crop=None):
    """Generate with latent steps, batched and KV-cached -> Rollout: `rollout_one` for B*G rows at
    once. `ids`: LatentIds; `prompt`: Prompt (left-padded); `group_size` G: row r samples prompt r
    // G. A row enters a span after it emits <|lvr_start|>; in it, its input is its previous last
    hidden state (latent_input) and the recorded token <|lvr|>. The span ends by Decode's rule
    (span_exit: after lvr_steps latents; near the end vector; on the model's own exit token), or at
    the budget; then <|lvr_end|> is forced (force_end=False: the model's own next token follows, as
    the official code). Stop tokens do not end a row in a span. `feed`: the diagnostics' latents;
    Sampling.latent_sigma > 0: latents explored (fed_latent). Decode.bottleneck: LIVR's mask, as
    train_sft --bottleneck trains it: the prompt and the text steps see no image token. `crop`:
    rollout_one's, asked for row r's prompt r // G (Regions)."""
    rule = exit_rule(model, ids, decode)
    dev = prompt.input_ids.device
    stop = torch.tensor(list(sampling.stop_ids) or model.default_stop_ids(), device=dev)

    # 1) prefill the prompts once, 2) copy each prompt's state to its G rows
    cache, input_ids, h, logits, image = prefill(
        model, prompt, max_new_tokens=decode.max_new_tokens, group_size=group_size,
        bottleneck=decode.bottleneck,
    )
    zero, no = torch.zeros_like(input_ids[:, 0]), torch.zeros_like(input_ids[:, 0], dtype=torch.bool)
    s = Spans(input_ids[:, -1] == ids.start, zero, zero, force=zero - 1, done=no)
    steps, regions = [], None
    if crop is not None:  # (a prompt may end in a box and <|lvr_start|>)
        regions = Regions(crop, h, most=decode.max_latent_steps, group_size=group_size)
        rule = dataclasses.replace(rule, budget=regions.budget)
        regions.read(s.in_span, input_ids, steps)
    for i in range(decode.max_new_tokens):
        # 3) every row samples; a token forced by the previous step replaces the sample
        tok = qwen.sample(
            logits, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            generator=sampling.generator,
        )
        sampled = ~s.done & (s.force < 0)
        tok = torch.where(s.force >= 0, s.force, tok)

        # 4) which rows in a span leave it now, and with which token; the others take a latent step
        vec = latent_input(model, h)  # (B, C)
        out = span_exit(rule, ids, tok, vec=vec, in_lat=s.in_span, n_lat=s.n_lat)
        latent_step = s.in_span & ~out.leave & ~s.done
        vec = fed_latent(vec, sampling, feed=feed, k_lat=s.k_lat)
        vec = vec if regions is None else regions.at(s.n_lat).to(vec.dtype)  # crop: its region
        tok = torch.where(s.done, stop[0], torch.where(latent_step, ids.latent, out.tok))
        text = model.token_embeds(tok[:, None])[:, 0]  # (official LVR: its own <|lvr_latent_end|>)
        x = slot_inputs(model, text, at=latent_step, v=vec)  # (B, C)

        # 5) record (a latent step is a sampled "continue" only under the token exit, past the
        # first), and update the modes
        sampled = torch.where(
            latent_step, (decode.decoding == "token") & (s.n_lat > 0), sampled & ~out.forced
        )
        s = advance(s, out, tok, latent_step=latent_step, start=ids.start, stop=stop)
        fed = torch.where(latent_step[:, None], x, 0.0)
        steps.append(Step(tok, fed, is_latent=latent_step, sampled=sampled, done=s.done))
        if regions is not None:  # (a sync, under crop alone)
            regions.read(s.in_span & ~latent_step & (tok == ids.start), input_ids, steps)
        if i == decode.max_new_tokens - 1 or (i % 16 == 15 and bool(s.done.all())):  # (a sync)
            break

        # 6) the next position (under the bottleneck a text step sees no image key)
        attend = None
        if image is not None:
            attend = bottleneck_attend(~latent_step[:, None], image[:, :cache.len + 1])
        h = model(inputs_embeds=x[:, None], cache=cache, attend=attend)[:, -1]
        logits = model.lm_head(h)

    return recorded(input_ids, steps)


def nearest_cells(latents, feats):
    """For each latent vector, the index of the most cosine-similar merged image token."""
    return F.cosine_similarity(latents.float()[:, None], feats.float()[None], dim=-1).argmax(-1)
