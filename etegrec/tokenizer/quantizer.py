"""Residual vector quantizer of the RQ-VAE item tokenizer (ETEGRec paper Sec. 3.1, TIGER's RQ-VAE).

Level ``l`` holds a codebook ``E_l`` of ``K_l`` vectors. Starting from ``v_1 = z`` (the encoder output), each
level picks ``c_l = argmin_k ||v_l - e_k||^2`` and passes on the residual ``v_{l+1} = v_l - e_{c_l}``. The
quantised vector is ``sum_l e_{c_l}``; gradients reach ``z`` through the straight-through estimator
``z + sg(sum_l e_{c_l} - z)``. Per level the loss is ``MSE(e_c, sg(v)) + beta * MSE(sg(e_c), v)``, averaged
over levels.

Sinkhorn-Knopp balanced assignment (``sk_epsilons``, ``balanced_codes``): at a level whose epsilon is > 0,
vectors that share the codes of the previous levels form a group (level 1: the whole batch). A group whose
nearest codes overfill some code (more than ``ceil(g / K)`` of its ``g`` vectors) is re-assigned from the
entropic optimal-transport plan between its vectors (uniform mass) and the codes (uniform capacity), with cost
"squared distance, min-max scaled to [-1, 1]", rounded so that no code exceeds its capacity. At level 1 this
balances code usage; at the last level a group of <= K vectors gets distinct codes, i.e. no collisions.

Deviations from the reference code (spec Sec. 4.2 / 11.1):
* The residual keeps its gradient towards the encoder: ``v_{l+1} = v_l - sg(e_{c_l})``. The reference builds
  ``v_{l+1}`` from the straight-through output, which carries no gradient, so the commitment term (and, in joint
  training, the sequence-item alignment) of levels >= 2 never reached the encoder. Here every level's
  commitment pulls the encoder towards its partial reconstruction, as in Lee et al. 2022 (RQ-VAE). Codebook
  ``l`` is still trained only by its own codebook term (``sg`` on ``e_{c_l}`` inside the residual).
* Sinkhorn (reference: ORIG ``models/vq.py``; the FORK ignored the flag) differs in three ways: (1) the plan is
  rounded with capacities instead of a row-wise argmax, which gives near-identical vectors the same code and so
  cannot separate near-duplicates; (2) below level 1 it balances inside prefix groups, not over the whole
  batch, because a collision is a clash inside a prefix group; (3) it runs in the log domain (no
  under/overflow at epsilon 0.003) and only where the caller passes ``sk_epsilons`` (training, or an explicit
  code assignment); the reference switched it on by ``self.training``.
* k-means initialisation uses faiss over the whole item set, level by level on the residuals, seeded
  (reference: scikit-learn on the first training batch only).
* Only the squared-L2 distance is implemented (the reference's ``dot``/``cos`` options were never used).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger("etegrec.tokenizer")


class QuantizerOutput(NamedTuple):
    """Result of ``ResidualQuantizer.forward``."""

    quantized: Tensor  # (B, e) straight-through: z + sg(sum_l e_{c_l} - z)
    codes: Tensor  # (B, L) long
    distances: Tensor  # (B, L, K) squared L2, differentiable w.r.t. residuals and codebooks
    loss: Tensor  # scalar: mean over levels of MSE(e_c, sg(v)) + beta * MSE(sg(e_c), v)


def squared_distances(v: Tensor, codebook: Tensor) -> Tensor:
    """``||v_b - e_k||^2`` for every pair: (B, e), (K, e) -> (B, K)."""
    return (
        v.pow(2).sum(dim=1, keepdim=True)  # (B, 1)
        + codebook.pow(2).sum(dim=1).unsqueeze(0)  # (1, K)
        - 2.0 * v @ codebook.t()  # (B, K)
    ).clamp_min(0.0)


def code_log_probs(distances: Tensor) -> Tensor:
    """Per-level code distribution ``log P(k | v) = log_softmax(-||v - e_k||^2)`` (paper Eq. 6).

    Args:
        distances: (..., K) squared distances, e.g. ``QuantizerOutput.distances`` (B, L, K).

    Returns:
        (..., K) log-probabilities (the reference used ``+distances`` by mistake, spec Sec. 11.1-1).
    """
    return F.log_softmax(-distances, dim=-1)


def _round_with_capacity(scores: Tensor, cap: int) -> Tensor:
    """Hard assignment from a transport plan: each row its best code, no code above ``cap`` rows.

    Rows propose their best code that still has room; a code keeps its ``remaining`` best-scoring proposers
    (ties: lower row index) and rejects the rest, who propose again next round. Ends within K rounds.

    Args:
        scores: (B, K) log plan values (higher = preferred).
        cap: capacity per code, with ``cap * K >= B``.

    Returns:
        (B,) long codes.
    """
    n, k = scores.shape
    codes = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    remaining = torch.full((k,), cap, dtype=torch.long, device=scores.device)
    active = torch.arange(n, device=scores.device)  # rows still unassigned
    while active.numel():
        s = scores[active].masked_fill((remaining == 0).unsqueeze(0), float("-inf"))  # (A, K)
        best, choice = s.max(dim=1)  # (A,), (A,)
        order = torch.argsort(-best, stable=True)  # best proposals first
        order = order[torch.argsort(choice[order], stable=True)]  # grouped by code, best first inside
        chosen = choice[order]  # (A,)
        counts = torch.bincount(chosen, minlength=k)  # (K,)
        rank = torch.arange(len(order), device=scores.device) - (torch.cumsum(counts, 0) - counts)[chosen]
        accept = rank < remaining[chosen]  # (A,)
        codes[active[order[accept]]] = chosen[accept]
        remaining -= torch.bincount(chosen[accept], minlength=k)
        active = active[order[~accept]]
    return codes


@torch.no_grad()
def sinkhorn_codes(distances: Tensor, epsilon: float, iters: int) -> Tensor:
    """Balanced code assignment by Sinkhorn-Knopp on one level's distances.

    The distances are min-max scaled to [-1, 1] over the whole matrix (the reference's convention, so the same
    ``epsilon`` means the same thing), then the plan ``Q ~ exp(-d / epsilon)`` is scaled alternately so that
    every row (vector) carries mass 1/B and every column (code) 1/K. The plan is rounded to a hard assignment
    that respects the column marginal: each code takes at most ``ceil(B / K)`` vectors (rows in order of their
    plan value). The reference took the row-wise argmax instead, which gives identical or near-identical
    vectors the same (near-identical) plan row and hence the same code, so it cannot separate near-duplicates.

    Args:
        distances: (B, K) squared distances.
        epsilon: entropic regularisation (> 0); smaller = closer to the exact balanced transport.
        iters: scaling rounds.

    Returns:
        (B,) long codes.
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}; use 0 in sk_epsilons to switch it off")
    d = distances.detach().double()  # (B, K)
    lo, hi = d.min(), d.max()
    d = 2.0 * (d - lo) / (hi - lo).clamp_min(1e-12) - 1.0  # (B, K) in [-1, 1]
    log_k = -d / epsilon  # (B, K) log kernel
    n, k = log_k.shape
    u = torch.zeros(n, 1, dtype=log_k.dtype, device=log_k.device)  # (B, 1) row log-scalings
    v = torch.zeros(1, k, dtype=log_k.dtype, device=log_k.device)  # (1, K) column log-scalings
    for _ in range(iters):
        u = -torch.logsumexp(log_k + v, dim=1, keepdim=True) - math.log(n)  # rows sum to 1/B
        v = -torch.logsumexp(log_k + u, dim=0, keepdim=True) - math.log(k)  # columns sum to 1/K
    return _round_with_capacity(log_k + u + v, math.ceil(n / k))  # (B,)


@torch.no_grad()
def balanced_codes(distances: Tensor, prefix: Tensor | None, epsilon: float, iters: int) -> Tensor:
    """Nearest codes, re-balanced by Sinkhorn inside every prefix group that overfills a code.

    Vectors that share the codes of the previous levels (``prefix``) form a group; a group of ``g`` vectors
    whose nearest codes put more than ``ceil(g / K)`` of them on one code is re-assigned with
    ``sinkhorn_codes``. At the first level (``prefix`` None) the whole batch is one group (usage balance, as
    in the reference); at the last level a group of <= K vectors gets distinct codes, which removes collisions.

    Args:
        distances: (B, K) squared distances at this level.
        prefix: (B, l) codes of the previous levels, or None at the first level.
        epsilon: Sinkhorn epsilon (> 0).
        iters: Sinkhorn rounds.

    Returns:
        (B,) long codes.
    """
    k = distances.shape[1]
    codes = distances.detach().argmin(dim=1)  # (B,)
    if prefix is None or prefix.shape[1] == 0:
        group = torch.zeros_like(codes)  # (B,) one group
    else:
        group = torch.unique(prefix, dim=0, return_inverse=True)[1]  # (B,)
    sizes = torch.bincount(group)  # (G,)
    load = torch.bincount(group * k + codes, minlength=len(sizes) * k).view(-1, k)  # (G, K)
    cap = (sizes + k - 1) // k  # (G,)
    for g in torch.nonzero(load.max(dim=1).values > cap).flatten().tolist():
        members = torch.nonzero(group == g).flatten()  # (g,)
        codes[members] = sinkhorn_codes(distances[members], epsilon, iters)
    return codes


class ResidualQuantizer(nn.Module):
    """``L = len(num_emb_list)`` codebooks applied to successive residuals.

    Args:
        num_emb_list: codebook size of each level, e.g. ``[256, 256, 256]``.
        e_dim: vector dimension.
        beta: commitment weight.
    """

    def __init__(self, *, num_emb_list: Sequence[int], e_dim: int, beta: float = 0.25) -> None:
        super().__init__()
        if not num_emb_list or any(int(k) < 1 for k in num_emb_list):
            raise ValueError(f"num_emb_list={list(num_emb_list)} must list at least one positive codebook size")
        if len({int(k) for k in num_emb_list}) > 1:
            raise ValueError(
                f"num_emb_list={list(num_emb_list)}: every level must have the same codebook size (distances are "
                "stacked per level and the recommender has one token table of code_num codes per level)"
            )
        if e_dim < 1:
            raise ValueError(f"e_dim={e_dim} must be positive")
        self.num_emb_list = [int(k) for k in num_emb_list]
        self.e_dim = int(e_dim)
        self.beta = float(beta)
        self.codebooks = nn.ModuleList(nn.Embedding(k, e_dim) for k in self.num_emb_list)
        for emb in self.codebooks:
            nn.init.uniform_(emb.weight, -1.0 / emb.num_embeddings, 1.0 / emb.num_embeddings)

    @property
    def num_levels(self) -> int:
        return len(self.num_emb_list)

    def forward(self, z: Tensor, sk_epsilons: Sequence[float] | None = None, sk_iters: int = 50) -> QuantizerOutput:
        """Quantise ``z`` (B, e); Sinkhorn at the levels whose ``sk_epsilons`` entry is > 0 (None = none)."""
        if sk_epsilons is not None and len(sk_epsilons) != self.num_levels:
            raise ValueError(
                f"sk_epsilons has {len(sk_epsilons)} values for {self.num_levels} levels; give one per level"
            )
        residual = z  # (B, e)
        total = torch.zeros_like(z)  # (B, e) sum of chosen codes
        codes, dists, losses = [], [], []
        for level, emb in enumerate(self.codebooks):
            d = squared_distances(residual, emb.weight)  # (B, K)
            eps = 0.0 if sk_epsilons is None else float(sk_epsilons[level])
            if eps > 0:
                c = balanced_codes(d, torch.stack(codes, dim=1) if codes else None, eps, sk_iters)  # (B,)
            else:
                c = d.detach().argmin(dim=1)  # (B,)
            e_c = emb(c)  # (B, e)
            losses.append(F.mse_loss(e_c, residual.detach()) + self.beta * F.mse_loss(e_c.detach(), residual))
            total = total + e_c
            residual = residual - e_c.detach()  # gradient to the encoder kept (module docstring)
            codes.append(c)
            dists.append(d)
        quantized = z + (total - z).detach()  # (B, e) straight-through
        return QuantizerOutput(
            quantized=quantized,
            codes=torch.stack(codes, dim=1),  # (B, L)
            distances=torch.stack(dists, dim=1),  # (B, L, K)
            loss=torch.stack(losses).mean(),
        )

    def codes_to_vectors(self, codes: Tensor) -> Tensor:
        """Sum of the chosen code vectors: (B, L) long -> (B, e)."""
        if codes.dim() != 2 or codes.shape[1] != self.num_levels:
            raise ValueError(f"codes must have shape (B, {self.num_levels}), got {tuple(codes.shape)}")
        return torch.stack([emb(codes[:, l]) for l, emb in enumerate(self.codebooks)], dim=0).sum(dim=0)

    @torch.no_grad()
    def revive_dead_codes(self, z: Tensor, dead: Tensor, generator: torch.Generator) -> list[int]:
        """Move unused codes onto randomly chosen residuals of their level (dead-code restart).

        Residuals are those of ``z`` (M, e) under nearest-code assignment with the codebooks as they are after
        the earlier levels' revival. Each dead code of level ``l`` becomes a distinct random level-``l``
        residual (with replacement only when M is smaller than the number of dead codes).

        Args:
            z: (M, e) encoder outputs of a sample of items.
            dead: (L, K) bool, True for codes no vector was assigned to in the last period.
            generator: CPU random generator.

        Returns:
            Number of codes moved per level.
        """
        residual = z.detach()  # (M, e)
        moved = []
        for level, emb in enumerate(self.codebooks):
            idx = torch.nonzero(dead[level]).flatten().to(emb.weight.device)  # (D,)
            if len(idx):
                m = residual.shape[0]
                pick = (
                    torch.randperm(m, generator=generator)[: len(idx)]
                    if m >= len(idx)
                    else torch.randint(0, m, (len(idx),), generator=generator)
                ).to(residual.device)
                emb.weight[idx] = residual[pick].to(emb.weight.dtype)
            moved.append(len(idx))
            nearest = squared_distances(residual, emb.weight).argmin(dim=1)  # (M,)
            residual = residual - emb.weight[nearest]
        return moved

    @torch.no_grad()
    def init_kmeans(self, z: Tensor, iters: int, seed: int) -> None:
        """Set each codebook to the k-means centroids of its level's residuals over all of ``z`` (N, e).

        faiss k-means (GPU when faiss has GPUs and ``z`` is on CUDA), seed ``seed + level``, no subsampling.
        With fewer vectors than codes, the codebook is filled with randomly chosen vectors plus small noise.
        """
        import faiss

        residual = z.detach().float()  # (N, e)
        n = residual.shape[0]
        gen = torch.Generator().manual_seed(seed)
        use_gpu = residual.is_cuda and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
        for level, emb in enumerate(self.codebooks):
            k = emb.num_embeddings
            data = np.ascontiguousarray(residual.cpu().numpy(), dtype=np.float32)  # (N, e)
            if n >= k:
                km = faiss.Kmeans(
                    self.e_dim, k, niter=iters, seed=seed + level, gpu=use_gpu, verbose=False,
                    max_points_per_centroid=max(1, math.ceil(n / k)) + 1, min_points_per_centroid=1,
                )
                km.train(data)
                centroids = torch.from_numpy(km.centroids).to(residual)  # (K, e)
            else:
                logger.warning("k-means init: %d vectors for %d codes; using random vectors + noise", n, k)
                pick = torch.randint(0, n, (k,), generator=gen)
                noise = torch.randn(k, self.e_dim, generator=gen) * residual.std().item() * 1e-2
                centroids = residual[pick] + noise.to(residual)  # (K, e)
            emb.weight.copy_(centroids)
            nearest = squared_distances(residual, centroids).argmin(dim=1)  # (N,)
            residual = residual - centroids[nearest]
