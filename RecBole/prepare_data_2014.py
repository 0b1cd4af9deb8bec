"""Step 1 for the Amazon 2014 dump: reviews (JSON or Python-literal lines) -> k-core -> leave-one-out splits.

    cd RecBole && python prepare_data_2014.py [--config PATH] [--dataset=Instrument2014]
        [--raw_file=reviews_Musical_Instruments.json] [--meta_file=meta_Musical_Instruments.json] [--min_interactions=5]

Other settings come from config/Instrument2018_5090.yaml; this script defaults to dataset Instrument2014 and
the 2014 file names (reviews_Musical_Instruments.json[.gz] and, optional, meta_Musical_Instruments.json[.gz];
the 2014 metadata is Python-literal and read with ast.literal_eval). Any of these can be
overridden on the command line. The logic lives in etegrec.prep.prepare.
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
DEFAULTS = ["--raw_format=amazon2014", "--dataset=Instrument2014", "--raw_file=", "--meta_file="]


def main(argv: list[str]) -> None:
    setup_logging()
    # Leading defaults: the same keys given later on the command line win.
    run(load_from_argv([*DEFAULTS, *argv], default_config=DEFAULT_CONFIG))


if __name__ == "__main__":
    run_script(main, __doc__, ("data",), default_config=DEFAULT_CONFIG)
