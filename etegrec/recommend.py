"""Use a trained model: top-k items for histories of raw item ids (README "Using a trained model").

    python -m etegrec.recommend --ckpt myckpt/ml-100k/<RUN>/best.pt --history 50 181 100 --k 10
    python -m etegrec.recommend --ckpt myckpt/ml-100k/<RUN>/best.pt --input histories.jsonl --output recs.jsonl

``Recommender.from_checkpoint`` rebuilds recommender, tokenizer and item-code table from a joint-training or GRPO
checkpoint (``checkpoint.load_joint``, ``weights_only=True``) and the item map and item text from the dataset
folder its config names (``data_path`` moves it). ``recommend`` maps raw ids to item ids, keeps the last
``max_his_len`` of them, batches histories sorted by length exactly as evaluation does (``eval_loader``) and decodes
them with evaluation's constrained beam search (``generation.beam_search``): without history exclusion a user's
list is the evaluation's top-k list for the same history.

History exclusion (``exclude_history=True``): the user's beam-search list (``max(num_beams, k)`` candidates)
minus the items of the history, cut to k. When fewer than k remain, that user is decoded again with
``k + (distinct history items)`` beams, which always leaves k (or every item not in the history, if fewer).

Bad input: an unknown raw id is ignored (listed in ``Recommendation.unknown``) and a history without any known
id gets no recommendation; with ``strict`` both are ``RecommendError``. ``k`` outside ``1..N`` is an error. A
missing dataset folder, or an item map that differs from the one the checkpoint was trained with, is an
``ArtifactError`` naming the folder. The command line prints such errors as one line ``error: <message>`` and
exits with status 2 (``etegrec.cli.run_script``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from etegrec.artifacts import (
    STEP_PREPARE,
    DatasetFiles,
    SplitData,
    atomic_write_text,
    check_prepared_file,
    item_map_sha256,
    load_item_map,
)
from etegrec.cli import run_script
from etegrec.config import Config
from etegrec.embeddings.text import item_text, load_item_text
from etegrec.errors import ArtifactError, EtegrecError
from etegrec.rec.checkpoint import load_joint
from etegrec.rec.data import CodeCollator, SequenceDataset
from etegrec.rec.generation import BeamOutput, beam_search
from etegrec.rec.model import GenerativeRecommender
from etegrec.tokenizer.item_codes import ItemCodes
from etegrec.tokenizer.rqvae import RQVAE

HISTORY_FIELDS = ("inter_history", "history")  # accepted history keys of a --input line, first found wins
Candidate = tuple[int, float, tuple[int, ...]]  # (item id, ranking score, semantic ID)


class RecommendError(EtegrecError, ValueError):
    """A request the recommender cannot serve; the message names the history or file and the fix."""


# ------------------------------------------------------------------------------- dataset of a checkpoint
def checkpoint_dataset(
    cfg: Config, ckpt: Path, n_items: int, trained_sha256: str | None
) -> tuple[DatasetFiles, dict[str, int]]:
    """The dataset folder and item map a checkpoint was trained on, checked against its item-code table.

    Args:
        cfg: the checkpoint's config (its ``data_path`` / ``dataset`` name the folder).
        ckpt: the checkpoint file (quoted in errors).
        n_items: rows of the checkpoint's item-code table.
        trained_sha256: the checkpoint's ``item_map_sha256`` (None: older checkpoint, only the size is checked).
    Raises:
        ArtifactError: the folder or item map is missing, or the item map is not the one of the checkpoint.
    """
    files = DatasetFiles.from_config(cfg)
    if not files.dir.is_dir():
        raise ArtifactError(
            f"dataset folder {files.dir} of checkpoint {ckpt} does not exist; pass --data_path=<folder that holds "
            f"{files.name}/> (API: data_path=...) or re-create it with {STEP_PREPARE.replace('NAME', files.name)}."
        )
    item_map = load_item_map(files)
    changed = len(item_map) - 1 != n_items or trained_sha256 not in (None, item_map_sha256(item_map))
    if changed:
        raise ArtifactError(
            f"{files.item_map} ({len(item_map) - 1} items) is not the item map checkpoint {ckpt} was trained with "
            f"({n_items} items{', other raw ids' if len(item_map) - 1 == n_items else ''}): the dataset was "
            "re-prepared since. Point --data_path at the original data or retrain on this one."
        )
    return files, item_map


def item_display_texts(files: DatasetFiles, item_map: dict[str, int], fields: Sequence[str]) -> list[str]:
    """Text shown for each item id (index 0 = padding): its title, else its other text fields, else ""."""
    texts: list[str] = [""] * len(item_map)
    if not files.item_text.is_file():
        return texts
    step = STEP_PREPARE.replace("NAME", files.name)
    records = load_item_text(check_prepared_file(files, files.item_text, "item text"), step)
    for raw, item in item_map.items():
        record = records.get(raw) or {}
        texts[item] = str(record.get("title") or "").strip() or item_text(record, fields)
    return texts


# ------------------------------------------------------------------------------------------ recommender
class Recommendation(NamedTuple):
    """Top items for one history, best first; empty lists when no history id is known (history skipped)."""

    items: list[str]  # raw item ids
    scores: list[float]  # ranking score: the model's log-probability of the item's semantic ID
    semantic_ids: list[tuple[int, ...]]  # code tuple of each item, suffix token last
    unknown: list[str]  # raw ids of the history that are not in the catalogue (ignored)


class Recommender:
    """A trained recommender that serves top-k items for histories of raw item ids.

    Args:
        model: the recommender (its device is the decoding device).
        tokenizer: the RQ-VAE that made ``item_codes`` (kept for callers; decoding does not use it).
        item_codes: every item's semantic ID.
        item_map: ``{"[PAD]": 0, raw_id: item id}``.
        texts: display text per item id (index 0 unused), e.g. from ``item_display_texts``; default none.
        max_his_len: history items the model sees (the last ones).
        num_beams: beam width (evaluation's ``num_beams``).
        batch_size: histories decoded together (evaluation's ``eval_batch_size``).
    """

    def __init__(
        self,
        *,
        model: GenerativeRecommender,
        tokenizer: RQVAE | None,
        item_codes: ItemCodes,
        item_map: dict[str, int],
        texts: list[str] | None = None,
        max_his_len: int,
        num_beams: int,
        batch_size: int,
    ) -> None:
        if num_beams < 1 or batch_size < 1:
            raise RecommendError(f"num_beams={num_beams} and batch_size={batch_size} must both be >= 1")
        if item_codes.n_items != len(item_map) - 1:
            raise ArtifactError(
                f"the item-code table has {item_codes.n_items} items but the item map {len(item_map) - 1}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.token_embeddings[0].weight.device
        self.codes = item_codes
        self.trie = item_codes.trie(self.device)
        self.item_map = item_map
        self.raw_ids = sorted(item_map, key=item_map.__getitem__)  # raw id of every item id, "[PAD]" first
        self.texts = texts if texts is not None else [""] * len(item_map)
        self.max_his_len = max_his_len
        self.num_beams = num_beams
        self.batch_size = batch_size

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        *,
        data_path: str | Path | None = None,
        num_beams: int | None = None,
        batch_size: int | None = None,
    ) -> Recommender:
        """Rebuild everything from a joint-training or GRPO checkpoint and its dataset folder.

        Args:
            path: ``myckpt/<NAME>/<RUN>/best.pt`` (or ``last.pt``, or a ``<RUN>_grpo`` file).
            device: decoding device.
            data_path: folder holding ``<NAME>/`` when it moved (default: the checkpoint config's ``data_path``).
            num_beams, batch_size: default to the checkpoint's ``num_beams`` / ``eval_batch_size``.
        """
        path = Path(path)
        state = load_joint(path, map_location=device)
        cfg = state.cfg
        if data_path is not None:
            cfg.data.data_path = str(Path(data_path).expanduser().resolve())
        files, item_map = checkpoint_dataset(cfg, path, state.item_codes.n_items, state.raw.get("item_map_sha256"))
        return cls(
            model=state.model,
            tokenizer=state.tokenizer,
            item_codes=state.item_codes,
            item_map=item_map,
            texts=item_display_texts(files, item_map, cfg.text.text_fields),
            max_his_len=cfg.data.max_his_len,
            num_beams=cfg.train.num_beams if num_beams is None else num_beams,
            batch_size=cfg.train.eval_batch_size if batch_size is None else batch_size,
        )

    @property
    def n_items(self) -> int:
        return len(self.raw_ids) - 1

    def text(self, raw_id: str) -> str:
        """Display text (title) of an item, "" when the dataset has none."""
        return self.texts[self.item_map[raw_id]]

    def item_ids(self, history: Sequence[str | int]) -> tuple[list[int], list[str]]:
        """Item ids of the known raw ids of ``history`` (in order) and the unknown raw ids."""
        known, unknown = [], []
        for raw in history:
            item = self.item_map.get(str(raw), 0)
            if item:
                known.append(item)
            else:
                unknown.append(str(raw))
        return known, unknown

    def recommend(
        self,
        histories: Sequence[Sequence[str | int]],
        k: int = 10,
        exclude_history: bool = True,
        *,
        strict: bool = False,
        progress: bool = False,
    ) -> list[Recommendation]:
        """Top-``k`` items for each history of raw item ids (oldest first), one ``Recommendation`` per history.

        Args:
            histories: raw item ids as in the dataset's files (ints are read as their string).
            k: items per history, 1..N.
            exclude_history: drop the history's own items (see the module docstring).
            strict: an unknown id or a history without known ids raises instead of being skipped.
            progress: show a progress bar over histories.
        """
        if not 1 <= k <= self.n_items:
            raise RecommendError(f"k={k} is outside 1..{self.n_items} (the catalogue has {self.n_items} items)")
        if isinstance(histories, str) or any(isinstance(history, str) for history in histories):
            raise RecommendError("histories must be a list of histories, each a list of raw ids: wrap one history "
                                 "in a list, e.g. recommend([['50', '181']])")
        mapped = [self.item_ids(history) for history in histories]
        if strict:
            for i, (known, unknown) in enumerate(mapped):
                if unknown:
                    raise RecommendError(f"history {i}: unknown item id {unknown[0]!r} ({len(unknown)} unknown)")
                if not known:
                    raise RecommendError(f"history {i} is empty; give at least one item id")
        served = [i for i, (known, _) in enumerate(mapped) if known]
        width = max(self.num_beams, k)
        found = self._decode([mapped[i][0] for i in served], width, width if exclude_history else k, progress)
        lists = dict(zip(served, _candidates(found)))
        if exclude_history:
            lists = self._exclude_history(lists, {i: mapped[i][0] for i in served}, k)
        empty: list[Candidate] = []
        return [
            Recommendation(
                items=[self.raw_ids[item] for item, _, _ in lists.get(i, empty)],
                scores=[score for _, score, _ in lists.get(i, empty)],
                semantic_ids=[codes for _, _, codes in lists.get(i, empty)],
                unknown=unknown,
            )
            for i, (_, unknown) in enumerate(mapped)
        ]

    def _exclude_history(
        self, lists: dict[int, list[Candidate]], known: dict[int, list[int]], k: int
    ) -> dict[int, list[Candidate]]:
        """Drop history items, cut to k; users left with fewer than k are decoded again with k + |history| beams."""
        seen = {i: set(items) for i, items in known.items()}
        kept = {i: [c for c in cands if c[0] not in seen[i]] for i, cands in lists.items()}
        short: dict[int, list[int]] = {}  # beam width -> users to decode again
        for i, cands in kept.items():
            if len(cands) < min(k, self.n_items - len(seen[i])):
                short.setdefault(min(self.n_items, k + len(seen[i])), []).append(i)
        for width, users in short.items():
            found = self._decode([known[i] for i in users], width, width, progress=False)
            for i, cands in zip(users, _candidates(found)):
                kept[i] = [c for c in cands if c[0] not in seen[i]]
        return {i: cands[:k] for i, cands in kept.items()}

    def _decode(self, histories: list[list[int]], num_beams: int, top_k: int, progress: bool) -> BeamOutput:
        """Beam search for item-id histories in evaluation's batches (sorted by length); rows in input order, CPU."""
        n = len(histories)
        items = torch.zeros(n, top_k, dtype=torch.long)
        scores = torch.full((n, top_k), -torch.inf)
        codes = torch.full((n, top_k, self.codes.code_length), -1, dtype=torch.long)
        if n == 0:
            return BeamOutput(items=items, codes=codes, scores=scores)
        split = SplitData(history=[np.asarray(h, dtype=np.int64) for h in histories], target=np.zeros(n), users=[])
        data = SequenceDataset(split, self.max_his_len)  # keeps the last max_his_len items, as evaluation does
        collate = CodeCollator(self.codes, history_suffix=self.model.history_suffix)
        order = torch.argsort(data.lengths, stable=True)  # eval_loader's order (SequenceDataset.sorted_by_length)
        with tqdm(total=n, desc="recommend", unit="user", disable=not progress, dynamic_ncols=True) as bar:
            for rows in order.split(self.batch_size):
                batch = collate(data.__getitems__(rows.tolist()))  # ItemBatch -> code tokens, padded per batch
                out = beam_search(self.model, self.trie, batch.history_codes.to(self.device), num_beams, top_k)
                items[rows], scores[rows], codes[rows] = out.items.cpu(), out.scores.cpu(), out.codes.cpu()
                bar.update(len(rows))
        return BeamOutput(items=items, codes=codes, scores=scores)


def _candidates(found: BeamOutput) -> list[list[Candidate]]:
    """Every row's live candidates (item id > 0), best first."""
    return [
        [(item, score, tuple(code)) for item, score, code in zip(items, scores, codes) if item > 0]
        for items, scores, codes in zip(found.items.tolist(), found.scores.tolist(), found.codes.tolist())
    ]


# ------------------------------------------------------------------------------------------ command line
def semantic_id_text(codes: Sequence[int]) -> str:
    """``12-40-3-0``: one number per level, the collision suffix last."""
    return "-".join(str(c) for c in codes)


def _read_histories(path: Path) -> list[tuple[int, Any, list[Any]]]:
    """(line number, user_id or None, history) of every non-empty line of a JSONL file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise RecommendError(f"cannot read --input {path}: {err.strerror or err}") from None
    out = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RecommendError(f"{path}:{line_no}: not JSON ({err.msg}); write one object per line") from None
        field = next((f for f in HISTORY_FIELDS if isinstance(record, dict) and f in record), None)
        if field is None or not isinstance(record[field], list):
            raise RecommendError(
                f"{path}:{line_no}: needs a list of raw item ids under 'inter_history' or 'history', e.g. "
                '{"user_id": "7", "inter_history": ["50", "181"]}'
            )
        out.append((line_no, record.get("user_id"), record[field]))
    return out


def _check_strict(recommender: Recommender, where: str, history: list[Any]) -> None:
    known, unknown = recommender.item_ids(history)
    if unknown:
        raise RecommendError(
            f"{where}: unknown item id {unknown[0]!r} ({len(unknown)} unknown in this history); use raw ids of the "
            "dataset's item map, or drop --strict to skip unknown ids"
        )
    if not known:
        raise RecommendError(f"{where}: the history is empty; give at least one item id, or drop --strict to skip it")


def _skip_report(results: list[Recommendation]) -> str:
    unknown = sum(len(r.unknown) for r in results)
    with_unknown = sum(bool(r.unknown) for r in results)
    skipped = sum(not r.items for r in results)
    parts = []
    if unknown:
        parts.append(f"skipped {unknown} unknown item id(s) in {with_unknown} history(ies)")
    if skipped:
        parts.append(f"skipped {skipped} user(s) without any known item")
    return "; ".join(parts)


def _print_table(recommender: Recommender, rec: Recommendation) -> None:
    header = ("rank", "item", "score", "semantic ID", "title")
    rows = [header] + [
        (str(rank), raw, f"{score:.4f}", semantic_id_text(sid), recommender.text(raw)[:70])
        for rank, (raw, score, sid) in enumerate(zip(rec.items, rec.scores, rec.semantic_ids), 1)
    ]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header) - 1)]  # the title column is last, unpadded
    for row in rows:
        cells = [cell.rjust(w) if c in (0, 2) else cell.ljust(w) for c, (cell, w) in enumerate(zip(row, widths))]
        print("  ".join([*cells, row[-1]]).rstrip())


def _write_recommendations(
    path: Path, records: list[tuple[int, Any, list[Any]]], results: list[Recommendation]
) -> int:
    """One JSON object per served user; returns how many were written."""
    lines = [
        json.dumps({"user_id": user, "items": rec.items, "scores": rec.scores,
                    "semantic_ids": [list(s) for s in rec.semantic_ids]}, ensure_ascii=False)
        for (_, user, _), rec in zip(records, results)
        if rec.items
    ]
    try:
        atomic_write_text(path, "".join(line + "\n" for line in lines))
    except OSError as err:
        raise RecommendError(f"cannot write --output {path}: {err.strerror or err}") from None
    return len(lines)


def main(argv: Sequence[str]) -> None:
    """The command line (module docstring); bad input raises an ``EtegrecError``, which ``run_script`` prints."""
    parser = argparse.ArgumentParser(prog="python -m etegrec.recommend", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="joint-training or GRPO checkpoint (best.pt)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--history", nargs="+", metavar="RAW_ID", help="one history of raw item ids, oldest first")
    source.add_argument("--input", type=Path, help="JSONL, one {user_id, inter_history | history} per line")
    parser.add_argument("--output", type=Path, help="JSONL of {user_id, items, scores, semantic_ids} (with --input)")
    parser.add_argument("--k", type=int, default=10, help="items per history")
    parser.add_argument("--include_history", action="store_true", help="keep items the user already has")
    parser.add_argument("--strict", action="store_true", help="unknown ids and empty histories are errors")
    parser.add_argument("--num_beams", type=int, help="beam width (default: the checkpoint's num_beams)")
    parser.add_argument("--batch_size", type=int, help="histories per batch (default: checkpoint's eval_batch_size)")
    parser.add_argument("--data_path", help="folder holding the dataset folder, when it moved")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = parser.parse_args(argv)
    if args.input is not None and args.output is None:
        parser.error("--input needs --output")
    recommender = Recommender.from_checkpoint(
        args.ckpt, args.device, data_path=args.data_path, num_beams=args.num_beams, batch_size=args.batch_size
    )
    records = [(0, None, args.history)] if args.history is not None else _read_histories(args.input)
    if args.strict:
        for line_no, user, history in records:
            where = "--history" if args.history is not None else f"{args.input}:{line_no} (user_id {user!r})"
            _check_strict(recommender, where, history)
    results = recommender.recommend(
        [history for _, _, history in records], k=args.k, exclude_history=not args.include_history,
        progress=args.input is not None,
    )
    report = _skip_report(results)
    if args.history is not None:
        if not results[0].items:
            raise RecommendError(f"none of the --history ids is in the catalogue ({report})")
        _print_table(recommender, results[0])
    else:
        written = _write_recommendations(args.output, records, results)
        print(f"wrote {written} user(s) to {args.output}", file=sys.stderr)
    if report:
        print(report, file=sys.stderr)


if __name__ == "__main__":
    run_script(main, __doc__, None)
