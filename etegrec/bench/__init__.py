"""Benchmarks shipped with the project: ``python -m etegrec.bench quality|speed``.

* ``quality``: SASRec (RecBole), the TIGER-style ablation, ETEGRec and ETEGRec + GRPO trained by this code on
  the same split with the same budget, mean ± std over seeds, beside the published numbers.
* ``gpu``: one command for a fresh GPU machine: steps 1-3 from the raw files, then the TIGER-style ablation and
  ETEGRec side by side at the paper's model size (``gpu`` preset), result tables within ``--time_budget``.
* ``speed``: training sequences/s per phase, evaluation users/s at several beam widths, peak memory, useful-FLOP
  utilisation, and the same checkpoint decoded by transformers' ``generate`` with ``prefix_allowed_tokens_fn``.

Both write a JSON result and a Markdown table, show progress, and resume from partial results.
"""
