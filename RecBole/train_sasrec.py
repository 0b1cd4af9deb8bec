"""Step 2.1: train RecBole's SASRec and export item vectors aligned to the prepared item map.

    cd RecBole && python train_sasrec.py                    # config/Instrument2018_5090.yaml
    cd RecBole && python train_sasrec.py --config ../config/beauty.yaml [--sasrec_epochs=50 ...]

Reads ``<data_path>/<dataset>/<dataset>.emb_map.json`` and the jsonl splits (step 1); writes
``<dataset>_emb_<sasrec_hidden_size>.npy`` (row j = item id j+1, no padding row) and
``<dataset>.sasrec_metrics.json`` (valid/test Recall@K, NDCG@K). Any config key can be overridden: --key=value.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etegrec.cli import run_script
from etegrec.config import load_from_argv

DEFAULT_CONFIG = "config/Instrument2018_5090.yaml"


def main(argv: list[str]) -> None:
    cfg = load_from_argv(argv, default_config=DEFAULT_CONFIG)  # bad input fails here, before torch loads
    from etegrec.embeddings import sasrec

    sasrec.run(cfg)


if __name__ == "__main__":
    run_script(main, __doc__, ("data", "sasrec"), default_config=DEFAULT_CONFIG)
