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

Deviations from the reference code:
* The residual keeps its gradient towards the encoder: ``v_{l+1} = v_l - sg(e_{c_l})``. The reference builds
  ``v_{l+1}`` from the straight-through output, which carries no gradient, so the commitment term (and, in joint
  training, the sequence-item alignment) of levels >= 2 never reached the encoder. Here every level's
  commitment pulls the encoder towards its partial reconstruction, as in Lee et al. 2022 (RQ-VAE). Codebook
  ``l`` is still trained only by its own codebook term (``sg`` on ``e_{c_l}`` inside the residual).
* Sinkhorn (reference: ``models/vq.py`` of the original repository; its fork ignored the flag) differs in three
  ways: (1) the plan is rounded with capacities instead of a row-wise argmax, which gives near-identical vectors
  the same code and so cannot separate near-duplicates; (2) below level 1 it balances inside prefix groups, not
  over the whole batch, because a collision is a clash inside a prefix group; (3) it runs in the log domain (no
  under/overflow at epsilon 0.003) and only where the caller passes ``sk_epsilons`` (training, or an explicit code
  assignment); the reference switched it on by ``self.training``.
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


def code_log_probs(distances: Tensor, tau: Tensor | float = 1.0) -> Tensor:
    """Per-level code distribution ``log P(k | v) = log_softmax(-||v - e_k||^2 / tau)`` (paper Eq. 6 at tau 1).

    Args:
        distances: (..., L, K) squared distances, e.g. ``QuantizerOutput.distances`` (B, L, K).
        tau: temperature, a float or one value per level (L,).

    Returns:
        (..., L, K) log-probabilities (the reference code used ``+distances`` by mistake, which puts most mass
        on the farthest codes).
    """
    if isinstance(tau, Tensor):
        tau = tau.to(distances).unsqueeze(-1)  # (L, 1) broadcast over codes
    return F.log_softmax(-distances / tau, dim=-1)


def nearest_code_gap(distances: Tensor) -> Tensor:
    """Per-level median gap between the second-nearest and the nearest code's squared distance.

    The natural distance unit of a level: at a temperature equal to it, the median item's nearest code is
    ``e`` times as likely as its second-nearest under ``softmax(-distance / tau)``.

    Args:
        distances: (N, L, K) squared distances of N vectors along their nearest-code path.

    Returns:
        (L,) positive gaps.
    """
    two = distances.topk(2, dim=-1, largest=False).values  # (N, L, 2) ascending
    return (two[..., 1] - two[..., 0]).median(dim=0).values.clamp_min(1e-12)  # (L,)


def _group_logsumexp(values: Tensor, group: Tensor, n_groups: int) -> Tensor:
    """Log-sum-exp over each group's rows: (R, K) values, (R,) group ids in [0, G) -> (G, K)."""
    if n_groups == 1:  # one plain reduction (on a GPU, 1.5x faster than the scatters below)
        return torch.logsumexp(values, dim=0, keepdim=True)
    index = group.unsqueeze(1).expand_as(values)  # (R, K)
    peak = torch.full((n_groups, values.shape[1]), -math.inf, dtype=values.dtype, device=values.device)
    peak = peak.scatter_reduce(0, index, values, reduce="amax")  # (G, K) every group has >= 1 row: finite
    total = torch.zeros_like(peak).index_add_(0, group, (values - peak[group]).exp())  # (G, K)
    return peak + total.log()


def _round_with_capacity(scores: Tensor, group: Tensor, cap: Tensor) -> Tensor:
    """Hard assignment from transport plans: each row its best code, no code above its group's ``cap`` rows.

    Rows propose their best code that still has room in their group; a (group, code) bin keeps its ``remaining``
    best-scoring proposers (ties: lower row index) and rejects the rest, who propose again next round. Groups
    never compete, so all of them are rounded in the same rounds (at most K).

    Args:
        scores: (R, K) log plan values (higher = preferred).
        group: (R,) group id of each row, in [0, G).
        cap: (G,) capacity per code in each group, with ``cap[g] * K >= rows of g``.

    Returns:
        (R,) long codes.
    """
    n, k = scores.shape
    codes = torch.full((n,), -1, dtype=torch.long, device=scores.device)
    remaining = cap.unsqueeze(1).expand(-1, k).reshape(-1).clone()  # (G*K,) room left per (group, code) bin
    active = torch.arange(n, device=scores.device)  # rows still unassigned
    while active.numel():
        row_group = group[active]  # (A,)
        full = remaining.view(-1, k)[row_group] == 0  # (A, K) codes without room in the row's group
        best, choice = scores[active].masked_fill(full, float("-inf")).max(dim=1)  # (A,), (A,)
        bins = row_group * k + choice  # (A,) flat (group, code) bin
        order = torch.argsort(-best, stable=True)  # best proposals first
        order = order[torch.argsort(bins[order], stable=True)]  # grouped by bin, best first inside
        chosen = bins[order]  # (A,)
        counts = torch.bincount(chosen, minlength=remaining.numel())  # (G*K,)
        rank = torch.arange(len(order), device=scores.device) - (torch.cumsum(counts, 0) - counts)[chosen]
        accept = rank < remaining[chosen]  # (A,)
        codes[active[order[accept]]] = choice[order[accept]]
        remaining -= torch.bincount(chosen[accept], minlength=remaining.numel())
        active = active[order[~accept]]
    return codes


@torch.no_grad()
def grouped_sinkhorn_codes(distances: Tensor, group: Tensor, epsilon: float, iters: int) -> Tensor:
    """``sinkhorn_codes`` applied to every group of rows at once (one batched pass, no loop over groups).

    Args:
        distances: (R, K) squared distances.
        group: (R,) group id of each row, ids 0..G-1 all present.
        epsilon: entropic regularisation (> 0).
        iters: scaling rounds.

    Returns:
        (R,) long codes, each group balanced on its own.
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}; use 0 in sk_epsilons to switch it off")
    d = distances.detach().double()  # (R, K)
    n_groups, k = int(group.max()) + 1, d.shape[1]
    rows = group.unsqueeze(1)  # (R, 1)
    lo = torch.full((n_groups,), math.inf, dtype=d.dtype, device=d.device).scatter_reduce(
        0, group, d.min(dim=1).values, reduce="amin")  # (G,) per-group minimum
    hi = torch.full((n_groups,), -math.inf, dtype=d.dtype, device=d.device).scatter_reduce(
        0, group, d.max(dim=1).values, reduce="amax")  # (G,)
    d = 2.0 * (d - lo[rows]) / (hi - lo).clamp_min(1e-12)[rows] - 1.0  # (R, K) in [-1, 1] per group
    log_k = -d / epsilon  # (R, K) log kernel
    sizes = torch.bincount(group, minlength=n_groups)  # (G,)
    log_rows = sizes.double().log()[rows]  # (R, 1) log of the row's group size
    u = torch.zeros(len(d), 1, dtype=d.dtype, device=d.device)  # (R, 1) row log-scalings
    v = torch.zeros(n_groups, k, dtype=d.dtype, device=d.device)  # (G, K) column log-scalings per group
    for _ in range(iters):
        u = -torch.logsumexp(log_k + v[group], dim=1, keepdim=True) - log_rows  # rows sum to 1/g
        v = -_group_logsumexp(log_k + u, group, n_groups) - math.log(k)  # columns sum to 1/K
    return _round_with_capacity(log_k + u + v[group], group, (sizes + k - 1) // k)  # (R,)


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
    group = torch.zeros(distances.shape[0], dtype=torch.long, device=distances.device)  # (B,) one group
    return grouped_sinkhorn_codes(distances, group, epsilon, iters)


@torch.no_grad()
def balanced_codes(distances: Tensor, prefix: Tensor | None, epsilon: float, iters: int) -> Tensor:
    """Nearest codes, re-balanced by Sinkhorn inside every prefix group that overfills a code.

    Vectors that share the codes of the previous levels (``prefix``) form a group; a group of ``g`` vectors
    whose nearest codes put more than ``ceil(g / K)`` of them on one code is re-assigned with
    ``sinkhorn_codes``. At the first level (``prefix`` None) the whole batch is one group (usage balance, as
    in the reference); at the last level a group of <= K vectors gets distinct codes, which removes collisions.
    All overfull groups are re-assigned in one batched pass (``grouped_sinkhorn_codes``): a loop over groups
    cost about 500 small GPU kernels per group, seconds per batch on a GPU.

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
    overfull = load.max(dim=1).values > (sizes + k - 1) // k  # (G,)
    members = torch.nonzero(overfull[group]).flatten()  # (R,) rows of overfull groups, ascending
    if members.numel():
        renumbered = torch.cumsum(overfull.long(), 0) - 1  # (G,) id among the overfull groups
        codes[members] = grouped_sinkhorn_codes(distances[members], renumbered[group[members]], epsilon, iters)
    return codes


def _level_codes(
    distances: Tensor, earlier: list[Tensor], sk_epsilons: Sequence[float] | None, level: int, sk_iters: int
) -> Tensor:
    """The codes of one level (B, K) -> (B,): Sinkhorn-balanced within groups of equal ``earlier`` codes where
    ``sk_epsilons[level]`` > 0, else the nearest code."""
    eps = 0.0 if sk_epsilons is None else float(sk_epsilons[level])
    if eps > 0:
        return balanced_codes(distances, torch.stack(earlier, dim=1) if earlier else None, eps, sk_iters)
    return distances.detach().argmin(dim=1)


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
            c = _level_codes(d, codes, sk_epsilons, level, sk_iters)  # (B,)
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

    @torch.no_grad()
    def codes_with_margin(
        self,
        z: Tensor,
        previous: Tensor,
        margins: Tensor,
        sk_epsilons: Sequence[float] | None = None,
        sk_iters: int = 50,
    ) -> Tensor:
        """Code tuples of ``z`` that keep each vector's previous code unless a new one is clearly nearer.

        Level by level, the usual assignment (nearest code, or Sinkhorn where ``sk_epsilons`` > 0) proposes a
        code; a vector whose earlier levels kept their previous codes keeps its previous code at this level too
        when that code's squared distance exceeds the proposal's by at most ``margins[level]``. Residuals follow
        the codes actually chosen, so deeper levels are assigned on the kept path.

        Args:
            z: (N, e) latents.
            previous: (N, L) long codes of the last assignment.
            margins: (L,) squared-distance margins (0 keeps a previous code only on an exact tie).
            sk_epsilons: Sinkhorn epsilon per level (None = nearest code everywhere).
            sk_iters: Sinkhorn rounds.

        Returns:
            (N, L) long codes.
        """
        if previous.shape != (z.shape[0], self.num_levels):
            raise ValueError(f"previous codes {tuple(previous.shape)} do not match ({z.shape[0]}, {self.num_levels})")
        previous = previous.to(z.device).long()
        residual = z  # (N, e)
        unchanged = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)  # (N,) prefix kept so far
        codes: list[Tensor] = []
        for level, emb in enumerate(self.codebooks):
            d = squared_distances(residual, emb.weight)  # (N, K)
            proposed = _level_codes(d, codes, sk_epsilons, level, sk_iters)  # (N,)
            old = previous[:, level]  # (N,)
            advantage = d.gather(1, old[:, None]).squeeze(1) - d.gather(1, proposed[:, None]).squeeze(1)  # (N,)
            c = torch.where(unchanged & (advantage <= float(margins[level])), old, proposed)  # (N,)
            unchanged &= c == old
            residual = residual - emb.weight[c]
            codes.append(c)
        return torch.stack(codes, dim=1)  # (N, L)

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
