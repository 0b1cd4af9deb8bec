"""Speed benchmark: training throughput per phase, evaluation users/s per beam width, peak memory.

Everything runs on one dataset's real split, item vectors and tokenizer at the configured model size (the
dataset configs hold the paper's size), on one process. Useful-FLOP utilisation divides the model's
analytic FLOPs (matrix products of the T5 layers, attention scores and classifiers; a training step counts
3x the forward) by the rate of a plain fp32 matrix multiply measured in the same run.

The same checkpoint and histories are also decoded by transformers' ``generate`` with
``prefix_allowed_tokens_fn`` (the path other implementations use), and the share of users whose top-10
lists agree with ours is reported. ``Recommender.recommend`` (``etegrec.recommend``, raw ids in and out) is
timed against the decoder on the same users at the same beam widths. Results go to
``<out>/speed_<dataset>.json`` section by section; a re-run skips finished sections.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from etegrec.artifacts import atomic_write_json, atomic_write_text
from etegrec.bench.quality import PRESETS, machine_description
from etegrec.config import REPO_ROOT, ModelConfig, load_config, resolve_path
from etegrec.rec.data import eval_loader
from etegrec.rec.schedule import plan_epoch
from etegrec.rec.trainer import LossSums
from etegrec.runtime import cuda_tf32, peak_memory_mb, sync_device

logger = logging.getLogger("etegrec.bench")


def matmul_gflops(device: torch.device, n: int = 1024, repeats: int = 20) -> float:
    """fp32 GFLOP/s of an n x n x n matrix product on ``device`` (the machine's practical peak)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    sync_device(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync_device(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def t5_forward_flops(m: ModelConfig, enc_tokens: float, dec_tokens: float, sequences: float) -> float:
    """Forward FLOPs of the T5 recommender for ``sequences`` examples with the given token totals.

    Per token and layer: attention projections 4*d*inner, feed-forward 2*d*d_ff, attention scores
    2*len*inner (QK^T and AV); the decoder adds cross-attention (q/o per decoder token, k/v per encoder token,
    scores against the encoder length) and one K-way classifier per decoder token. MACs x 2 = FLOPs.
    """
    inner = m.num_heads * m.d_kv
    enc_len = enc_tokens / max(sequences, 1.0)
    dec_len = dec_tokens / max(sequences, 1.0)
    enc = m.encoder_layers * enc_tokens * (4 * m.d_model * inner + 2 * m.d_model * m.d_ff + 2 * enc_len * inner)
    dec = m.decoder_layers * (
        dec_tokens * (4 * m.d_model * inner + 2 * dec_len * inner)  # self-attention
        + dec_tokens * (2 * m.d_model * inner + 2 * enc_len * inner)  # cross-attention q, o, scores
        + enc_tokens * 2 * m.d_model * inner  # cross-attention k, v of the encoder states
        + dec_tokens * 2 * m.d_model * m.d_ff
    )
    classifier = dec_tokens * m.d_model * m.code_num
    return 2.0 * (enc + dec + classifier)


def time_train_steps(trainer: Any, phase: str, steps: int) -> dict[str, float]:
    """Time ``steps`` training steps of a ``JointTrainer`` in ``phase`` (``tokenizer`` | ``recommender``) with every
    loss term on.

    Trains the models as a real epoch would (weights change). The same ``steps`` batches run twice: an untimed
    pass first, so that every batch shape's kernels, plans and memory are set up (on a GPU the first step of
    each new shape costs several steps), then the timed pass. Token counts exclude padding, so callers can
    turn them into useful FLOPs.

    Returns:
        ``sequences``, ``seconds``, ``enc_tokens`` / ``dec_tokens`` (history / target code tokens of all
        rows), ``distinct`` and ``enc_tokens_distinct`` (rows with distinct targets, which the tokenizer
        phase runs the recommender on).
    """
    if phase not in ("tokenizer", "recommender"):
        raise ValueError(f"phase={phase!r}; use tokenizer or recommender")
    plan = plan_epoch(
        0 if phase == "tokenizer" else 1, cycle=2, warm_epoch=0, ablation="none", converged=False,
        weights=trainer.weights,
    )
    groups = trainer.start_phase(plan)
    batches = [b for _, b in zip(range(steps), trainer.train_loader)]
    out = dict.fromkeys(("sequences", "enc_tokens", "dec_tokens", "distinct", "enc_tokens_distinct"), 0.0)
    for b in batches:  # token counts of the timed steps, before timing
        real = b.history_codes >= 0  # (B, S)
        out["sequences"] += b.target.shape[0]
        out["enc_tokens"] += float(real.sum())
        out["dec_tokens"] += b.target_codes.numel()
        out["distinct"] += b.distinct.shape[0]
        out["enc_tokens_distinct"] += float(real[b.distinct].sum())
    batches = [b.to(trainer.device) for b in batches]
    sums: LossSums | None = None
    start = 0.0
    with cuda_tf32(trainer.device.type == "cuda"):
        for timed in (False, True):
            if timed:
                sync_device(trainer.device)
                start = time.perf_counter()
            for b in batches:
                names, values = trainer.accumulate(b, plan)
                sums = sums or LossSums(names, trainer.device)
                sums.add(values)
                trainer.optimizer_step(groups)
            trainer.read_losses(sums, plan, groups)  # as a training epoch does every sync_every steps
    sync_device(trainer.device)
    out["seconds"] = time.perf_counter() - start
    return out


def eval_history_batches(trainer: Any, split: str, users: int) -> list[Tensor]:
    """History codes of the first ``users`` records of a ``JointTrainer``'s ``split``, sorted by length, in
    eval-size batches: (b, S) each."""
    data = trainer.eval_sets[split]
    subset = data.subset(torch.arange(min(users, len(data))))
    loader = eval_loader(subset, trainer.codes, trainer.cfg.train.eval_batch_size,
                         history_suffix=trainer.cfg.model.history_suffix)
    return [b.history_codes.to(trainer.device) for b in loader]


def _train_section(trainer: Any, steps: int, peak: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    m = trainer.cfg.model
    for phase in ("recommender", "tokenizer"):
        r = time_train_steps(trainer, phase, steps)
        flops = 3 * t5_forward_flops(m, r["enc_tokens"], r["dec_tokens"], r["sequences"])
        if phase == "tokenizer":
            # tokenizer phase: the frozen recommender runs forward only (no backward), on the distinct targets,
            # encoder + the BOS decoder state; the RQ-VAE's own MLP FLOPs are left out (small)
            flops = t5_forward_flops(m, r["enc_tokens_distinct"], r["distinct"], r["distinct"])
        out[phase] = {
            "seq_per_s": r["sequences"] / r["seconds"],
            "useful_gflop_per_s": flops / r["seconds"] / 1e9,
            "utilisation": flops / r["seconds"] / 1e9 / peak,
            "steps": steps,
            "batch_size": trainer.cfg.train.batch_size,
        }
        logger.info("%s phase: %.1f seq/s, %.1f%% of the matmul peak", phase, out[phase]["seq_per_s"],
                    100 * out[phase]["utilisation"])
    return out


def _eval_section(trainer: Any, beams: list[int], users: int, hf_users: int, peak: float) -> dict[str, Any]:
    from etegrec.bench.hf_generate import HFConstrainedGenerator
    from etegrec.rec.generation import beam_search

    model = trainer.model.eval()
    trie = trainer.codes.trie(trainer.device)
    batches = eval_history_batches(trainer, "test", users)  # history_codes (b, S) batches, length-sorted
    n_users = sum(b.shape[0] for b in batches)
    out: dict[str, Any] = {"users": n_users}
    m = trainer.cfg.model
    enc_tokens = float(sum((b >= 0).sum() for b in batches))
    for width in beams:
        top_k = min(10, width)
        beam_search(model, trie, batches[0], width, top_k)  # warm-up
        sync_device(trainer.device)
        start = time.perf_counter()
        for b in batches:
            beam_search(model, trie, b, width, top_k)
        sync_device(trainer.device)
        seconds = time.perf_counter() - start
        # decoder rows: 1 at the first step, then `width` per later level
        dec_tokens = n_users * (1 + (m.code_length - 1) * width)
        flops = t5_forward_flops(m, enc_tokens, dec_tokens, n_users)
        out[f"beams_{width}"] = {"users_per_s": n_users / seconds, "utilisation": flops / seconds / 1e9 / peak}
        logger.info("beam search, %d beams: %.1f users/s", width, n_users / seconds)
    hf = HFConstrainedGenerator(model=model, codes=trainer.codes)
    step = max(1, len(batches) // max(1, round(hf_users / batches[0].shape[0])))
    hf_batches = batches[::step][: max(1, round(hf_users / batches[0].shape[0]))]  # spread over lengths
    seen = sum(b.shape[0] for b in hf_batches)
    for width in (w for w in beams if w in (1, 20)):
        top_k = min(10, width)
        start = time.perf_counter()
        ours = [beam_search(model, trie, b, width, top_k).items for b in hf_batches]
        ours_seconds = time.perf_counter() - start
        start = time.perf_counter()
        theirs = [hf(b, width, top_k).items for b in hf_batches]
        seconds = time.perf_counter() - start
        agree = torch.cat([(a == b).all(dim=1) for a, b in zip(ours, theirs)]).float().mean().item()
        speed = seen / seconds
        out[f"hf_generate_beams_{width}"] = {
            "users_per_s": speed, "users": seen, "top_k_identical_share": agree,
            "our_speedup": ours_seconds and seconds / ours_seconds,
        }
        logger.info("transformers generate, %d beams: %.2f users/s, identical top-%d lists %.3f", width, speed,
                    top_k, agree)
    return out


def _fastest_interleaved(runs: dict[str, Any], device: torch.device, repeats: int) -> dict[str, float]:
    """Seconds of the fastest of ``repeats`` calls of each of ``runs``, called in turn (one call of each per round,
    so that every run sees the same changes of machine load)."""
    best = {name: math.inf for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            sync_device(device)
            start = time.perf_counter()
            run()
            sync_device(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _recommend_section(trainer: Any, beams: list[int], users: int, repeats: int = 7) -> dict[str, Any]:
    """``Recommender.recommend`` (raw ids in, raw ids out, top 10) against the bare decoder on the same users.

    At every width >= 10 (top-10 lists need 10 beams): the decoder as the decoding section times it
    (``beam_search`` over ready code batches), and ``recommend``'s whole batch path (id mapping, batching, code
    lookup, the same beam search) without and with history exclusion; each is the fastest of ``repeats`` passes,
    interleaved so that all three see the same machine load. ``vs_decoder`` = recommend users/s / decoder users/s.
    """
    from etegrec.artifacts import DatasetFiles, load_item_map
    from etegrec.rec.generation import beam_search
    from etegrec.recommend import Recommender

    cfg, model = trainer.cfg, trainer.model.eval()
    item_map = load_item_map(DatasetFiles.from_config(cfg))
    raw_ids = sorted(item_map, key=item_map.__getitem__)
    data = trainer.eval_sets["test"]
    n = min(users, len(data))
    histories = [[raw_ids[i] for i in data.history[u, : data.lengths[u]].tolist()] for u in range(n)]
    batches = eval_history_batches(trainer, "test", n)  # the same users, as the decoding section decodes them
    trie = trainer.codes.trie(trainer.device)
    out: dict[str, Any] = {"users": n, "repeats": repeats}
    for width in (w for w in beams if w >= 10):
        recommender = Recommender(
            model=model, tokenizer=trainer.tokenizer, item_codes=trainer.codes, item_map=item_map,
            max_his_len=cfg.data.max_his_len, num_beams=width, batch_size=cfg.train.eval_batch_size,
        )
        recommender.recommend(histories[: cfg.train.eval_batch_size], k=10)  # warm-up
        seconds = _fastest_interleaved(
            {
                "decoder": lambda: [beam_search(model, trie, b, width, 10) for b in batches],
                "recommend": lambda: recommender.recommend(histories, k=10, exclude_history=False),
                "exclude": lambda: recommender.recommend(histories, k=10, exclude_history=True),
            },
            trainer.device,
            repeats,
        )
        decoder = n / seconds["decoder"]
        out[f"decoder_beams_{width}"] = {"users_per_s": decoder}
        for key, run in ((f"beams_{width}", "recommend"), (f"beams_{width}_exclude_history", "exclude")):
            out[key] = {"users_per_s": n / seconds[run], "vs_decoder": n / seconds[run] / decoder}
        logger.info(
            "%d beams: decoder %.1f users/s, recommend batch %.1f users/s (%.1f with history excluded)", width,
            decoder, out[f"beams_{width}"]["users_per_s"], out[f"beams_{width}_exclude_history"]["users_per_s"],
        )
    return out


def markdown(result: dict[str, Any]) -> str:
    """The speed tables."""
    lines = [(f"Dataset `{result['dataset']}`, model {result['model']}, machine: {result['machine']}, fp32 matmul "
              f"{result['matmul_gflops']:.0f} GFLOP/s."), ""]
    if "train" in result:
        lines += ["| training phase | sequences/s | useful-FLOP utilisation |", "|---|---|---|"]
        for phase, r in result["train"].items():
            lines.append(f"| {phase} | {r['seq_per_s']:.1f} | {100 * r['utilisation']:.1f}% |")
        lines.append("")
    if "eval" in result:
        lines += ["| decoding | users/s | note |", "|---|---|---|"]
        for key, r in result["eval"].items():
            if key.startswith("beams_"):
                lines.append(f"| ours, {key[6:]} beams | {r['users_per_s']:.1f} | "
                             f"{100 * r['utilisation']:.1f}% useful-FLOP utilisation |")
            elif key.startswith("hf_generate_beams_"):
                lines.append(
                    f"| transformers generate + prefix_allowed_tokens_fn, {key[18:]} beams | {r['users_per_s']:.2f} | "
                    f"top-10 identical for {100 * r['top_k_identical_share']:.1f}% of {r['users']} users; ours "
                    f"{r['our_speedup']:.0f}x faster |"
                )
        for key, r in result.get("recommend", {}).items():
            if key.startswith("beams_"):
                width, _, excluded = key[6:].partition("_")
                decoder = result["recommend"][f"decoder_beams_{width}"]["users_per_s"]
                lines.append(
                    f"| `Recommender.recommend` batch (raw ids, top 10{', history excluded' if excluded else ''}), "
                    f"{width} beams | {r['users_per_s']:.1f} | {r['vs_decoder']:.2f}x the decoder's {decoder:.1f} "
                    f"users/s at {width} beams (best of {result['recommend']['repeats']} interleaved passes each) |"
                )
        lines.append("")
    lines.append(f"Peak memory: {result.get('peak_memory_train_mb', float('nan')):.0f} MB while training, "
                 f"{result.get('peak_memory_mb', float('nan')):.0f} MB over the whole run.")
    return "\n".join(lines)


def run_speed(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Run (or resume) the speed benchmark and write its JSON and Markdown results."""
    from etegrec.pipeline import build_missing
    from etegrec.rec.trainer import JointTrainer
    from etegrec.runtime import make_accelerator, setup_logging

    out = resolve_path(args.out)
    result_file = out / f"speed_{args.dataset}.json"
    cfg = load_config(
        REPO_ROOT / "config" / f"{args.dataset}.yaml",
        PRESETS[args.preset] + [f"--batch_size={args.batch_size}", f"--ckpt_dir={out / 'speed_ckpt'}",
                                f"--log_dir={out / 'speed_logs'}", "--tensorboard=false"] + overrides,
    )
    setup_logging(out / f"speed_{args.dataset}.log", keep_for_session=True)
    build_missing(cfg)
    result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    accelerator = make_accelerator()
    trainer = JointTrainer(cfg, accelerator)
    peak = matmul_gflops(trainer.device)
    m = cfg.model
    result.update({
        "dataset": args.dataset, "preset": args.preset, "machine": machine_description(), "matmul_gflops": peak,
        "model": f"T5 {m.encoder_layers}+{m.decoder_layers} layers, d_model {m.d_model}, d_ff {m.d_ff}",
        "threads": torch.get_num_threads(),
    })
    if "train" not in result:
        result["train"] = _train_section(trainer, args.train_steps, peak)
        result["peak_memory_train_mb"] = peak_memory_mb(trainer.device)
        atomic_write_json(result_file, result)
    if "eval" not in result:
        result["eval"] = _eval_section(trainer, args.beams, args.eval_users, args.hf_users, peak)
    if "recommend" not in result:
        result["recommend"] = _recommend_section(trainer, args.beams, args.eval_users)
    result["peak_memory_mb"] = max(result.get("peak_memory_mb", 0.0), peak_memory_mb(trainer.device))
    atomic_write_json(result_file, result)
    table = markdown(result)
    atomic_write_text(out / f"speed_{args.dataset}.md", table + "\n")
    print(table)
    return result
