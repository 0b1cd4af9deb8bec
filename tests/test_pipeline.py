"""``build_missing`` (main.py's path through steps 1-3): what it rebuilds, what it refuses, and its messages.

Steps 2-3 are replaced by stand-ins that record their calls and write their output file, so these tests check
the decisions, not the training (tests/test_embeddings.py and tests/test_tokenizer.py train for real).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from etegrec.artifacts import ArtifactError, DatasetFiles, atomic_save_npy, atomic_write_text, collab_emb_path
from etegrec.config import Config, load_config
from etegrec.embeddings import sasrec, text
from etegrec.pipeline import build_missing
from etegrec.tokenizer import pretrain

REPO_ROOT = Path(__file__).resolve().parent.parent
# Six users review all of i0..i4; three more review all of x0..x2. A 3-core keeps both groups, a 4-core drops
# the x group (its users have 3 reviews), which changes the item map.
REVIEWS = [(f"u{u}", f"i{j}", 10 * u + j) for u in range(6) for j in range(5)] + [
    (f"v{u}", f"x{j}", 100 + 10 * u + j) for u in range(3) for j in range(3)
]


def write_reviews(folder: Path, with_metadata: bool = False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"reviewerID": u, "asin": i, "overall": 5.0, "unixReviewTime": ts}) for u, i, ts in REVIEWS]
    (folder / "Musical_Instruments.json").write_text("\n".join(lines) + "\n")
    if with_metadata:
        items = sorted({i for _, i, _ in REVIEWS})
        (folder / "meta_Musical_Instruments.json").write_text("".join(json.dumps({"asin": i, "title": i}) + "\n"
                                                                      for i in items))


def toy_config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [
        f"--data_path={tmp_path}", "--dataset=Toy", "--raw_format=amazon2018", "--min_interactions=3",
        "--max_his_len=4", "--sasrec_hidden_size=8", f"--rq_ckpt_dir={tmp_path / 'rqvae'}", *overrides,
    ])  # fmt: skip


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-ins for steps 2.1, 2.2 and 3; the list records the steps run, in order."""
    calls: list[str] = []

    def n_items(cfg: Config) -> int:
        return len(json.loads(DatasetFiles.from_config(cfg).item_map.read_text())) - 1

    def fake_sasrec(cfg: Config) -> None:
        calls.append("sasrec")
        atomic_save_npy(collab_emb_path(cfg), np.zeros((n_items(cfg), 8), np.float32))

    def fake_text(cfg: Config) -> None:
        calls.append("text")
        atomic_save_npy(DatasetFiles.from_config(cfg).text_emb(4), np.zeros((n_items(cfg), 4), np.float32))

    def fake_pretrain(cfg: Config) -> None:
        calls.append("rqvae")
        root = pretrain.ckpt_root(cfg)
        atomic_write_text(root / "run" / "best_collision.pth", "")
        atomic_write_text(root / pretrain.POINTER, json.dumps({"best_collision": "run/best_collision.pth"}))

    monkeypatch.setattr(sasrec, "run", fake_sasrec)
    monkeypatch.setattr(text, "run", fake_text)
    monkeypatch.setattr(pretrain, "run", fake_pretrain)
    return calls


def test_dual_input_without_item_text_stops_before_any_training(tmp_path: Path, stages: list[str]) -> None:
    cfg = toy_config(tmp_path, "--tokenizer_input=dual")
    write_reviews(cfg.dataset_dir)
    with pytest.raises(ArtifactError) as err:
        build_missing(cfg)
    msg = str(err.value)
    assert "no item text" in msg and str(cfg.dataset_dir / "meta_Musical_Instruments.json") in msg and "\n" not in msg
    assert stages == [] and DatasetFiles.from_config(cfg).stats.is_file()  # step 1 ran; nothing else


def test_collab_input_needs_no_item_text(tmp_path: Path, stages: list[str]) -> None:
    cfg = toy_config(tmp_path, "--tokenizer_input=collab")
    write_reviews(cfg.dataset_dir)
    build_missing(cfg)
    assert stages == ["sasrec", "rqvae"]
    build_missing(cfg)  # everything present: nothing re-run
    assert stages == ["sasrec", "rqvae"]


def test_missing_item_map_is_named(tmp_path: Path, stages: list[str]) -> None:
    cfg = toy_config(tmp_path, "--tokenizer_input=collab")
    write_reviews(cfg.dataset_dir)
    build_missing(cfg)
    files = DatasetFiles.from_config(cfg)
    files.item_map.unlink()
    with pytest.raises(ArtifactError, match=rf"missing prepared data: item-id map {files.item_map} does not exist"):
        build_missing(toy_config(tmp_path, "--tokenizer_input=collab", "--build_missing=false"))
    build_missing(cfg)  # rebuilt; the same map, so steps 2-3 are kept
    assert files.item_map.is_file() and stages == ["sasrec", "rqvae"]


def test_interrupted_step_1_is_rebuilt_or_refused(tmp_path: Path, stages: list[str]) -> None:
    cfg = toy_config(tmp_path, "--tokenizer_input=collab")
    write_reviews(cfg.dataset_dir)
    build_missing(cfg)
    files = DatasetFiles.from_config(cfg)
    atomic_write_text(files.step1_incomplete, "")  # what a killed step 1 leaves
    files.stats.unlink()
    with pytest.raises(ArtifactError, match=r"step 1 that did not finish.*build_missing: true"):
        build_missing(toy_config(tmp_path, "--tokenizer_input=collab", "--build_missing=false"))
    build_missing(cfg)
    assert files.stats.is_file() and not files.step1_incomplete.exists()


def test_other_settings_rebuild_step_1_and_what_depends_on_its_item_map(tmp_path: Path, stages: list[str]) -> None:
    cfg = toy_config(tmp_path, "--tokenizer_input=collab")
    write_reviews(cfg.dataset_dir)
    build_missing(cfg)
    strict = ["--tokenizer_input=collab", "--min_interactions=4"]
    with pytest.raises(ArtifactError, match=r"prepared with min_interactions=3 .*--min_interactions=4"):
        build_missing(toy_config(tmp_path, *strict, "--build_missing=false"))
    build_missing(toy_config(tmp_path, *strict))
    files = DatasetFiles.from_config(cfg)
    assert json.loads(files.stats.read_text())["settings"]["min_interactions"] == 4
    assert "x0" not in json.loads(files.item_map.read_text())
    assert stages == ["sasrec", "rqvae", "sasrec", "rqvae"]  # the old vectors and tokenizer belong to the old map


def test_split_changed_after_step_1_stops_even_with_build_missing(tmp_path: Path, stages: list[str]) -> None:
    cfg = toy_config(tmp_path, "--tokenizer_input=collab")
    write_reviews(cfg.dataset_dir)
    build_missing(cfg)
    test_split = DatasetFiles.from_config(cfg).split("test")
    test_split.write_text("".join(test_split.read_text().splitlines(keepends=True)[:4]))
    with pytest.raises(ArtifactError, match=r"Toy.test.jsonl is not the file step 1 wrote \(4 records, step 1 wrote 9"):
        build_missing(cfg)


def test_main_reports_a_truncated_split_in_one_line(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path)
    write_reviews(cfg.dataset_dir, with_metadata=True)
    from etegrec.prep.prepare import run as prepare

    prepare(cfg)
    test_split = DatasetFiles.from_config(cfg).split("test")
    test_split.write_text("".join(test_split.read_text().splitlines(keepends=True)[:4]))
    done = subprocess.run(
        [sys.executable, "main.py", "--config", "config/ml-100k.yaml", f"--data_path={tmp_path}", "--dataset=Toy",
         "--raw_format=amazon2018", "--min_interactions=3", "--max_his_len=4", "--build_missing=false"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(test_split) in last and "Re-run step 1" in last
    assert "Traceback" not in done.stderr
