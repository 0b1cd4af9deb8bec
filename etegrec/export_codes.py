"""Export a trained model's item -> semantic ID table and its per-level codebook usage.

    python -m etegrec.export_codes --ckpt myckpt/ml-100k/<RUN>/best.pt --out codes/
    python -m etegrec.export_codes --ckpt RQVAE/rqvae_ckpt/ml-100k/<TIME>/best_collision_<...>.pth --out codes/

Reads a joint-training or GRPO checkpoint (step 4 / 5) or an RQ-VAE tokenizer checkpoint (step 3), with
``weights_only=True``, plus the item map and item text of the dataset folder its config names (checked against
the checkpoint as ``etegrec.recommend`` does). Writes into ``--out``, each file atomically:

* ``item_codes.csv``: ``raw_id, item_id, code_1 .. code_L, suffix, title``, one row per item in item-id order;
* ``item_codes.json``: the same rows under ``items`` (``codes`` = the L quantiser codes) plus the source;
* ``codebook_usage.json``: per level the codebook size, codes used, usage share, entropy (nats), perplexity
  (exp entropy), Gini and the most items on one code; and the collisions of the L-code tuples (items with a
  non-zero suffix share their L codes with an earlier item).

The usage table is also printed. Errors print one line ``error: <message>`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from etegrec.artifacts import STEP_JOINT, STEP_RQVAE, atomic_write_json, atomic_write_text
from etegrec.cli import run_script
from etegrec.config import Config
from etegrec.errors import ArtifactError
from etegrec.rec.checkpoint import CKPT_FORMAT as JOINT_FORMAT
from etegrec.rec.checkpoint import GRPO_CKPT_FORMAT
from etegrec.recommend import checkpoint_dataset, item_display_texts
from etegrec.runtime import load_checkpoint_file, stored_config
from etegrec.tokenizer.item_codes import ItemCodes, level_stats
from etegrec.tokenizer.rqvae import CKPT_FORMAT as RQVAE_FORMAT


class CodeSource(NamedTuple):
    """The item-code table of a checkpoint and what it needs to be read."""

    kind: str  # "joint", "grpo" or "rqvae"
    cfg: Config
    item_codes: Tensor  # (N, L+1) long, suffix last, row j = item id j+1
    codebook_sizes: list[int]  # (L,) codes per level
    item_map_sha256: str | None  # fingerprint of the training item map (joint / GRPO checkpoints)


def read_code_source(path: Path) -> CodeSource:
    """The item-code table of a joint, GRPO or RQ-VAE checkpoint (``weights_only=True``).

    Raises:
        ArtifactError: the file is missing, unreadable, of another kind, or its config does not fit this code.
    """
    obj = load_checkpoint_file(path, "checkpoint", f"{STEP_JOINT} or {STEP_RQVAE}")
    fmt = obj.get("format") if isinstance(obj, dict) else None
    if fmt in (JOINT_FORMAT, GRPO_CKPT_FORMAT):
        kind, args = ("grpo" if fmt == GRPO_CKPT_FORMAT else "joint"), obj["tokenizer_args"]
    elif fmt == RQVAE_FORMAT:
        kind, args = "rqvae", obj["model_args"]
    else:
        raise ArtifactError(
            f"{path} is neither a joint-training / GRPO checkpoint (myckpt/<NAME>/<RUN>/best.pt) nor an RQ-VAE "
            "checkpoint (RQVAE/rqvae_ckpt/<NAME>/<TIME>/best_collision_*.pth)"
        )
    cfg = stored_config(path, obj)
    sizes = [int(k) for k in args["num_emb_list"]]
    codes = ItemCodes.from_file(obj["item_codes"], cfg.model.code_num, path, code_length=len(sizes) + 1)
    return CodeSource(kind, cfg, codes.stored(), sizes, obj.get("item_map_sha256"))


def codebook_usage(codes: Tensor, sizes: Sequence[int]) -> dict[str, Any]:
    """Per-level usage of an (N, L+1) table (suffix last) and the collisions of its L-code tuples."""
    levels = []
    for level, size in enumerate(sizes):
        counts = torch.bincount(codes[:, level], minlength=size)  # (K,)
        stats = level_stats(codes[:, level], size)
        levels.append({
            "level": level + 1,
            "codebook_size": size,
            "codes_used": int((counts > 0).sum()),
            "usage": stats["usage"],
            "entropy": math.log(stats["perplexity"]),
            "perplexity": stats["perplexity"],
            "gini": stats["gini"],
            "max_items_per_code": int(counts.max()),
        })
    suffix = codes[:, -1]  # (N,) rank inside the collision group
    n = codes.shape[0]
    return {
        "items": n,
        "levels": levels,
        "distinct_tuples": int((suffix == 0).sum()),
        "collision_rate": float((suffix > 0).sum()) / n,
        "largest_collision_group": int(suffix.max()) + 1,
    }


def usage_table(usage: dict[str, Any]) -> str:
    """The usage as a Markdown table plus one line on collisions."""
    lines = [
        "| level | codebook | codes used | usage | entropy (nats) | perplexity | max items per code |",
        "|---|---|---|---|---|---|---|",
    ]
    for u in usage["levels"]:
        lines.append(
            f"| {u['level']} | {u['codebook_size']} | {u['codes_used']} | {100 * u['usage']:.1f}% | {u['entropy']:.3f} "
            f"| {u['perplexity']:.1f} | {u['max_items_per_code']} |"
        )
    lines.append(
        f"\n{usage['items']} items, {usage['distinct_tuples']} distinct code tuples before the suffix (collision rate "
        f"{usage['collision_rate']:.4f}, largest group {usage['largest_collision_group']})"
    )
    return "\n".join(lines)


def export(ckpt: Path, out: Path, data_path: str | None = None) -> dict[str, Any]:
    """Write the three files of the module docstring into ``out``; returns the codebook usage."""
    source = read_code_source(ckpt)
    cfg = source.cfg
    if data_path is not None:
        cfg.data.data_path = str(Path(data_path).expanduser().resolve())
    files, item_map = checkpoint_dataset(cfg, ckpt, source.item_codes.shape[0], source.item_map_sha256)
    texts = item_display_texts(files, item_map, cfg.text.text_fields)
    raw_ids = sorted(item_map, key=item_map.__getitem__)  # raw id of every item id, "[PAD]" first
    levels = len(source.codebook_sizes)
    rows = [
        {"raw_id": raw_ids[item], "item_id": item, "codes": code[:-1], "suffix": code[-1], "title": texts[item]}
        for item, code in enumerate(source.item_codes.tolist(), start=1)
    ]
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["raw_id", "item_id", *(f"code_{level}" for level in range(1, levels + 1)), "suffix", "title"])
    writer.writerows([r["raw_id"], r["item_id"], *r["codes"], r["suffix"], r["title"]] for r in rows)
    usage = codebook_usage(source.item_codes, source.codebook_sizes)
    described = {"checkpoint": str(ckpt), "kind": source.kind, "dataset": cfg.data.dataset}
    atomic_write_text(out / "item_codes.csv", table.getvalue())
    atomic_write_json(out / "item_codes.json", {**described, "codebook_sizes": source.codebook_sizes, "items": rows})
    atomic_write_json(out / "codebook_usage.json", {**described, **usage})
    return usage


def main(argv: Sequence[str]) -> None:
    """The command line (module docstring); bad input raises an ``EtegrecError``, which ``run_script`` prints."""
    parser = argparse.ArgumentParser(prog="python -m etegrec.export_codes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, type=Path, help="joint / GRPO best.pt, or an RQ-VAE .pth")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--data_path", help="folder holding the dataset folder, when it moved")
    args = parser.parse_args(argv)
    try:
        usage = export(args.ckpt, args.out, args.data_path)
    except OSError as err:  # an unwritable --out
        raise ArtifactError(f"cannot write into --out {args.out}: {err.strerror or err}") from None
    print(usage_table(usage))
    print(f"wrote item_codes.csv, item_codes.json, codebook_usage.json into {args.out}")


if __name__ == "__main__":
    run_script(main, __doc__, None)
