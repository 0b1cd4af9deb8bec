"""The benchmarks run end to end on a tiny preset (real Scientific data, shrunk by a stricter k-core)."""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch

from etegrec.artifacts import DatasetFiles
from etegrec.bench.quality import (
    PRESETS,
    REPORTED,
    _claim,
    _merge_result,
    _prepared_seed_folder,
    _reuse_deterministic_files,
    build_seed_folder,
    markdown,
    matched_recommender_epochs,
    run_quality,
    seed_config,
    summarise,
)
from etegrec.bench.speed import eval_history_batches, t5_forward_flops, time_train_steps
from etegrec.config import ModelConfig


def test_summary_mean_and_std() -> None:
    runs = {
        "d/seed1/M": {"test": {m: 0.1 for m in REPORTED}},
        "d/seed2/M": {"test": {m: 0.3 for m in REPORTED}},
    }
    s = summarise(runs, ["d"], ["M"])["d"]["M"]["ndcg@10"]
    assert s["mean"] == pytest.approx(0.2) and s["std"] == pytest.approx(0.1) and s["n"] == 2
    assert "0.2000 ± 0.1000" in markdown({"d": {"M": summarise(runs, ["d"], ["M"])["d"]["M"]}},
                                         {"preset": "x", "seeds": [1, 2], "machine": "m", "commit": "c"})


def test_run_table_says_how_each_training_stage_ended() -> None:
    runs = {"d/seed1/ETEGRec": {"test": {m: 0.1 for m in REPORTED}, "wall_s": 60, "epochs_done": 30,
                                "stage_ends": {"alternating": "early stop after 28 epochs",
                                               "finetune": "early stop after 2 epochs"}}}
    table = markdown(summarise(runs, ["d"], ["ETEGRec"]), {"preset": "x", "seeds": [1], "machine": "m", "commit": "c"},
                     runs)
    assert "| d/seed1/ETEGRec | 60 s | 30 | finished; alternating: early stop after 28 epochs; finetune: early stop " \
           "after 2 epochs |" in table


def test_result_file_keeps_runs_of_a_concurrent_invocation(tmp_path: Path) -> None:
    result_file = tmp_path / "quality_cpu.json"
    mine = {"runs": {}}
    other = {"runs": {}}
    mine = _merge_result(result_file, mine, "d/seed1/ETEGRec", {"test": {"ndcg@10": 0.2}}, {"preset": "cpu"})
    other = _merge_result(result_file, other, "d/seed1/TIGER-style", {"test": {"ndcg@10": 0.1}}, {"preset": "cpu"})
    mine = _merge_result(result_file, mine, None, None, {"preset": "cpu"})
    saved = json.loads(result_file.read_text())
    assert set(saved["runs"]) == set(mine["runs"]) == {"d/seed1/ETEGRec", "d/seed1/TIGER-style"}
    assert saved["runs"]["d/seed1/TIGER-style"]["test"]["ndcg@10"] == 0.1


def test_result_file_lists_the_seeds_of_all_its_runs(tmp_path: Path) -> None:
    result_file = tmp_path / "quality_cpu.json"
    state = _merge_result(result_file, {"runs": {}}, "d/seed2020/SASRec", {"test": {}}, {"seeds": [2020]})
    state = _merge_result(result_file, state, "e/seed2022/SASRec", {"test": {}}, {"seeds": [2022]})
    assert state["meta"]["seeds"] == json.loads(result_file.read_text())["meta"]["seeds"] == [2020, 2022]


def test_a_run_claimed_by_a_live_process_is_skipped(tmp_path: Path) -> None:
    import subprocess
    import sys

    holder = (
        "import sys, time; from etegrec.locks import FileLock\n"
        f"FileLock({str(tmp_path / 'd__seed1__ETEGRec.lock')!r}).acquire(); print('locked', flush=True); time.sleep(60)"
    )
    other = subprocess.Popen([sys.executable, "-c", holder], cwd=Path(__file__).resolve().parent.parent,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        assert _claim(tmp_path, "d/seed1/ETEGRec") is None  # the other process holds it
    finally:
        other.kill()
        other.wait()
    lock = _claim(tmp_path, "d/seed1/ETEGRec")  # released by the killed process: taken over
    assert lock is not None and lock.path.read_text().strip() == str(os.getpid())
    assert _claim(tmp_path, "d/seed1/TIGER-style") is not None
    lock.release()


def test_two_invocations_build_a_seed_folder_one_after_the_other(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading
    import time

    import etegrec.pipeline

    spans: list[tuple[float, float]] = []

    def slow_build(cfg) -> None:
        start = time.monotonic()
        time.sleep(0.3)
        spans.append((start, time.monotonic()))

    monkeypatch.setattr(etegrec.pipeline, "build_missing", slow_build)
    builders = [threading.Thread(target=build_seed_folder, args=("scientific", "tiny", 1, tmp_path, []))
                for _ in range(2)]
    for b in builders:
        b.start()
    for b in builders:
        b.join()
    first, second = sorted(spans)
    assert second[0] >= first[1]  # the second waited for the first (separate lock descriptors, as two processes)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("dataset", sorted(p.stem for p in (Path(__file__).parents[1] / "config").glob("*.yaml")))
def test_every_preset_is_a_valid_config_for_every_dataset(preset: str, dataset: str, tmp_path: Path) -> None:
    # a preset's overrides must not clash with a dataset config's own keys (the gpu preset's warm-up steps once
    # met beauty.yaml's warm-up ratio: a ConfigError a GPU machine would have met first)
    cfg = seed_config(dataset, preset, 1, tmp_path, [])
    assert cfg.train.seed == 1 and cfg.data.data_path == str(tmp_path / preset / dataset / "seed1" / "data")


def test_tiger_style_gets_as_many_recommender_epochs_as_etegrec(tmp_path: Path) -> None:
    # cycle 2: epochs 0, 2, 4, ... train the tokenizer, so 40 alternating epochs hold 20 recommender epochs
    cpu = seed_config("scientific", "cpu", 1, tmp_path, [])
    assert (cpu.train.epochs, cpu.train.cycle) == (40, 2) and matched_recommender_epochs(cpu) == 20
    # the measured winner (README, Benchmarks): the paper's SIA temperature, codes kept unless a margin-1 move
    assert (cpu.train.sia_tau, cpu.train.code_refresh_margin) == ("1", 1.0)
    # cycle 4: one tokenizer epoch, three recommender epochs per cycle
    cycle4 = seed_config("scientific", "cpu", 1, tmp_path, ["--cycle=4", "--eval_step=4"])
    assert matched_recommender_epochs(cycle4) == 30
    # warm_phase=recommender: the first cycle's tokenizer epoch inside warm_epoch=2 trains the recommender too
    warm_rec = seed_config("scientific", "cpu", 1, tmp_path, ["--warm_phase=recommender"])
    assert matched_recommender_epochs(warm_rec) == 21


def test_flop_count_by_hand() -> None:
    # 1 encoder layer, 0 decoder layers, d=2, inner=2 (1 head x 2), d_ff=4, K=3; one sequence of 2 encoder
    # tokens and 1 decoder token: encoder 2 * (4*2*2 + 2*2*4 + 2*2*2) = 2 * 40 = 80 MACs; classifier 1*2*3 = 6.
    m = ModelConfig(encoder_layers=1, decoder_layers=0, d_model=2, d_ff=4, num_heads=1, d_kv=2, code_num=3)
    assert t5_forward_flops(m, enc_tokens=2, dec_tokens=1, sequences=1) == 2 * (80 + 6)


def test_speed_benchmark_counts_real_tokens(tmp_path: Path) -> None:
    import torch
    from tiny_data import make_tiny_dataset

    from etegrec.rec.trainer import JointTrainer
    from etegrec.runtime import make_accelerator

    cfg = make_tiny_dataset(tmp_path)
    joint = JointTrainer(cfg, make_accelerator())
    steps_taken = []
    step = joint.optimizer_step
    joint.optimizer_step = lambda groups: (steps_taken.append(1), step(groups))
    for phase in ("tokenizer", "recommender"):
        r = time_train_steps(joint, phase, 2)
        assert r["sequences"] == 2 * cfg.train.batch_size and r["seconds"] > 0
        assert len(steps_taken) == 4  # an untimed pass over the 2 batches, then the timed one
        steps_taken.clear()
        assert r["dec_tokens"] == r["sequences"] * cfg.model.code_length
        assert 0 < r["enc_tokens_distinct"] <= r["enc_tokens"] and 0 < r["distinct"] <= r["sequences"]
    batches = eval_history_batches(joint, "test", 20)
    lengths = torch.cat([(b >= 0).sum(1) for b in batches])
    assert len(lengths) == 20 and torch.equal(lengths, lengths.sort().values)


def test_quality_benchmark_tiny_end_to_end(shared_data: Path, tmp_path: Path) -> None:
    args = argparse.Namespace(datasets=["scientific"], preset="tiny", seeds=[1],
                              models=["SASRec", "TIGER-style", "ETEGRec", "ETEGRec+GRPO", "without-ETE",
                                      "without-alignment"],
                              out=str(tmp_path), parallel=1, time_budget=0.0, deadline=0.0)
    overrides = [f"--raw_file={shared_data / 'scientific2018_cgr'}", "--min_interactions=6"]  # 465 users, 231 items
    state = run_quality(args, overrides)
    saved = json.loads((tmp_path / "quality_tiny.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(state["summary"]))
    assert set(saved["meta"]) >= {"preset", "seeds", "machine", "commit"}
    for model in args.models:
        run = saved["runs"][f"scientific/seed1/{model}"]
        assert run["wall_s"] >= 0
        for metric in REPORTED:
            assert 0.0 <= run["test"][metric] <= 1.0 and math.isfinite(run["test"][metric])
        assert saved["summary"]["scientific"][model]["recall@10"]["n"] == 1
    matched = ("TIGER-style", "ETEGRec", "without-ETE")
    limits = {m: saved["runs"][f"scientific/seed1/{m}"]["recommender_epoch_limit"] for m in matched}
    assert limits == dict.fromkeys(matched, 1)  # tiny preset: 2 alternating epochs, cycle 2
    # without-ETE trains a fresh recommender on the item IDs ETEGRec ended with, tokenizer frozen
    ete = torch.load(saved["runs"]["scientific/seed1/ETEGRec"]["checkpoint"], weights_only=True)
    without = torch.load(saved["runs"]["scientific/seed1/without-ETE"]["checkpoint"], weights_only=True)
    assert torch.equal(without["item_codes"], ete["item_codes"])
    assert all(torch.equal(without["tokenizer"][k], v) for k, v in ete["tokenizer"].items())
    assert without["config"]["ablation"] == "no_ete"
    # without-alignment: ETEGRec's schedule with SIA and PSA off
    unaligned = torch.load(saved["runs"]["scientific/seed1/without-alignment"]["checkpoint"], weights_only=True)
    assert unaligned["config"]["ablation"] == "no_align" and unaligned["config"]["epochs"] == ete["config"]["epochs"]
    assert (tmp_path / "quality_tiny.md").read_text().count("| ") > 4
    # a second invocation resumes: nothing is re-run, the same result comes back
    again = run_quality(args, overrides)
    assert again["runs"] == saved["runs"]


def test_a_killed_run_continues_from_its_last_checkpoint(shared_data: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from etegrec.runtime import Deadline

    overrides = [f"--raw_file={shared_data / 'scientific2018_cgr'}", "--min_interactions=6"]
    args = argparse.Namespace(datasets=["scientific"], preset="tiny", seeds=[1], models=["TIGER-style"],
                              out=str(tmp_path), parallel=1, time_budget=0.0, deadline=0.0)

    def killed(self, *units, accelerator=None):
        raise KeyboardInterrupt  # as a kill right after the first epoch's last.pt is written

    with monkeypatch.context() as patch:
        patch.setattr(Deadline, "room_for", killed)
        with pytest.raises(KeyboardInterrupt):
            run_quality(args, overrides)
    [interrupted] = (tmp_path / "tiny/scientific/seed1/ckpt/TIGER-style/scientific").iterdir()
    assert (interrupted / "last.pt").is_file() and not (tmp_path / "quality_tiny.json").exists()

    resumed = run_quality(args, overrides)["runs"]["scientific/seed1/TIGER-style"]
    assert resumed["resumed"] and Path(resumed["checkpoint"]).parent == interrupted
    # the same run without the kill (a finished run is never resumed: a fresh folder) gives the same result
    result_file = tmp_path / "quality_tiny.json"
    result_file.write_text(json.dumps({**json.loads(result_file.read_text()), "runs": {}}))
    fresh = run_quality(args, overrides)["runs"]["scientific/seed1/TIGER-style"]
    assert not fresh["resumed"] and Path(fresh["checkpoint"]).parent != interrupted
    assert fresh["test"] == pytest.approx(resumed["test"], abs=1e-6) and fresh["epochs_done"] == resumed["epochs_done"]


def test_new_seed_reuses_any_prepared_seed_folder(tmp_path: Path) -> None:
    # Seed 2021 prepared earlier; a run of seeds [2022] alone copies its step-1 files and text vectors, not its
    # seed-dependent SASRec vectors, nor lock or temporary files.
    import hashlib

    prepared = DatasetFiles.from_config(seed_config("scientific", "tiny", 2021, tmp_path, []))
    prepared.dir.mkdir(parents=True)
    step1 = {prepared.item_map: '{"[PAD]": 0}\n', prepared.split("train"): "{}\n"}
    for path, content in step1.items():
        path.write_text(content)
    sha = {p.name: hashlib.sha256(c.encode()).hexdigest() for p, c in step1.items()}
    prepared.stats.write_text(json.dumps({"sha256": sha}))
    (prepared.dir / f"{prepared.name}_sentence-transformer_text_384.npy").write_bytes(b"text")
    (prepared.dir / f"{prepared.name}_emb_64.npy").write_bytes(b"sasrec")
    (prepared.dir / f".{prepared.name}.inter.etegrec-1@h.x.tmp").write_bytes(b"")
    source = _prepared_seed_folder("scientific", "tiny", tmp_path, [])
    assert source is not None and source.train.seed == 2021

    new = seed_config("scientific", "tiny", 2022, tmp_path, [])
    _reuse_deterministic_files(new, source)
    copied = DatasetFiles.from_config(new)
    assert sorted(p.name for p in copied.dir.iterdir()) == sorted(
        ["dataset_stats.json", *sha, f"{prepared.name}_sentence-transformer_text_384.npy"]
    )
    assert copied.split("train").read_text() == "{}\n"
    assert _prepared_seed_folder("beauty", "tiny", tmp_path, []) is None


def test_gpu_command_runs_every_step_and_both_trainings_side_by_side(shared_data: Path, tmp_path: Path) -> None:
    # The GPU command as a fresh GPU machine runs it, with the tiny preset on the CPU.
    from etegrec.bench.__main__ import main

    main(["gpu", "--preset", "tiny", "--dataset", "scientific", "--seed", "1", "--time_budget", "1800",
          "--out", str(tmp_path), f"--raw_file={shared_data / 'scientific2018_cgr'}", "--min_interactions=6"])
    saved = json.loads((tmp_path / "quality_tiny.json").read_text())
    runs = {key.split("/")[-1]: run for key, run in saved["runs"].items()}
    assert set(runs) == {"SASRec", "TIGER-style", "ETEGRec"}
    tiger, ete = runs["TIGER-style"], runs["ETEGRec"]
    assert tiger["started_at"] < ete["finished_at"] and ete["started_at"] < tiger["finished_at"]  # side by side
    assert not tiger["stopped_by_budget"] and not ete["stopped_by_budget"]
    for run in runs.values():
        assert all(0.0 <= run["test"][m] <= 1.0 for m in REPORTED)
    # steps 1-3 were built once, by the invocation, before the workers started
    seed_folder = tmp_path / "tiny" / "scientific" / "seed1"
    assert list(saved["builds"]) == ["scientific/seed1"]
    assert len([p for p in (seed_folder / "rqvae" / "scientific").iterdir() if p.is_dir()]) == 1
    # each training has its own process log (told the deadline) and its own run folder
    for model in ("TIGER-style", "ETEGRec"):
        log = (tmp_path / "workers" / f"scientific_seed1_{model}.log").read_text()
        assert f"benchmark run scientific/seed1/{model}" in log and "the benchmark ends by" in log
        assert "building missing artifact" not in log
    assert Path(tiger["checkpoint"]).parent != Path(ete["checkpoint"]).parent
    table = (tmp_path / "quality_tiny.md").read_text()
    assert "Time budget 1800 s, used " in table and "runs not started within it: none." in table
    assert 0 < saved["meta"]["wall_s"] < 1800
    assert "| scientific/seed1: steps 1-3 |" in table and "| ETEGRec (n=1) |" in table
    # the speed benchmark of the same preset, on what the command built (as the H200 run did): nothing rebuilt
    main(["speed", "--preset", "tiny", "--dataset", "scientific", "--train_steps", "2", "--eval_users", "64",
          "--hf_users", "8", "--beams", "1", "10", "--batch_size", "64", "--out", str(tmp_path / "speed"),
          f"--data_path={seed_folder / 'data'}", f"--rq_ckpt_dir={seed_folder / 'rqvae'}", "--min_interactions=6"])
    speed = json.loads((tmp_path / "speed" / "speed_scientific.json").read_text())
    assert speed["preset"] == "tiny" and speed["model"].startswith("T5 1+1 layers, d_model 32")
    assert speed["train"]["recommender"]["seq_per_s"] > 0 and speed["eval"]["beams_10"]["users_per_s"] > 0
    assert speed["eval"]["hf_generate_beams_1"]["top_k_identical_share"] == 1.0
    assert "building missing artifact" not in (tmp_path / "speed" / "speed_scientific.log").read_text()


def test_grpo_waits_for_the_etegrec_run_of_its_seed() -> None:
    from etegrec.bench.quality import _ready

    grpo = ("d", 1, "ETEGRec+GRPO")
    assert _ready(("d", 1, "ETEGRec"), {}, set()) is True
    assert _ready(grpo, {}, {"d/seed1/ETEGRec"}) is False  # ETEGRec pending or running: wait
    assert _ready(grpo, {"d/seed1/ETEGRec": {}}, set()) is True
    assert _ready(grpo, {"d/seed2/ETEGRec": {}}, {"d/seed2/ETEGRec+GRPO"}) is None  # never: no ETEGRec of seed 1
    assert _ready(("d", 1, "without-ETE"), {}, {"d/seed1/ETEGRec"}) is False  # also trains on ETEGRec's IDs


def test_time_budget_stops_runs_records_them_and_still_writes_the_tables(shared_data: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from etegrec.runtime import Deadline

    overrides = [f"--raw_file={shared_data / 'scientific2018_cgr'}", "--min_interactions=6"]
    args = argparse.Namespace(datasets=["scientific"], preset="tiny", seeds=[1], models=["TIGER-style"],
                              out=str(tmp_path), parallel=1, time_budget=3600.0, deadline=0.0)
    with monkeypatch.context() as patch:  # the deadline is reached at the run's first epoch boundary
        patch.setattr(Deadline, "room_for", lambda self, *units, accelerator=None: False)
        run_quality(args, overrides)
    run = json.loads((tmp_path / "quality_tiny.json").read_text())["runs"]["scientific/seed1/TIGER-style"]
    assert run["stopped_by_budget"] and run["epochs_done"] == 1
    assert all(math.isfinite(run["test"][m]) for m in REPORTED)  # its best (only) model was tested

    # budget already spent: the next run does not start; the tables still show what finished
    args.models, args.time_budget = ["TIGER-style", "ETEGRec"], 1e-6
    state = run_quality(args, overrides)
    assert list(state["runs"]) == ["scientific/seed1/TIGER-style"]
    assert state["meta"]["not_started"] == ["scientific/seed1/ETEGRec"]
    table = (tmp_path / "quality_tiny.md").read_text()
    assert "| TIGER-style (n=1, 1 stopped by the time budget) |" in table
    assert "runs not started within it: scientific/seed1/ETEGRec" in table


def test_a_failed_parallel_run_is_named_with_its_error_in_the_tables_and_the_exit_status(
        shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a worker that stops with the one-line error every script ends with (here: the NaN guard's)
    import subprocess
    import sys

    from etegrec.bench import quality
    from etegrec.bench.__main__ import main

    def failing_worker(preset, job, out, overrides, env, deadline):
        log = quality._worker_log(out, quality._run_key(*job))
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("epoch 1 recommender: 77%|\rerror: non-finite loss at epoch 1 (recommender phase)\n")
        return subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])

    monkeypatch.setattr(quality, "_start_worker", failing_worker)
    with pytest.raises(SystemExit) as stop:
        main(["quality", "--preset", "tiny", "--datasets", "scientific", "--seeds", "1", "--models", "SASRec",
              "TIGER-style", "--parallel", "2", "--out", str(tmp_path),
              f"--raw_file={shared_data / 'scientific2018_cgr'}", "--min_interactions=6"])
    assert stop.value.code == 1  # the tables are written, and a script sees that a run is missing from them
    saved = json.loads((tmp_path / "quality_tiny.json").read_text())
    assert saved["meta"]["failed"] == {
        "scientific/seed1/TIGER-style": "non-finite loss at epoch 1 (recommender phase)"}
    assert list(saved["runs"]) == ["scientific/seed1/SASRec"]
    table = (tmp_path / "quality_tiny.md").read_text()
    assert ("Runs that failed (not in the tables): scientific/seed1/TIGER-style: non-finite loss at epoch 1 "
            "(recommender phase).") in table
