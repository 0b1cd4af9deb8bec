"""``python -m etegrec.bench quality|gpu|speed [options] [--key=value overrides]``.

Options are those below; any other ``--key=value`` is a config override applied to every run (the keys of
``python main.py --help``).
"""

from __future__ import annotations

import argparse
import sys

from etegrec.bench.quality import GPU_MODELS, MODELS, PRESETS
from etegrec.cli import SETTINGS_HELP, run_script


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m etegrec.bench", description=__doc__, epilog=SETTINGS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quality", help="SASRec vs TIGER-style vs ETEGRec vs ETEGRec+GRPO, mean ± std over seeds")
    q.add_argument("--datasets", nargs="+", default=["beauty", "scientific"], help="config/<name>.yaml datasets")
    q.add_argument("--preset", default="cpu", choices=list(PRESETS), help="model size and schedule")
    q.add_argument("--seeds", nargs="+", type=int, default=[2020, 2021, 2022])
    q.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    q.add_argument("--out", default="bench_results", help="result folder (relative to the repository root)")
    q.add_argument("--parallel", type=int, default=1,
                   help="trainings run at once, one process each, sharing the device (steps 1-3 are built first)")
    q.add_argument("--time_budget", type=float, default=0.0,
                   help="seconds for the whole benchmark: runs stop in time to test, later ones don't start (0 = none)")
    q.add_argument("--deadline", type=float, default=0.0,
                   help="Unix time by which runs end (what --parallel gives its workers; 0 = none)")
    g = sub.add_parser("gpu", help="a fresh GPU machine, one command: steps 1-3, then TIGER-style and ETEGRec "
                       "side by side at paper size, tables within --time_budget")
    g.add_argument("--dataset", default="beauty", help="config/<name>.yaml dataset (give --raw_file=<its raw files>)")
    g.add_argument("--seed", type=int, default=2020)
    g.add_argument("--preset", default="gpu", choices=list(PRESETS), help="model size and recipe")
    g.add_argument("--time_budget", type=float, default=540.0, help="seconds for everything, tables included")
    g.add_argument("--out", default="bench_results/gpu", help="result folder (relative to the repository root)")
    s = sub.add_parser("speed", help="training/evaluation throughput, peak memory, HF generate comparison")
    s.add_argument("--dataset", default="beauty")
    s.add_argument("--preset", default="paper", choices=list(PRESETS),
                   help="model size (paper: the dataset config's own); the speed of what a quality preset trains")
    s.add_argument("--beams", nargs="+", type=int, default=[1, 10, 20, 50])
    s.add_argument("--train_steps", type=int, default=10, help="timed optimiser steps per phase")
    s.add_argument("--eval_users", type=int, default=512, help="users decoded per beam width")
    s.add_argument("--hf_users", type=int, default=64, help="users decoded by transformers' generate")
    s.add_argument("--batch_size", type=int, default=512)
    s.add_argument("--out", default="bench_results")
    args, overrides = parser.parse_known_args(argv)
    if args.command == "gpu":  # the quality benchmark with the GPU command's fixed choices
        args = argparse.Namespace(command="quality", datasets=[args.dataset], seeds=[args.seed], models=GPU_MODELS,
                                  preset=args.preset, parallel=2, time_budget=args.time_budget, deadline=0.0,
                                  out=args.out)
    if args.command == "quality" and args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: give 1 or more")
    if args.command == "quality" and args.time_budget < 0:
        parser.error(f"--time_budget {args.time_budget}: give 0 (no budget) or more seconds")
    if args.command == "quality":
        from etegrec.bench.quality import run_quality

        failed = run_quality(args, overrides)["meta"].get("failed")
        if failed:  # the tables are written; the exit status tells a script that some runs are missing from them
            print(f"error: {len(failed)} benchmark run(s) failed ({', '.join(sorted(failed))}); the reasons are in "
                  f"the tables' notes and the logs under {args.out}/workers", file=sys.stderr)
            raise SystemExit(1)
    else:
        from etegrec.bench.speed import run_speed

        run_speed(args, overrides)


if __name__ == "__main__":
    run_script(main, __doc__, sections=None)
