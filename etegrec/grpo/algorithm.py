"""GRPO maths for a generative recommender: rewards, group-relative advantages, clipped objective, KL.

Variant: GRPO with outcome rewards (Shao et al. 2024, DeepSeekMath §4.1, "outcome supervision"), one
"completion" = the code tuple of one item (``code_length`` tokens), a group = ``G`` items sampled for one user
history. Every function here is pure: shaped tensors in, shaped tensors out; the trainer does the I/O.

Choices, and where they depart from the GRPO paper, from TRL's ``GRPOTrainer`` and from the reference code:

* **Reward** = ``hit + alpha * graded`` with ``hit`` = 1 when the sampled item is the target. The graded term
  (``grpo_reward_type``) is by default the **shared item-code prefix length / code_length** of the sampled
  item and the target (1 for the target itself, so a hit scores ``1 + alpha`` as in the reference). Why not the
  reference's cosine of the frozen tokenizer inputs: (1) the item codes are the similarity the decoder really
  works in -- ETEGRec trained the tokenizer and the recommender to agree on them (SIA/PSA), and each shared
  leading token is one decoding step done right, so the reward gives credit per step; (2) it needs nothing but
  the checkpoint's code table (no embedding files); (3) with hits rare at small G, a graded term that is
  usually non-zero for some samples leaves fewer groups with all-equal rewards, i.e. more groups that teach.
  ``cosine`` (the reference's choice, on the tokenizer input vectors) and ``none`` (hit only) are available.
  Invalid items cannot occur (constrained sampling), so the reference's ``-0.1`` out-of-vocabulary penalty
  has no counterpart. Rewards are computed with tensor ops (the reference loops over samples in Python).
* **Advantages**: ``(r - mean_G) / std_G`` with the unbiased std, as TRL (the paper does not say which std).
  Groups whose rewards are all equal (``max - min <= 1e-6``) get advantage exactly 0 -- no division by a zero
  std, no NaN -- and are left out of the loss altogether, including the KL term (TRL keeps their KL term;
  DAPO drops such groups): they carry no learning signal, so they move no weight. The loss is still divided by
  the full number of samples, so its scale does not jump when few groups are informative.
* **Ratio against the old policy**: ``exp(log pi_theta - log pi_old)`` per token, with ``pi_old`` the policy
  that generated the rollouts (its per-token log-probs are kept from before the first update on them, and
  checked against the sampler's sequence log-probs); the reference uses the frozen SFT model here, which
  makes the "ratio" a KL surrogate and ``!= 1`` from the first step. With
  ``grpo_num_iterations = 1`` (TRL's default) the ratio is 1 at the gradient step and the clip is inactive; it
  acts when several updates reuse one batch of rollouts (the paper's mu).
* **Token-level objective**: per-token clipped surrogate ``-min(rho A, clip(rho, 1 +- eps) A)``, averaged over
  the ``code_length`` tokens and the samples. All completions have the same length, so the paper's
  ``1/|o|`` length normalisation, TRL's token-level sum and Dr. GRPO's fixed constant coincide here.
* **Constrained distributions**: sampling follows the same prefix trie as evaluation, so the policy that
  generated a rollout is the *renormalised* distribution over allowed next tokens. All log-probs (policy, old,
  reference, KL) are taken from that masked distribution at ``grpo_temperature`` (TRL also scores with the
  sampling temperature); the reference scores unconstrained, at temperature 1, with a top-k that sampling used.
* **KL penalty**: the **exact** token-level KL ``KL(pi_theta(.|prefix) || pi_ref(.|prefix))`` summed over the
  (at most ``code_num``) allowed tokens at every position of the sampled prefix, averaged over positions --
  cheap with 256-way heads, zero-variance given the prefix, and with the correct gradient. The paper and TRL
  use the per-sample k3 estimator ``exp(q - p) - (q - p) - 1``; the reference uses k1 ``log pi - log pi_ref``
  (can go negative). The penalty is added to the loss (as in the paper), not folded into the reward.
* Dropout stays off during GRPO, in rollouts and in the gradient forward, so the stored old log-probs and the
  current ones describe the same function (the reference samples with dropout on and scores the reference
  with it off). Set in the trainer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from etegrec.config import GRPO_REWARD_TYPES

# Rewards within this distance count as equal (float noise in cosine rewards).
EQUAL_REWARD_TOL = 1e-6


class Rewards(NamedTuple):
    """Per-sample reward parts, each (B, G)."""

    reward: Tensor  # hit + alpha * graded
    hit: Tensor  # 1.0 where the sampled item is the target
    graded: Tensor  # similarity of the sampled item to the target, in [0, 1] (cosine: [-1, 1])


class Advantages(NamedTuple):
    """Group-relative advantages."""

    advantages: Tensor  # (B, G), 0 in zero-variance groups
    informative: Tensor  # (B,) bool: the group's rewards are not all equal


class GRPOLoss(NamedTuple):
    """The loss and its parts (all scalars; only ``loss`` carries gradient)."""

    loss: Tensor  # mean over samples of informative-group (policy + kl_coeff * kl)
    policy: Tensor  # mean clipped surrogate over informative samples (detached)
    kl: Tensor  # mean token KL to the reference over all samples (detached)
    clip_fraction: Tensor  # share of informative tokens whose gradient the clip removed (detached)
    ratio: Tensor  # mean policy ratio over informative tokens, 1 when there are none (detached)


def shared_prefix_length(sampled_codes: Tensor, target_codes: Tensor) -> Tensor:
    """Number of leading code tokens a sampled item shares with the target.

    Args:
        sampled_codes: (B, G, C) long.
        target_codes: (B, C) long.

    Returns:
        (B, G) long in [0, C]; C means the same code tuple, i.e. the same item.
    """
    equal = sampled_codes == target_codes.unsqueeze(1)  # (B, G, C)
    return equal.long().cumprod(dim=-1).sum(dim=-1)  # (B, G)


def cosine_similarity(sampled_items: Tensor, target_items: Tensor, item_vectors: Tensor) -> Tensor:
    """Cosine of item vectors.

    Args:
        sampled_items: (B, G) item ids in 1..N.
        target_items: (B,) item ids in 1..N.
        item_vectors: (N + 1, d), row i = item id i (row 0 unused).

    Returns:
        (B, G) cosine similarities.
    """
    unit = torch.nn.functional.normalize(item_vectors, dim=-1)  # (N + 1, d)
    return (unit[sampled_items] * unit[target_items].unsqueeze(1)).sum(dim=-1)  # (B, G)


def compute_rewards(
    sampled_items: Tensor,
    sampled_codes: Tensor,
    target_items: Tensor,
    target_codes: Tensor,
    *,
    alpha: float,
    reward_type: str,
    item_vectors: Tensor | None = None,
) -> Rewards:
    """Reward of every rollout: ``hit + alpha * graded`` (see the module docstring for the graded term).

    Args:
        sampled_items: (B, G) item ids of the rollouts.
        sampled_codes: (B, G, C) their code tuples.
        target_items: (B,) the held-out next item.
        target_codes: (B, C) its code tuple.
        alpha: weight of the graded term (``grpo_reward_alpha``).
        reward_type: ``prefix`` | ``cosine`` | ``none``.
        item_vectors: (N + 1, d), needed for ``cosine``.
    """
    hit = (sampled_items == target_items.unsqueeze(1)).float()  # (B, G)
    if reward_type == "prefix":
        graded = shared_prefix_length(sampled_codes, target_codes).float() / sampled_codes.shape[-1]
    elif reward_type == "cosine":
        if item_vectors is None:
            raise ValueError("grpo_reward_type=cosine needs the item vectors (tokenizer input); pass item_vectors")
        graded = cosine_similarity(sampled_items, target_items, item_vectors).float()
    elif reward_type == "none":
        graded = torch.zeros_like(hit)
    else:
        raise ValueError(f"grpo_reward_type={reward_type!r}; use one of: {', '.join(GRPO_REWARD_TYPES)}")
    return Rewards(reward=hit + alpha * graded, hit=hit, graded=graded)


def group_advantages(rewards: Tensor) -> Advantages:
    """Group-relative advantages ``(r - mean) / std`` (unbiased std); all-equal groups get exactly 0.

    Args:
        rewards: (B, G) float, one row per group.
    """
    if rewards.shape[-1] < 2:
        raise ValueError("group-relative advantages need at least 2 samples per group (grpo_group_size >= 2)")
    informative = (rewards.amax(dim=-1) - rewards.amin(dim=-1)) > EQUAL_REWARD_TOL  # (B,)
    centred = rewards - rewards.mean(dim=-1, keepdim=True)  # (B, G)
    std = rewards.std(dim=-1, keepdim=True)  # (B, 1), unbiased
    # clamp only guards the division; zero-variance rows are replaced by 0 below, so no NaN reaches the loss
    adv = torch.where(informative.unsqueeze(-1), centred / std.clamp_min(1e-8), torch.zeros_like(rewards))
    return Advantages(advantages=adv, informative=informative)


def masked_log_softmax(logits: Tensor, allowed: Tensor | None, temperature: float) -> Tensor:
    """Log-probabilities of the next token at ``temperature``, renormalised over allowed tokens.

    Args:
        logits: (..., K).
        allowed: (..., K) bool, or None for the unconstrained distribution.
        temperature: > 0.

    Returns:
        (..., K); disallowed tokens get -inf.
    """
    scaled = logits / temperature
    if allowed is not None:
        scaled = scaled.masked_fill(~allowed, float("-inf"))
    return torch.log_softmax(scaled, dim=-1)


def gather_tokens(log_probs: Tensor, codes: Tensor) -> Tensor:
    """Pick the log-probability of each chosen token: (N, C, K), (N, C) -> (N, C)."""
    return log_probs.gather(-1, codes.unsqueeze(-1)).squeeze(-1)


def token_kl(policy_log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Exact KL(policy || reference) of each next-token distribution.

    Args:
        policy_log_probs: (N, C, K) log-probs of the trained policy (-inf = disallowed token).
        ref_log_probs: (N, C, K) log-probs of the frozen reference on the same prefixes and mask.

    Returns:
        (N, C) KL per position, >= 0.
    """
    support = torch.isfinite(policy_log_probs)  # (N, C, K); same mask for both models
    # zero the -inf entries before subtracting so neither the value nor the gradient sees inf - inf
    logp = policy_log_probs.masked_fill(~support, 0.0)
    logq = ref_log_probs.masked_fill(~support, 0.0)
    p = torch.exp(policy_log_probs)  # exactly 0 off the support
    return (p * (logp - logq)).sum(dim=-1)  # (N, C)


def grpo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    advantages: Tensor,
    kl: Tensor,
    informative: Tensor,
    *,
    clip_range: float,
    kl_coeff: float,
) -> GRPOLoss:
    """Clipped GRPO objective with a KL penalty, for one micro-batch of flattened groups.

    Args:
        log_probs: (N, C) current log-prob of each sampled token (with gradient).
        old_log_probs: (N, C) log-probs of the same tokens under the policy that sampled them.
        advantages: (N,) one advantage per sample (shared by its tokens).
        kl: (N, C) token KL to the reference (with gradient), from ``token_kl``.
        informative: (N,) bool, the sample's group has non-equal rewards; others do not enter the loss.
        clip_range: epsilon of the ratio clip.
        kl_coeff: beta, weight of the KL penalty.

    Returns:
        GRPOLoss; ``loss`` = sum over informative samples of mean-over-tokens (surrogate + beta * kl), / N.
    """
    n = log_probs.shape[0]
    ratio = torch.exp(log_probs - old_log_probs.detach())  # (N, C)
    adv = advantages.detach().unsqueeze(-1)  # (N, 1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * adv)  # (N, C)
    per_sample = (-surrogate + kl_coeff * kl).mean(dim=-1)  # (N,)
    weight = informative.to(per_sample.dtype)  # (N,)
    loss = (per_sample * weight).sum() / max(n, 1)

    with torch.no_grad():
        clipped = ((ratio > 1.0 + clip_range) & (adv > 0)) | ((ratio < 1.0 - clip_range) & (adv < 0))  # (N, C)
        tokens = weight.sum() * log_probs.shape[-1]
        denom = tokens.clamp_min(1.0)
        tok_w = weight.unsqueeze(-1)  # (N, 1)
        policy = -(surrogate * tok_w).sum() / denom
        clip_fraction = (clipped.float() * tok_w).sum() / denom
        # no informative token: report the neutral ratio 1 rather than an empty mean
        mean_ratio = (ratio * tok_w).sum() / denom if tokens > 0 else torch.ones_like(denom)
        mean_kl = kl.mean() if kl.numel() else kl.sum()
    return GRPOLoss(loss=loss, policy=policy, kl=mean_kl, clip_fraction=clip_fraction, ratio=mean_ratio)
