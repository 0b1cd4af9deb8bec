"""Training and evaluation batches for the recommender: item-id histories turned into code tokens on the fly.

A split is pre-tokenised once into int tensors (``SequenceDataset``). A batch is gathered with one indexing
operation, padded only to the longest history *in the batch*, and mapped from item ids to code tokens by
indexing the current item-code table (``ItemCodes.table``, updated in place), so a new table after a tokenizer
epoch takes effect at the next batch without rebuilding anything. Histories take their codes from
``ItemCodes.history_table`` (``history_suffix``: whole IDs, or the level codes without the suffix); targets
always get whole IDs. ``BucketBatchSampler`` shuffles, then sorts windows of batches by history length, so
batches hold histories of similar length and padding stays small; it also deals batches to processes itself
(every process runs the same number of steps, as DDP-style gradient averaging needs). For a GPU,
``DeviceBatches`` gathers the same batches on the device instead (no per-batch work on the host).

Deviations from the reference code (``data.py``): batches are padded to the batch maximum in *items* exactly
as there, but histories are length-bucketed; the history cap is ``max_his_len`` (the reference's 210-item
collator cap with its off-by-one never triggers on 50-item histories).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from etegrec.artifacts import SplitData, load_item_vectors
from etegrec.config import Config
from etegrec.rec.losses import first_occurrence
from etegrec.tokenizer.item_codes import ItemCodes, history_width


class ItemBatch(NamedTuple):
    """A batch as item ids."""

    history: Tensor  # (B, T) long, right-padded with 0, T = longest history in the batch
    target: Tensor  # (B,) long


class Batch(NamedTuple):
    """A batch as code tokens, ready for the recommender."""

    history_codes: Tensor  # (B, T*W) long, item-aligned, -1 = padding; W = C, or L without the suffix
    target_codes: Tensor  # (B, C) long
    target: Tensor  # (B,) long target item ids (1..N)
    distinct: Tensor  # (M,) long rows holding the first occurrence of each distinct target, by target id

    def to(self, device: torch.device | str) -> Batch:
        """The same batch on ``device``."""
        return Batch(*(t.to(device, non_blocking=True) for t in self))


def item_vectors_by_id(cfg: Config, n_items: int) -> Tensor:
    """The tokenizer's input vectors indexed by item id: (N+1, d_s), row i = item i, row 0 (padding) zeros."""
    vectors = torch.from_numpy(load_item_vectors(cfg, n_items))  # (N, d_s)
    return torch.cat([vectors.new_zeros(1, vectors.shape[1]), vectors])


class SequenceDataset(Dataset):
    """One split as tensors: ``history`` (n, H) right-padded with 0, ``lengths`` (n,), ``target`` (n,).

    Indexing takes a list of record indices and returns a whole ``ItemBatch`` (``__getitems__``), so a batch
    costs one gather instead of ``B`` Python calls.
    """

    def __init__(self, split: SplitData, max_his_len: int) -> None:
        lengths = np.fromiter((min(len(h), max_his_len) for h in split.history), dtype=np.int64, count=len(split))
        if lengths.min(initial=1) < 1:
            raise ValueError("a record has an empty history; every record needs at least one earlier item")
        history = np.zeros((len(split), int(lengths.max(initial=1))), dtype=np.int64)
        for i, h in enumerate(split.history):
            history[i, : lengths[i]] = h[len(h) - lengths[i] :]  # the last max_his_len items, oldest first
        self.history = torch.from_numpy(history)  # (n, H)
        self.lengths = torch.from_numpy(lengths)  # (n,)
        self.target = torch.from_numpy(np.asarray(split.target, dtype=np.int64))  # (n,)

    def subset(self, index: Tensor) -> SequenceDataset:
        """The records ``index`` (long tensor), in that order, sharing no storage with this one."""
        out = SequenceDataset.__new__(SequenceDataset)
        out.history, out.lengths, out.target = self.history[index], self.lengths[index], self.target[index]
        return out

    def sorted_by_length(self) -> SequenceDataset:
        """The same records ordered by history length (stable)."""
        return self.subset(torch.argsort(self.lengths, stable=True))

    def __len__(self) -> int:
        return self.target.shape[0]

    def __getitem__(self, index: int) -> ItemBatch:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> ItemBatch:
        idx = torch.as_tensor(indices, dtype=torch.long)
        width = int(self.lengths[idx].max())
        return ItemBatch(history=self.history[idx, :width], target=self.target[idx])


class CodeCollator:
    """Map an ``ItemBatch`` to a ``Batch`` with the table's current codes (pure indexing, no loops).

    ``history_suffix``: history items as whole IDs, or without the suffix (``ItemCodes.history_table``).
    The distinct-target rows are found here, on the host: ``torch.unique`` on a GPU would wait for the device.
    """

    def __init__(self, codes: ItemCodes, *, history_suffix: bool) -> None:
        # views of the shared table, updated in place; only the tensors travel to DataLoader workers
        self.table = codes.table  # (N+1, C)
        self.history_table = codes.history_table(history_suffix)  # (N+1, W)

    def __call__(self, items: ItemBatch) -> Batch:
        history_codes = self.history_table[items.history]  # (B, T, W); padding item 0 -> -1s
        return Batch(
            history_codes=history_codes.reshape(items.history.shape[0], -1),  # (B, T*W)
            target_codes=self.table[items.target],  # (B, C)
            target=items.target,
            distinct=first_occurrence(items.target),  # (M,)
        )


class BucketBatchSampler:
    """Shuffled, length-bucketed batches of record indices, dealt round-robin to ``num_replicas`` processes.

    Each epoch: a seeded permutation (its first ``epoch_records`` records when that is > 0), cut into windows of
    ``window`` batches; each window is sorted by history length and cut into batches of ``batch_size`` records
    -- fewer when ``max_tokens`` > 0 and the batch would exceed ``max_tokens`` padded history tokens (records x
    longest history x ``tokens_per_item``), which bounds the memory of long-history batches. The batch order is
    shuffled again, and the list is padded by repeating its first batches to a multiple of ``num_replicas`` so
    every process takes the same number of steps.
    Everything depends only on ``(seed, epoch)``, so a resumed run sees the same batches.
    """

    def __init__(
        self,
        lengths: Tensor,
        batch_size: int,
        *,
        seed: int,
        window: int = 50,
        max_tokens: int = 0,
        tokens_per_item: int = 1,
        epoch_records: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        if batch_size < 1 or window < 1 or not 0 <= rank < num_replicas:
            raise ValueError(
                f"bad sampler arguments batch_size={batch_size} window={window} rank={rank}/{num_replicas}"
            )
        self.lengths = lengths
        self.batch_size = batch_size
        self.seed = seed
        self.window = window
        self.max_tokens = max_tokens
        self.tokens_per_item = tokens_per_item
        self.epoch_records = epoch_records
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0
        self._cache: tuple[int, list[Tensor]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _cut(self, part: Tensor) -> list[Tensor]:
        """Cut records sorted by length into batches (by count, and by token budget when set)."""
        if self.max_tokens <= 0:
            return list(part.split(self.batch_size))
        batches, start = [], 0
        for i, length in enumerate(self.lengths[part].tolist()):
            n = i - start  # records already in the open batch; this one is the longest so far
            if n == self.batch_size or (n > 0 and (n + 1) * length * self.tokens_per_item > self.max_tokens):
                batches.append(part[start:i])
                start = i
        batches.append(part[start:])
        return batches

    def _global_batches(self) -> list[Tensor]:
        if self._cache is not None and self._cache[0] == self.epoch:
            return self._cache[1]
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=gen)
        if self.epoch_records > 0:
            perm = perm[: self.epoch_records]  # a different random subset every epoch
        chunk = self.batch_size * self.window
        batches: list[Tensor] = []
        for start in range(0, len(perm), chunk):
            part = perm[start : start + chunk]
            batches.extend(self._cut(part[torch.argsort(self.lengths[part], stable=True)]))
        order = torch.randperm(len(batches), generator=gen).tolist()
        batches = [batches[i] for i in order]
        batches += batches[: -len(batches) % self.num_replicas]
        self._cache = (self.epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches()[self.rank :: self.num_replicas]:
            yield batch.tolist()

    def __len__(self) -> int:
        return len(self._global_batches()) // self.num_replicas


class DeviceBatches:
    """Training batches gathered where the model runs (a GPU): the split's histories and targets are copied to
    ``device`` once and the code table once per update, so a batch costs one small index copy and a few gathers
    there -- no collation, pinning or copy of padded code histories on the host per batch. The batches equal
    ``CodeCollator``'s (moved to ``device``, same ``history_suffix``) for the same indices.

    ``batch_sampler`` and ``len()`` work as on a DataLoader (``batch_sampler.set_epoch`` picks the epoch).
    """

    def __init__(self, dataset: SequenceDataset, codes: ItemCodes, batch_sampler: BucketBatchSampler,
                 device: torch.device, *, history_suffix: bool) -> None:
        self.history = dataset.history.to(device)  # (n, H)
        self.target = dataset.target.to(device)  # (n,)
        self.host_lengths, self.host_target = dataset.lengths, dataset.target  # batch widths, distinct targets
        self.codes = codes
        self.history_suffix = history_suffix
        self.batch_sampler = batch_sampler
        self.device = device

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def _to_device(self, t: Tensor) -> Tensor:
        """A small host tensor on the device without the host waiting (pinned first on CUDA)."""
        return (t.pin_memory() if self.device.type == "cuda" else t).to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[Batch]:
        table = self.codes.table_on(self.device)  # (N+1, C) the current codes
        history_table = self.codes.history_table(self.history_suffix, self.device)  # (N+1, W)
        for indices in self.batch_sampler:
            idx = torch.as_tensor(indices, dtype=torch.long)  # (B,)
            width = int(self.host_lengths[idx].max())
            rows = self._to_device(idx)
            target = self.target[rows]  # (B,)
            yield Batch(
                history_codes=history_table[self.history[rows, :width]].reshape(len(indices), -1),  # (B, T*W)
                target_codes=table[target],  # (B, C)
                target=target,
                distinct=self._to_device(first_occurrence(self.host_target[idx])),  # (M,)
            )


def train_loader(
    dataset: SequenceDataset,
    codes: ItemCodes,
    batch_size: int,
    *,
    history_suffix: bool,
    seed: int,
    window: int = 50,
    max_tokens: int = 0,
    epoch_records: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    device: torch.device | None = None,
) -> DataLoader | DeviceBatches:
    """Loader of shuffled, length-bucketed training batches for this process (call ``batch_sampler.set_epoch``).

    ``history_suffix`` as in ``CodeCollator``. With a CUDA ``device`` and no workers the batches are gathered
    there (``DeviceBatches``); otherwise a DataLoader collates them on the host (pinned for a CUDA device, so
    ``Batch.to`` does not block the host).
    """
    sampler = BucketBatchSampler(
        dataset.lengths,
        batch_size,
        seed=seed,
        window=window,
        max_tokens=max_tokens,
        tokens_per_item=history_width(codes.code_length, history_suffix),
        epoch_records=epoch_records,
        num_replicas=num_replicas,
        rank=rank,
    )
    cuda = device is not None and device.type == "cuda"
    if cuda and num_workers == 0:
        return DeviceBatches(dataset, codes, sampler, device, history_suffix=history_suffix)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=CodeCollator(codes, history_suffix=history_suffix),
                      num_workers=num_workers, pin_memory=cuda)


def eval_loader(
    dataset: SequenceDataset, codes: ItemCodes, batch_size: int, *, history_suffix: bool, num_workers: int = 0
) -> DataLoader:
    """Unsharded loader over all records in length order (ready for ``accelerator.prepare``); ``history_suffix``
    as in ``CodeCollator``.

    Records are visited sorted by history length so each batch pads little; metrics are averages over users,
    so the order does not change them.
    """
    ordered = dataset.sorted_by_length()
    sampler = BatchSampler(SequentialSampler(ordered), batch_size=batch_size, drop_last=False)
    collate = CodeCollator(codes, history_suffix=history_suffix)
    return DataLoader(ordered, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)
