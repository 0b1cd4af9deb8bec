"""Step 1, generic: prepare any supported raw format; without --config, the Amazon 2023 dump.

    cd RecBole && python prepare_data.py                                  # Amazon 2023 (Instruments2023)
    cd RecBole && python prepare_data.py --config config/ml-100k.yaml     # any format, from its config

Without --config: settings from config/Instrument2018_5090.yaml, with dataset Instruments2023, raw_format
amazon2023 and its file names (Musical_Instruments.jsonl[.gz] and, optional, meta_Musical_Instruments.jsonl[.gz];
timestamps in ms). With --config: that file's raw_format (amazon2018 | amazon2014 | amazon2023 | ml-100k |
beauty_p5 | cgr_json). Command-line overrides (--raw_file=..., --min_interactions=...) win in both cases.
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
AMAZON_2023 = ["--raw_format=amazon2023", "--dataset=Instruments2023", "--raw_file=", "--meta_file="]


def main(argv: list[str]) -> None:
    setup_logging()
    has_config = any(a == "--config" or a.startswith("--config=") for a in argv)
    run(load_from_argv([*([] if has_config else AMAZON_2023), *argv], default_config=DEFAULT_CONFIG))


if __name__ == "__main__":
    run_script(main, __doc__, ("data",), default_config=DEFAULT_CONFIG)
