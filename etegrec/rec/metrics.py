"""Top-k ranking metrics for leave-one-out evaluation with one relevant item per user.

``recall@k`` = 1 if the target is among the first k candidates (= HR@k); ``ndcg@k`` = 1 / log2(rank + 1) if
rank <= k, else 0 (the ideal DCG of a single relevant item is 1). Both are averaged over users. Unlike the
reference (fixed cut-offs 1/5/10, ``KeyError`` otherwise) any positive k is accepted; ranks come from a
vectorised comparison of item ids (candidates are distinct real items, see ``generation.beam_search``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from etegrec.config import METRIC_NAME


def parse_metric(name: str) -> tuple[str, int]:
    """``"ndcg@10"`` -> ``("ndcg", 10)``; ValueError for anything but recall@k / ndcg@k."""
    match = METRIC_NAME.match(name)
    if match is None:
        raise ValueError(f"unknown metric {name!r}: use recall@K or ndcg@K with K a positive integer, e.g. ndcg@10")
    return match.group(1), int(match.group(2))


def max_cutoff(names: list[str]) -> int:
    """Largest k among the metric names (how many candidates evaluation must return)."""
    if not names:
        raise ValueError("no metrics given; use e.g. ['recall@10', 'ndcg@10']")
    return max(parse_metric(name)[1] for name in names)


def target_ranks(pred_items: Tensor, target: Tensor) -> Tensor:
    """1-based rank of each user's target among its candidates, 0 if absent.

    Args:
        pred_items: (B, k) item ids, best first (0 = no candidate, never matches a real target).
        target: (B,) item ids >= 1.
    Returns:
        (B,) long.
    """
    hits = pred_items == target.unsqueeze(1)  # (B, k)
    first = hits.to(torch.int8).argmax(dim=1)  # (B,) first hit (0 when none)
    return torch.where(hits.any(dim=1), first + 1, torch.zeros_like(first))


def metrics_from_ranks(ranks: Tensor, names: list[str]) -> dict[str, float]:
    """Mean recall@k / ndcg@k over users from 1-based ranks (0 = miss).

    Args:
        ranks: (U,) long, as from ``target_ranks``.
        names: metric names, e.g. ``["recall@5", "ndcg@10"]``.
    """
    if ranks.numel() == 0:
        raise ValueError("no ranks to average: the evaluation split is empty")
    ranks = ranks.double()
    result = {}
    for name in names:
        kind, k = parse_metric(name)
        hit = (ranks > 0) & (ranks <= k)  # (U,)
        gain = hit.double() if kind == "recall" else torch.where(hit, 1.0 / torch.log2(ranks + 1.0), 0.0)
        result[name] = float(gain.mean())
    return result
