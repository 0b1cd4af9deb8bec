"""Ranking metrics by hand arithmetic, and evaluation: batching-, sharding- and process-count-independent."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from etegrec.artifacts import SplitData
from etegrec.config import ModelConfig
from etegrec.rec.data import SequenceDataset, eval_loader
from etegrec.rec.evaluate import evaluate
from etegrec.rec.generation import beam_search
from etegrec.rec.metrics import max_cutoff, metrics_from_ranks, parse_metric, target_ranks
from etegrec.rec.model import GenerativeRecommender
from etegrec.runtime import make_accelerator
from etegrec.tokenizer.item_codes import ItemCodes

REPO = Path(__file__).resolve().parent.parent
NAMES = ["recall@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10"]


# --------------------------------------------------------------------------------------------- metrics
def test_target_ranks_by_hand() -> None:
    pred = torch.tensor([[5, 3, 9], [1, 2, 3], [7, 8, 0], [4, 0, 0]])
    target = torch.tensor([3, 4, 7, 6])
    assert target_ranks(pred, target).tolist() == [2, 0, 1, 0]


def test_metrics_by_hand() -> None:
    ranks = torch.tensor([2, 0, 1, 6])  # hit at 2, miss, hit at 1, hit at 6
    got = metrics_from_ranks(ranks, ["recall@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10"])
    assert got["recall@1"] == 0.25  # only the rank-1 user
    assert got["recall@5"] == 0.5  # ranks 2 and 1
    # ndcg@5 = (1/log2(3) + 1/log2(2)) / 4 = (0.6309297535714575 + 1) / 4
    assert math.isclose(got["ndcg@5"], 0.40773243839286435, rel_tol=1e-12)
    assert got["recall@10"] == 0.75
    # ndcg@10 adds 1/log2(7) = 0.3562071871080222 for the rank-6 user
    assert math.isclose(got["ndcg@10"], (0.6309297535714575 + 1 + 0.3562071871080222) / 4, rel_tol=1e-12)


def test_metric_names_are_checked() -> None:
    assert parse_metric("ndcg@10") == ("ndcg", 10)
    assert max_cutoff(["recall@5", "ndcg@20"]) == 20
    for bad in ["hr@5", "ndcg@0", "recall@", "mrr@10"]:
        with pytest.raises(ValueError, match="recall@K or ndcg@K"):
            parse_metric(bad)
    with pytest.raises(ValueError, match="empty"):
        metrics_from_ranks(torch.empty(0, dtype=torch.long), ["recall@1"])


# ------------------------------------------------------------------------------------------ evaluation
K, C, N_ITEMS, N_USERS = 6, 3, 40, 23


def setup_tiny(seed: int = 0) -> tuple[GenerativeRecommender, torch.Tensor, SequenceDataset]:
    """A tiny random-weight model, a 40-item catalogue and 23 users with histories of 1..12 items."""
    torch.manual_seed(seed)
    cfg = ModelConfig(encoder_layers=1, decoder_layers=2, d_model=16, d_ff=32, num_heads=2, d_kv=8,
                      code_num=K, code_length=C)
    model = GenerativeRecommender(cfg=cfg, semantic_dim=8, latent_dim=4)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.4)
    gen = torch.Generator().manual_seed(seed)
    codes = torch.unique(torch.randint(0, K, (200, C), generator=gen), dim=0)
    codes = codes[torch.randperm(codes.shape[0], generator=gen)[:N_ITEMS]]
    rng = np.random.default_rng(seed)
    history = [rng.integers(1, N_ITEMS + 1, int(rng.integers(1, 13))) for _ in range(N_USERS)]
    split = SplitData(history=history, target=rng.integers(1, N_ITEMS + 1, N_USERS), users=[str(u) for u in
                                                                                            range(N_USERS)])
    return model.eval(), codes, SequenceDataset(split, max_his_len=50)


def direct_metrics(model, codes, dataset) -> dict[str, float]:
    """Beam search over all users in one batch, no loader, no accelerator."""
    trie = ItemCodes(codes, K).trie()
    table = ItemCodes(codes, K).table
    hist = table[dataset.history].reshape(len(dataset), -1)
    out = beam_search(model, trie, hist, num_beams=10, top_k=10)
    return metrics_from_ranks(target_ranks(out.items, dataset.target), NAMES)


def test_evaluate_equals_direct_computation_for_every_batch_size() -> None:
    model, codes, dataset = setup_tiny()
    accelerator = make_accelerator()
    trie = ItemCodes(codes, K).trie()
    expected = direct_metrics(model, codes, dataset)
    assert 0 < expected["recall@10"]  # some hits, so the comparison means something
    for batch_size in [1, 4, 7, 64]:
        loader = eval_loader(dataset, ItemCodes(codes, K), batch_size, history_suffix=True)
        got = evaluate(model, trie, loader, accelerator, 10, NAMES)
        assert got == pytest.approx(expected, abs=1e-12), batch_size


def test_evaluate_checks_beam_width() -> None:
    model, codes, dataset = setup_tiny()
    trie = ItemCodes(codes, K).trie()
    loader = eval_loader(dataset, ItemCodes(codes, K), 8, history_suffix=True)
    with pytest.raises(ValueError, match="num_beams"):
        evaluate(model, trie, loader, make_accelerator(), 5, NAMES)


WORKER = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_metrics import setup_tiny, K, NAMES
from etegrec.rec.data import eval_loader
from etegrec.rec.evaluate import evaluate
from etegrec.runtime import make_accelerator
from etegrec.tokenizer.item_codes import ItemCodes
acc = make_accelerator()
model, codes, dataset = setup_tiny()
loader = eval_loader(dataset, ItemCodes(codes, K), 5, history_suffix=True)
got = evaluate(model, ItemCodes(codes, K).trie(), loader, acc, 10, NAMES)
json.dump({{"world": acc.num_processes, "metrics": got}}, open({out!r} + str(acc.process_index), "w"))
"""


def test_two_processes_give_the_single_process_metrics(tmp_path) -> None:
    # 23 users in batches of 5 = 5 batches for 2 processes: accelerate repeats samples to even the shards out,
    # and gather_for_metrics must drop them again for the means to match.
    script = tmp_path / "worker.py"
    out = str(tmp_path / "metrics_rank")
    script.write_text(WORKER.format(tests=str(REPO / "tests"), out=out))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         str(script)], check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model, codes, dataset = setup_tiny()
    expected = direct_metrics(model, codes, dataset)
    for rank in range(2):
        result = json.loads(Path(out + str(rank)).read_text())
        assert result["world"] == 2
        assert result["metrics"] == pytest.approx(expected, abs=1e-12)
