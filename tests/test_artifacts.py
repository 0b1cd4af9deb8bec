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
