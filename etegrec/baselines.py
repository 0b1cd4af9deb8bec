"""Non-learned reference points printed beside the model's metrics.

Popularity: every user gets the same ranked list, items ordered by how often they are a training target
(each training record's target is one training interaction; ties broken by smaller item id). It needs no
model, so it is a sanity floor for any trained recommender under the same leave-one-out protocol.
"""

from __future__ import annotations

import numpy as np
import torch

from etegrec.artifacts import SplitData
from etegrec.rec.metrics import metrics_from_ranks


def popularity_ranking(train: SplitData, n_items: int) -> np.ndarray:
    """Item ids (1..N) from most to least popular in the training split."""
    counts = np.bincount(train.target, minlength=n_items + 1)[1:]  # (N,) counts of items 1..N
    order = np.lexsort((np.arange(1, n_items + 1), -counts))  # by count desc, then id asc
    return order + 1


def popularity_metrics(train: SplitData, evaluated: SplitData, n_items: int, names: list[str]) -> dict[str, float]:
    """Recall/NDCG of the popularity list on ``evaluated`` (valid or test) targets."""
    ranking = popularity_ranking(train, n_items)
    rank_of_item = np.zeros(n_items + 1, dtype=np.int64)
    rank_of_item[ranking] = np.arange(1, n_items + 1)
    ranks = torch.from_numpy(rank_of_item[evaluated.target])  # (U,) 1-based rank of each target
    return metrics_from_ranks(ranks, names)
