"""A tiny synthetic dataset with every artifact joint training reads, for fast end-to-end tests.

``make_tiny_dataset(tmp_path)`` writes, under ``tmp_path``:
``data/tiny/tiny.emb_map.json``, ``tiny.{train,valid,test}.jsonl`` (leave-one-out, as step 1 writes them),
``tiny_emb_16.npy`` (collaborative vectors), ``tiny_sentence-transformer_text_8.npy`` (text vectors) and
``rqvae/tiny.pth`` (an RQ-VAE made with the tokenizer API: k-means codebooks, 3 levels x 8 codes, its
collision-free code table), and returns a validated ``Config`` for a 1+1-layer, 16-wide T5 that points at
all of it, with logs and checkpoints under ``tmp_path``. Users follow item "chains" (item i tends to be
followed by item i+1), so a model can learn something in a few steps.

Reusable by any stage's tests (joint training, GRPO, benchmarks).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from etegrec.config import Config
from etegrec.tokenizer.item_codes import ItemCodes, add_suffix
from etegrec.tokenizer.rqvae import RQVAE, save_rqvae

NAME = "tiny"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_tiny_dataset(
    root: Path, *, n_users: int = 24, n_items: int = 30, seed: int = 0, **overrides: object
) -> Config:
    """Write the tiny dataset and tokenizer under ``root`` and return a Config for it.

    Args:
        root: an empty folder (e.g. pytest's ``tmp_path``).
        n_users: users (each gives one valid and one test record).
        n_items: catalogue size.
        seed: controls sequences, vectors and the tokenizer.
        overrides: config leaf values to set after the defaults below, e.g. ``epochs=4``.
    """
    rng = np.random.default_rng(seed)
    data_dir = root / "data" / NAME
    data_dir.mkdir(parents=True, exist_ok=True)
    raw = [f"it{j}" for j in range(1, n_items + 1)]
    (data_dir / f"{NAME}.emb_map.json").write_text(json.dumps({"[PAD]": 0, **{r: j + 1 for j, r in enumerate(raw)}}))

    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for u in range(n_users):
        length = int(rng.integers(5, 11))
        start = int(rng.integers(0, n_items))
        items = [(start + t + int(rng.random() < 0.2)) % n_items for t in range(length)]  # mostly i -> i+1
        seq = [raw[i] for i in items]
        user = f"u{u:03d}"
        for t in range(1, length - 2):
            splits["train"].append({"user_id": user, "target_id": seq[t], "inter_history": seq[:t]})
        splits["valid"].append({"user_id": user, "target_id": seq[-2], "inter_history": seq[:-2]})
        splits["test"].append({"user_id": user, "target_id": seq[-1], "inter_history": seq[:-1]})
    for split, rows in splits.items():
        _write_jsonl(data_dir / f"{NAME}.{split}.jsonl", rows)

    collab = rng.normal(size=(n_items, 16)).astype(np.float32)
    text = rng.normal(size=(n_items, 8)).astype(np.float32)
    np.save(data_dir / f"{NAME}_emb_16.npy", collab)
    np.save(data_dir / f"{NAME}_sentence-transformer_text_8.npy", text)

    cfg = Config()
    values: dict[str, object] = {
        "dataset": NAME,
        "data_path": str(root / "data"),
        "max_his_len": 8,
        "sasrec_hidden_size": 16,
        "tokenizer_input": "dual",
        "normalize": True,
        "num_emb_list": [8, 8, 8],
        "layers": [16],
        "e_dim": 8,
        "code_num": 8,
        "code_length": 4,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "d_model": 16,
        "d_ff": 32,
        "num_heads": 2,
        "d_kv": 8,
        "dropout_rate": 0.1,
        "seed": 1,
        "epochs": 2,
        "batch_size": 16,
        "eval_batch_size": 8,
        "lr_rec": 0.01,
        "lr_id": 0.001,
        "warmup_steps": 2,
        "cycle": 2,
        "eval_step": 2,
        "early_stop": 3,
        "warm_epoch": 0,
        "finetune_epochs": 1,
        "finetune_early_stop": 2,
        "num_beams": 10,
        "log_dir": str(root / "logs"),
        "ckpt_dir": str(root / "ckpt"),
        "tensorboard": False,
        "rqvae_path": str(root / "rqvae" / f"{NAME}.pth"),
        "bucket_window": 4,
    }
    values.update(overrides)
    for key, value in values.items():
        section = next(s for s in ("data", "sasrec", "tokenizer", "model", "train") if hasattr(getattr(cfg, s), key))
        setattr(getattr(cfg, section), key, value)
    cfg.validate()

    from etegrec.artifacts import load_item_vectors

    vectors = torch.from_numpy(load_item_vectors(cfg, n_items))  # (N, 24)
    torch.manual_seed(seed)
    t = cfg.tokenizer
    model = RQVAE(in_dim=vectors.shape[1], layers=t.layers, e_dim=t.e_dim, num_emb_list=t.num_emb_list)
    model.rq.init_kmeans(model.encode(vectors), iters=10, seed=seed)
    codes = ItemCodes(add_suffix(model.get_codes(vectors), cfg.model.code_num), cfg.model.code_num)  # (N, 4)
    save_rqvae(
        Path(t.rqvae_path),
        model,
        codes,
        {"collision_rate": 0.0},
        cfg,
        extra={"input": {"tokenizer_input": "dual", "n_items": n_items}},
    )
    return cfg
