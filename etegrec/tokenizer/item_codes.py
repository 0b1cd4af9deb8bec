"""Item-code tables: the suffix that makes every item ID unique, and codebook health statistics.

Suffix rule (spec Sec. 5.2, TIGER): items are visited in item-id order; an item's suffix is the number of
earlier items with the same code tuple, so the first item of a collision group gets 0, the next 1, ...
Example with 3 items: codes ``[[1, 2], [1, 2], [0, 5]]`` -> ``[[1, 2, 0], [1, 2, 1], [0, 5, 0]]``.

Collision measures (both reported, named so they cannot be confused):
* ``collision_rate = (N - #distinct tuples) / N``: the share of items that need a non-zero suffix (the reference
  code's and the README's "collision rate"; 0 = all tuples distinct).
* ``collided_share = #items whose tuple is shared with another item / N`` (always >= collision_rate).

Per-level usage is the share of the K codes used at least once, perplexity is ``exp(entropy)`` of the code
frequencies (K = perfectly uniform), and the Gini coefficient is the reference's
``G = sum_i (2i - K - 1) c_(i) / (K sum c)`` over the K counts sorted ascending (0 = uniform). The reported
``gini`` is the mean over levels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def _groups(codes: Tensor) -> tuple[Tensor, Tensor]:
    """Group id of each row and size of each group: (N, L) -> ((N,), (G,))."""
    _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    return inverse, counts


def add_suffix(codes: Tensor, code_num: int) -> Tensor:
    """Append the within-group rank as a last token: (N, L) -> (N, L+1) long.

    Raises:
        ValueError: a collision group has more than ``code_num`` items, so the suffix would not fit a token.
    """
    if codes.dim() != 2:
        raise ValueError(f"codes must be (N, L), got shape {tuple(codes.shape)}")
    codes = codes.long().cpu()
    n = codes.shape[0]
    if n == 0:
        return torch.empty(0, codes.shape[1] + 1, dtype=torch.long)
    inverse, counts = _groups(codes)
    largest = int(counts.max())
    if largest > code_num:
        example = codes[inverse == int(counts.argmax())][0].tolist()
        raise ValueError(
            f"{largest} items share the code tuple {example}, but the suffix token has only code_num={code_num} "
            "values. Lower the collisions: train the tokenizer with Sinkhorn balancing (--sk_epsilons, e.g. "
            "0.0 0.0 0.003, or larger/more non-zero epsilons), train longer, or use larger codebooks "
            "(--num_emb_list and code_num)."
        )
    order = torch.argsort(inverse, stable=True)  # (N,) rows grouped, id order inside a group
    starts = torch.cumsum(counts, 0) - counts  # (G,) first position of each group in `order`
    rank_sorted = torch.arange(n) - starts[inverse[order]]  # (N,) rank in group, in `order` positions
    suffix = torch.empty(n, dtype=torch.long)
    suffix[order] = rank_sorted
    return torch.cat([codes, suffix.unsqueeze(1)], dim=1)  # (N, L+1)


def level_stats(level_codes: Tensor, code_num: int) -> dict[str, float]:
    """Usage, perplexity and Gini of one level's codes (N,)."""
    counts = torch.bincount(level_codes.long().cpu(), minlength=code_num).double()  # (K,)
    total = counts.sum()
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    sorted_counts = counts.sort().values  # ascending
    i = torch.arange(1, code_num + 1, dtype=torch.float64)
    gini = ((2 * i - code_num - 1) * sorted_counts).sum() / (code_num * total)
    return {
        "usage": float((counts > 0).double().mean()),
        "perplexity": float(entropy.exp()),
        "gini": float(gini),
    }


def collision_stats(codes: Tensor, code_num: int) -> dict[str, Any]:
    """Health of a code table (N, L) without suffix (definitions in the module docstring).

    Returns:
        ``collision_rate``, ``collided_share``, ``n_distinct``, ``max_group``, ``gini`` (mean over levels),
        ``min_usage`` and per level ``usage_l{i}``, ``perplexity_l{i}``, ``gini_l{i}`` (i from 1).
    """
    codes = codes.long().cpu()
    n = codes.shape[0]
    _, counts = _groups(codes)
    shared = int(counts[counts > 1].sum())
    out: dict[str, Any] = {
        "collision_rate": (n - len(counts)) / n,
        "collided_share": shared / n,
        "n_distinct": len(counts),
        "max_group": int(counts.max()),
    }
    per_level = [level_stats(codes[:, l], code_num) for l in range(codes.shape[1])]
    for l, s in enumerate(per_level, start=1):
        for key, value in s.items():
            out[f"{key}_l{l}"] = value
    out["gini"] = sum(s["gini"] for s in per_level) / len(per_level)
    out["min_usage"] = min(s["usage"] for s in per_level)
    return out


def build_item_codes(
    model: Any,
    vectors: Tensor,
    code_num: int,
    sk_epsilons: Sequence[float] | None = None,
    sk_iters: int = 50,
) -> tuple[Tensor, dict[str, Any]]:
    """The item-code table of a tokenizer: (N, d_s) vectors -> ((N, L+1) codes with suffix, collision stats).

    Args:
        model: an ``RQVAE``.
        vectors: item vectors, row j = item id j+1.
        code_num: codebook size (bound for the suffix).
        sk_epsilons: optional Sinkhorn at assignment time (None = nearest code, as joint training does).
        sk_iters: Sinkhorn rounds.
    """
    codes = model.get_codes(vectors, sk_epsilons=sk_epsilons, sk_iters=sk_iters)  # (N, L)
    stats = collision_stats(codes, code_num)
    return add_suffix(codes, code_num), stats
