"""Step 1: raw Amazon 2018 reviews -> k-core -> leave-one-out splits, item-id map, item text, statistics.

    cd RecBole && python prepare_data_2018.py [--config PATH] [--dataset=NAME] [--raw_file=FILE]
        [--meta_file=FILE] [--min_interactions=5] [--max_his_len=50] [--dedup=true] [--max_bad_line_share=0.01]

Defaults come from config/Instrument2018_5090.yaml: reads RecBole/dataset/<dataset>/Musical_Instruments.json
(or .json.gz) and, when it is there, meta_Musical_Instruments.json[.gz] (item text; without it one warning
names it); writes <dataset>.inter, .{train,valid,test}.jsonl, .emb_map.json, .item_text.json (with metadata)
and dataset_stats.json into the same folder. raw_format is amazon2018 unless
--raw_format=... is given. The logic lives in etegrec.prep.prepare.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from etegrec.cli import run_script
from etegrec.config import load_from_argv
from etegrec.prep.prepare import run
from etegrec.runtime import setup_logging

DEFAULT_CONFIG = "config/Instrument2018_5090.yaml"


def main(argv: list[str]) -> None:
    setup_logging()
    # Leading defaults: a later --raw_format=... on the command line wins.
    run(load_from_argv(["--raw_format=amazon2018", *argv], default_config=DEFAULT_CONFIG))


if __name__ == "__main__":
    run_script(main, __doc__, ("data",), default_config=DEFAULT_CONFIG)
