"""
GRPO_latent's maths (docs/method.md): the rewards, group-relative advantages, the clipped objective
with a k3 KL, and the training forward's log-probs of a rollout's decisions.

What carries a log-prob: every decision the policy sampled, and nothing else, as lvr.rollout
records them (Rollout.sampled). The official mask drops the whole span from <|lvr_start|>; we keep
<|lvr_start|> (a sampled token: the choice to look) and, under the `token` exit, each in-span
"continue" (the sample was not an exit token, probability 1 - p(exit)), so the reward reaches the
span's length too. Forced tokens and a span's first step (never an exit) carry nothing. The old
log-probs are the training forward's own (TRL's convention), not the sampler's.

Latents carry nothing either, unless the rollout explores them (--latent_sigma S > 0): then each
latent fed is z = mu + S * eps, and its log-prob log N(z; mu', S^2 I) sits in the same clipped ratio
as a token's, mu' = latent_input of the hidden state at the position that *produced* z; the KL to
the reference on it is the closed form for two Gaussians of equal S. This departs from Monet's VLPO
(arXiv 2511.21395) twice: VLPO's rollout adds no noise (z = mu, so on-policy the latent's gradient,
along A (z - mu'), is about zero), and it compares z with the output at the position that reads it,
one step late, rather than the one that produced it.
"""
from typing import NamedTuple

import torch
import torch.utils.checkpoint

import data
import lvr
import qwen
from cli import InputError


# -----------------------------------------------------------------------------
# rewards: named functions (text, tokens, answer, ids, stop_ids, map_desc) -> float

def accuracy_reward(text, tokens, answer, ids, stop_ids, map_desc=None):
    """1 when the answer matches (data.is_correct: a VSP plan when it reaches the goal), else 0."""
    return float(data.is_correct(text, answer, map_desc))


def format_reward(text, tokens, answer, ids, stop_ids, map_desc=None):
    """1 when the completion is an LVR span, an answer, then a stop token (data.is_lvr_format)."""
    return float(data.is_lvr_format(tokens, ids, stop_ids, text=text))


REWARDS = {"accuracy": accuracy_reward, "format": format_reward}


def box_rewards(grid_thw, crop=False):
    """--method box and crop's REWARDS for a completion on an image of grid_thw: the box is text
    the policy samples (DeepEyes' RL on it), so accuracy reads the answer after the last box
    (data.after_boxes), and format asks that every box parse (clipped to the image), an answer
    follow and the completion stop (data.is_box_format; crop: one span per box)."""
    def accuracy(text, tokens, answer, ids, stop_ids, map_desc=None):
        return float(data.is_correct(data.after_boxes(text), answer, map_desc))

    def format(text, tokens, answer, ids, stop_ids, map_desc=None):
        boxes = data.written_boxes(text, grid_thw)
        spans = not crop or tokens.count(ids.start) == len(boxes)
        return float(data.is_box_format(tokens, text, stop_ids, grid_thw) and spans)

    return {"accuracy": accuracy, "format": format}


# -----------------------------------------------------------------------------
# advantages and the loss

def group_advantages(rewards, group_size, scale=True):
    """(N,) rewards, consecutive groups of G rows -> (r - group mean) / (group std + 1e-4).

    std is the unbiased one (torch's default, as in TRL); scale=False keeps r - mean (Dr. GRPO)."""
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(1, keepdim=True)
    if scale:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)

    # an all-equal group carries no signal, but its float mean can miss the value by an ulp (eight
    # 1.2s), which the division above turns into a 1e-3 advantage on every row: make it exactly 0
    return adv.masked_fill((r == r[:, :1]).all(1, keepdim=True), 0.0).flatten()


def loss_weights(mask, norm="token", max_len=None, total=None):
    """(N, L) per-token weights that make sum(weights * per_token_loss) the normalised loss.

    token:    mean over every sampled decision in the batch (the mask's; the default);
    sequence: mean per completion, then mean over completions (the GRPO paper);
    fixed:    sum / (N * max_len) (Dr. GRPO: no length bias).
    Written as weights so that the loss of a batch split into micro-batches (or drawn in several rounds:
    total = (rows, sampled decisions) of the whole batch) sums exactly."""
    m = mask.float()
    rows, tokens = total or (m.shape[0], m.sum())
    if norm == "token":
        return m / max(float(tokens), 1.0)
    if norm == "sequence":
        return m / (m.sum(1, keepdim=True).clamp(min=1) * rows)
    if norm == "fixed":
        return m / (rows * (max_len or m.shape[1]))
    raise InputError(f"loss_norm must be token, sequence or fixed, got {norm!r}")


def k3(logp, ref_logp, used):
    """(N, L) the k3 estimate of KL(policy || reference) at each sampled token decision (`used`),
    else 0: exp(ref - logp) - (ref - logp) - 1. Unused positions are zeroed before the exp: an
    overflow there would give inf * 0 = NaN in the loss, and in the gradient even through
    torch.where."""
    d = torch.where(used, ref_logp - logp, 0.0)
    return torch.exp(d) - d - 1


def gaussian_kl(mu, ref_mu, sigma):
    """(n, C) -> (n,) KL(N(mu, sigma^2 I) || N(ref_mu, sigma^2 I)), the closed form for equal
    sigma."""
    return ((mu.float() - ref_mu.float()) ** 2).sum(-1) / (2 * sigma ** 2)


def decision_mask(sampled, is_latent, latent_sigma):
    """(N, L) bool: every decision the policy drew, what carries a log-prob: its sampled tokens,
    and with latent_sigma > 0 every latent."""
    return sampled | is_latent if latent_sigma else sampled


def joint_logprob(d, sampled, latent_sigma):
    """(N, L) the log-prob of the decisions drawn at each step (d: completion_logprobs' for those
    rows; sampled: their mask): the token's, plus (latent_sigma > 0) the latent's; a latent step's
    token part only where a "continue" was sampled."""
    return torch.where(sampled, d.token, 0.0) + d.latent if latent_sigma else d.token


def reference_kl(d, ref_d, sampled, is_latent, used, latent_sigma):
    """(N, L) KL to the reference at each drawn decision (`used`): k3 on the tokens; the closed
    form for two Gaussians of equal sigma on the latents (at is_latent)."""
    kl = k3(d.token, ref_d.token, used & sampled if latent_sigma else used)
    if latent_sigma:
        at = is_latent.nonzero(as_tuple=True)
        kl = kl.index_put(at, kl[at] + gaussian_kl(d.mu, ref_d.mu, latent_sigma))

    return kl


def grpo_loss(logp, old_logp, adv, weights, kl=None, clip_eps=0.2, beta=0.04):
    """Per-decision PPO-clip objective plus beta * KL to the reference -> the loss.

    logp, old_logp, weights, kl: (N, L); adv: (N,). Positions of weight 0 (padding, forced tokens)
    are set to 0 before the exp, as in k3."""
    used = weights > 0
    ratio = torch.exp(torch.where(used, logp - old_logp, 0.0))
    a = adv[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    if kl is not None:
        per_token = per_token + beta * kl
    return (per_token * weights).sum()


def reference(model, dtype, keep_tower):
    """The frozen KL reference, from a fresh load of the SFT checkpoint: matmul weights in the run's
    dtype (autocast casts the policy's to it anyway), norms and embeddings as the policy holds them,
    so its forward equals the policy's at step 0. Without keep_tower it has none: both models then
    read the image features of the policy's frozen tower."""
    model.eval().requires_grad_(False)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight is not model.model.embed_tokens.weight:
            m.to(dtype)

    if not keep_tower:
        del model.visual
    return model


# completion positions whose (V,)-wide logits exist at once in the training forward: at Qwen's V =
# 151,936 one fp32 copy of 2048 positions is 1.2 GB, where every logit of 64 rows of 512 tokens
# would be 20 GB
LOGIT_CHUNK = 2048


class Decisions(NamedTuple):
    """The training forward's log-probs of a rollout's decisions."""
    token: torch.Tensor  # (N, L) each token's (or "continue"'s) log-prob
    # (N, L) each latent's Gaussian log-prob, log N(z; mu, sigma^2 I) (0: none)
    latent: torch.Tensor
    mu: torch.Tensor  # (n_latent, C) the mean of each latent (latent_sigma > 0), else None


class Completions(NamedTuple):
    """The rows a training forward scores: prompts and completions as the rollout recorded them."""
    seqs: torch.Tensor  # (N, T + L) prompt and completion tokens
    attention_mask: torch.Tensor  # (N, T + L) 1 on real tokens
    n_prompt: int  # T: the padded prompt length
    latents: torch.Tensor  # (N, L, C) the vector fed at each latent step
    is_latent: torch.Tensor  # (N, L)
    grid_thw: torch.Tensor = None  # the rows' images (None: text only)
    feats: torch.Tensor = None  # their merged image tokens


def decision_logprobs(lm_head, h, comp, is_latent, temperature, exits):
    """(n, L, C) hidden states -> (n, L) log-probs of the decisions `comp` (continue at latent
    steps)."""
    lp = (lm_head(h).float() / (temperature or 1.0)).log_softmax(-1)
    tok_lp = lp.gather(-1, comp[..., None])[..., 0]
    return torch.where(is_latent, lvr.continue_logprob(lp, exits), tok_lp) if exits else tok_lp


def completion_logprobs(model, completions, temperature=1.0, exits=(), latent_sigma=0.0):
    """One batched forward over `completions` (Completions), prompt + completion -> Decisions.

    The recorded latent vectors (detached) sit at the latent positions, exactly as the rollout fed
    them; logits are divided by the sampling temperature, as in the rollout. At a latent step the
    token decision is "continue": log(1 - p(exits)) (only a `token`-exit rollout samples it). With
    latent_sigma > 0 each latent z was sampled around mu = latent_input(the state that produced it),
    the state at the position before it, as the rollout did: log N(z; mu, sigma^2 I) is its
    log-prob. The head runs on LOGIT_CHUNK positions at a time, recomputed in backward, so the
    logits never exist whole."""
    n_prompt = completions.n_prompt
    is_latent, latents = completions.is_latent, completions.latents  # (N, L), (N, L, C)
    prompt, comp = completions.seqs[:, :n_prompt], completions.seqs[:, n_prompt:]
    # (N, T, C): images only in the prompt
    x = model.embed(prompt, grid_thw=completions.grid_thw, feats=completions.feats)
    # (N, L, C)
    c = torch.where(is_latent[..., None], latents.detach().to(x.dtype), model.token_embeds(comp))
    x = torch.cat([x, c], 1)
    pos = qwen.get_rope_index(
        prompt, completions.grid_thw, attention_mask=completions.attention_mask[:, :n_prompt],
        image_token_id=model.cfg.image_token_id,
    )

    # completion positions count on like text, as in the rollout's cache
    after = pos.amax(dim=(0, 2)) + 1
    text_pos = after[:, None] + torch.arange(comp.shape[1], device=comp.device)  # (N, L)
    pos = torch.cat([pos, text_pos.expand(3, -1, -1)], 2)
    h = model(inputs_embeds=x, attention_mask=completions.attention_mask, position_ids=pos)

    # (N, L, C): position t predicts t + 1, and produced the latent at t + 1
    h = h[:, n_prompt - 1:-1]
    per_chunk = max(1, LOGIT_CHUNK // max(1, comp.shape[1]))  # rows
    out = []
    for i in range(0, len(comp), per_chunk):
        chunk = slice(i, i + per_chunk)
        args = (model.lm_head, h[chunk], comp[chunk], is_latent[chunk], temperature, list(exits))
        out.append(torch.utils.checkpoint.checkpoint(decision_logprobs, *args, use_reentrant=False)
                   if torch.is_grad_enabled() else decision_logprobs(*args))

    token = torch.cat(out)
    if not latent_sigma:
        return Decisions(token, torch.zeros_like(token), None)
    mu = lvr.latent_input(model, h[is_latent])  # (n_latent, C)
    latent = torch.zeros_like(token).index_put(
        is_latent.nonzero(as_tuple=True), lvr.gaussian_logprob(latents[is_latent], mu, latent_sigma)
    )
    return Decisions(token, latent, mu)


