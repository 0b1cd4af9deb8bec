"""Step 3: pretrain the RQ-VAE item tokenizer (``cd RQVAE && bash run_dual.sh``).

Usage: ``python main.py --config ../config/<DATASET>.yaml [--key value ...]``. Prints the best_collision
checkpoint path.

Every config key means here what it means in every other script: pretraining reads the ``tokenizer`` section
(``--rq_epochs --rq_batch_size --rq_lr --rq_eval_step ...``) and ignores the keys of other stages, so the flags
of joint training (``--cycle=2 --eval_step=2``) may be passed along and are recorded in the run's config.yaml.
The reference script's flag names work where they are not config keys of their own: ``--lr --device --patience
--warmup_epochs --ckpt_dir`` (the ``rq_*`` keys) and ``--collab_path`` / ``--semantic_path`` (the two input
vector files; a relative path is taken from the current directory when it exists there, else from the
repository root). Its ``--epochs --batch_size --weight_decay --eval_step --seed`` are joint-training keys in
this project; given here they are recorded but do not change pretraining, and a warning names the ``rq_*`` key
to use instead.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etegrec.cli import run_script
from etegrec.config import Config, given_values, load_from_argv, resolve_path
from etegrec.runtime import setup_logging

DEFAULT_CONFIG = "config/Instrument2018_5090.yaml"  # used without --config when it exists (else built-in defaults)
ALIASES = {
    "lr": "rq_lr",
    "device": "rq_device",
    "patience": "rq_patience",
    "warmup_epochs": "rq_warmup_epochs",
    "ckpt_dir": "rq_ckpt_dir",
    "collab_path": "collab_emb_path",
    "semantic_path": "text_emb_path",
}
# The reference script's names that are joint-training keys here, and the pretraining key each meant.
JOINT_TRAINING_NAMES = {
    "epochs": "rq_epochs",
    "batch_size": "rq_batch_size",
    "weight_decay": "rq_weight_decay",
    "eval_step": "rq_eval_step",
    "seed": "rq_seed",
}
logger = logging.getLogger("etegrec.tokenizer")


def build_config(argv: list[str]) -> Config:
    """Config from ``--config`` + overrides (reference flag names included, see the module docstring)."""
    default = DEFAULT_CONFIG if resolve_path(DEFAULT_CONFIG).is_file() else None
    cfg = load_from_argv(argv, default_config=default, aliases=ALIASES)
    given = given_values(argv, aliases=ALIASES)
    for key, rq_key in JOINT_TRAINING_NAMES.items():
        if key in given:
            logger.warning(
                "--%s is joint training's %s (step 4), which RQ-VAE pretraining does not read; pretraining uses "
                "--%s=%s", key, key, rq_key, getattr(cfg.tokenizer, rq_key),
            )
    return cfg


def main(argv: list[str]) -> Path:
    setup_logging()
    cfg = build_config(argv)  # bad input fails here, before torch loads
    from etegrec.tokenizer import pretrain

    path = pretrain.run(cfg)
    print(path)
    return path


if __name__ == "__main__":
    run_script(main, __doc__, ("data", "tokenizer"), default_config=DEFAULT_CONFIG)
