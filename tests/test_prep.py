"""Step 1 (data preparation): k-core, leave-one-out, raw Amazon readers, converters on the real data, errors."""

from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from pathlib import Path

import pytest

from etegrec.artifacts import ArtifactError, DatasetFiles, load_item_map, load_splits
from etegrec.config import Config, ConfigError, load_config
from etegrec.prep.prepare import (
    Interactions,
    UserSequence,
    assign_item_ids,
    drop_duplicates,
    k_core,
    leave_one_out,
    run,
    sort_user_ids,
    user_sequences,
)
from etegrec.errors import PrepError
from etegrec.prep.reading import Row


def rows_from(seqs: dict[str, list[str]]) -> list[Row]:
    """One row per (user, item); the position is the timestamp, the global counter the line."""
    out, line = [], 0
    for user, items in seqs.items():
        for pos, item in enumerate(items):
            out.append(Row(user, item, 5.0, float(pos), line))
            line += 1
    return out


# ------------------------------------------------------------------------------ pure functions
def test_k_core_iterates_until_stable() -> None:
    inter = Interactions.from_rows(
        rows_from(
            {
                "a": ["1", "2", "3", "4"],
                "b": ["1", "2", "3"],
                "c": ["1", "2", "3", "5"],
                "d": ["4", "5", "6"],
                "e": ["6", "7"],
                "f": ["1", "2", "8"],
            }
        )
    )
    kept, rounds = k_core(inter, 3)
    # Round 1: user e (2 rows) goes; then items 4 (a, d), 5 (c, d), 6 (d), 7, 8 (f) have < 3 users and go,
    # leaving d with nothing and f with 2 rows. Round 2 drops f (items 1-3 keep exactly 3 users). Round 3: no change.
    assert rounds == 3
    assert sorted(kept.pairs()) == [(u, i) for u in "abc" for i in "123"]
    assert kept.counts() == {"users": 3, "items": 3, "interactions": 9}


def test_k_core_empty_names_threshold() -> None:
    inter = Interactions.from_rows(rows_from({"a": ["1", "2", "3"], "b": ["1", "2", "3"]}))
    with pytest.raises(PrepError, match=r"min_interactions=4.*2 users / 3 items / 6 interactions"):
        k_core(inter, 4)


def test_drop_duplicates_keeps_earliest() -> None:
    inter = Interactions.from_rows(
        [
            Row("u", "i", 5.0, 5.0, 0),
            Row("u", "i", 4.0, 3.0, 1),  # earlier timestamp: kept
            Row("u", "j", 5.0, 3.0, 2),  # tie on timestamp: the earlier line is kept
            Row("u", "j", 5.0, 3.0, 3),
            Row("v", "i", 5.0, 1.0, 4),
        ]
    )
    kept, removed = drop_duplicates(inter)
    assert removed == 2
    assert kept.line.tolist() == [1, 2, 4] and kept.rating.tolist() == [4.0, 5.0, 5.0]


def test_sort_user_ids_numeric_or_string() -> None:
    assert sort_user_ids(["10", "9", "2"]) == ["2", "9", "10"]
    assert sort_user_ids(["10", "a", "9"]) == ["10", "9", "a"]


def test_user_sequences_chronological_with_line_tie_break() -> None:
    inter = Interactions.from_rows(
        [
            Row("10", "a", 5.0, 2.0, 5),
            Row("9", "x", 5.0, 7.0, 0),
            Row("10", "b", 5.0, 1.0, 9),
            Row("10", "c", 5.0, 2.0, 3),  # same time as "a" but an earlier line: comes first
        ]
    )
    seqs = user_sequences(inter)
    assert [(s.user, s.items, s.timestamps) for s in seqs] == [
        ("9", ["x"], [7.0]),
        ("10", ["b", "c", "a"], [1.0, 2.0, 2.0]),
    ]
    assert assign_item_ids(seqs) == {"[PAD]": 0, "x": 1, "b": 2, "c": 3, "a": 4}


def test_leave_one_out_records() -> None:
    seqs = [
        UserSequence("u", list("abcde"), [5.0] * 5, [0.0] * 5),
        UserSequence("w", list("xyz"), [5.0] * 3, [0.0] * 3),
    ]
    rec = leave_one_out(seqs, max_his_len=2)
    as_tuples = {s: [(r.user_id, r.inter_history, r.target_id) for r in rec[s]] for s in rec}
    assert as_tuples == {
        # t = 1 .. n-3 = 1, 2 for u; none for w (n = 3). Histories keep their last 2 items.
        "train": [("u", ["a"], "b"), ("u", ["a", "b"], "c")],
        "valid": [("u", ["b", "c"], "d"), ("w", ["x"], "y")],
        "test": [("u", ["c", "d"], "e"), ("w", ["x", "y"], "z")],
    }


# ------------------------------------------------------------------------- raw Amazon fixtures
# (user, item, unix seconds) in file order; I1 is reviewed twice by A1 (the later copy is a duplicate),
# X9 and Z5 have one interaction each, B2 reviews I2 and I1 in the same second (file order decides).
REVIEWS = [
    ("A1", "I1", 100), ("A1", "I2", 200), ("A1", "X9", 150), ("A1", "I3", 300), ("A1", "I4", 400),
    ("B2", "I2", 10), ("B2", "I1", 10), ("B2", "I3", 30),
    ("C3", "I3", 5), ("C3", "I1", 6), ("C3", "I2", 7), ("C3", "I4", 8),
    ("D4", "I4", 1), ("D4", "I2", 2), ("D4", "I1", 3),
    ("Z5", "I1", 1),
    ("A1", "I1", 500),
]  # fmt: skip
# After dedup and the 3-core (Z5 and X9 go), users in string order, items by time:
# A1: I1 I2 I3 I4 | B2: I2 I1 I3 | C3: I3 I1 I2 I4 | D4: I4 I2 I1.  Item ids by first appearance: I1..I4 = 1..4.
EXPECTED_TRAIN = '{"user_id": "A1", "target_id": "I2", "inter_history": ["I1"]}\n{"user_id": "C3", "target_id": "I1", "inter_history": ["I3"]}\n'
EXPECTED_VALID = (
    '{"user_id": "A1", "target_id": "I3", "inter_history": ["I1", "I2"]}\n'
    '{"user_id": "B2", "target_id": "I1", "inter_history": ["I2"]}\n'
    '{"user_id": "C3", "target_id": "I2", "inter_history": ["I3", "I1"]}\n'
    '{"user_id": "D4", "target_id": "I2", "inter_history": ["I4"]}\n'
)
EXPECTED_TEST = (  # max_his_len = 2 cuts A1's and C3's test histories
    '{"user_id": "A1", "target_id": "I4", "inter_history": ["I2", "I3"]}\n'
    '{"user_id": "B2", "target_id": "I3", "inter_history": ["I2", "I1"]}\n'
    '{"user_id": "C3", "target_id": "I4", "inter_history": ["I1", "I2"]}\n'
    '{"user_id": "D4", "target_id": "I1", "inter_history": ["I4", "I2"]}\n'
)


def review_2018(user: str, item: str, ts: int) -> str:
    return json.dumps(
        {"overall": 4.0, "verified": True, "reviewTime": "01 1, 2015", "reviewerID": user, "asin": item,
         "style": {"Color:": " Black"}, "reviewerName": "x", "reviewText": "fine {\"quoted\"}", "summary": "ok",
         "unixReviewTime": ts}
    )  # fmt: skip


def review_2014(user: str, item: str, ts: int) -> str:
    return json.dumps(
        {"reviewerID": user, "asin": item, "reviewerName": "x", "helpful": [0, 0], "reviewText": "fine",
         "overall": 4.0, "summary": "ok", "unixReviewTime": ts, "reviewTime": "01 1, 2014"}
    )  # fmt: skip


def review_2023(user: str, item: str, ts: int) -> str:
    rec = {"rating": 4.0, "title": "ok", "text": "fine", "images": [], "asin": "B" + item, "parent_asin": item,
           "user_id": user, "timestamp": ts * 1000, "helpful_vote": 0, "verified_purchase": True}  # fmt: skip
    if user == "B2":
        del rec["rating"]  # optional in 2023: written as 5.0
    return json.dumps(rec)


META_2018 = [
    {"asin": "I1", "title": "Guitar &amp; Strap", "brand": "Fender", "category": ["Musical Instruments", "Guitars"],
     "description": ["<b>Solid</b> wood.", "Great."], "main_cat": "Musical Instruments"},
    {"asin": "X9", "title": "dropped by the k-core"},
    {"asin": "I2", "title": "Drum", "category": []},
    {"asin": "I4", "title": "Pick", "brand": "Dunlop", "category": ["Musical Instruments"], "description": []},
]  # fmt: skip
META_2014 = [  # Python literals, as in the 2014 dump
    (
        "{'asin': 'I1', 'title': 'Guitar & Strap', 'brand': 'Fender', 'categories': [['Musical Instruments', "
        "'Guitars'], ['Musical Instruments']], 'description': 'Solid wood. Great.', 'salesRank': {'Musical "
        "Instruments': 5}}"
    ),
    "{'asin': 'I2', 'title': 'Drum', 'related': {'also_bought': ['I1']}}",
    "{'asin': 'I4', 'title': 'Pick', 'brand': 'Dunlop', 'categories': [['Musical Instruments']]}",
]
META_2023 = [
    {"main_category": "Musical Instruments", "title": "Guitar & Strap", "store": "Fender",
     "categories": ["Musical Instruments", "Guitars"], "description": ["Solid wood.", "Great."], "parent_asin": "I1"},
    {"title": "Drum", "parent_asin": "I2", "categories": [], "store": None, "description": []},
    {"title": "Pick", "store": "Dunlop", "categories": ["Musical Instruments"], "parent_asin": "I4"},
]  # fmt: skip
EXPECTED_TEXT = {
    "I1": {"title": "Guitar & Strap", "brand": "Fender", "categories": "Musical Instruments, Guitars", "description": "Solid wood. Great."},
    "I2": {"title": "Drum", "brand": "", "categories": "", "description": ""},
    "I3": {"title": "", "brand": "", "categories": "", "description": ""},
    "I4": {"title": "Pick", "brand": "Dunlop", "categories": "Musical Instruments", "description": ""},
}  # fmt: skip


def toy_config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(
        None, [f"--data_path={tmp_path}", "--dataset=Toy", "--min_interactions=3", "--max_his_len=2", *overrides]
    )


def write_lines(path: Path, lines: list[str], gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join(lines) + "\n"
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def read_outputs(cfg: Config) -> dict[str, bytes]:
    """Every file in the dataset folder except the raw inputs."""
    raw = {"Musical_Instruments.json", "meta_Musical_Instruments.json"}
    return {p.name: p.read_bytes() for p in sorted(cfg.dataset_dir.iterdir()) if p.name not in raw}


def check_toy_outputs(cfg: Config, stats: dict) -> None:
    files = DatasetFiles.from_config(cfg)
    assert files.split("train").read_text() == EXPECTED_TRAIN
    assert files.split("valid").read_text() == EXPECTED_VALID
    assert files.split("test").read_text() == EXPECTED_TEST
    assert json.loads(files.item_map.read_text()) == {"[PAD]": 0, "I1": 1, "I2": 2, "I3": 3, "I4": 4}
    inter = files.inter.read_text().splitlines()
    assert inter[0] == "user_id:token\titem_id:token\trating:float\ttimestamp:float\tsplit:token"
    no_rating = [line.split("\t")[:2] + line.split("\t")[3:] for line in inter[5:8]]  # 2023: B2 has no rating
    assert no_rating == [["B2", "I2", "10.0", "train"], ["B2", "I1", "10.0", "valid"], ["B2", "I3", "30.0", "test"]]
    assert len(inter) == 1 + 14
    assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (4, 4, 14)
    assert (stats["train_records"], stats["valid_records"], stats["test_records"]) == (2, 4, 4)
    assert stats["raw"]["interactions"] == 17 and stats["duplicates"] == {"rows": 1, "removed": True}
    assert stats["after_dedup"] == {"users": 5, "items": 5, "interactions": 16} and stats["kcore_rounds"] == 2
    # Option 1 compatibility: the shared loaders read what we wrote.
    splits = load_splits(files, load_item_map(files))
    assert splits["test"].target.tolist() == [4, 3, 4, 1] and splits["train"].history[1].tolist() == [3]


@pytest.mark.parametrize("gz", [False, True])
def test_amazon2018_full_pipeline(tmp_path: Path, gz: bool) -> None:
    cfg = toy_config(tmp_path)  # the config's default raw_file: Musical_Instruments.json (.gz found too)
    name = "Musical_Instruments.json" + (".gz" if gz else "")
    write_lines(cfg.dataset_dir / name, [review_2018(*r) for r in REVIEWS], gz=gz)
    write_lines(cfg.dataset_dir / ("meta_" + name), [json.dumps(m) for m in META_2018], gz=gz)
    stats = run(cfg)
    check_toy_outputs(cfg, stats)
    assert json.loads(DatasetFiles.from_config(cfg).item_text.read_text()) == EXPECTED_TEXT
    assert stats["item_text"]["items_with_metadata"] == 3


def test_amazon2014_python_literal_lines(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "--raw_format=amazon2014", "--raw_file=reviews.json", "--meta_file=meta.json")
    lines = [review_2014(*r) for r in REVIEWS]
    lines[3] = repr(json.loads(lines[3]))  # a Python-literal review line is tolerated in 2014 files
    write_lines(cfg.dataset_dir / "reviews.json", lines)
    write_lines(cfg.dataset_dir / "meta.json", META_2014)
    stats = run(cfg)
    check_toy_outputs(cfg, stats)
    assert stats["raw"]["bad_lines"] == 0
    assert json.loads(DatasetFiles.from_config(cfg).item_text.read_text()) == EXPECTED_TEXT


def test_amazon2023_milliseconds_and_missing_rating(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "--raw_format=amazon2023")  # default raw file Musical_Instruments.jsonl
    write_lines(cfg.dataset_dir / "Musical_Instruments.jsonl", [review_2023(*r) for r in REVIEWS])
    write_lines(cfg.dataset_dir / "meta_Musical_Instruments.jsonl", [json.dumps(m) for m in META_2023])
    stats = run(cfg)
    check_toy_outputs(cfg, stats)
    inter = DatasetFiles.from_config(cfg).inter.read_text().splitlines()
    assert inter[1] == "A1\tI1\t4.0\t100.0\ttrain" and inter[5] == "B2\tI2\t5.0\t10.0\ttrain"
    assert json.loads(DatasetFiles.from_config(cfg).item_text.read_text()) == EXPECTED_TEXT


def test_dedup_false_keeps_repeated_reviews(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "--dedup=false", "--meta_file=")
    write_lines(cfg.dataset_dir / "Musical_Instruments.json", [review_2018(*r) for r in REVIEWS])
    stats = run(cfg)
    test = DatasetFiles.from_config(cfg).split("test").read_text().splitlines()
    assert test[0] == '{"user_id": "A1", "target_id": "I1", "inter_history": ["I3", "I4"]}'  # the repeat at t=500
    assert stats["num_interactions"] == 15 and stats["duplicates"] == {"rows": 1, "removed": False}
    assert not DatasetFiles.from_config(cfg).item_text.exists()


def test_rerun_is_byte_identical(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path)
    write_lines(cfg.dataset_dir / "Musical_Instruments.json", [review_2018(*r) for r in REVIEWS])
    write_lines(cfg.dataset_dir / "meta_Musical_Instruments.json", [json.dumps(m) for m in META_2018])
    first_stats = run(cfg)
    first = read_outputs(cfg)
    assert run(cfg) == first_stats and read_outputs(cfg) == first
    assert sorted(first) == sorted(
        ["Toy.inter", "Toy.emb_map.json", "Toy.item_text.json", "dataset_stats.json"]
        + [f"Toy.{s}.jsonl" for s in ("train", "valid", "test")]
    )
    assert not list(cfg.dataset_dir.glob(".*.tmp"))  # no temporary files left behind


# -------------------------------------------------------------------------------------- errors
def test_malformed_lines_reported_then_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [review_2018(*r) for r in REVIEWS]
    lines.insert(2, '{"reviewerID": "A1", "asin": "I9", "overall": 5.0')  # line 3: truncated JSON
    lines.insert(6, json.dumps({"reviewerID": "B2", "asin": "I1", "overall": 5.0}))  # line 7: no timestamp
    cfg = toy_config(tmp_path, "--max_bad_line_share=0.2")
    path = write_lines(cfg.dataset_dir / "Musical_Instruments.json", lines)
    prep_logger = logging.getLogger("etegrec.prep")
    prep_logger.addHandler(caplog.handler)  # the "etegrec" logger may not propagate to the root
    try:
        with caplog.at_level(logging.WARNING, logger="etegrec.prep"):
            stats = run(cfg)
    finally:
        prep_logger.removeHandler(caplog.handler)
    assert stats["raw"]["bad_lines"] == 2 and stats["raw"]["lines"] == 19
    assert f"{path}:3: not valid JSON" in caplog.text and f"{path}:7: missing field 'unixReviewTime'" in caplog.text
    check_toy_outputs(cfg, stats)  # the bad lines are skipped, the rest is unchanged

    strict = toy_config(tmp_path, "--max_bad_line_share=0.05")
    with pytest.raises(PrepError) as err:
        run(strict)
    msg = str(err.value)
    assert "2 of 19 lines (10.53%)" in msg and "max_bad_line_share=0.05" in msg
    assert f"{path}:3:" in msg and f"{path}:7:" in msg and "--max_bad_line_share=0.11" in msg


def test_wrong_format_stops(tmp_path: Path) -> None:
    # 2014-style Python-literal reviews are not valid 2018 JSON: every line is reported, the run stops.
    cfg = toy_config(tmp_path)
    write_lines(cfg.dataset_dir / "Musical_Instruments.json", [repr(json.loads(review_2018(*r))) for r in REVIEWS])
    with pytest.raises(PrepError, match=r"(?s)17 of 17 lines .*--raw_format=amazon2014.*check raw_format"):
        run(cfg)


def test_missing_files_name_path_and_source(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path)
    with pytest.raises(PrepError) as err:
        run(cfg)
    assert str(cfg.dataset_dir / "Musical_Instruments.json") in str(err.value) and "nijianmo" in str(err.value)
    write_lines(cfg.dataset_dir / "Musical_Instruments.json", [review_2018(*r) for r in REVIEWS])
    with pytest.raises(PrepError, match=r"metadata file .*missing_meta\.json.*--meta_file="):
        run(toy_config(tmp_path, "--meta_file=missing_meta.json"))
    with pytest.raises(ConfigError, match="raw_format='amazon2019'; use one of: amazon2018, "):
        toy_config(tmp_path, "--raw_format=amazon2019")  # caught by Config.validate, before step 1 starts


def _load_script(name: str):
    """A ``RecBole/<name>.py`` script as a module (its ``main(argv)``)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "RecBole" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("script", "dataset", "raw_name", "review", "meta_name"),
    [
        ("prepare_data_2018", "Instrument2018_5090", "Musical_Instruments.json", review_2018,
         "meta_Musical_Instruments.json"),
        ("prepare_data_2014", "Instrument2014", "reviews_Musical_Instruments.json", review_2014,
         "meta_Musical_Instruments.json"),
        ("prepare_data", "Instruments2023", "Musical_Instruments.jsonl", review_2023,
         "meta_Musical_Instruments.jsonl"),
    ],
)  # fmt: skip
def test_scripts_prepare_reviews_without_metadata(
    tmp_path: Path, script: str, dataset: str, raw_name: str, review, meta_name: str
) -> None:
    # Each script with its defaults and only the review file: splits and map written, one warning naming the
    # metadata file; then step 2.2 stops with one line naming it.
    from etegrec.embeddings import text

    folder = tmp_path / dataset
    write_lines(folder / raw_name, [review(*r) for r in REVIEWS])
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("etegrec.prep").addHandler(handler)
    try:
        _load_script(script).main([f"--data_path={tmp_path}", "--min_interactions=3"])
    finally:
        logging.getLogger("etegrec.prep").removeHandler(handler)
    files = DatasetFiles(folder, dataset)
    assert json.loads(files.item_map.read_text()) == {"[PAD]": 0, "I1": 1, "I2": 2, "I3": 3, "I4": 4}
    assert all(files.split(s).is_file() for s in ("train", "valid", "test")) and not files.item_text.exists()
    assert len(warnings) == 1 and f"{folder / meta_name}" in warnings[0] and "no item text" in warnings[0]
    assert json.loads(files.stats.read_text())["item_text"]["looked_for"][0] == str(folder / meta_name)

    cfg = load_config(None, [f"--data_path={tmp_path}", f"--dataset={dataset}", "--min_interactions=3"])
    with pytest.raises(ArtifactError, match=rf"no item text .*{meta_name}.*re-run step 1"):
        text.run(cfg)
    with pytest.raises(ArtifactError, match=rf"^no item text .*{meta_name}"):
        _load_script("generate_text_embeddings").main(
            [f"--data_path={tmp_path}", f"--dataset={dataset}", "--min_interactions=3"]
        )


def test_explicit_metadata_file_must_exist_in_the_scripts(tmp_path: Path) -> None:
    write_lines(tmp_path / "Instrument2018_5090" / "Musical_Instruments.json", [review_2018(*r) for r in REVIEWS])
    with pytest.raises(PrepError, match=r"^metadata file .*foo\.json"):
        _load_script("prepare_data_2018").main([f"--data_path={tmp_path}", "--meta_file=foo.json"])
    assert not (tmp_path / "Instrument2018_5090" / "dataset_stats.json").exists()


def test_killed_step_1_leaves_the_folder_marked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from etegrec.prep import prepare

    cfg = toy_config(tmp_path)
    write_lines(cfg.dataset_dir / "Musical_Instruments.json", [review_2018(*r) for r in REVIEWS])
    run(cfg)
    first = read_outputs(cfg)
    files = DatasetFiles.from_config(cfg)
    real_write = prepare.atomic_write_text

    def killed_at_the_item_map(path: Path, text: str) -> None:
        if path == files.item_map:
            raise KeyboardInterrupt  # what a kill leaves: earlier files new, later ones old, no cleanup
        real_write(path, text)

    monkeypatch.setattr(prepare, "atomic_write_text", killed_at_the_item_map)
    with pytest.raises(KeyboardInterrupt):
        run(toy_config(tmp_path, "--dedup=false"))
    assert files.step1_incomplete.exists() and not files.stats.exists()
    with pytest.raises(ArtifactError, match="step 1 that did not finish"):
        load_item_map(files)
    monkeypatch.setattr(prepare, "atomic_write_text", real_write)
    run(cfg)  # a complete re-run clears the marker
    assert read_outputs(cfg) == first


def test_over_strict_threshold_names_it(tmp_path: Path) -> None:
    cfg = toy_config(tmp_path, "--min_interactions=6")
    write_lines(cfg.dataset_dir / "Musical_Instruments.json", [review_2018(*r) for r in REVIEWS])
    with pytest.raises(
        PrepError, match=r"min_interactions=6: before it 5 users / 5 items / 16 interactions, after it 0"
    ):
        run(cfg)
    assert not DatasetFiles.from_config(cfg).stats.exists()  # nothing is written on failure


# ------------------------------------------------------------------------- converters, real data
def prepare_real(tmp_path: Path, *overrides: str) -> tuple[Config, dict]:
    cfg = load_config(None, [f"--data_path={tmp_path}", *overrides])
    return cfg, run(cfg)


def check_leave_one_out_counts(cfg: Config, stats: dict) -> None:
    """train = sum(n_u - 3), valid = test = users, counted from the written files."""
    files = DatasetFiles.from_config(cfg)
    per_user = Counter(line.split("\t", 1)[0] for line in files.inter.read_text().splitlines()[1:])
    assert len(per_user) == stats["num_users"] and sum(per_user.values()) == stats["num_interactions"]
    n_lines = {s: sum(1 for _ in files.split(s).open()) for s in ("train", "valid", "test")}
    assert n_lines == {"train": sum(n - 3 for n in per_user.values()), "valid": len(per_user), "test": len(per_user)}
    assert n_lines == {s: stats[f"{s}_records"] for s in n_lines}
    assert len(json.loads(files.item_map.read_text())) == stats["num_items"] + 1


def test_beauty_p5(tmp_path: Path, shared_data: Path) -> None:
    cfg, stats = prepare_real(
        tmp_path, "--dataset=Beauty", "--raw_format=beauty_p5", f"--raw_file={shared_data / 'beauty_p5'}"
    )
    assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (22363, 12101, 198502)
    assert stats["raw"] | {"file": None} == {
        "file": None,
        "lines": 22363,
        "bad_lines": 0,
        "users": 22363,
        "items": 12101,
        "interactions": 198502,
    }
    assert stats["duplicates"]["rows"] == 0 and stats["kcore_rounds"] == 1  # already 5-core: nothing removed
    assert (stats["train_records"], stats["valid_records"]) == (198502 - 3 * 22363, 22363)
    check_leave_one_out_counts(cfg, stats)
    text = json.loads(DatasetFiles.from_config(cfg).item_text.read_text())
    assert len(text) == 12101
    # item 1: ["OPI", "Makeup", "Nails", "Nail Polish"]; item 4 has no brand: ["Makeup", "Face", ...]
    assert text["1"] == {"title": "", "brand": "OPI", "categories": "Makeup, Nails, Nail Polish", "description": ""}
    assert text["4"]["brand"] == "" and text["4"]["categories"] == "Makeup, Face, Concealers & Neutralizers"


def test_cgr_scientific(tmp_path: Path, shared_data: Path) -> None:
    cfg, stats = prepare_real(
        tmp_path, "--dataset=Scientific", "--raw_format=cgr_json", f"--raw_file={shared_data / 'scientific2018_cgr'}"
    )
    assert (stats["num_users"], stats["num_items"], stats["num_interactions"]) == (8317, 4344, 58492)
    assert (stats["raw"]["users"], stats["raw"]["items"], stats["raw"]["interactions"]) == (8317, 4344, 58492)
    check_leave_one_out_counts(cfg, stats)
    text = json.loads(DatasetFiles.from_config(cfg).item_text.read_text())
    assert len(text) == 4344 and text["0"]["brand"] == "Sealed Unit Parts Co., Inc."
    assert text["0"]["categories"] == "Industrial & Scientific, Industrial Electrical, Passive Components, Capacitors"
    first = json.loads(DatasetFiles.from_config(cfg).split("valid").open().readline())
    assert first == {"user_id": "0", "target_id": "7", "inter_history": ["0", "1", "2", "3", "4", "5", "6"]}


def test_ml100k_from_recbole_package(tmp_path: Path) -> None:
    cfg, stats = prepare_real(tmp_path, "--dataset=ml-100k", "--raw_format=ml-100k")
    assert (stats["raw"]["users"], stats["raw"]["items"], stats["raw"]["interactions"]) == (943, 1682, 100000)
    assert stats["num_users"] == 943 and stats["num_items"] < 1682
    check_leave_one_out_counts(cfg, stats)
    text = json.loads(DatasetFiles.from_config(cfg).item_text.read_text())
    assert text["1"] == {
        "title": "Toy Story (1995)",
        "brand": "",
        "categories": "Animation, Children's, Comedy",
        "description": "",
    }
    assert list(text) == list(json.loads(DatasetFiles.from_config(cfg).item_map.read_text()))[1:]  # item-id order
