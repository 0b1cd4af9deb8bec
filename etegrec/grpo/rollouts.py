"""GRPO rollouts: G items per history from the current policy, scored for the update that follows.

The G items are drawn by constrained sampling at ``grpo_temperature`` or, with ``grpo_rollout: beam``, are the
policy's G best items by constrained beam search (distinct, the ones evaluation ranks first, so a group holds
the target as often as recall@G). A rollout batch holds everything the policy update needs and nothing it
would have to recompute: the items and code tuples, the trie children of every prefix, the frozen reference's
masked, tempered next-token distributions on those prefixes, the policy's own sequence log-probs under that
distribution (the update checks its teacher-forced ones against them), rewards and group advantages.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from etegrec.config import GRPOConfig
from etegrec.errors import ConfigError
from etegrec.grpo.algorithm import Rewards, compute_rewards, group_advantages, masked_log_softmax
from etegrec.rec.data import Batch
from etegrec.rec.generation import SequenceScorer, beam_search, sample, sequence_log_probs
from etegrec.rec.model import GenerativeRecommender
from etegrec.tokenizer.item_codes import ItemTrie


class Rollouts(NamedTuple):
    """One micro-batch of rollouts, flattened to N = B*G samples where noted."""

    history: Tensor  # (B, S) history codes, -1 = pad
    items: Tensor  # (B, G) item ids of the rollouts
    codes: Tensor  # (B, G, C) their code tuples
    allowed: Tensor  # (N, C, K) bool, trie children of each rollout prefix
    ref_log_probs: Tensor  # (N, C, K) frozen reference, masked and tempered
    sample_log_probs: Tensor  # (N,) the policy's sequence log-probs (masked, tempered) when it drew them
    advantages: Tensor  # (N,)
    informative: Tensor  # (N,) bool, the sample's group has unequal rewards
    rewards: Rewards  # each (B, G)
    group_informative: Tensor  # (B,) bool


def check_group_size(cfg: GRPOConfig, trie: ItemTrie) -> None:
    """Beam rollouts are G distinct items: the catalogue must hold at least ``grpo_group_size`` of them."""
    if cfg.grpo_rollout == "beam" and cfg.grpo_group_size > trie.n_items:
        raise ConfigError(f"grpo_group_size={cfg.grpo_group_size} exceeds the catalogue ({trie.n_items} items): beam "
                          "rollouts are distinct items; lower grpo_group_size", "grpo_group_size")


@torch.no_grad()
def collect_rollouts(
    policy: GenerativeRecommender,
    reference: SequenceScorer,
    trie: ItemTrie,
    batch: Batch,
    cfg: GRPOConfig,
    item_vectors: Tensor | None,
) -> Rollouts:
    """Draw G items per history with the current policy (eval mode) and score them (rewards, reference).

    Args:
        batch: histories with their held-out next item (``target`` (B,) ids, ``target_codes`` (B, C)).
        item_vectors: (N_items + 1, d) indexed by item id, for the cosine reward; else None.
    """
    g = cfg.grpo_group_size
    history = batch.history_codes  # (B, S)
    if cfg.grpo_rollout == "beam":
        check_group_size(cfg, trie)
        top = beam_search(policy, trie, history, num_beams=g, top_k=g)  # items (B, G), best first
        items, codes = top.items, top.codes
        # the beam's ranking score is not the renormalised, tempered distribution the update scores: rescore
        drawn_log_probs = sequence_log_probs(policy, trie, history, codes, cfg.grpo_temperature)  # (B, G)
    else:
        out = sample(policy, trie, history, num_samples=g, temperature=cfg.grpo_temperature)  # items (B, G)
        items, codes, drawn_log_probs = out.items, out.codes, out.log_probs
    flat = codes.reshape(-1, codes.shape[-1])  # (N, C)
    allowed = trie.allowed_tokens(flat)  # (N, C, K)
    ref_log_probs = masked_log_softmax(reference(history, codes), allowed, cfg.grpo_temperature)  # (N, C, K)
    rewards = compute_rewards(
        items,
        codes,
        batch.target,
        batch.target_codes,
        alpha=cfg.grpo_reward_alpha,
        reward_type=cfg.grpo_reward_type,
        item_vectors=item_vectors,
    )
    adv = group_advantages(rewards.reward)
    return Rollouts(
        history=history,
        items=items,
        codes=codes,
        allowed=allowed,
        ref_log_probs=ref_log_probs,
        sample_log_probs=drawn_log_probs.reshape(-1),
        advantages=adv.advantages.reshape(-1),
        informative=adv.informative.repeat_interleave(g),
        rewards=rewards,
        group_informative=adv.informative,
    )


def rollout_stats(ro: Rollouts) -> dict[str, float]:
    """Rollout-side statistics of one micro-batch (means over samples or groups)."""
    adv = ro.advantages.view(ro.codes.shape[:2])  # (B, G)
    informative = ro.group_informative
    spread = (adv.amax(-1) - adv.amin(-1))[informative]  # (B_informative,)
    return {
        "reward": ro.rewards.reward.mean().item(),
        "hit_rate": ro.rewards.hit.mean().item(),
        "graded": ro.rewards.graded.mean().item(),
        "zero_var_share": 1.0 - informative.float().mean().item(),
        "adv_abs": ro.advantages.abs().mean().item(),
        "adv_range": spread.mean().item() if spread.numel() else 0.0,
    }
