"""The config of a GRPO run: the SFT checkpoint's own, with GRPO and run-time keys on top.

A GRPO run fine-tunes one joint-training checkpoint (``--sft_ckpt``), so the model, its item codes and its data
come from that checkpoint's stored config; a command line or config file may change only ``MUTABLE_KEYS``.
``--resume=<run>_grpo/last.pt`` continues an interrupted run with that run's own config.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from etegrec import config as config_mod
from etegrec.artifacts import ArtifactError
from etegrec.config import Config, ConfigError, GRPOConfig, resolve_path
from etegrec.rec.checkpoint import read_joint
from etegrec.runtime import resumed_config, stored_config

# Keys a GRPO run may set on top of the SFT checkpoint's config. Everything else comes from the checkpoint.
MUTABLE_KEYS = frozenset(f.name for f in dataclasses.fields(GRPOConfig)) | {
    "seed",
    "eval_batch_size",
    "num_beams",
    "metrics",
    "valid_metric",
    "gradient_accumulation_steps",
    "num_workers",
    "log_dir",
    "ckpt_dir",
    "tensorboard",
    "weight_decay",
    "lr_scheduler_type",
    "bucket_window",
    "data_path",
    "collab_emb_path",
    "text_emb_path",
}
# Keys that define the model, its item codes or its inputs: a config file that disagrees is an error.
ARCHITECTURE_KEYS = frozenset(f.name for f in dataclasses.fields(config_mod.ModelConfig)) | {
    "dataset",
    "max_his_len",
    "tokenizer_input",
    "normalize",
    "num_emb_list",
    "layers",
    "e_dim",
    "beta",
    "dropout_prob",
    "bn",
}


def load_grpo_config(argv: Sequence[str]) -> Config:
    """Config of a GRPO run: the SFT checkpoint's config, then ``--config FILE`` and ``--key=value`` on top.

    Only GRPO and run-time keys (``MUTABLE_KEYS``) may change. A command-line value for any other key must equal
    the checkpoint's; a config file may hold other stages' keys (ignored) but not a different architecture.
    With ``--resume=<run>_grpo/last.pt`` the config is that run's own (``resumed_grpo_config``).
    """
    path, rest = config_mod.add_config_argument(argv, None)
    *file_layer, (cli, _) = config_mod.config_layers(path, rest, None)
    from_file = file_layer[0][0] if file_layer else {}
    resume = cli.get("resume") or from_file.get("resume")
    if resume:
        resume_path = resolve_path(resume)
        given = {k: v for k, v in from_file.items() if k in MUTABLE_KEYS | ARCHITECTURE_KEYS} | cli
        return resumed_grpo_config(resume_path, read_resume_checkpoint(resume_path), given)
    sft = cli.get("sft_ckpt") or from_file.get("sft_ckpt")
    if not sft:
        raise ConfigError(
            "GRPO needs a joint-training checkpoint: add --sft_ckpt=myckpt/<dataset>/<run>/best.pt (step 4 output), "
            "or continue an interrupted GRPO run with --resume=myckpt/<dataset>/<run>_grpo/last.pt"
        )
    sft_path = resolve_path(sft)
    cfg = stored_config(sft_path, read_joint(sft_path))
    cfg.train.resume = ""  # the SFT run's own resume point (if it was resumed); this run starts fresh
    base = cfg.to_dict()
    for source, values in ((str(path), from_file), ("command line", cli)):
        for leaf, value in values.items():
            section = config_mod.LEAVES[leaf][0]
            if leaf in MUTABLE_KEYS:
                setattr(getattr(cfg, section), leaf, value)
            elif value != base[leaf] and (source == "command line" or leaf in ARCHITECTURE_KEYS):
                raise ConfigError(
                    f"{leaf}={value!r} ({source}) differs from the SFT checkpoint's {leaf}={base[leaf]!r}; the "
                    "checkpoint fixes the model, its item codes and data. Drop the setting, or train a new "
                    "model with it (step 4). GRPO may change: " + ", ".join(sorted(MUTABLE_KEYS))
                )
    cfg.grpo.sft_ckpt = str(sft_path)
    return cfg.validate()


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The raw ``last.pt`` of a GRPO run, checked to hold everything a resumed run needs."""
    obj = read_joint(path)
    trainer = obj.get("trainer") or {}
    if obj.get("phase") != "grpo" or "grpo" not in obj.get("optimizers", {}) or "best_model" not in trainer:
        raise ArtifactError(
            f"{path} is not the last.pt of a GRPO run (phase {obj.get('phase')!r}, no GRPO optimiser or trainer "
            "state). Resume with --resume=myckpt/<dataset>/<run>_grpo/last.pt, or start GRPO from a joint-training "
            "checkpoint with --sft_ckpt=myckpt/<dataset>/<run>/best.pt"
        )
    return obj


def resumed_grpo_config(path: Path, obj: dict[str, Any], given: dict[str, Any]) -> Config:
    """``runtime.resumed_config`` with a given ``sft_ckpt`` compared as the file it names."""
    if given.get("sft_ckpt"):
        given = {**given, "sft_ckpt": str(resolve_path(given["sft_ckpt"]))}
    return resumed_config(path, obj, given)


def check_architecture(cfg: Config, stored: Config, path: str) -> None:
    """``cfg`` must describe the SFT checkpoint's model, item codes and inputs (``ARCHITECTURE_KEYS``)."""
    ours, theirs = cfg.to_dict(), stored.to_dict()
    diff = {k: (ours[k], theirs[k]) for k in sorted(ARCHITECTURE_KEYS) if ours[k] != theirs[k]}
    if diff:
        raise ValueError(
            f"config disagrees with the SFT checkpoint {path} on {diff} (yours, checkpoint's); build the config "
            "with etegrec.grpo.config.load_grpo_config so the checkpoint's architecture is used"
        )
