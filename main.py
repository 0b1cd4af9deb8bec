"""Step 4: joint training of the item tokenizer and the generative recommender (``bash run.sh``).

    accelerate launch --config_file accelerate_config_ddp.yaml main.py --config config/ml-100k.yaml [--key=value ...]
    python main.py --config config/beauty.yaml --lr_rec=0.003      # one process
    python main.py --resume=myckpt/<dataset>/<TIMESTAMP>/last.pt   # continue an interrupted run

Missing earlier artifacts (prepared data, SASRec / text vectors, pretrained RQ-VAE) are built first. A resumed
run takes its whole config from its checkpoint (other values given are ignored, with a warning) and builds
nothing: it needs the artifacts it was trained on.
"""

from __future__ import annotations

from etegrec.cli import run_script
from etegrec.config import given_values, load_from_argv, resolve_path
from etegrec.runtime import setup_logging

DEFAULT_CONFIG = "config/ml-100k.yaml"


def main(argv: list[str]) -> None:
    setup_logging()
    given = given_values(argv)
    resume = given.get("resume")
    cfg = None if resume else load_from_argv(argv, DEFAULT_CONFIG)  # bad input fails here, before torch loads

    from etegrec.pipeline import ensure_upstream
    from etegrec.rec.checkpoint import read_joint_resume
    from etegrec.rec.trainer import run
    from etegrec.runtime import make_accelerator, resumed_config

    if resume:
        path = resolve_path(resume)
        cfg = resumed_config(path, read_joint_resume(path), given)
    accelerator = make_accelerator()
    if not resume:
        ensure_upstream(cfg, accelerator)
    run(cfg, accelerator)


if __name__ == "__main__":
    run_script(main, __doc__, ("data", "sasrec", "text", "tokenizer", "model", "train"), default_config=DEFAULT_CONFIG)
