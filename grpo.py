"""
GRPO_latent's maths (docs/method.md): the rewards, group-relative advantages, the clipped objective
with a k3 KL, and the training forward's log-probs of a rollout's decisions.

What carries a log-prob: every decision the policy sampled, and nothing else, as lvr.rollout
records them (Rollout.sampled). The official mask drops the whole span from <|lvr_start|>; we keep
<|lvr_start|> (a sampled token: the choice to look) and, under the `token` exit, each in-span
"continue" (the sample was not an exit token, probability 1 - p(exit)), so the reward reaches the
span's length too. Latent vectors, forced tokens and a span's first step (never an exit) carry
nothing. The old log-probs are the training forward's own (TRL's convention), not the sampler's.
"""
import re

import torch
import torch.utils.checkpoint

import lvr
import qwen
from cli import InputError


# -----------------------------------------------------------------------------
# rewards: named functions (text, tokens, answer, ids, stop_ids) -> float

def is_lvr_format(tokens, ids, stop_ids, text):
    """A completion (token list up to its stop) is <|lvr_start|> ... <|lvr_end|> (one span or more: the
    relation task looks twice), then a non-empty answer (`text`: the decoded completion), then a stop token.
    """
    if not tokens or tokens[0] != ids.start or ids.end not in tokens or tokens[-1] not in stop_ids:
        return False
    after = tokens[len(tokens) - tokens[::-1].index(ids.end):-1]  # after the last <|lvr_end|>
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


def accuracy_reward(text, tokens, answer, ids, stop_ids):
    """1 when the answer matches (is_correct), else 0."""
    return float(is_correct(text, answer))


def format_reward(text, tokens, answer, ids, stop_ids):
    """1 when the completion is an LVR span, then a non-empty answer, then a stop token (is_lvr_format)."""
    return float(is_lvr_format(tokens, ids, stop_ids, text))


REWARDS = {"accuracy": accuracy_reward, "format": format_reward}


# -----------------------------------------------------------------------------
# advantages and the loss

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


def loss_weights(mask, norm="token", max_len=None, total=None):
    """(N, L) per-token weights that make sum(weights * per_token_loss) the normalised loss.

    token:    mean over all text tokens in the batch (the default);
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


def grpo_loss(logp, old_logp, adv, weights, ref_logp=None, clip_eps=0.2, beta=0.04):
    """Per-token PPO-clip objective plus beta * k3 KL to the reference -> (loss, kl per token).

    logp, old_logp, ref_logp, weights: (N, L); adv: (N,). k3 = exp(ref - logp) - (ref - logp) - 1.
    Positions of weight 0 (padding, forced tokens, latents) are set to 0 before any exp: an overflow
    there would give inf * 0 = NaN in the loss, and in the gradient even through torch.where."""
    used = weights > 0
    ratio = torch.exp(torch.where(used, logp - old_logp, 0.0))
    a = adv[:, None]
    per_token = -torch.min(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        d = torch.where(used, ref_logp - logp, 0.0)
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    return (per_token * weights).sum(), kl


def reference(model, dtype, keep_tower):
    """The frozen KL reference, from a fresh load of the SFT checkpoint: matmul weights in the run's dtype
    (autocast casts the policy's to it anyway), norms and embeddings as the policy holds them, so its
    forward equals the policy's at step 0. Without keep_tower it has none: both models then read the
    image features of the policy's frozen tower."""
    model.eval().requires_grad_(False)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and m.weight is not model.model.embed_tokens.weight:
            m.to(dtype)
    if not keep_tower:
        del model.visual
    return model


# completion positions whose (V,)-wide logits exist at once in the training forward: at Qwen's V = 151,936
# one fp32 copy of 2048 positions is 1.2 GB, where every logit of 64 rows of 512 tokens would be 20 GB
LOGIT_CHUNK = 2048


def completion_logprobs(
    model, seqs, attention_mask, n_prompt, grid_thw, feats, latents, is_latent, temperature=1.0, exits=()
):
    """One batched forward over prompt + completion -> (N, L) log-probs of the completion's decisions.

    The recorded latent vectors (detached) sit at the latent positions, exactly as the rollout fed
    them; logits are divided by the sampling temperature, as in the rollout. At a latent step the
    decision is "continue": log(1 - p(exits)) (only a `token`-exit rollout samples it). The head runs
    on LOGIT_CHUNK positions at a time, recomputed in backward, so the logits never exist whole."""
    prompt, comp = seqs[:, :n_prompt], seqs[:, n_prompt:]
    x = model.embed(prompt, grid_thw=grid_thw, feats=feats)  # (N, T, C) images only in the prompt,
    c = torch.where(is_latent[..., None], latents.detach().to(x.dtype), model.token_embeds(comp))  # (N, L, C)
    x = torch.cat([x, c], 1)
    pos = qwen.get_rope_index(prompt, grid_thw, attention_mask[:, :n_prompt], model.cfg.image_token_id)
    after = pos.amax(dim=(0, 2)) + 1  # completion positions count on like text, as in the rollout's cache
    text_pos = after[:, None] + torch.arange(comp.shape[1], device=seqs.device)  # (N, L)
    pos = torch.cat([pos, text_pos.expand(3, -1, -1)], 2)
    h = model(inputs_embeds=x, attention_mask=attention_mask, position_ids=pos)
    h = h[:, n_prompt - 1:-1]  # (N, L, C): position t predicts t + 1
    rows = max(1, LOGIT_CHUNK // max(1, comp.shape[1]))
    out = []
    for i in range(0, len(comp), rows):
        args = (
            model.lm_head,
            h[i : i + rows],
            comp[i : i + rows],
            is_latent[i : i + rows],
            temperature,
            list(exits),
        )
        out.append(torch.utils.checkpoint.checkpoint(decision_logprobs, *args, use_reentrant=False)
                   if torch.is_grad_enabled() else decision_logprobs(*args))
    return torch.cat(out)


def decision_logprobs(lm_head, h, comp, is_latent, temperature, exits):
    """(n, L, C) hidden states -> (n, L) log-probs of the decisions `comp` (continue at latent steps)."""
    lp = (lm_head(h).float() / (temperature or 1.0)).log_softmax(-1)
    tok_lp = lp.gather(-1, comp[..., None])[..., 0]
    return torch.where(is_latent, lvr.continue_logprob(lp, exits), tok_lp) if exits else tok_lp
