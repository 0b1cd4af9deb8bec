"""The whole pipeline behind ``bash run.sh``: build whatever earlier artifact is missing, then report.

``ensure_upstream`` runs steps 1-3 (data preparation, SASRec and text vectors, RQ-VAE pretraining) on the
main process for any artifact that does not exist yet, while the other processes wait; existing artifacts
are used as they are (delete one to rebuild it). With ``build_missing: false`` a missing artifact is an
error naming the step that makes it.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from etegrec.artifacts import (
    SPLITS,
    STEP_PREPARE,
    ArtifactError,
    DatasetFiles,
    collab_emb_path,
    text_emb_path,
)
from etegrec.config import Config

logger = logging.getLogger("etegrec.pipeline")


def _missing_prepared(files: DatasetFiles) -> bool:
    return not files.item_map.is_file() or not all(files.split(s).is_file() for s in SPLITS)


def _timed(what: str, fn, *args) -> Any:
    logger.info("building missing artifact: %s", what)
    start = time.perf_counter()
    out = fn(*args)
    logger.info("%s done in %.1f s", what, time.perf_counter() - start)
    return out


def build_missing(cfg: Config) -> None:
    """Run every earlier stage whose output is missing (single process)."""
    files = DatasetFiles.from_config(cfg)
    name = cfg.data.dataset

    def need(what: str, step: str) -> None:
        if not cfg.data.build_missing:
            raise ArtifactError(f"missing {what} for dataset {name!r}; make it with {step.replace('NAME', name)} "
                                "or set build_missing: true")

    if _missing_prepared(files):
        need("prepared splits", STEP_PREPARE)
        from etegrec.prep.prepare import run as prepare

        _timed("step 1: data preparation", prepare, cfg)
    mode = cfg.tokenizer.tokenizer_input
    if mode in ("dual", "collab") and not collab_emb_path(cfg).is_file():
        need("SASRec item vectors", "step 2.1")
        from etegrec.embeddings.sasrec import run as train_sasrec

        _timed("step 2.1: SASRec item vectors", train_sasrec, cfg)
    if mode in ("dual", "text") and not text_emb_path(cfg).is_file():
        need("text item vectors", "step 2.2")
        from etegrec.embeddings.text import run as encode_text

        _timed("step 2.2: text item vectors", encode_text, cfg)
    from etegrec.tokenizer.pretrain import resolve_rqvae_path

    try:
        resolve_rqvae_path(cfg)
    except ArtifactError:
        need("pretrained RQ-VAE tokenizer", "step 3")
        from etegrec.tokenizer.pretrain import run as pretrain_tokenizer

        _timed("step 3: RQ-VAE tokenizer pretraining", pretrain_tokenizer, cfg)


def ensure_upstream(cfg: Config, accelerator: Any = None) -> None:
    """``build_missing`` on the main process; every process waits for it.

    ``accelerate launch`` gives each of N CPU processes 1/N of the cores; while the others only wait, the
    main process uses all of them for the upstream stages.
    """
    import os

    import torch

    if accelerator is None or accelerator.is_main_process:
        threads = torch.get_num_threads()
        if accelerator is not None and accelerator.num_processes > 1 and accelerator.device.type == "cpu":
            torch.set_num_threads(os.cpu_count() or threads)
        try:
            build_missing(cfg)
        finally:
            torch.set_num_threads(threads)
    if accelerator is not None:
        accelerator.wait_for_everyone()


def comparison_table(cfg: Config, rows: dict[str, dict[str, float]]) -> str:
    """A Markdown table of test metrics, one row per model, plus SASRec and popularity when available."""
    from etegrec.artifacts import load_item_map, load_splits
    from etegrec.baselines import popularity_metrics

    names = cfg.train.metrics
    files = DatasetFiles.from_config(cfg)
    item_map = load_item_map(files)
    splits = load_splits(files, item_map, cfg.data.max_his_len)
    table = dict(rows)
    if files.sasrec_metrics.is_file():
        sasrec = json.loads(files.sasrec_metrics.read_text()).get("test", {})
        table["SASRec (RecBole)"] = {k: sasrec[k] for k in names if k in sasrec}
    table["Popularity"] = popularity_metrics(splits["train"], splits["test"], len(item_map) - 1, names)
    lines = ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for model, metrics in table.items():
        cells = [f"{metrics[n]:.4f}" if n in metrics else "-" for n in names]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
