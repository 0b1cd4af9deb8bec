"""Every file that passes between pipeline stages: its path, its format, and a loader that checks it.

Item ids are integers ``1..N`` assigned once by the data-preparation stage and written to
``<NAME>.emb_map.json`` (``{"[PAD]": 0, raw_id: id, ...}``); 0 is padding. Every item-vector file
(``<NAME>_emb_<dim>.npy``, ``<NAME>_sentence-transformer_text_<dim>.npy``) has exactly ``N`` rows and row
``j`` belongs to item id ``j + 1``: there is no padding row. For compatibility with the reference code's
files, a text file with ``N + 1`` rows whose first row is all zeros is accepted and its first row dropped.

Writers are atomic (temporary file in the same folder, then ``os.replace``), so a crash never leaves a
half-written artifact that a later stage would trust. A temporary file is named
``.<target>.etegrec-<pid>@<host>.<random>.tmp``; the next atomic write in its folder deletes those whose process
no longer runs on this host (left by a killed writer).

Step 1's outputs are trusted only as a whole: while it rewrites a folder, the marker ``step1_incomplete`` is
there and ``dataset_stats.json`` is not; ``dataset_stats.json`` (written last) records the data settings and the
SHA-256 of every file it wrote. The loaders refuse a folder with the marker, a folder prepared with other data
settings than the config's, and a split or item map whose hash differs from the recorded one (each file is
hashed once per process: about 45 ms for Beauty's three splits, against 2 s to parse them). A folder without
either file (e.g. the reference's pre-processed files) is used as it is, with a warning.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from etegrec.config import Config, DataConfig
from etegrec.errors import ArtifactError

logger = logging.getLogger("etegrec.artifacts")

SPLITS = ("train", "valid", "test")
PAD_TOKEN = "[PAD]"

# The command that produces each artifact, quoted in "missing file" errors.
STEP_PREPARE = "step 1: `cd RecBole && python prepare_data_2018.py --dataset=NAME` (or prepare_data_2014.py / prepare_data.py)"
STEP_SASREC = "step 2.1: `cd RecBole && python train_sasrec.py --dataset=NAME`"
STEP_TEXT = "step 2.2: `cd RecBole && python generate_text_embeddings.py --dataset=NAME`"
STEP_RQVAE = "step 3: `cd RQVAE && bash run_dual.sh` (or run_pretrain.sh)"
STEP_JOINT = "step 4: `bash run.sh`"


# ------------------------------------------------------------------ writers
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: files written atomically get the usual mode (mkstemp alone makes them 0600)
_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TMP_NAME = re.compile(r"\..+\.etegrec-(?P<pid>[0-9]+)@(?P<host>[A-Za-z0-9_-]+)\.[^.]+\.tmp")
_SWEPT: set[Path] = set()  # folders this process has already cleared of orphaned temporary files


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def remove_orphan_tmp_files(folder: Path) -> list[Path]:
    """Delete the temporary files of atomic writes in ``folder`` whose process no longer runs; return them.

    Only files named by this module's writers on this host are considered, so a live writer's file (its
    process exists) and other programs' files are never touched.
    """
    removed = []
    for path in Path(folder).glob(".*.tmp"):
        match = _TMP_NAME.fullmatch(path.name)
        if match and match["host"] == _HOST and not _process_alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        logger.info("removed %d temporary file(s) of killed writes in %s", len(removed), folder)
    return removed


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.parent not in _SWEPT:
        _SWEPT.add(path.parent)
        remove_orphan_tmp_files(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.etegrec-{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
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


def atomic_copy(src: Path, dst: Path) -> None:
    """Copy the file ``src`` to ``dst`` atomically (modification time kept)."""
    with open(src, "rb") as fh:
        _atomic_write(dst, lambda out: shutil.copyfileobj(fh, out), "wb")
    shutil.copystat(src, dst)


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save`` atomically; keep ``obj`` to tensors and plain containers so ``weights_only`` loads work."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write(path, lambda fh: fh.write(buf.getvalue()), "wb")


# ------------------------------------------------------------------- paths
class DatasetFiles:
    """Paths of one dataset folder ``<data_path>/<NAME>/``.

    ``data``: the data settings the reader expects (``from_config`` passes the config's); the loaders stop when
    ``dataset_stats.json`` says the folder was prepared with others. None = no settings check.
    """

    def __init__(self, directory: Path, name: str, data: DataConfig | None = None) -> None:
        self.dir = Path(directory)
        self.name = name
        self.data = data

    @classmethod
    def from_config(cls, cfg: Config) -> DatasetFiles:
        return cls(cfg.dataset_dir, cfg.data.dataset, cfg.data)

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

    @property
    def step1_incomplete(self) -> Path:
        """Present while step 1 rewrites the folder, and after a step 1 that did not finish."""
        return self.dir / "step1_incomplete"

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


# --------------------------------------------------------- step-1 outputs
_VERIFIED: set[tuple[Path, int, int]] = set()  # (path, size, mtime) whose hash matched dataset_stats.json
_UNCHECKED_WARNED: set[Path] = set()  # folders without dataset_stats.json already warned about


def _step_prepare(files: DatasetFiles) -> str:
    return STEP_PREPARE.replace("NAME", files.name)


def read_dataset_stats(files: DatasetFiles) -> dict[str, Any] | None:
    """``dataset_stats.json`` of the folder, or None when step 1 did not write one."""
    if not files.stats.is_file():
        return None
    try:
        stats = json.loads(files.stats.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        stats = None
    if not isinstance(stats, dict):
        raise ArtifactError(f"{files.stats} is damaged; re-run {_step_prepare(files)}.")
    return stats


def settings_mismatch(files: DatasetFiles, stats: dict[str, Any]) -> str | None:
    """How the folder's step-1 settings differ from ``files.data``, or None when they agree.

    ``min_interactions`` and ``dedup`` must be equal; the prepared histories must be at least ``max_his_len``
    items long (the loaders cut longer ones, which gives exactly the shorter preparation).
    """
    if files.data is None:
        return None
    stored, d = stats.get("settings", {}), files.data
    differ = [
        (key, stored.get(key), want)
        for key, want in (("min_interactions", d.min_interactions), ("dedup", d.dedup))
        if stored.get(key) != want
    ]
    if not isinstance(stored.get("max_his_len"), int) or stored["max_his_len"] < d.max_his_len:
        differ.append(("max_his_len", stored.get("max_his_len"), d.max_his_len))
    if not differ:
        return None
    has = ", ".join(f"{k}={json.dumps(v)}" for k, v, _ in differ)
    wants = ", ".join(f"--{k}={json.dumps(w)}" for k, _, w in differ)
    return f"{files.dir} was prepared with {has} ({files.stats.name}), but the config asks for {wants}"


def prepared_folder_problem(files: DatasetFiles) -> str | None:
    """Why the folder's step-1 outputs as a whole cannot be used with ``files.data``, or None."""
    if files.step1_incomplete.exists():
        return (
            f"{files.dir} holds the outputs of a step 1 that did not finish ({files.step1_incomplete.name} is "
            "there): its files may mix two preparations"
        )
    stats = read_dataset_stats(files)
    return settings_mismatch(files, stats) if stats is not None else None


def check_prepared_file(files: DatasetFiles, path: Path, what: str) -> Path:
    """``path`` (a step-1 output) if it exists and is what step 1 wrote, else ArtifactError saying what to do."""
    require(path, _step_prepare(files), what)
    problem = prepared_folder_problem(files)
    if problem:
        raise ArtifactError(f"{problem}. Re-run {_step_prepare(files)} with the config's data settings.")
    stats = read_dataset_stats(files)
    if stats is None:
        if files.dir not in _UNCHECKED_WARNED:
            _UNCHECKED_WARNED.add(files.dir)
            logger.warning(
                "%s has no %s (not written by step 1 here, e.g. the reference's pre-processed files): its files "
                "are used as they are, unchecked",
                files.dir,
                files.stats.name,
            )
        return path
    expected = stats.get("sha256", {}).get(path.name)
    info = path.stat()
    key = (path, info.st_size, info.st_mtime_ns)
    if expected is None or key in _VERIFIED:
        return path
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != expected:
        split = next((s for s in SPLITS if path == files.split(s)), None)
        lines = data.count(b"\n")
        written = stats.get(f"{split}_records", "?")
        detail = f"{lines} records, step 1 wrote {written}" if split else "its content differs"
        raise ArtifactError(
            f"{path} is not the file step 1 wrote ({detail}; its SHA-256 is in {files.stats.name}): it was changed "
            f"or truncated since. Re-run {_step_prepare(files)}."
        )
    _VERIFIED.add(key)
    return path


@contextlib.contextmanager
def rewriting_step1_outputs(files: DatasetFiles) -> Iterator[None]:
    """Mark the folder as not prepared while the block (re)writes step 1's files, ``dataset_stats.json`` last.

    The marker is written before ``dataset_stats.json`` is removed and deleted only when the block finished
    and wrote ``dataset_stats.json``, so a step 1 killed at any point leaves a folder every later step rejects.
    """
    atomic_write_text(
        files.step1_incomplete,
        f"step 1 (process {os.getpid()}) is writing this folder, or was killed while it did: re-run step 1.\n",
    )
    files.stats.unlink(missing_ok=True)
    yield
    if not files.stats.is_file():
        raise RuntimeError(f"{files.stats} was not written; the folder stays marked as incomplete")
    files.step1_incomplete.unlink()


def describe_candidates(paths: list[str]) -> str:
    """Files tried in turn, for a message: ``a`` and ``a.gz`` read as ``a[.gz]``."""
    shown = [p for p in paths if not (p.endswith(".gz") and p.removesuffix(".gz") in paths)]
    return " or ".join(p + ("[.gz]" if p + ".gz" in paths else "") for p in shown)


def require_item_text(files: DatasetFiles) -> Path:
    """``<NAME>.item_text.json``, or ArtifactError naming the metadata file step 1 needed to write it."""
    if files.item_text.is_file():
        return check_prepared_file(files, files.item_text, "item text")
    stats = read_dataset_stats(files) or {}
    looked_for = (stats.get("item_text") or {}).get("looked_for")
    source = (
        f"step 1 found no metadata file (looked for {describe_candidates(looked_for)}): put it there"
        if looked_for
        else "it is made by step 1 from the raw metadata (meta_file): provide it"
    )
    raise ArtifactError(
        f"no item text for dataset {files.name!r}: {files.item_text} does not exist; {source} and re-run "
        f"{_step_prepare(files)}, or use tokenizer_input=collab (no text vectors)."
    )


# ------------------------------------------------------------------ loaders
def load_item_map(files: DatasetFiles) -> dict[str, int]:
    """Load ``<NAME>.emb_map.json`` and check it is a bijection onto ``0..N`` with ``[PAD] = 0``."""
    path = check_prepared_file(files, files.item_map, "item-id map")
    item_map = json.loads(path.read_text())
    ids = sorted(item_map.values())
    if item_map.get(PAD_TOKEN) != 0 or ids != list(range(len(ids))):
        raise ArtifactError(
            f"{path} is not a valid item map: it must map '[PAD]' to 0 and the raw item ids onto 1..N "
            f"without gaps. Re-create it with {STEP_PREPARE.replace('NAME', files.name)}."
        )
    return item_map


def item_map_sha256(item_map: dict[str, int]) -> str:
    """Fingerprint of an item map: SHA-256 of its raw ids in item-id order (JSON formatting does not matter)."""
    raw_ids = sorted(item_map, key=item_map.__getitem__)  # "[PAD]" first, then items 1..N
    return hashlib.sha256("\n".join(raw_ids).encode("utf-8")).hexdigest()


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
    path = check_prepared_file(files, files.split(split), f"{split} split")
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
