"""The whole pipeline behind ``bash run.sh``: build whatever earlier artifact is missing, then report.

``ensure_upstream`` runs steps 1-3 (data preparation, SASRec and text vectors, RQ-VAE pretraining) on the
main process for any artifact that does not exist yet, while the other processes wait; existing artifacts
are used as they are (delete one to rebuild it). Step 1 also runs when its folder is from an interrupted run
or was prepared with other data settings than the config's; when that changes the item map, steps 2-3 are
re-run too (their outputs belong to the old map). With ``build_missing: false`` each of these is an error
naming the file and the step that makes it. A split or item map changed after step 1 wrote it is always an
error (re-run step 1 on purpose).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from etegrec.artifacts import (
    SPLITS,
    STEP_PREPARE,
    STEP_RQVAE,
    STEP_SASREC,
    STEP_TEXT,
    ArtifactError,
    DatasetFiles,
    check_prepared_file,
    collab_emb_path,
    prepared_folder_problem,
    require_item_text,
    text_emb_path,
)
from etegrec.config import Config

logger = logging.getLogger("etegrec.pipeline")


def prepared_data_problem(files: DatasetFiles) -> str | None:
    """Why step 1 has to run for ``files``: a missing output (named), an interrupted run, other settings."""
    needed = [(files.item_map, "item-id map"), *((files.split(s), f"{s} split") for s in SPLITS)]
    missing = [f"{what} {path}" for path, what in needed if not path.is_file()]
    if missing:
        return f"missing prepared data: {', '.join(missing)} does not exist"
    return prepared_folder_problem(files)


def _timed(what: str, fn, *args) -> Any:
    logger.info("building missing artifact: %s", what)
    start = time.perf_counter()
    out = fn(*args)
    logger.info("%s done in %.1f s", what, time.perf_counter() - start)
    return out


def _ensure_prepared(cfg: Config, files: DatasetFiles) -> bool:
    """Run step 1 when ``prepared_data_problem`` says so; True when that replaced an existing, different item map."""
    problem = prepared_data_problem(files)
    if problem is None:
        for path, what in [(files.item_map, "item-id map"), *((files.split(s), f"{s} split") for s in SPLITS)]:
            check_prepared_file(files, path, what)  # stops on a file changed since step 1
        return False
    if not cfg.data.build_missing:
        raise ArtifactError(f"{problem}. Make it with {STEP_PREPARE.replace('NAME', files.name)} or set "
                            "build_missing: true")
    logger.info("step 1 needed: %s", problem)
    old_map = files.item_map.read_bytes() if files.item_map.is_file() else None
    from etegrec.prep.prepare import run as prepare

    _timed("step 1: data preparation", prepare, cfg)
    return old_map is not None and old_map != files.item_map.read_bytes()


def build_missing(cfg: Config) -> None:
    """Run every earlier stage whose output is missing or stale (single process)."""
    files = DatasetFiles.from_config(cfg)
    name = cfg.data.dataset

    def need(what: str, step: str) -> None:
        if not cfg.data.build_missing:
            raise ArtifactError(f"missing {what} for dataset {name!r}; make it with {step.replace('NAME', name)} "
                                "or set build_missing: true")

    remapped = _ensure_prepared(cfg, files)
    if remapped:
        logger.warning("step 1 changed the item map: steps 2-3 are re-run for it")
    t = cfg.tokenizer
    mode = t.tokenizer_input
    collab_stale = mode in ("dual", "collab") and (
        not collab_emb_path(cfg).is_file() or (remapped and not t.collab_emb_path)
    )
    text_stale = mode in ("dual", "text") and (not text_emb_path(cfg).is_file() or (remapped and not t.text_emb_path))
    if text_stale:
        need("text item vectors", STEP_TEXT)
        require_item_text(files)  # before any long step: without item text there are no text vectors
    if collab_stale:
        need("SASRec item vectors", STEP_SASREC)
        from etegrec.embeddings.sasrec import run as train_sasrec

        _timed("step 2.1: SASRec item vectors", train_sasrec, cfg)
    if text_stale:
        from etegrec.embeddings.text import run as encode_text

        _timed("step 2.2: text item vectors", encode_text, cfg)
    from etegrec.tokenizer.pretrain import resolve_rqvae_path

    if t.rqvae_path:
        resolve_rqvae_path(cfg)  # a configured checkpoint is never replaced: it must exist and be finished
        return
    try:
        resolve_rqvae_path(cfg)
        stale = remapped
    except ArtifactError:
        need("pretrained RQ-VAE tokenizer", STEP_RQVAE)
        stale = True
    if stale:
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
