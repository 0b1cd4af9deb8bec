"""Step 4: joint training of the item tokenizer and the generative recommender (``bash run.sh``).

    accelerate launch --config_file accelerate_config_ddp.yaml main.py --config config/ml-100k.yaml [--key=value ...]
    python main.py --config config/beauty.yaml --lr_rec=0.003      # one process
    python main.py --resume=myckpt/<dataset>/<TIMESTAMP>/last.pt   # continue an interrupted run

Missing earlier artifacts (prepared data, SASRec / text vectors, pretrained RQ-VAE) are built first.
"""

from __future__ import annotations

import sys

from etegrec.artifacts import ArtifactError
from etegrec.config import load_from_argv
from etegrec.pipeline import ensure_upstream
from etegrec.prep.reading import PrepError
from etegrec.rec import trainer
from etegrec.runtime import make_accelerator


def main() -> None:
    cfg = load_from_argv(sys.argv[1:], default_config="config/ml-100k.yaml")
    accelerator = make_accelerator()
    try:
        ensure_upstream(cfg, accelerator)
        trainer.run(cfg, accelerator)
    except (ArtifactError, PrepError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
