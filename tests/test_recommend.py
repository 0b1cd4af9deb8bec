"""Using a trained model: the Recommender API, its command line, the code export and their bad-input errors
(etegrec/recommend.py, etegrec/export_codes.py), on tiny joint-training and GRPO checkpoints."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from tiny_data import make_tiny_dataset

from etegrec import export_codes, recommend
from etegrec.artifacts import ArtifactError, DatasetFiles, load_item_map, load_split
from etegrec.rec import trainer
from etegrec.rec.checkpoint import load_joint
from etegrec.cli import run_script
from etegrec.rec.data import SequenceDataset, eval_loader
from etegrec.rec.evaluate import top_candidates
from etegrec.rec.metrics import metrics_from_ranks, target_ranks
from etegrec.recommend import Recommender, RecommendError
from etegrec.runtime import make_accelerator


@pytest.fixture(scope="module")
def accelerator():
    return make_accelerator()


def _train(root, accelerator, **overrides):
    """A tiny dataset with item text, a joint-training run and a one-epoch GRPO run on top of it."""
    from etegrec.grpo.config import load_grpo_config
    from etegrec.grpo.trainer import run as run_grpo

    cfg = make_tiny_dataset(root, epochs=4, finetune_epochs=2, **overrides)
    files = DatasetFiles.from_config(cfg)
    text = {f"it{j}": {"title": f"Film {j}", "categories": "Drama"} for j in range(1, 30)}
    text["it30"] = {"title": "", "categories": "Comedy, Music"}  # no title: the other fields are shown
    files.item_text.write_text(json.dumps(text))
    joint = trainer.run(cfg, accelerator)
    grpo_cfg = load_grpo_config(
        [f"--sft_ckpt={joint['best_checkpoint']}", "--grpo_group_size=2", "--grpo_batch_size=16",
         "--grpo_epochs=1", "--grpo_epoch_updates=2", "--grpo_lr=0.003"]
    )
    grpo = run_grpo(grpo_cfg, accelerator)
    return {
        "cfg": cfg,
        "joint": (Path(joint["best_checkpoint"]), joint["test"]),
        "grpo": (Path(grpo["run_dir"]) / "best.pt", grpo["grpo"]["test"]),
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, accelerator):
    return _train(tmp_path_factory.mktemp("use"), accelerator)


@pytest.fixture(scope="module")
def trained_without_suffix(tmp_path_factory, accelerator):
    """As ``trained``, with encoder histories of level codes alone (``history_suffix: false``)."""
    return _train(tmp_path_factory.mktemp("use_no_suffix"), accelerator, history_suffix=False)


def _test_records(cfg):
    lines = DatasetFiles.from_config(cfg).split("test").read_text().splitlines()
    return [json.loads(line) for line in lines]


# --------------------------------------------------------------------------------------- API vs evaluation
@pytest.mark.parametrize("runs", ["trained", "trained_without_suffix"])
@pytest.mark.parametrize("kind", ["joint", "grpo"])
def test_recommendations_are_the_evaluation_top_k_lists(request, accelerator, tmp_path, capsys, runs, kind):
    trained = request.getfixturevalue(runs)
    path, test_metrics = trained[kind]
    cfg = trained["cfg"]
    rec = Recommender.from_checkpoint(path)
    records = _test_records(cfg)
    recs = rec.recommend([r["inter_history"] for r in records], k=10, exclude_history=False)
    # the command line on the test split file itself (user_id, target_id, inter_history) serves the same lists
    split_file, out_file = DatasetFiles.from_config(cfg).split("test"), tmp_path / "recs.jsonl"
    args = ["--ckpt", path, "--input", split_file, "--output", out_file, "--k", "10", "--include_history"]
    assert _run(recommend, args, capsys)[0] == 0
    served = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [s["user_id"] for s in served] == [r["user_id"] for r in records]
    assert [(s["items"], s["scores"]) for s in served] == [(r.items, r.scores) for r in recs]

    # the evaluation's own lists: top_candidates over evaluation's loader of the test split
    state = load_joint(path)
    suffix = state.cfg.model.history_suffix  # the stored config decides how the model reads histories
    assert suffix == cfg.model.history_suffix == rec.model.history_suffix
    files = DatasetFiles.from_config(cfg)
    data = SequenceDataset(load_split(files, "test", load_item_map(files), cfg.data.max_his_len), cfg.data.max_his_len)
    loader = eval_loader(data, state.item_codes, cfg.train.eval_batch_size, history_suffix=suffix)
    outs = list(top_candidates(state.model, state.item_codes.trie(), loader, accelerator, cfg.train.num_beams, 10))
    items = torch.cat([out.items for _, out in outs])  # (n, 10) in the loader's record order
    scores = torch.cat([out.scores for _, out in outs])
    ordered = loader.dataset
    evaluation = {
        (tuple(ordered.history[i, : ordered.lengths[i]].tolist()), int(ordered.target[i])): (items[i], scores[i])
        for i in range(len(ordered))
    }
    assert len(evaluation) == len(records)
    for record, got in zip(records, recs):
        key = (tuple(rec.item_map[x] for x in record["inter_history"][-cfg.data.max_his_len :]),
               rec.item_map[record["target_id"]])
        want_items, want_scores = evaluation[key]
        assert got.items == [rec.raw_ids[i] for i in want_items.tolist()]
        assert got.scores == pytest.approx(want_scores.tolist(), abs=1e-5)
        codes = [state.item_codes.table[rec.item_map[x]].tolist() for x in got.items]
        assert [list(s) for s in got.semantic_ids] == codes

    # and the metrics recomputed from the served lists are the run's test metrics
    served = torch.tensor([[rec.item_map[x] for x in r.items] for r in recs])
    target = torch.tensor([rec.item_map[r["target_id"]] for r in records])
    ranks = target_ranks(served, target)
    assert metrics_from_ranks(ranks, list(test_metrics)) == pytest.approx(test_metrics, abs=1e-9)


def test_excluding_the_history_cuts_the_evaluation_list_or_widens_the_beam(trained):
    path, _ = trained["joint"]
    rec = Recommender.from_checkpoint(path)
    histories = [r["inter_history"] for r in _test_records(trained["cfg"])]
    k = 5
    plain = rec.recommend(histories, k=rec.num_beams, exclude_history=False)
    excluded = rec.recommend(histories, k=k)
    for history, full, got in zip(histories, plain, excluded):
        assert len(got.items) == k and not set(got.items) & set(history)
        assert got.items == [x for x in full.items if x not in history][:k]  # enough left: the list minus history
        assert got.scores == sorted(got.scores, reverse=True)

    # k=25 of 30 items with 10 beams: at most 25 - |history| survive the cut, so the user is decoded again with
    # k + |history| (capped at N = 30) beams, which yields every item outside the history
    history = [f"it{j}" for j in range(3, 11)]
    got = rec.recommend([history], k=25)[0]
    assert sorted(got.items) == sorted(set(rec.raw_ids[1:]) - set(history))
    assert got.scores == sorted(got.scores, reverse=True) and all(math.isfinite(s) for s in got.scores)


def test_unknown_ids_are_skipped_or_strict_errors(trained):
    rec = Recommender.from_checkpoint(trained["joint"][0])
    mixed, clean, empty = ["it4", "nope", "it5", 6], ["it4", "it5"], ["nope"]
    out = rec.recommend([mixed, clean, empty, []], k=3)
    assert out[0].unknown == ["nope", "6"] and out[0].items == out[1].items and out[1].unknown == []
    assert out[2] == recommend.Recommendation([], [], [], ["nope"]) and out[3].items == []
    with pytest.raises(RecommendError, match=r"history 0: unknown item id 'nope' \(2 unknown\)"):
        rec.recommend([mixed], strict=True)
    with pytest.raises(RecommendError, match="history 1 is empty"):
        rec.recommend([clean, []], strict=True)
    for k in (0, 31):
        with pytest.raises(RecommendError, match=r"k=\d+ is outside 1..30 \(the catalogue has 30 items\)"):
            rec.recommend([clean], k=k)
    assert len(rec.recommend([clean], k=30, exclude_history=False)[0].items) == 30
    with pytest.raises(RecommendError, match="wrap one history in a list"):
        rec.recommend(clean)  # one history instead of a list of them: its ids would be read as histories


def test_item_text_and_titles(trained):
    rec = Recommender.from_checkpoint(trained["joint"][0])
    assert rec.text("it7") == "Film 7" and rec.text("it30") == "Categories: Comedy, Music"


# ------------------------------------------------------------------------------------- dataset checks
def _moved_data(trained, tmp_path) -> Path:
    """A copy of the tiny dataset folder under tmp_path/data (pass tmp_path / "data" as data_path)."""
    src = DatasetFiles.from_config(trained["cfg"]).dir
    shutil.copytree(src, tmp_path / "data" / src.name)
    return tmp_path / "data" / src.name / f"{src.name}.emb_map.json"


def test_moved_dataset_folder_is_found_with_data_path(trained, tmp_path):
    path = trained["joint"][0]
    _moved_data(trained, tmp_path)
    moved = Recommender.from_checkpoint(path, data_path=tmp_path / "data")
    assert moved.recommend([["it1", "it2"]]) == Recommender.from_checkpoint(path).recommend([["it1", "it2"]])
    with pytest.raises(ArtifactError, match=r"dataset folder .*empty/tiny of .* does not exist; pass --data"):
        Recommender.from_checkpoint(path, data_path=tmp_path / "empty")


def test_a_different_item_map_is_refused(trained, tmp_path):
    path = trained["joint"][0]
    item_map_file = _moved_data(trained, tmp_path)
    item_map = json.loads(item_map_file.read_text())
    item_map["it1"], item_map["it2"] = item_map["it2"], item_map["it1"]  # same size, other ids
    item_map_file.write_text(json.dumps(item_map))
    with pytest.raises(ArtifactError, match=r"\(30 items\) is not the item map .* \(30 items, other raw ids\)"):
        Recommender.from_checkpoint(path, data_path=tmp_path / "data")
    del item_map["it30"]
    item_map_file.write_text(json.dumps(item_map))
    with pytest.raises(ArtifactError, match=r"\(29 items\) is not the item map .* \(30 items\): the dataset was re-"):
        Recommender.from_checkpoint(path, data_path=tmp_path / "data")
    # a checkpoint from before the fingerprint: only the size can be checked
    old = torch.load(path, weights_only=True)
    del old["item_map_sha256"]
    torch.save(old, tmp_path / "old.pt")
    with pytest.raises(ArtifactError, match=r"\(29 items\) is not the item map"):
        Recommender.from_checkpoint(tmp_path / "old.pt", data_path=tmp_path / "data")


# ----------------------------------------------------------------------------------------- command line
def _run(module, argv, capsys):
    """Exit status, stdout and stderr of a module's command line, run as its ``__main__`` block runs it."""
    try:
        run_script(module.main, module.__doc__, None, argv=[str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_a_ranked_table(trained, capsys):
    path = trained["joint"][0]
    code, out, err = _run(recommend, ["--ckpt", path, "--history", "it3", "it4", "zz", "--k", "4"], capsys)
    assert code == 0 and "skipped 1 unknown item id(s) in 1 history(ies)" in err
    want = Recommender.from_checkpoint(path).recommend([["it3", "it4"]], k=4)[0]
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "item", "score", "semantic", "ID", "title"]
    assert len(lines) == 5
    for rank, (line, raw, score, sid) in enumerate(zip(lines[1:], want.items, want.scores, want.semantic_ids), 1):
        cells = line.split()
        assert cells[:4] == [str(rank), raw, f"{score:.4f}", "-".join(map(str, sid))]
        assert " ".join(cells[4:]) == Recommender.from_checkpoint(path).text(raw)


def test_cli_batch_mode_writes_one_line_per_user(trained, tmp_path, capsys):
    path = trained["joint"][0]
    lines = [
        {"user_id": "a", "inter_history": ["it1", "it2", "it3"]},
        {"user_id": 7, "history": ["it9", "bad", "it10"]},
        {"user_id": "empty", "history": ["bad"]},
        {"user_id": "b", "inter_history": ["it20"], "target_id": "it21"},
    ]
    src = tmp_path / "histories.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines) + "\n")
    dst = tmp_path / "recs.jsonl"
    code, _, err = _run(recommend, ["--ckpt", path, "--input", src, "--output", dst, "--k", "3"], capsys)
    assert code == 0
    assert "recommend: 100%" in err  # the progress bar
    assert "wrote 3 user(s)" in err and "skipped 2 unknown item id(s) in 2 history(ies)" in err
    assert "skipped 1 user(s) without any known item" in err
    got = [json.loads(line) for line in dst.read_text().splitlines()]
    want = Recommender.from_checkpoint(path).recommend([x.get("inter_history") or x["history"] for x in lines], k=3)
    assert [g["user_id"] for g in got] == ["a", 7, "b"]
    for g, w in zip(got, [want[0], want[1], want[3]]):
        assert g["items"] == w.items and g["scores"] == w.scores
        assert g["semantic_ids"] == [list(s) for s in w.semantic_ids]

    code, _, err = _run(recommend, ["--ckpt", path, "--input", src, "--output", dst, "--strict"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: {src}:2 (user_id 7): unknown item id 'bad' (1 unknown in this history)")
    src.write_text(json.dumps(lines[0]) + "\n" + json.dumps({"user_id": "x", "history": []}) + "\n")
    code, _, err = _run(recommend, ["--ckpt", path, "--input", src, "--output", dst, "--strict"], capsys)
    assert code == 2 and err.startswith(f"error: {src}:2 (user_id 'x'): the history is empty")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"user_id": "a", "history": ["it1"]}\n{oops\n', r":2: not JSON \(.*\); write one object per line"),
        ('{"user_id": "a", "items": ["it1"]}\n', r":1: needs a list of raw item ids under 'inter_history' or 'hist"),
        ('["it1"]\n', ":1: needs a list of raw item ids"),
    ],
)
def test_cli_malformed_input_lines(trained, tmp_path, capsys, content, message):
    src = tmp_path / "in.jsonl"
    src.write_text(content)
    code, _, err = _run(
        recommend, ["--ckpt", trained["joint"][0], "--input", src, "--output", tmp_path / "o.jsonl"], capsys
    )
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert re.search(message, err)
    assert not (tmp_path / "o.jsonl").exists()


def test_cli_bad_requests_give_one_line(trained, tmp_path, capsys):
    path = trained["joint"][0]
    cases = [
        (["--history", "it1", "--k", "99"], r"error: k=99 is outside 1..30"),
        (["--history", "zz", "yy"], r"error: none of the --history ids is in the catalogue \(skipped 2 unknown"),
        (["--history", "it1", "--data_path", tmp_path / "nowhere"], r"error: dataset folder .* does not exist"),
        (["--input", tmp_path / "missing.jsonl", "--output", tmp_path / "o"], r"error: cannot read --input .*missing"),
        (["--history", "it1", "--batch_size", "0"], r"error: num_beams=10 and batch_size=0 must both be >= 1"),
    ]
    for extra, message in cases:
        code, _, err = _run(recommend, ["--ckpt", path, *extra], capsys)
        assert code == 2 and err.count("\n") == 1, err
        assert re.match(message, err), err
    code, _, err = _run(recommend, ["--ckpt", tmp_path / "none.pt", "--history", "it1"], capsys)
    assert code == 2 and err.startswith("error: joint checkpoint") and "does not exist" in err
    code, _, err = _run(recommend, ["--ckpt", path, "--input", tmp_path / "x.jsonl"], capsys)
    assert code == 2 and "--input needs --output" in err  # argparse: usage line, then the error


# --------------------------------------------------------------------------------------------- export
def test_codebook_usage_by_hand():
    codes = torch.tensor([[0, 1, 0], [0, 1, 1], [1, 2, 0], [3, 2, 0]])  # (4 items, 2 levels + suffix)
    usage = export_codes.codebook_usage(codes, [4, 4])
    first, second = usage["levels"]
    # level 1: counts (2, 1, 0, 1) -> 3 codes used, entropy -(.5 ln .5 + 2 * .25 ln .25); level 2: (0, 2, 2, 0)
    assert (first["codes_used"], first["max_items_per_code"], first["usage"]) == (3, 2, 0.75)
    assert first["entropy"] == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)))
    assert first["perplexity"] == pytest.approx(math.exp(first["entropy"]))
    assert (second["codes_used"], second["max_items_per_code"]) == (2, 2)
    assert second["entropy"] == pytest.approx(math.log(2))
    assert (usage["distinct_tuples"], usage["collision_rate"], usage["largest_collision_group"]) == (3, 0.25, 2)


@pytest.mark.parametrize("kind", ["joint", "grpo", "rqvae"])
def test_export_writes_the_code_table_of_every_checkpoint_kind(trained, tmp_path, capsys, kind):
    cfg = trained["cfg"]
    path = Path(cfg.tokenizer.rqvae_path) if kind == "rqvae" else trained[kind][0]
    table = torch.load(path, weights_only=True)["item_codes"]  # (30, 4)
    out = tmp_path / "codes"
    code, printed, _ = _run(export_codes, ["--ckpt", path, "--out", out], capsys)
    assert code == 0 and "| level | codebook | codes used |" in printed and "30 items" in printed
    assert sorted(p.name for p in out.iterdir()) == ["codebook_usage.json", "item_codes.csv", "item_codes.json"]

    item_map = load_item_map(DatasetFiles.from_config(cfg))
    rows = list(csv.DictReader((out / "item_codes.csv").open()))
    assert list(rows[0]) == ["raw_id", "item_id", "code_1", "code_2", "code_3", "suffix", "title"]
    assert len(rows) == 30
    for row in rows:
        item = int(row["item_id"])
        assert item_map[row["raw_id"]] == item
        assert [int(row[f"code_{level}"]) for level in (1, 2, 3)] + [int(row["suffix"])] == table[item - 1].tolist()
    assert rows[6]["title"] == "Film 7" and rows[29]["title"] == "Categories: Comedy, Music"

    doc = json.loads((out / "item_codes.json").read_text())
    assert (doc["kind"], doc["dataset"], doc["codebook_sizes"]) == (kind, "tiny", [8, 8, 8])
    assert [[r["raw_id"], r["item_id"], *r["codes"], r["suffix"], r["title"]] for r in doc["items"]] == [
        [r["raw_id"], int(r["item_id"]), *(int(r[f"code_{i}"]) for i in (1, 2, 3)), int(r["suffix"]), r["title"]]
        for r in rows
    ]
    usage = json.loads((out / "codebook_usage.json").read_text())
    assert usage == {"checkpoint": str(path), "kind": kind, "dataset": "tiny",
                     **json.loads(json.dumps(export_codes.codebook_usage(table, [8, 8, 8])))}
    for level in usage["levels"]:
        assert level["codes_used"] == len(torch.unique(table[:, level["level"] - 1]))


def test_export_bad_inputs_give_one_line(trained, tmp_path, capsys):
    cfg = trained["cfg"]
    not_a_ckpt = DatasetFiles.from_config(cfg).item_map
    code, _, err = _run(export_codes, ["--ckpt", not_a_ckpt, "--out", tmp_path / "o"], capsys)
    assert code == 2 and err.count("\n") == 1 and "is not a readable checkpoint" in err
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    code, _, err = _run(export_codes, ["--ckpt", tmp_path / "other.pt", "--out", tmp_path / "o"], capsys)
    assert code == 2 and "is neither a joint-training / GRPO checkpoint" in err
    args = ["--ckpt", cfg.tokenizer.rqvae_path, "--out", tmp_path / "o", "--data_path", tmp_path / "nowhere"]
    code, _, err = _run(export_codes, args, capsys)
    assert code == 2 and err.count("\n") == 1 and "does not exist; pass --data_path" in err
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ benchmark
def test_speed_benchmark_times_recommend_beside_the_decoder(tmp_path, accelerator):
    from etegrec.bench.speed import _recommend_section, markdown

    joint = trainer.JointTrainer(make_tiny_dataset(tmp_path), accelerator)
    section = _recommend_section(joint, [1, 10], 16, repeats=2)
    # 1 beam cannot give a top 10: only the 10-beam rows
    assert set(section) == {"users", "repeats", "decoder_beams_10", "beams_10", "beams_10_exclude_history"}
    assert section["users"] == 16
    decoder = section["decoder_beams_10"]["users_per_s"]
    for row in ("beams_10", "beams_10_exclude_history"):
        assert section[row]["vs_decoder"] == pytest.approx(section[row]["users_per_s"] / decoder)
    table = markdown({"dataset": "tiny", "model": "T5", "machine": "cpu", "matmul_gflops": 1.0,
                      "eval": {"beams_10": {"users_per_s": 100.0, "utilisation": 0.1}}, "recommend": section})
    assert "| `Recommender.recommend` batch (raw ids, top 10), 10 beams |" in table
    assert "| `Recommender.recommend` batch (raw ids, top 10, history excluded), 10 beams |" in table
