"""Step 3: pretrain the RQ-VAE item tokenizer (``cd RQVAE && bash run_dual.sh``).

Usage: ``python main.py --config ../config/<DATASET>.yaml [--key value ...]``. Besides every config key, the
reference script's flag names work: ``--batch_size --epochs --lr --weight_decay --device --eval_step --patience
--warmup_epochs --seed --ckpt_dir`` (mapped to the ``rq_*`` keys), ``--collab_path`` / ``--semantic_path`` (the
two input vector files; a relative path is taken from the current directory when it exists there, else from
the repository root), and ``--num_emb_list --layers --e_dim --beta --sk_epsilons --sk_iters --kmeans_iters``.
Prints the best_collision checkpoint path.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etegrec.artifacts import ArtifactError
from etegrec.config import REPO_ROOT, Config, load_from_argv
from etegrec.tokenizer import pretrain

DEFAULT_CONFIG = "config/Instrument2018_5090.yaml"  # used without --config when it exists (else built-in defaults)
ALIASES = {
    "batch_size": "rq_batch_size",
    "epochs": "rq_epochs",
    "lr": "rq_lr",
    "weight_decay": "rq_weight_decay",
    "device": "rq_device",
    "eval_step": "rq_eval_step",
    "patience": "rq_patience",
    "warmup_epochs": "rq_warmup_epochs",
    "seed": "rq_seed",
    "ckpt_dir": "rq_ckpt_dir",
    "collab_path": "collab_emb_path",
    "semantic_path": "text_emb_path",
}


def build_config(argv: list[str]) -> Config:
    """Config from ``--config`` + overrides; input paths relative to the current directory become absolute."""
    default = DEFAULT_CONFIG if (REPO_ROOT / DEFAULT_CONFIG).is_file() else None
    cfg = load_from_argv(argv, default_config=default, aliases=ALIASES)
    for key in ("collab_emb_path", "text_emb_path"):
        value = getattr(cfg.tokenizer, key)
        if value and not Path(value).is_absolute() and Path(value).exists():
            setattr(cfg.tokenizer, key, str(Path(value).resolve()))
    return cfg


def main(argv: list[str] | None = None) -> Path:
    try:
        path = pretrain.run(build_config(sys.argv[1:] if argv is None else argv))
    except ArtifactError as err:
        sys.exit(f"error: {err}")
    print(path)
    return path


if __name__ == "__main__":
    main()
