"""Recommender checkpoints (joint training and GRPO): one self-describing file per snapshot.

``<ckpt_dir>/<dataset>/<TIMESTAMP>/best.pt`` (best validated model) and ``last.pt`` (end of the latest epoch,
with everything needed to resume) are ``torch.save`` dicts of tensors and plain containers, so
``torch.load(path, weights_only=True)`` reads them::

    {"format": "etegrec.joint/1", "config": cfg.to_dict(), "model": recommender state_dict,
     "tokenizer": RQ-VAE state_dict, "tokenizer_args": RQVAE.model_args(), "item_codes": LongTensor (N, C),
     "epoch": int, "phase": str, "metrics": dict, "optimizers": {name: state_dict}, "schedulers": {...},
     "trainer": {stage, epoch, best score, patience, ...}, "rng": {...},
     "item_map_sha256": str | None}

``item_map_sha256`` (``artifacts.item_map_sha256``) fingerprints the item map of the config's dataset folder at
save time (None when there is none), so a reader can tell that the folder was re-prepared with other item ids
since; checkpoints written before it existed lack the key.

A GRPO run's files (``<TIMESTAMP>_grpo/``) hold the same entries under the format ``etegrec.grpo/1``: every
reader of a recommender (``load_joint``: GRPO's SFT model, evaluation) takes both, but a run resumes only from
its own kind (``read_joint_resume`` here, ``etegrec.grpo.config.read_resume_checkpoint`` for GRPO).
Deviation from the reference: one file instead of ``{epoch}.pt`` + ``.pt.rqvae`` + ``.code.json`` (model,
tokenizer and item codes saved apart, so they could go out of step), strict loading, and finetune checkpoints
never overwrite the alternating phase's files by name collision.

``export_tokenizer`` writes a run's tokenizer and item IDs as an RQ-VAE checkpoint that ``rqvae_path`` accepts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from etegrec.artifacts import (
    STEP_JOINT,
    ArtifactError,
    DatasetFiles,
    atomic_torch_save,
    item_map_sha256,
    load_item_map,
)
from etegrec.config import Config
from etegrec.rec.model import GenerativeRecommender
from etegrec.runtime import cpu_state, load_checkpoint_file, stored_config
from etegrec.tokenizer.item_codes import ItemCodes, collision_stats
from etegrec.tokenizer.rqvae import RQVAE, load_tokenizer_state, save_rqvae

CKPT_FORMAT = "etegrec.joint/1"
GRPO_CKPT_FORMAT = "etegrec.grpo/1"


class JointState(NamedTuple):
    """Everything a joint checkpoint rebuilds."""

    cfg: Config
    model: GenerativeRecommender
    tokenizer: RQVAE
    item_codes: ItemCodes
    raw: dict[str, Any]


def build_recommender(cfg: Config, tokenizer_args: dict[str, Any]) -> GenerativeRecommender:
    """The recommender that fits a tokenizer: PSA works in its input space, SIA in its latent space."""
    return GenerativeRecommender(
        cfg=cfg.model, semantic_dim=int(tokenizer_args["in_dim"]), latent_dim=int(tokenizer_args["e_dim"])
    )


def save_joint(
    path: Path,
    *,
    cfg: Config,
    model: GenerativeRecommender,
    tokenizer: RQVAE,
    item_codes: ItemCodes,
    epoch: int,
    phase: str,
    metrics: dict[str, Any],
    optimizers: dict[str, Any] | None = None,
    schedulers: dict[str, Any] | None = None,
    trainer: dict[str, Any] | None = None,
    rng: dict[str, Any] | None = None,
    ckpt_format: str = CKPT_FORMAT,
) -> None:
    """Write a checkpoint atomically (format in the module docstring; ``ckpt_format`` names the run's kind)."""
    obj: dict[str, Any] = {
        "format": ckpt_format,
        "config": cfg.to_dict(),
        "model": cpu_state(model),
        "tokenizer": cpu_state(tokenizer),
        "tokenizer_args": tokenizer.model_args(),
        "item_codes": item_codes.stored(),
        "epoch": int(epoch),
        "phase": str(phase),
        "metrics": dict(metrics),
        "optimizers": optimizers or {},
        "schedulers": schedulers or {},
        "trainer": trainer or {},
        "rng": rng or {},
        "item_map_sha256": _dataset_item_map_sha256(cfg),
    }
    atomic_torch_save(Path(path), obj)


def _dataset_item_map_sha256(cfg: Config) -> str | None:
    files = DatasetFiles.from_config(cfg)
    return item_map_sha256(load_item_map(files)) if files.item_map.is_file() else None


def read_joint(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw contents of a joint-training or GRPO checkpoint, checked for format (``weights_only=True``)."""
    path = Path(path)
    obj = load_checkpoint_file(path, "joint checkpoint", STEP_JOINT, map_location)
    if not isinstance(obj, dict) or obj.get("format") not in (CKPT_FORMAT, GRPO_CKPT_FORMAT):
        raise ArtifactError(
            f"{path} is not an {CKPT_FORMAT} checkpoint (best.pt / last.pt of a run made by {STEP_JOINT})."
        )
    return obj


def read_joint_resume(path: Path) -> dict[str, Any]:
    """The ``last.pt`` of an interrupted joint-training run, checked to hold everything resuming needs."""
    obj = read_joint(path)
    if obj["format"] == GRPO_CKPT_FORMAT or obj.get("phase") == "grpo":
        raise ArtifactError(
            f"{path} is a GRPO checkpoint; continue its run with `python train_grpo.py --resume={path}`. "
            "main.py --resume continues joint-training runs (myckpt/<dataset>/<run>/last.pt)."
        )
    if not obj.get("trainer") or "rec" not in obj.get("optimizers", {}):
        raise ArtifactError(
            f"{path} holds no optimiser or trainer state (a best.pt?); resume from the run's last.pt "
            "(myckpt/<dataset>/<run>/last.pt)."
        )
    return obj


def load_joint(
    path: Path | str, map_location: str | torch.device = "cpu", n_items: int | None = None
) -> JointState:
    """Rebuild config, recommender, tokenizer and item codes from one checkpoint file (strict).

    Args:
        n_items: the catalogue size of the caller's data, if known; a checkpoint whose item codes cover another
            catalogue is an ArtifactError.
    Returns:
        JointState with both models in eval mode on ``map_location``.
    """
    obj = read_joint(path, map_location)
    cfg = stored_config(Path(path), obj)
    tokenizer = RQVAE(**obj["tokenizer_args"])
    load_tokenizer_state(tokenizer, obj["tokenizer"], f"joint checkpoint {path}")
    model = build_recommender(cfg, obj["tokenizer_args"])
    try:
        model.load_state_dict(obj["model"], strict=True)
    except RuntimeError as err:
        raise ArtifactError(
            f"{path}: recommender weights do not fit the stored config ({err}); the file is damaged or was written "
            "by another version of the code."
        ) from None
    codes = ItemCodes.from_file(
        obj["item_codes"], cfg.model.code_num, path, n_items=n_items, code_length=model.code_length
    )
    return JointState(
        cfg=cfg,
        model=model.to(map_location).eval(),
        tokenizer=tokenizer.to(map_location).eval(),
        item_codes=codes,
        raw=obj,
    )


def export_tokenizer(joint_path: Path | str, out_path: Path | str) -> Path:
    """Write the tokenizer and item-code table of a joint checkpoint as an RQ-VAE checkpoint.

    A run started with ``rqvae_path`` set to the result (and ``ablation=no_ete``) trains a fresh recommender on
    the item IDs the joint run ended with: the paper's "w/o ETE" ablation.
    """
    state = load_joint(joint_path)
    stats = collision_stats(state.item_codes.stored()[:, :-1], state.cfg.model.code_num)  # (N, L) without suffix
    save_rqvae(
        Path(out_path),
        state.tokenizer,
        state.item_codes,
        {k: v for k, v in stats.items() if isinstance(v, (int, float))},
        state.cfg,
        extra={
            "input": {"tokenizer_input": state.cfg.tokenizer.tokenizer_input, "n_items": state.item_codes.n_items},
            "producer": f"etegrec.rec.checkpoint.export_tokenizer({joint_path})",
        },
    )
    return Path(out_path)
