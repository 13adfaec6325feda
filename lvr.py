"""
The method: latent visual reasoning on Qwen2.5-VL (LVR, arXiv 2509.24251; Mirage, arXiv 2506.17218).

The assistant turn is  <|lvr_start|> <|lvr|> x N <|lvr_end|> \\n answer <|im_end|>.
At the N latent slots the model does not read a token embedding: in training it reads the
target vector (teacher forcing), at inference its own previous last hidden state. The hidden
state just before latent i is trained to predict target i: the merged visual tokens of the
image region that answers the question (LVR), or a helper image squeezed to k vectors (Mirage).

Where we depart from the official code, and why:
- <|lvr_latent_end|> is inserted only when the `latent` exit mode is trained (the official code
  always inserts it);
- pixel bboxes are normalised by the original image size (the official non-packed path divides
  by the resized size);
- `max_latents` pools the ROI grid, so training length can match inference budgets;
- the latent head, when used, is applied at every latent step including the first.
"""
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import qwen
from vision import InputError

LVR_TOKENS = {"start": "<|lvr_start|>", "latent": "<|lvr|>", "latent_end": "<|lvr_latent_end|>", "end": "<|lvr_end|>"}
# Mirage has no latent-end token; we name one so that the `latent` exit mode works for it too
MIRAGE_TOKENS = {"start": "<|latent_start|>", "latent": "<|latent_pad|>", "latent_end": "<|latent_stop|>",
                 "end": "<|latent_end|>"}


@dataclass
class LatentIds:
    start: int
    latent: int
    latent_end: int
    end: int


def latent_ids(tok, names=LVR_TOKENS):
    """Ids of the latent tokens, or None when the tokenizer lacks them (a plain Qwen2.5-VL)."""
    ids = {k: tok.tok.token_to_id(v) for k, v in names.items()}
    return None if None in ids.values() else LatentIds(**ids)


def add_latent_tokens(model, tok, names=LVR_TOKENS):
    """Add the latent tokens to the tokenizer (and embedding rows if needed); record them in the config."""
    tok.tok.add_special_tokens([n for n in names.values() if tok.tok.token_to_id(n) is None])
    grow = len(tok) - model.cfg.vocab_size
    if grow > 0:  # new rows start at the mean embedding, so they are not outliers
        def grown(w):
            return torch.nn.Parameter(torch.cat([w.data, w.data.mean(0, keepdim=True).expand(grow, -1)]))
        model.model.embed_tokens.weight = grown(model.model.embed_tokens.weight)
        model.lm_head.weight = (model.model.embed_tokens.weight if model.cfg.tie_word_embeddings
                                else grown(model.lm_head.weight))
        model.model.embed_tokens.num_embeddings = model.lm_head.out_features = model.cfg.vocab_size = len(tok)
    ids = latent_ids(tok, names)
    model.cfg.extra.update(lvr_tokens=dict(names), lvr_token_ids=vars(ids).copy())
    return ids


# -----------------------------------------------------------------------------
# ROI -> merged-token indices, and the target vectors

def normalise_bbox(bbox, width, height, where=""):
    """[x0, y0, x1, y1] in [0, 1], accepting pixel boxes (any value > 1) in the original image size."""
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
    """Normalised bbox -> (y0t, y1t, x0t, x1t): the merged-grid cells it touches (DESIGN 3.3)."""
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
    """One list of token indices per latent: the ROI tokens, or an adaptive average pool to <= K cells."""
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
    """Mirage: the helper image's n tokens in k contiguous chunks (remainder dropped), one latent each."""
    if n_tokens < k:
        raise InputError(f"helper image has {n_tokens} tokens, fewer than the {k} latents asked for")
    size = n_tokens // k
    return [list(range(i * size, (i + 1) * size)) for i in range(k)]


def averaging_matrix(groups, n_feat):
    """(L, n_feat) matrix whose row i averages the features in groups[i]: targets = W @ feats."""
    W = torch.zeros(len(groups), n_feat)
    for i, g in enumerate(groups):
        W[i, g] = 1.0 / len(g)
    return W


# -----------------------------------------------------------------------------
# teacher-forced SFT forward and loss

def head(model, h):
    """The latent head when the model has one, else identity."""
    return model.lvr_head(h) if hasattr(model, "lvr_head") else h


def latent_distance(pred, target, kind="mse"):
    """Mean latent loss in fp32: mse (over all elements), cosine (1 - cos) or l1."""
    pred, target = pred.float(), target.float()
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "cosine":
        return (1 - F.cosine_similarity(pred, target, dim=-1)).mean()
    if kind == "l1":
        return F.l1_loss(pred, target)
    raise InputError(f"latent loss must be mse, cosine or l1, got {kind!r}")


def encode_images(model, batch, freeze_vision=True):
    """Merged image tokens for the prompt images and the target vectors (no gradient into targets)."""
    with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_vision):
        feats = model.visual(batch["pixel_values"], batch["grid_thw"])
    src = feats
    if batch.get("helper_pixel_values") is not None:  # Mirage: targets come from the helper image
        with torch.no_grad():
            src = model.visual(batch["helper_pixel_values"], batch["helper_grid_thw"])
    targets = (batch["target_w"].to(src.device) @ src.detach().float())  # (L, C)
    return feats, targets


def supervised_ce(model, h, labels):
    """Mean next-token CE over labelled positions; lm_head runs only there (a few % of a long
    image prompt), which saves most of its FLOPs and the (B, T, V) logits' memory."""
    sel = labels[:, 1:] != -100  # position t predicts label t + 1
    return F.cross_entropy(model.lm_head(h[:, :-1][sel]).float(), labels[:, 1:][sel])


def sft_loss(model, batch, ce_weight=1.0, latent_weight=0.1, latent_loss="mse", freeze_vision=True):
    """-> (loss, ce, latent) for one padded batch (see data.collate for the fields)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    feats, targets = encode_images(model, batch, freeze_vision)
    x = model.embed(ids, grid_thw=batch["grid_thw"], feats=feats)  # (B, T, C)
    b, t = batch["latent_pos"]  # (L,), (L,): where the latent slots are
    x = x.index_put((b, t), targets.to(x.dtype))  # teacher forcing: the slots read their targets
    pos, _ = qwen.get_rope_index(ids, batch["grid_thw"], mask, model.cfg.image_token_id)
    _, h = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, logits=False)
    ce = supervised_ce(model, h, labels)
    lat = latent_distance(head(model, h[b, t - 1]), targets, latent_loss) if len(b) else ce.new_zeros(())
    eb, et = batch["latent_end_pos"]  # `latent` exit mode: the state before <|lvr_latent_end|> learns its embedding
    if len(eb):
        end = model.model.embed_tokens(ids[eb, et])
        lat = lat + latent_distance(head(model, h[eb, et - 1]), end, latent_loss)
    return ce_weight * ce + latent_weight * lat, ce.detach(), lat.detach()


def mirage_stage2_loss(model, batch, freeze_vision=True):
    """Mirage stage 2: latent slots read the model's own hidden states, with gradients, CE only.

    k + 1 full passes: pass j fills latent slot j from pass j-1's hidden state at slot j-1.
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    feats, _ = encode_images(model, batch, freeze_vision)
    x = model.embed(ids, grid_thw=batch["grid_thw"], feats=feats)
    pos, _ = qwen.get_rope_index(ids, batch["grid_thw"], mask, model.cfg.image_token_id)
    b, t = batch["latent_pos"]
    slot = batch["latent_slot"]  # (L,) index of each latent within its span
    n_pass = int(slot.max()) + 1 if len(slot) else 0
    for j in range(n_pass):
        _, h = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, logits=False)
        sel = slot == j
        x = x.index_put((b[sel], t[sel]), head(model, h[b[sel], t[sel] - 1]).to(x.dtype))
    _, h = model(inputs_embeds=x, attention_mask=mask, position_ids=pos, logits=False)
    ce = supervised_ce(model, h, labels)
    return ce, ce.detach(), ce.new_zeros(())


# -----------------------------------------------------------------------------
# latent rollout: batched, KV-cached, a mode flag per row

@torch.no_grad()
def rollout(model, ids, input_ids, pixel_values=None, grid_thw=None, attention_mask=None, max_new_tokens=64,
            decoding="steps", lvr_steps=8, force_end=True, max_latent_steps=64, end_threshold=0.1,
            end_metric="mse", temperature=0.0, top_k=0, top_p=1.0, stop_ids=(), generator=None, feats=None,
            group_size=1):
    """Generate with latent steps. `ids`: LatentIds. Prompts left-padded. `feats`: merged image
    tokens already computed (GRPO encodes each image once), instead of pixel_values. `group_size` G:
    the B prompts are prefilled once and their cache rows copied, giving B*G rows (row r samples
    prompt r // G): GRPO's G rollouts of a prompt share one prefill, which dominates short rollouts.

    A row enters latent mode after it emits <|lvr_start|>. In latent mode its input is its previous
    last hidden state (through the latent head) and the recorded token is <|lvr|>. Exit:
      steps:  after `lvr_steps` latents, <|lvr_end|> is forced (force_end=False: the model's own token);
      latent: when dist(hidden, embedding of <|lvr_latent_end|>) < end_threshold, feed
              <|lvr_latent_end|>, then force <|lvr_end|>;
      token:  when the model itself emits <|lvr_end|>, after at least one latent (every trained span
              has one, and the state that read <|lvr_start|> has no CE label: its token means nothing);
    and always at `max_latent_steps`. Stop tokens do not end a row while it is in latent mode.
    Returns tokens (B, T+n), latents (B, n, C) (zeros at text steps), is_latent (B, n) bool, and
    logprobs (B, n): log-softmax(logits / temperature) of each token (0 at latent steps), which
    GRPO uses as the old policy's.
    """
    if decoding not in ("steps", "latent", "token"):
        raise InputError(f"decoding must be steps, latent or token, got {decoding!r}")
    B, T = input_ids.shape
    dev = input_ids.device
    stop = torch.tensor(list(stop_ids) or model.default_stop_ids(), device=dev)
    emb = model.model.embed_tokens
    cache = qwen.KVCache(model.cfg, B, T + max_new_tokens, dev, emb.weight.dtype)
    x = model.embed(input_ids, pixel_values, grid_thw, feats)
    _, h = model(input_ids, grid_thw=grid_thw, inputs_embeds=x, attention_mask=attention_mask, cache=cache,
                 logits=False)
    h = h[:, -1]
    logits = model.lm_head(h)  # only the last position's: lm_head over the whole prompt is wasted
    if group_size > 1:  # each prompt's prefilled state, copied to its G rows
        cache.repeat_rows(group_size)
        input_ids, h, logits = (t.repeat_interleave(group_size, 0) for t in (input_ids, h, logits))
        B = B * group_size
    budget = lvr_steps if decoding == "steps" else max_latent_steps
    in_lat = input_ids[:, -1] == ids.start  # the mode flag (a prompt may end in <|lvr_start|>)
    n_lat = torch.zeros(B, dtype=torch.long, device=dev)  # latent steps taken in the current span
    force = torch.full((B,), -1, dtype=torch.long, device=dev)  # token to force at the next step
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    toks, lats, is_lats, logps, dones = [], [], [], [], []
    for i in range(max_new_tokens):
        tok = qwen.sample(logits, temperature, top_k, top_p, generator)
        tok = torch.where(force >= 0, force, tok)
        force.fill_(-1)
        vec = head(model, h)  # (B, C) the latent input, used by rows that stay in latent mode
        if decoding == "steps":
            exit_ = in_lat & (n_lat >= budget)
            if force_end:
                tok = torch.where(exit_, ids.end, tok)
        elif decoding == "latent":
            end_vec = emb.weight[ids.latent_end]
            dist = ((vec.float() - end_vec.float()) ** 2).mean(-1) if end_metric == "mse" else \
                1 - F.cosine_similarity(vec.float(), end_vec.float()[None], dim=-1)
            exit_ = in_lat & (dist < end_threshold)
            tok = torch.where(exit_, ids.latent_end, tok)
            force = torch.where(exit_, ids.end, force)
        else:  # token: the model's own <|lvr_end|>, once a latent step has been taken
            exit_ = in_lat & (tok == ids.end) & (n_lat > 0)
        over = in_lat & ~exit_ & (n_lat >= budget)  # budget reached in latent/token mode: force the end
        tok = torch.where(over, ids.end, tok)
        exit_ = exit_ | over
        latent_step = in_lat & ~exit_ & ~done
        tok = torch.where(latent_step, ids.latent, tok)
        tok = torch.where(done, stop[0], tok)
        x = torch.where(latent_step[:, None], vec.to(emb.weight.dtype), emb(tok))
        toks.append(tok)
        lats.append(torch.where(latent_step[:, None], vec, 0.0))
        is_lats.append(latent_step)
        lp = (logits.float() / (temperature or 1.0)).log_softmax(-1).gather(1, tok[:, None])[:, 0]
        logps.append(torch.where(latent_step, 0.0, lp))
        n_lat = torch.where(latent_step, n_lat + 1, torch.where(exit_, 0, n_lat))
        in_lat = (in_lat & ~exit_) | (~in_lat & (tok == ids.start) & ~done)
        done = done | (~latent_step & ~in_lat & torch.isin(tok, stop))
        dones.append(done)
        if i == max_new_tokens - 1 or (i % 16 == 15 and bool(done.all())):  # a host sync every 16 steps only
            break
        logits, h = model(inputs_embeds=x[:, None], cache=cache)
        logits, h = logits[:, -1], h[:, -1]
    n = min(int((~torch.stack(dones).all(1)).sum()) + 1, len(dones))  # up to the step the last row stopped
    toks, lats, is_lats, logps = (torch.stack(t, 1)[:, :n] for t in (toks, lats, is_lats, logps))
    return torch.cat([input_ids, toks], 1), lats, is_lats, logps


def is_lvr_format(tokens, ids, stop_ids, text):
    """A completion (token list up to its stop) is <|lvr_start|> ... <|lvr_end|>, then a non-empty
    answer (`text`: the decoded completion), then a stop token."""
    if not tokens or tokens[0] != ids.start or ids.end not in tokens or tokens[-1] not in stop_ids:
        return False
    after = tokens[tokens.index(ids.end) + 1:-1]
    return len(after) > 0 and ids.start not in after and bool(text.strip())


def normalise(text):
    """Lower case, no punctuation at the ends, single spaces: for exact-match scoring."""
    return " ".join(text.lower().strip().strip(".!?,;:'\"").split())


def answer_of(completion):
    """The text inside <answer>...</answer> if present, else the whole completion; normalised."""
    if "<answer>" in completion:
        completion = completion.split("<answer>")[-1].split("</answer>")[0]
    return normalise(completion)


def letter_of(text):
    """The multiple-choice letter a normalised answer starts with ("b", "(b) cat", "b. cat"), or None."""
    m = re.match(r"^\(?([a-z])\)?(?:[.):]|\s|$)", text)
    return m.group(1) if m else None


def is_correct(completion, answer):
    """Exact match after normalising; when the gold answer is a letter, the letters are compared."""
    pred, gold = answer_of(completion), answer_of(answer)
    if len(gold.strip("()")) == 1 and gold.strip("()").isalpha():
        return letter_of(pred) == gold.strip("()")
    return pred == gold


def nearest_cells(latents, feats):
    """For each latent vector, the index of the most cosine-similar merged image token."""
    return F.cosine_similarity(latents.float()[:, None], feats.float()[None], dim=-1).argmax(-1)


# -----------------------------------------------------------------------------
# GRPO_latent (DESIGN 3.7): group-relative advantages, a loss on text tokens only

def group_advantages(rewards, group_size, scale=True):
    """(N,) rewards, consecutive groups of G rows -> (r - group mean) / (group std + 1e-4).

    std is the unbiased one (torch's default, as in TRL); scale=False keeps r - mean (Dr. GRPO)."""
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    # an all-equal group carries no signal, but its float mean can miss the value by an ulp (eight 1.2s),
    # which the division above turns into a 1e-3 advantage on every row: make it exactly 0
    return adv.masked_fill((r == r[:, :1]).all(1, keepdim=True), 0.0).flatten()


def text_mask(completion, ids, stop_ids):
    """(N, L) completion tokens -> bool mask of the tokens the policy loss sees.

    Excluded: the latent span from <|lvr_start|> up to but not including <|lvr_end|> (an unclosed
    span runs to the end), and everything after the first stop token (which itself counts)."""
    starts = (completion == ids.start).cumsum(1)
    ends = (completion == ids.end).cumsum(1)
    in_span = starts > ends
    is_stop = torch.isin(completion, torch.as_tensor(list(stop_ids), device=completion.device))
    after_stop = (is_stop.cumsum(1) - is_stop.long()) > 0  # a stop token earlier in the row
    return ~in_span & ~after_stop


def loss_weights(mask, norm="token", max_len=None):
    """(N, L) per-token weights that make sum(weights * per_token_loss) the normalised loss.

    token:    mean over all text tokens in the batch (the default);
    sequence: mean per completion, then mean over completions (the GRPO paper);
    fixed:    sum / (N * max_len) (Dr. GRPO: no length bias).
    Written as weights so that the loss of a batch split into micro-batches sums exactly."""
    m = mask.float()
    if norm == "token":
        return m / m.sum().clamp(min=1)
    if norm == "sequence":
        return m / (m.sum(1, keepdim=True).clamp(min=1) * m.shape[0])
    if norm == "fixed":
        return m / (m.shape[0] * (max_len or m.shape[1]))
    raise InputError(f"loss_norm must be token, sequence or fixed, got {norm!r}")


def grpo_loss(logp, old_logp, adv, weights, ref_logp=None, clip_eps=0.2, beta=0.04):
    """Per-token PPO-clip objective plus beta * k3 KL to the reference -> (loss, kl per token).

    logp, old_logp, ref_logp, weights: (N, L); adv: (N,). k3 = exp(ref - logp) - (ref - logp) - 1."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    return (per_token * weights).sum(), kl


def completion_logprobs(model, seqs, attention_mask, n_prompt, grid_thw, feats, latents, is_latent, temperature=1.0):
    """One batched forward over prompt + completion -> (N, L) log-probs of the completion tokens.

    The recorded latent vectors (detached) sit at the latent positions, exactly as the rollout fed
    them; logits are divided by the sampling temperature, as in the rollout."""
    prompt, comp = seqs[:, :n_prompt], seqs[:, n_prompt:]
    x = model.embed(prompt, grid_thw=grid_thw, feats=feats)  # (N, T, C) images only in the prompt,
    c = torch.where(is_latent[..., None], latents.detach().to(x.dtype), model.model.embed_tokens(comp))  # (N, L, C)
    x = torch.cat([x, c], 1)
    pos, _ = qwen.get_rope_index(prompt, grid_thw, attention_mask[:, :n_prompt], model.cfg.image_token_id)
    after = pos.amax(dim=(0, 2)) + 1  # completion positions count on like text, as in the rollout's cache
    pos = torch.cat([pos, (after[:, None] + torch.arange(comp.shape[1], device=seqs.device)).expand(3, -1, -1)], 2)
    _, h = model(inputs_embeds=x, attention_mask=attention_mask, position_ids=pos, logits=False)
    logits = model.lm_head(h[:, n_prompt - 1:-1]).float() / (temperature or 1.0)  # t predicts t + 1; no prompt logits
    return logits.log_softmax(-1).gather(-1, seqs[:, n_prompt:, None])[..., 0]
