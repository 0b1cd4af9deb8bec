"""Loss terms of joint training as pure functions of tensors and floats (paper §3.3).

* ``rec_loss``: L_REC, cross-entropy of the target code tokens.
* ``sq_loss``: L_SQ, the tokenizer's reconstruction + ``alpha`` x residual-quantisation loss.
* ``sia_loss``: L_SIA, symmetric KL between the code distributions of the target item and of the sequence.
* ``psa_loss``: L_PSA, two-way InfoNCE between h_D and the reconstruction z~ with in-batch negatives.
* ``code_entropy``: mean entropy per level of code distributions (how peaked SIA's distributions are).
* ``first_occurrence``: rows holding the first occurrence of each distinct target (SIA/PSA/L_SQ use one row per
  distinct item so a repeated target is neither counted twice nor its own negative).

Deviations from the reference code:
* SIA uses the paper's distributions ``softmax(-distance)`` (Eq. 6); the reference applies softmax to
  ``+distance``, which puts most mass on the farthest codes. The caller passes ``code_log_probs(distances)``
  from the tokenizer.
* SIA is averaged over distinct items and levels as in the reference, i.e. the paper's Eq. 15 (sum over levels)
  divided by the number of levels, so the configured weights keep the reference's meaning.
* PSA's temperature is a parameter (config ``psa_tau``, default 0.07 = the reference's hard-coded value).
* De-duplication uses ``torch.unique`` on the device instead of ``np.unique`` on the CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rec_loss(logits: Tensor, target_codes: Tensor) -> Tensor:
    """L_REC: mean cross-entropy over all target tokens, every level weighted equally.

    Args:
        logits: (B, C, K) scores of level j at position j.
        target_codes: (B, C) long.
    """
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target_codes.reshape(-1))


def sq_loss(loss_recon: Tensor, loss_rq: Tensor, alpha: float) -> Tensor:
    """L_SQ = reconstruction MSE + alpha * (codebook + beta * commitment) loss."""
    return loss_recon + alpha * loss_rq


def sia_loss(target_log_probs: Tensor, seq_log_probs: Tensor) -> Tensor:
    """L_SIA: symmetric KL between per-level code distributions, mean over items and levels.

    ``KL(p||q) + KL(q||p) = sum_k (p_k - q_k) (log p_k - log q_k)``.

    Args:
        target_log_probs: (M, L, K) log-probabilities of the target items' codes (log p).
        seq_log_probs: (M, L, K) log-probabilities of the sequences' codes (log q).
    Returns:
        scalar.
    """
    diff = target_log_probs.exp() - seq_log_probs.exp()  # (M, L, K)
    return (diff * (target_log_probs - seq_log_probs)).sum(-1).mean()


def code_entropy(log_probs: Tensor) -> Tensor:
    """Mean entropy (nats) of each level's code distribution: (M, L, K) log-probabilities -> (L,)."""
    return -(log_probs.exp() * log_probs).sum(-1).mean(0)


def psa_loss(pref: Tensor, recon: Tensor, tau: float) -> Tensor:
    """L_PSA: InfoNCE in both directions on cosine similarities / tau, in-batch negatives, summed.

    Row i of ``pref`` (h_D of sequence i) is positive with row i of ``recon`` (z~ of its target) and negative
    with every other row.

    Args:
        pref: (M, D) decoder-side latents h_D.
        recon: (M, D) tokenizer reconstructions z~ of the targets.
        tau: temperature (> 0).
    """
    sim = F.normalize(pref, dim=-1) @ F.normalize(recon, dim=-1).t() / tau  # (M, M)
    labels = torch.arange(sim.shape[0], device=sim.device)
    return F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)


def first_occurrence(ids: Tensor) -> Tensor:
    """Indices of the first occurrence of each distinct value, ordered by value (like ``np.unique``).

    Args:
        ids: (B,) integer tensor.
    Returns:
        (M,) long indices into ``ids``, M = number of distinct values.
    """
    uniq, inverse = torch.unique(ids, return_inverse=True)  # (M,), (B,)
    positions = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((uniq.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")
