"""Stage artifacts: atomic writers, the item map, splits and item-vector alignment checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from etegrec.artifacts import (
    ArtifactError,
    DatasetFiles,
    atomic_save_npy,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_item_map,
    load_item_vectors,
    load_split,
    load_vectors,
)
from etegrec.config import load_config


def _dataset(tmp_path: Path) -> DatasetFiles:
    files = DatasetFiles(tmp_path / "toy", "toy")
    atomic_write_json(files.item_map, {"[PAD]": 0, "a": 1, "b": 2, "c": 3})
    rec = {"user_id": "u1", "target_id": "c", "inter_history": ["a", "b"]}
    for split in ("train", "valid", "test"):
        atomic_write_text(files.split(split), json.dumps(rec) + "\n")
    return files


def test_atomic_write_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    atomic_write_json(target, {"ok": 1})

    class Boom:
        def __reduce__(self):  # torch.save fails half-way through pickling
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_torch_save(tmp_path / "ckpt.pt", {"a": torch.zeros(2), "b": Boom()})
    assert not (tmp_path / "ckpt.pt").exists()
    assert sorted(os.listdir(tmp_path)) == ["x.json"]  # no temporary leftovers


def test_item_map_and_split(tmp_path: Path) -> None:
    files = _dataset(tmp_path)
    item_map = load_item_map(files)
    split = load_split(files, "train", item_map, max_his_len=1)
    assert split.target.tolist() == [3] and split.history[0].tolist() == [2]


def test_item_map_must_be_bijection(tmp_path: Path) -> None:
    files = _dataset(tmp_path)
    atomic_write_json(files.item_map, {"[PAD]": 0, "a": 1, "b": 3})
    with pytest.raises(ArtifactError, match="without gaps"):
        load_item_map(files)


def test_unknown_item_in_split_names_line(tmp_path: Path) -> None:
    files = _dataset(tmp_path)
    atomic_write_text(files.split("valid"), '{"user_id": "u", "target_id": "a", "inter_history": []}\n'
                      '{"user_id": "u", "target_id": "zz", "inter_history": ["a"]}\n')
    with pytest.raises(ArtifactError, match=r"toy.valid.jsonl:2: bad record"):
        load_split(files, "valid", load_item_map(files))


def test_missing_file_names_step(tmp_path: Path) -> None:
    files = DatasetFiles(tmp_path / "none", "none")
    with pytest.raises(ArtifactError, match=r"none.emb_map.json does not exist. It is made by step 1"):
        load_item_map(files)


def test_vector_rows_checked(tmp_path: Path) -> None:
    p = tmp_path / "v.npy"
    atomic_save_npy(p, np.ones((4, 2), np.float32))
    with pytest.raises(ArtifactError, match="has 4 rows but the item map has 3 items"):
        load_vectors(p, 3, "step X", "vectors")
    padded = np.vstack([np.zeros((1, 2)), np.ones((3, 2))]).astype(np.float32)
    atomic_save_npy(p, padded)  # the reference layout: zero pad row first, dropped explicitly
    assert load_vectors(p, 3, "step X", "vectors").shape == (3, 2)


def test_dual_vectors_normalised_and_concatenated(tmp_path: Path) -> None:
    files = _dataset(tmp_path)
    cfg = load_config(None, [f"--data_path={tmp_path}", "--dataset=toy", "--sasrec_hidden_size=2", "--sasrec_heads=1"])
    atomic_save_npy(files.collab_emb(2), np.array([[3, 4], [0, 2], [1, 0]], np.float32))
    atomic_save_npy(files.text_emb(3), np.array([[0, 0, 2], [1, 0, 0], [0, 1, 0]], np.float32))
    vecs = load_item_vectors(cfg, 3)
    assert vecs.shape == (3, 5)
    np.testing.assert_allclose(vecs[0], [0.6, 0.8, 0, 0, 1.0], rtol=1e-6)


def test_killed_writer_leaves_a_temporary_file_the_next_write_removes(tmp_path: Path) -> None:
    import subprocess
    import sys

    from etegrec.artifacts import remove_orphan_tmp_files

    # A writer killed in the middle of an atomic write leaves its temporary file (and no target file).
    script = (
        "import sys, time; from pathlib import Path; from etegrec.artifacts import _atomic_write\n"
        "def write(fh):\n    fh.write(b'half'); fh.flush(); print('writing', flush=True); time.sleep(60)\n"
        f"_atomic_write(Path({str(tmp_path / 'killed.json')!r}), write, 'wb')\n"
    )
    repo = Path(__file__).resolve().parent.parent
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=repo, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "writing"
        left = list(tmp_path.glob(".killed.json.etegrec-*.tmp"))
        assert len(left) == 1 and not (tmp_path / "killed.json").exists()
        assert remove_orphan_tmp_files(tmp_path) == []  # its writer still runs: kept
    finally:
        writer.kill()
        writer.wait()
    foreign = tmp_path / ".notes.txt.tmp"  # another program's temporary file: never touched
    foreign.write_text("x")
    atomic_write_text(tmp_path / "next.json", "{}\n")  # the next write in the folder clears the orphan
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.txt.tmp", "next.json"]


def _prepared(tmp_path: Path, **settings: object) -> DatasetFiles:
    """``_dataset`` plus the dataset_stats.json step 1 would write for it."""
    import hashlib

    files = _dataset(tmp_path)
    names = [files.item_map, *(files.split(s) for s in ("train", "valid", "test"))]
    stats = {
        "train_records": 1, "valid_records": 1, "test_records": 1,
        "settings": {"min_interactions": 5, "max_his_len": 50, "dedup": True, **settings},
        "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in names},
    }  # fmt: skip
    atomic_write_json(files.stats, stats)
    return files


def test_split_changed_after_step_1_is_refused(tmp_path: Path) -> None:
    files = _prepared(tmp_path)
    assert load_split(files, "test", load_item_map(files)).target.tolist() == [3]
    atomic_write_text(files.split("test"), "")  # truncated
    with pytest.raises(ArtifactError) as err:
        load_split(files, "test", load_item_map(files))
    msg = str(err.value)
    assert str(files.split("test")) in msg and "0 records, step 1 wrote 1" in msg and "Re-run step 1" in msg
    assert "\n" not in msg


def test_other_data_settings_are_refused(tmp_path: Path) -> None:
    files = _prepared(tmp_path, min_interactions=5, max_his_len=20)
    cfg = load_config(None, [f"--data_path={tmp_path}", "--dataset=toy", "--min_interactions=20", "--max_his_len=20"])
    with pytest.raises(ArtifactError, match=r"prepared with min_interactions=5 .*asks for --min_interactions=20"):
        load_item_map(DatasetFiles.from_config(cfg))
    longer = load_config(None, [f"--data_path={tmp_path}", "--dataset=toy", "--max_his_len=50"])
    with pytest.raises(ArtifactError, match=r"max_his_len=20 .*--max_his_len=50"):
        load_item_map(DatasetFiles.from_config(longer))
    shorter = load_config(None, [f"--data_path={tmp_path}", "--dataset=toy", "--max_his_len=10"])
    assert load_item_map(DatasetFiles.from_config(shorter)) == load_item_map(files)  # the loader cuts histories


def test_interrupted_step_1_is_refused(tmp_path: Path) -> None:
    files = _prepared(tmp_path)
    atomic_write_text(files.step1_incomplete, "")
    with pytest.raises(ArtifactError, match=r"step 1 that did not finish.*Re-run step 1"):
        load_item_map(files)


def test_folder_without_stats_is_used_with_one_warning(tmp_path: Path) -> None:
    import logging

    files = _dataset(tmp_path)  # the reference's pre-processed files: splits and map only
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("etegrec.artifacts").addHandler(handler)
    try:
        item_map = load_item_map(files)
        load_split(files, "train", item_map)
    finally:
        logging.getLogger("etegrec.artifacts").removeHandler(handler)
    assert item_map["c"] == 3
    assert len(warnings) == 1 and "has no dataset_stats.json" in warnings[0] and "unchecked" in warnings[0]


def test_missing_item_text_names_the_metadata_file(tmp_path: Path) -> None:
    from etegrec.artifacts import require_item_text

    files = _prepared(tmp_path)
    stats = json.loads(files.stats.read_text())
    atomic_write_json(files.stats, {**stats, "item_text": {"file": None, "looked_for": ["/d/meta_X.json"]}})
    with pytest.raises(ArtifactError) as err:
        require_item_text(files)
    msg = str(err.value)
    assert "no item text for dataset 'toy'" in msg and "/d/meta_X.json" in msg and "tokenizer_input=collab" in msg


def test_each_file_is_hashed_once_per_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    import etegrec.artifacts

    files = _prepared(tmp_path)
    hashed: list[int] = []
    real_sha256 = hashlib.sha256

    def counting_sha256(data: bytes):
        hashed.append(len(data))
        return real_sha256(data)

    monkeypatch.setattr(etegrec.artifacts.hashlib, "sha256", counting_sha256)
    item_map = load_item_map(files)
    for _ in range(3):
        load_split(files, "train", item_map)
    assert len(hashed) == 2  # the item map and the train split, each once
    atomic_write_text(files.split("train"), files.split("train").read_text())  # rewritten: checked again
    load_split(files, "train", item_map)
    assert len(hashed) == 3


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    from etegrec import artifacts

    artifacts.atomic_write_text(tmp_path / "a.txt", "x")  # mkstemp alone would leave it 0600
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~artifacts._UMASK
