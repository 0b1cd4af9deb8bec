"""Every file that passes between pipeline stages: its path, its format, and a loader that checks it.

Item ids are integers ``1..N`` assigned once by the data-preparation stage and written to
``<NAME>.emb_map.json`` (``{"[PAD]": 0, raw_id: id, ...}``); 0 is padding. Every item-vector file
(``<NAME>_emb_<dim>.npy``, ``<NAME>_sentence-transformer_text_<dim>.npy``) has exactly ``N`` rows and row
``j`` belongs to item id ``j + 1``: there is no padding row. For compatibility with the reference code's
files, a text file with ``N + 1`` rows whose first row is all zeros is accepted and its first row dropped.

Writers are atomic (temporary file in the same folder, then ``os.replace``), so a crash never leaves a
half-written artifact that a later stage would trust.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from etegrec.config import Config
from etegrec.errors import ArtifactError

SPLITS = ("train", "valid", "test")
PAD_TOKEN = "[PAD]"

# The command that produces each artifact, quoted in "missing file" errors.
STEP_PREPARE = "step 1: `cd RecBole && python prepare_data_2018.py --dataset=NAME` (or prepare_data_2014.py / prepare_data.py)"
STEP_SASREC = "step 2.1: `cd RecBole && python train_sasrec.py --dataset=NAME`"
STEP_TEXT = "step 2.2: `cd RecBole && python generate_text_embeddings.py --dataset=NAME`"
STEP_RQVAE = "step 3: `cd RQVAE && bash run_dual.sh` (or run_pretrain.sh)"
STEP_JOINT = "step 4: `bash run.sh`"


# ------------------------------------------------------------------ writers
def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, ``\\n`` line ends) so that readers see all of it or none."""
    _atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), "wb")


def atomic_write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write JSON with sorted-free, deterministic formatting."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    """Save a numpy array atomically (``.npy`` format)."""
    _atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False), "wb")


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` atomically; keep ``obj`` to tensors and plain containers so ``weights_only`` loads work."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write(path, lambda fh: fh.write(buf.getvalue()), "wb")


# ------------------------------------------------------------------- paths
class DatasetFiles:
    """Paths of one dataset folder ``<data_path>/<NAME>/``."""

    def __init__(self, directory: Path, name: str) -> None:
        self.dir = Path(directory)
        self.name = name

    @classmethod
    def from_config(cls, cfg: Config) -> DatasetFiles:
        return cls(cfg.dataset_dir, cfg.data.dataset)

    def _p(self, suffix: str) -> Path:
        return self.dir / f"{self.name}{suffix}"

    @property
    def inter(self) -> Path:
        return self._p(".inter")

    def split(self, split: str) -> Path:
        assert split in SPLITS, split
        return self._p(f".{split}.jsonl")

    @property
    def item_map(self) -> Path:
        return self._p(".emb_map.json")

    @property
    def item_text(self) -> Path:
        return self._p(".item_text.json")

    @property
    def stats(self) -> Path:
        return self.dir / "dataset_stats.json"

    def collab_emb(self, dim: int) -> Path:
        return self._p(f"_emb_{dim}.npy")

    def text_emb(self, dim: int) -> Path:
        return self._p(f"_sentence-transformer_text_{dim}.npy")

    def text_emb_any(self) -> Path | None:
        """The text-embedding file of whatever dimension exists (newest first), if any."""
        found = sorted(self.dir.glob(f"{self.name}_sentence-transformer_text_*.npy"), key=os.path.getmtime)
        return found[-1] if found else None

    @property
    def sasrec_metrics(self) -> Path:
        return self._p(".sasrec_metrics.json")


def require(path: Path, step: str, what: str) -> Path:
    """Return ``path`` if it exists, else raise ArtifactError naming the step that makes it."""
    if not Path(path).is_file():
        raise ArtifactError(f"missing {what}: {path} does not exist. It is made by {step}.")
    return Path(path)


# ------------------------------------------------------------------ loaders
def load_item_map(files: DatasetFiles) -> dict[str, int]:
    """Load ``<NAME>.emb_map.json`` and check it is a bijection onto ``0..N`` with ``[PAD] = 0``."""
    path = require(files.item_map, STEP_PREPARE.replace("NAME", files.name), "item-id map")
    item_map = json.loads(path.read_text())
    ids = sorted(item_map.values())
    if item_map.get(PAD_TOKEN) != 0 or ids != list(range(len(ids))):
        raise ArtifactError(
            f"{path} is not a valid item map: it must map '[PAD]' to 0 and the raw item ids onto 1..N "
            f"without gaps. Re-create it with {STEP_PREPARE.replace('NAME', files.name)}."
        )
    return item_map


@dataclass
class SplitData:
    """One split as item ids: ``history[i]`` (int64, oldest first) precedes ``target[i]``."""

    history: list[np.ndarray]
    target: np.ndarray  # (n_records,) int64
    users: list[str]

    def __len__(self) -> int:
        return len(self.target)


def load_split(files: DatasetFiles, split: str, item_map: dict[str, int], max_his_len: int | None = None) -> SplitData:
    """Read ``<NAME>.<split>.jsonl`` and map raw ids to item ids (error names the line of an unknown id)."""
    path = require(files.split(split), STEP_PREPARE.replace("NAME", files.name), f"{split} split")
    history: list[np.ndarray] = []
    target: list[int] = []
    users: list[str] = []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                his = [item_map[str(x)] for x in rec["inter_history"]]
                tgt = item_map[str(rec["target_id"])]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ArtifactError(
                    f"{path}:{line_no}: bad record ({type(err).__name__}: {err}). Each line must be "
                    '{"user_id": ..., "target_id": ..., "inter_history": [...]} with ids present in '
                    f"{files.item_map.name}; re-create the splits with {STEP_PREPARE.replace('NAME', files.name)}."
                ) from None
            if max_his_len is not None:
                his = his[-max_his_len:]
            history.append(np.asarray(his, dtype=np.int64))
            target.append(tgt)
            users.append(str(rec.get("user_id", "")))
    if not target:
        raise ArtifactError(f"{path} has no records; re-create it with {STEP_PREPARE.replace('NAME', files.name)}.")
    return SplitData(history=history, target=np.asarray(target, dtype=np.int64), users=users)


def load_splits(files: DatasetFiles, item_map: dict[str, int], max_his_len: int | None = None) -> dict[str, SplitData]:
    """All three splits, keyed by split name."""
    return {s: load_split(files, s, item_map, max_his_len) for s in SPLITS}


def load_vectors(path: Path, n_items: int, step: str, what: str) -> np.ndarray:
    """Load an item-vector ``.npy`` and check it has one row per item (see the module docstring)."""
    require(path, step, what)
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as err:
        raise ArtifactError(f"{path} is not a readable .npy file ({err}); re-create it with {step}.") from None
    if arr.ndim != 2:
        raise ArtifactError(f"{path} has shape {arr.shape}; expected (n_items, dim). Re-create it with {step}.")
    if arr.shape[0] == n_items + 1 and not np.any(arr[0]):
        arr = arr[1:]  # reference layout: a zero padding row first
    if arr.shape[0] != n_items:
        raise ArtifactError(
            f"{path} has {arr.shape[0]} rows but the item map has {n_items} items: it was made for another "
            f"item map or dataset. Re-create it with {step} after the current data preparation."
        )
    if not np.all(np.isfinite(arr)):
        raise ArtifactError(f"{path} contains NaN or infinite values; re-create it with {step}.")
    return arr.astype(np.float32, copy=False)


def collab_emb_path(cfg: Config) -> Path:
    """The collaborative-vector file the tokenizer reads."""
    if cfg.tokenizer.collab_emb_path:
        return cfg.dataset_input(cfg.tokenizer.collab_emb_path)
    return DatasetFiles.from_config(cfg).collab_emb(cfg.sasrec.sasrec_hidden_size)


def text_emb_path(cfg: Config) -> Path:
    """The text-vector file the tokenizer reads."""
    files = DatasetFiles.from_config(cfg)
    if cfg.tokenizer.text_emb_path:
        return cfg.dataset_input(cfg.tokenizer.text_emb_path)
    return files.text_emb_any() or files.text_emb(384)


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, 1e-12)


def load_item_vectors(cfg: Config, n_items: int) -> np.ndarray:
    """The tokenizer's input vectors, shape (N, d_s), row j = item id j+1.

    ``dual`` concatenates the collaborative and text vectors, each L2-normalised first when
    ``normalize`` is on (otherwise SASRec vectors, whose norms are far above 1, dominate the
    reconstruction loss -- the reference code's behaviour).
    """
    name = cfg.data.dataset
    parts: list[np.ndarray] = []
    if cfg.tokenizer.tokenizer_input in ("dual", "collab"):
        parts.append(load_vectors(collab_emb_path(cfg), n_items, STEP_SASREC.replace("NAME", name), "SASRec item vectors"))
    if cfg.tokenizer.tokenizer_input in ("dual", "text"):
        parts.append(load_vectors(text_emb_path(cfg), n_items, STEP_TEXT.replace("NAME", name), "text item vectors"))
    if cfg.tokenizer.normalize:
        parts = [_l2_normalise(p) for p in parts]
    return np.ascontiguousarray(np.concatenate(parts, axis=1), dtype=np.float32)
