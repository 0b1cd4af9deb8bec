"""Full-ranking evaluation of the generative recommender with constrained beam search.

Every user's top candidates come from ``generation.beam_search`` (distinct real items; ``top_candidates`` yields
them per batch, ``etegrec.recommend`` serves the same lists to users); the rank of the target among them is
computed per process, gathered with ``accelerator.gather_for_metrics`` (which drops the samples accelerate
repeats to even out the last batches) and averaged once, on all processes, so the metrics are the same whether
evaluation runs on 1 or N processes.

Deviations from the reference: constrained decoding (the reference counts invalid code tuples as misses);
metric cut-offs are any recall@k / ndcg@k with k <= num_beams instead of the fixed 1/5/10; no rounding.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from accelerate.data_loader import prepare_data_loader
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from etegrec.rec.data import Batch
from etegrec.rec.generation import BeamOutput, beam_search
from etegrec.rec.metrics import max_cutoff, metrics_from_ranks, target_ranks
from etegrec.tokenizer.item_codes import ItemTrie


def top_candidates(
    model: nn.Module,
    trie: ItemTrie,
    loader: DataLoader,
    accelerator,
    num_beams: int,
    top_k: int,
    *,
    desc: str = "eval",
) -> Iterator[tuple[Batch, BeamOutput]]:
    """This process's batches of ``loader``, each with its users' ``top_k`` candidates (what ``evaluate`` ranks).

    Args:
        model: the recommender, possibly wrapped by ``accelerator.prepare`` (it is unwrapped; decoding runs in
            eval mode and the previous mode is restored).
        trie: the trie of the item codes the loader's codes come from (``ItemCodes.trie(accelerator.device)``).
        loader: yields ``etegrec.rec.data.Batch`` (``history_codes`` (B, S) with -1 padding, ``target`` (B,)
            item ids). An unprepared loader is sharded here (``accelerate.data_loader.prepare_data_loader``); an
            already prepared one is used as is.
        accelerator: the run's ``accelerate.Accelerator``.
        num_beams: beam width.
        top_k: candidates per user (<= num_beams).
        desc: progress-bar label (main process only).
    """
    if not getattr(loader, "_is_accelerate_prepared", False):
        # Module-level helper, not accelerator.prepare: a fresh eval loader per call must not be kept alive by
        # the accelerator's list of loaders.
        loader = prepare_data_loader(
            loader, accelerator.device, num_processes=accelerator.num_processes,
            process_index=accelerator.process_index, split_batches=accelerator.split_batches, put_on_device=True,
            even_batches=accelerator.even_batches,
        )
    recommender = accelerator.unwrap_model(model)
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, leave=False, dynamic_ncols=True):
        yield batch, beam_search(recommender, trie, batch.history_codes, num_beams=num_beams, top_k=top_k)


def evaluate(
    model: nn.Module,
    trie: ItemTrie,
    loader: DataLoader,
    accelerator,
    num_beams: int,
    metric_names: list[str],
    *,
    max_rank: int | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Constrained beam search over every batch of ``loader``; mean metrics over all users of all processes.

    Args:
        model, trie, loader, accelerator, num_beams, desc: as for ``top_candidates``.
        metric_names: e.g. ``["recall@5", "ndcg@10"]``.
        max_rank: candidates per user (default: the largest metric cut-off); must be <= num_beams.
    Returns:
        ``{name: mean value}`` for every name in ``metric_names``.
    """
    top_k = max_cutoff(metric_names) if max_rank is None else max_rank
    if top_k < max_cutoff(metric_names):
        raise ValueError(f"max_rank={max_rank} is below the largest metric cut-off {max_cutoff(metric_names)}")
    if top_k > num_beams:
        raise ValueError(f"metrics need {top_k} candidates but num_beams={num_beams}; raise num_beams to >= {top_k}")
    ranks = [
        accelerator.gather_for_metrics(target_ranks(out.items, batch.target))
        for batch, out in top_candidates(model, trie, loader, accelerator, num_beams, top_k, desc=desc)
    ]
    all_ranks = torch.cat(ranks) if ranks else torch.empty(0, dtype=torch.long)
    return metrics_from_ranks(all_ranks.cpu(), metric_names)
