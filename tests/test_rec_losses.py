"""Joint-training losses on small hand-computed examples (etegrec/rec/losses.py)."""

from __future__ import annotations

import math

import pytest
import torch

from etegrec.rec.losses import code_entropy, first_occurrence, psa_loss, rec_loss, sia_loss, sq_loss
from etegrec.tokenizer.quantizer import ResidualQuantizer, code_log_probs, nearest_code_gap


def test_rec_loss_is_mean_token_cross_entropy() -> None:
    # Position 0: logits [0, ln 3], target 1 -> p = 3/4 -> -ln(3/4). Position 1: logits [0, 0], target 0 -> ln 2.
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # (B=1, C=2, K=2)
    target = torch.tensor([[1, 0]])
    expected = (math.log(4 / 3) + math.log(2)) / 2
    assert rec_loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_sq_loss_adds_weighted_quantisation_loss() -> None:
    assert sq_loss(torch.tensor(0.5), torch.tensor(0.25), alpha=2.0).item() == pytest.approx(0.5 + 2 * 0.25)


def test_code_distribution_puts_most_mass_on_the_nearest_code() -> None:
    # Paper Eq. 6: P(k) = softmax(-d)_k. d = [0, ln 3] -> [1, 1/3] / (4/3) = [3/4, 1/4] (the reference's +d flips it).
    probs = code_log_probs(torch.tensor([0.0, math.log(3.0)])).exp()
    assert probs.tolist() == pytest.approx([0.75, 0.25], rel=1e-6)


def test_sia_is_symmetric_kl_averaged_over_items_and_levels() -> None:
    # Level 1: p = [3/4, 1/4] (d = [0, ln 3]), q = [1/2, 1/2] (d = [0, 0]).
    # KL(p||q) + KL(q||p) = sum (p - q)(ln p - ln q) = 1/4 ln(3/2) + (-1/4) ln(1/2) = 1/4 ln 3.
    # Level 2: identical distributions -> 0. Mean over the 2 levels: ln(3) / 8.
    target_d = torch.tensor([[[0.0, math.log(3.0)], [1.0, 2.0]]])  # (M=1, L=2, K=2)
    seq_d = torch.tensor([[[0.0, 0.0], [1.0, 2.0]]])
    got = sia_loss(code_log_probs(target_d), code_log_probs(seq_d))
    assert got.item() == pytest.approx(math.log(3.0) / 8, rel=1e-6)
    # Symmetric, and zero when the distance profiles differ by a constant (same distribution).
    assert sia_loss(code_log_probs(seq_d), code_log_probs(target_d)).item() == pytest.approx(got.item(), rel=1e-6)
    assert sia_loss(code_log_probs(target_d), code_log_probs(target_d + 5.0)).item() == pytest.approx(0.0, abs=1e-6)


def test_sia_gradient_pulls_the_sequence_towards_the_target_code() -> None:
    target_d = torch.tensor([[[0.0, 4.0]]])  # target item nearest to code 0
    seq_d = torch.tensor([[[2.0, 2.0]]], requires_grad=True)
    sia_loss(code_log_probs(target_d), code_log_probs(seq_d)).backward()
    # Descending the gradient lowers the distance to code 0 and raises it to code 1.
    assert seq_d.grad[0, 0, 0] > 0 > seq_d.grad[0, 0, 1]


def test_psa_is_two_way_infonce_on_cosine_similarities() -> None:
    # Cosine ignores norms: sim = I / tau. Each row: -log(e^{1/tau} / (e^{1/tau} + e^0)) = log(1 + e^{-1/tau}).
    # Mean over the 2 rows, then both directions summed: 2 log(1 + e^{-1/tau}).
    pref = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    recon = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    assert psa_loss(pref, recon, tau=1.0).item() == pytest.approx(2 * math.log(1 + math.exp(-1.0)), rel=1e-6)
    assert psa_loss(pref, recon, tau=0.5).item() == pytest.approx(2 * math.log(1 + math.exp(-2.0)), rel=1e-6)


def test_psa_directions_differ_for_an_asymmetric_similarity() -> None:
    # s = 1/sqrt(2); sim = [[s, s], [0, 1]] (tau = 1).
    # pref -> recon (rows): row0 = [s, s], label 0 -> ln 2; row1 = [0, 1], label 1 -> log(1 + e^{-1}); mean a.
    # recon -> pref (columns): col0 = [s, 0] -> log(e^s + 1) - s; col1 = [s, 1] -> log(e^s + e) - 1; mean b.
    s = 1 / math.sqrt(2)
    pref = torch.tensor([[s, s], [0.0, 1.0]])
    recon = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # sim[0] = [s, s], sim[1] = [0, 1]
    a = (math.log(math.exp(s) + math.exp(s)) - s + math.log(1 + math.exp(-1.0))) / 2
    b = (math.log(math.exp(s) + 1) - s + math.log(math.exp(s) + math.exp(1.0)) - 1.0) / 2
    assert psa_loss(pref, recon, tau=1.0).item() == pytest.approx(a + b, rel=1e-6)


def test_first_occurrence_matches_numpy_unique() -> None:
    ids = torch.tensor([5, 3, 5, 7, 3])
    # distinct values sorted: 3 (first at 1), 5 (at 0), 7 (at 3)
    assert first_occurrence(ids).tolist() == [1, 0, 3]
    assert first_occurrence(torch.tensor([4])).tolist() == [0]


def test_code_entropy_of_uniform_and_one_hot_levels() -> None:
    uniform = torch.full((2, 1, 4), 0.25).log()  # (M, L, K)
    peaked = torch.log_softmax(torch.tensor([[[0.0, -1e4, -1e4, -1e4]]]).expand(2, 1, 4), dim=-1)
    torch.testing.assert_close(code_entropy(torch.cat([uniform, peaked], dim=1)), torch.tensor([math.log(4), 0.0]))


def test_sia_at_the_auto_temperature_tells_a_matching_sequence_from_another() -> None:
    # An L2-normalised-scale latent space (norm 0.5) as the dual tokenizer input gives: codebooks from k-means.
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(1024, 16), dim=1) * 0.5  # (N, e) item latents
    quantizer = ResidualQuantizer(num_emb_list=[32, 32, 32], e_dim=16)
    quantizer.init_kmeans(z, iters=20, seed=0)
    with torch.no_grad():
        target = quantizer(z).distances  # (N, L, K)
        matching = quantizer(z + 0.02 * torch.randn_like(z)).distances  # sequence states near their targets
        other = quantizer(z[torch.randperm(len(z))]).distances  # sequence states of other items
    tau = nearest_code_gap(target)  # (L,) the default sia_tau=auto
    assert bool((tau < 0.1).all())  # distances here are far below 1, so tau = 1 flattens the distributions

    def sia(seq: torch.Tensor, t: torch.Tensor | float) -> float:
        return float(sia_loss(code_log_probs(target, t), code_log_probs(seq, t)))

    assert sia(other, tau) > 1.0 and sia(matching, tau) < 0.1 * sia(other, tau)
    # at the paper's temperature 1 the same two sequences differ by less than 0.01 nats: SIA carries no signal
    assert sia(other, 1.0) - sia(matching, 1.0) < 0.01
