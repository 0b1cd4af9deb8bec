"""GRPO: hand-computed maths (tier a), rollouts through the constrained decoder (tier b), a tiny run (tier c)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from etegrec.grpo.algorithm import (
    compute_rewards,
    gather_tokens,
    group_advantages,
    grpo_loss,
    masked_log_softmax,
    shared_prefix_length,
    token_kl,
)


# ----------------------------------------------------------------------------- tier (a): pure maths
def test_group_advantages_hand_example():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    out = group_advantages(rewards)
    # row 0: mean 0.25, deviations (.75, -.25, -.25, -.25), unbiased var = .75 / 3 = .25, std .5
    # row 1: mean 1, deviations +-1, unbiased var = 4 / 3, std 1.154700538
    s = 1 / math.sqrt(4 / 3)
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [s, -s, s, -s], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(out.advantages, expected, atol=1e-6)
    assert out.informative.tolist() == [True, True, False]


def test_zero_variance_group_gives_zero_advantage_and_no_nan():
    rewards = torch.tensor([[0.0, 0.0], [1.5, 1.5], [0.3, 0.3 + 1e-9]])
    out = group_advantages(rewards)
    assert torch.equal(out.advantages, torch.zeros_like(rewards))
    assert not out.informative.any()
    # the loss of an all-degenerate batch is exactly 0 with zero, finite gradients
    logits = torch.randn(6, 4, 5, requires_grad=True)
    codes = torch.randint(0, 5, (6, 4))
    lp_all = masked_log_softmax(logits, None, 1.0)
    lp = gather_tokens(lp_all, codes)
    kl = token_kl(lp_all, masked_log_softmax(torch.randn(6, 4, 5), None, 1.0))
    res = grpo_loss(
        lp, lp.detach() - 0.3, out.advantages.reshape(-1), kl, out.informative.repeat_interleave(2),
        clip_range=0.2, kl_coeff=0.1,
    )
    res.loss.backward()
    assert res.loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and torch.count_nonzero(logits.grad) == 0
    assert res.clip_fraction.item() == 0.0 and math.isfinite(res.policy.item())


def test_rewards_prefix_and_cosine_by_hand():
    target_codes = torch.tensor([[3, 1, 4, 1]])  # (B=1, C=4)
    sampled_codes = torch.tensor([[[3, 1, 4, 1], [3, 1, 5, 9], [2, 1, 4, 1], [3, 9, 4, 1]]])  # (1, 4, 4)
    assert shared_prefix_length(sampled_codes, target_codes).tolist() == [[4, 2, 0, 1]]
    items = torch.tensor([[7, 2, 3, 4]])
    target = torch.tensor([7])
    r = compute_rewards(items, sampled_codes, target, target_codes, alpha=0.5, reward_type="prefix")
    # hit + 0.5 * prefix / 4
    assert torch.allclose(r.reward, torch.tensor([[1.5, 0.25, 0.0, 0.125]]))
    assert r.hit.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    vectors = torch.zeros(8, 2)
    vectors[7] = torch.tensor([2.0, 0.0])
    vectors[2] = torch.tensor([1.0, 1.0])  # cos 45 deg
    vectors[3] = torch.tensor([0.0, 3.0])  # cos 90 deg
    vectors[4] = torch.tensor([-1.0, 0.0])  # cos 180 deg
    r = compute_rewards(items, sampled_codes, target, target_codes, alpha=0.5, reward_type="cosine", item_vectors=vectors)
    assert torch.allclose(r.reward, torch.tensor([[1.5, 0.5 / math.sqrt(2), 0.0, -0.5]]), atol=1e-6)
    r = compute_rewards(items, sampled_codes, target, target_codes, alpha=0.5, reward_type="none")
    assert r.reward.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="prefix, cosine, none"):
        compute_rewards(items, sampled_codes, target, target_codes, alpha=0.5, reward_type="ndcg")


def test_clipped_objective_hand_example():
    old = torch.log(torch.tensor([[0.2, 0.4], [0.5, 0.3], [0.1, 0.1]]))
    ratio = torch.tensor([[1.5, 0.9], [0.5, 1.1], [3.0, 3.0]])
    log_probs = (old + torch.log(ratio)).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.0])
    kl = torch.tensor([[0.1, 0.3], [0.2, 0.0], [5.0, 5.0]])
    informative = torch.tensor([True, True, False])
    res = grpo_loss(log_probs, old, adv, kl, informative, clip_range=0.2, kl_coeff=0.5)
    # sample 0 (A=+1): min(1.5, 1.2) = 1.2 (clipped), min(.9, .9) = .9 -> (-1.2+.05 - .9+.15)/2 = -0.95
    # sample 1 (A=-2): min(-1, -1.6) = -1.6 (clipped), -2.2 -> (1.6+.1 + 2.2+0)/2 = 1.95
    # sample 2 is in a zero-variance group: left out; loss = (-0.95 + 1.95) / 3 samples
    assert res.loss.item() == pytest.approx(1 / 3, abs=1e-6)
    assert res.policy.item() == pytest.approx(-(1.2 + 0.9 - 1.6 - 2.2) / 4, abs=1e-6)
    assert res.clip_fraction.item() == pytest.approx(0.5)
    assert res.ratio.item() == pytest.approx(1.0, abs=1e-6)
    assert res.kl.item() == pytest.approx(10.6 / 6, abs=1e-6)
    res.loss.backward()
    # d/dlogp of -rho*A/(2*3) where unclipped, 0 where the clip is active or the group is degenerate
    expected = torch.tensor([[0.0, -0.9 / 6], [0.0, 2.2 / 6], [0.0, 0.0]])
    assert torch.allclose(log_probs.grad, expected, atol=1e-6)


def test_masked_log_softmax_and_exact_kl_by_hand():
    lp = masked_log_softmax(torch.tensor([2.0, 0.0, 100.0]), torch.tensor([True, True, False]), temperature=2.0)
    z = math.log(math.e + 1)
    assert torch.allclose(lp, torch.tensor([1 - z, -z, -math.inf]))
    allowed = torch.tensor([[[True, True, False]]])  # (N=1, C=1, K=3)
    policy_logits = torch.log(torch.tensor([[[0.5, 0.5, 0.9]]])).requires_grad_(True)
    ref_logits = torch.log(torch.tensor([[[0.25, 0.75, 0.9]]]))
    kl = token_kl(masked_log_softmax(policy_logits, allowed, 1.0), masked_log_softmax(ref_logits, allowed, 1.0))
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    assert kl.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    kl.sum().backward()
    assert torch.isfinite(policy_logits.grad).all() and policy_logits.grad[0, 0, 2] == 0
    same = masked_log_softmax(ref_logits, allowed, 1.0)
    assert token_kl(same, same).abs().max() < 1e-7


# ----------------------------------------------------------------------------- tier (b): rollouts
def _tiny_model_and_trie(seed: int = 0):
    from etegrec.config import ModelConfig
    from etegrec.rec.generation import ItemTrie
    from etegrec.rec.model import GenerativeRecommender

    torch.manual_seed(seed)
    cfg = ModelConfig(encoder_layers=1, decoder_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8, code_num=6,
                      code_length=3)
    model = GenerativeRecommender(cfg=cfg, semantic_dim=4, latent_dim=4).eval()
    # 20 distinct items over a 6 x 6 x 6 code space
    flat = torch.randperm(6**3, generator=torch.Generator().manual_seed(seed))[:20]
    item_codes = torch.stack([flat // 36, (flat // 6) % 6, flat % 6], dim=1)  # (20, 3)
    return model, ItemTrie(item_codes=item_codes, code_num=6)


def test_rollouts_are_valid_items_with_consistent_log_probs():
    from etegrec.config import GRPOConfig
    from etegrec.grpo.trainer import GroupScorer, collect_rollouts

    model, trie = _tiny_model_and_trie()
    history = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, -1, 5, 0, 2]])  # (B=2, S=2*C), -1 = pad
    target = torch.tensor([3, 11])
    cfg = GRPOConfig(grpo_group_size=8, grpo_temperature=1.5)
    ro = collect_rollouts(model, GroupScorer(model=copy.deepcopy(model)), trie, history, target, cfg, None)
    items = trie.lookup(ro.codes)  # (B, G)
    assert (items >= 1).all() and (items <= trie.n_items).all()
    assert torch.equal(items, ro.items)  # the codes decode to the reported items
    assert torch.equal(ro.rewards.hit, (items == target[:, None]).float())
    # every sampled token is allowed by the trie, and the reference (a copy) equals the sampler's distribution
    tok = ro.codes.reshape(-1, 3)
    assert ro.allowed.gather(-1, tok.unsqueeze(-1)).all()
    ref_seq = gather_tokens(ro.ref_log_probs, tok).sum(-1)
    assert torch.allclose(ref_seq, ro.sample_log_probs, atol=1e-4)
    assert torch.isfinite(ro.advantages).all()
