"""Tests of the RQ-VAE item tokenizer: quantizer maths, Sinkhorn balancing, suffix rule, checkpoints, pretraining."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from etegrec.artifacts import ArtifactError, atomic_save_npy, atomic_write_json
from etegrec.config import load_config
from etegrec.tokenizer import (
    ItemCodes,
    RQVAE,
    ResidualQuantizer,
    add_suffix,
    build_item_codes,
    code_log_probs,
    collision_stats,
    load_rqvae,
    save_rqvae,
    sinkhorn_codes,
)
from etegrec.tokenizer.pretrain import resolve_rqvae_path, run
from etegrec.tokenizer.quantizer import grouped_sinkhorn_codes, nearest_code_gap

REPO_ROOT = Path(__file__).resolve().parent.parent


def small_model(in_dim: int = 12, levels: int = 3, k: int = 8, seed: int = 0) -> RQVAE:
    torch.manual_seed(seed)
    return RQVAE(in_dim=in_dim, layers=[16], e_dim=4, num_emb_list=[k] * levels)


# ----------------------------------------------------------------------------------------- quantizer maths
@pytest.mark.parametrize("levels,k", [(1, 4), (3, 8), (4, 16)])
def test_codes_in_range_and_shapes(levels: int, k: int) -> None:
    model = small_model(levels=levels, k=k)
    x = torch.randn(50, 12)
    out = model(x)
    assert out.codes.shape == (50, levels) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < k
    assert out.distances.shape == (50, levels, k)
    assert out.recon.shape == (50, 12) and out.quantized.shape == (50, 4)
    sk = model(x, sk_epsilons=[0.003] * levels).codes
    assert int(sk.min()) >= 0 and int(sk.max()) < k


def test_codes_to_vectors_round_trip() -> None:
    model = small_model().eval()
    x = torch.randn(64, 12)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out.quantized, model.codes_to_vectors(out.codes), rtol=1e-5, atol=1e-6)
        assert torch.equal(model.get_codes(x, batch_size=7), out.codes)  # batching does not change codes


def test_distances_are_squared_l2_and_nearest() -> None:
    q = ResidualQuantizer(num_emb_list=[3], e_dim=2)
    with torch.no_grad():
        q.codebooks[0].weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]]))
    out = q(torch.tensor([[1.0, 1.0]]))
    # ||(1,1)-(0,0)||^2 = 2, ||(1,1)-(1,0)||^2 = 1, ||(1,1)-(0,2)||^2 = 1 + 1 = 2
    torch.testing.assert_close(out.distances[0, 0], torch.tensor([2.0, 1.0, 2.0]))
    assert out.codes.tolist() == [[1]]


def test_code_log_probs_is_softmax_of_negative_distance() -> None:
    d = torch.tensor([[0.0, math.log(2.0)]])  # exp(-0) : exp(-ln 2) = 1 : 1/2 -> probabilities 2/3, 1/3
    torch.testing.assert_close(code_log_probs(d).exp(), torch.tensor([[2 / 3, 1 / 3]]))


def test_quantizer_loss_and_gradient_by_hand() -> None:
    """Two levels with one code each: loss and d loss / d z written out."""
    beta = 0.25
    q = ResidualQuantizer(num_emb_list=[1, 1], e_dim=2, beta=beta)
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    with torch.no_grad():
        q.codebooks[0].weight.copy_(e1[None])
        q.codebooks[1].weight.copy_(e2[None])
    z = torch.tensor([[2.0, 1.0]], requires_grad=True)
    out = q(z)
    v1, v2 = z.detach()[0], z.detach()[0] - e1  # residuals (2, 1) and (1, 1)
    mse = lambda a, b: ((a - b) ** 2).mean()
    expected = ((1 + beta) * mse(e1, v1) + (1 + beta) * mse(e2, v2)) / 2  # mean over levels
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    # commitment of both levels reaches z (residual keeps its gradient): d/dz beta*mean((v_l - e_l)^2) / 2 levels
    grad = (beta * 2 * (v1 - e1) / 2 + beta * 2 * (v2 - e2) / 2) / 2
    torch.testing.assert_close(z.grad[0], grad)
    torch.testing.assert_close(out.quantized.detach(), (e1 + e2)[None])  # forward value = sum of codes


def test_gradients_reach_encoder_through_straight_through() -> None:
    model = small_model()
    out = model(torch.randn(32, 12))
    out.loss_recon.backward()  # recon depends on the encoder only through quantized = z + sg(q - z)
    first = model.encoder.mlp_layers[1].weight.grad
    assert first is not None and float(first.abs().sum()) > 0
    assert all(cb.weight.grad is None or float(cb.weight.grad.abs().sum()) == 0 for cb in model.rq.codebooks)


def test_mlp_structure() -> None:
    model = RQVAE(in_dim=10, layers=[8, 6], e_dim=4, num_emb_list=[5, 5], bn=True, dropout_prob=0.1)
    linears = [m for m in model.encoder.mlp_layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(10, 8), (8, 6), (6, 4)]
    dec = [m for m in model.decoder.mlp_layers if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in dec] == [(4, 6), (6, 8), (8, 10)]
    kinds = [type(m).__name__ for m in model.encoder.mlp_layers]
    assert kinds == ["Dropout", "Linear", "BatchNorm1d", "ReLU"] * 2 + ["Dropout", "Linear"]
    with pytest.raises(ValueError, match="same codebook size"):
        RQVAE(in_dim=10, layers=[8], e_dim=4, num_emb_list=[5, 6])


# ------------------------------------------------------------------------------------------------ Sinkhorn
def test_sinkhorn_balances_code_usage() -> None:
    torch.manual_seed(0)
    d = torch.rand(64, 8) + torch.linspace(0, 0.5, 8)  # code 0 is nearest for most rows
    plain = torch.bincount(d.argmin(1), minlength=8)
    balanced = torch.bincount(sinkhorn_codes(d, 0.003, 50), minlength=8)
    assert int(plain.max()) > 8
    assert balanced.tolist() == [8] * 8  # capacity ceil(64 / 8) per code


def test_grouped_sinkhorn_equals_one_call_per_group() -> None:
    """The batched pass gives every group exactly what balancing that group alone gives."""
    torch.manual_seed(0)
    sizes = [1, 3, 17, 40, 9, 64]
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))  # (R,)
    group = group[torch.randperm(len(group))]  # members of a group are not contiguous
    d = torch.rand(len(group), 8) * torch.rand(len(group), 1) * 5  # (R, 8) groups on different scales
    together = grouped_sinkhorn_codes(d, group, 0.003, 50)
    for g, size in enumerate(sizes):
        rows = torch.nonzero(group == g).flatten()
        assert torch.equal(together[rows], sinkhorn_codes(d[rows], 0.003, 50))
        assert int(torch.bincount(together[rows], minlength=8).max()) <= -(-size // 8)  # capacity ceil(g / K)


def test_sinkhorn_lowers_collisions_on_near_duplicates() -> None:
    """32 items x 4 near-copies: nearest code gives every copy the same tuple; Sinkhorn spreads them."""
    torch.manual_seed(0)
    z = torch.randn(32, 8).repeat_interleave(4, dim=0) + 1e-3 * torch.randn(128, 8)  # (128, 8)
    q = ResidualQuantizer(num_emb_list=[16, 16], e_dim=8)
    q.init_kmeans(z, iters=20, seed=0)
    plain = collision_stats(q(z).codes, 16)
    last = collision_stats(q(z, sk_epsilons=[0.0, 0.003]).codes, 16)
    both = collision_stats(q(z, sk_epsilons=[0.003, 0.003]).codes, 16)
    assert plain["collision_rate"] >= 0.7  # copies share a tuple: at most 128 - 32 = 96 of 128 collide (0.75)
    assert last["collision_rate"] < plain["collision_rate"] / 3
    assert both["collision_rate"] == 0.0
    assert both["max_group"] == 1


def test_get_codes_with_sinkhorn_over_all_items() -> None:
    model = small_model(k=8)
    x = torch.randn(20, 12).repeat(5, 1)  # 100 items, every vector five times
    plain = collision_stats(model.get_codes(x), 8)
    table, stats = build_item_codes(model, x, 8, sk_epsilons=[0.0, 0.0, 0.003])
    assert plain["collision_rate"] >= 0.8 - 1e-9  # at least the 80 exact copies collide
    assert stats["collision_rate"] < plain["collision_rate"]
    assert table.shape == (100, 4) and len(torch.unique(table, dim=0)) == 100


# --------------------------------------------------------------------------------------------- item codes
def test_add_suffix_hand_table() -> None:
    codes = torch.tensor([[1, 2], [0, 5], [1, 2], [1, 2], [0, 5], [3, 3]])
    expected = torch.tensor([[1, 2, 0], [0, 5, 0], [1, 2, 1], [1, 2, 2], [0, 5, 1], [3, 3, 0]])
    assert torch.equal(add_suffix(codes, code_num=4), expected)


def test_add_suffix_group_too_large() -> None:
    codes = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 2]])
    assert add_suffix(codes, code_num=3)[:, 2].tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match=r"3 items share the code tuple \[1, 1\].*--sk_epsilons.*--num_emb_list"):
        add_suffix(codes, code_num=2)


def test_item_codes_copy_their_table_to_another_device_once_per_version() -> None:
    codes, meta = ItemCodes(torch.tensor([[0, 1, 0], [0, 1, 1], [2, 0, 0]]), code_num=3), torch.device("meta")
    first = codes.table_on(meta)  # "meta": a device without data, so only the copying is checked
    assert first.device == meta and first.shape == (4, 3) and codes.table_on(meta) is first  # copied once
    codes.update(torch.tensor([[0, 1, 0], [1, 1, 1], [2, 2, 0]]))
    assert codes.table_on(meta) is not first  # copied again after the codes changed
    assert codes.table_on("cpu") is codes.table


def test_item_codes_check_their_invariants_and_rebuild_the_trie_only_after_a_change() -> None:
    codes = ItemCodes(torch.tensor([[0, 1, 0], [0, 1, 1], [2, 0, 0]]), code_num=3)  # items 1..3 in id order
    assert codes.table[0].tolist() == [-1, -1, -1] and codes.table[3].tolist() == [2, 0, 0]  # row i = item i
    assert (codes.n_items, codes.code_length) == (3, 3)
    trie = codes.trie()
    assert trie.lookup(codes.table[1:]).tolist() == [1, 2, 3]
    codes.update(codes.stored())  # the same codes: the trie stays
    assert codes.trie() is trie
    new = torch.tensor([[0, 1, 0], [1, 1, 1], [2, 2, 0]])  # item 2 changes at level 1, item 3 at level 2
    churn = codes.churn(new)
    assert churn == pytest.approx(
        {"churn": 2 / 3, "prefix_churn": 2 / 3, "churn_first_level1": 1 / 3, "churn_first_level2": 1 / 3}
    )
    codes.update(new)
    assert codes.trie() is not trie and codes.trie().lookup(torch.tensor([1, 1, 1])).item() == 2
    for bad, message in [
        (new[:2], "shape"),
        (new[:, :2], "code_length"),
        (new + 1, "code_num"),
        (torch.tensor([[0, 1, 0], [0, 1, 0], [2, 0, 0]]), "add_suffix"),
    ]:
        with pytest.raises(ValueError, match=message):
            codes.update(bad)
    assert torch.equal(codes.stored(), new)  # a rejected update changes nothing
    with pytest.raises(ArtifactError, match=r"ckpt.pt: .*codes for 3 items, but the data has 4"):
        ItemCodes.from_file(new, 3, "ckpt.pt", n_items=4)


def test_collision_stats_hand_arithmetic() -> None:
    codes = torch.tensor([[1, 2], [0, 5], [1, 2], [1, 2], [0, 5], [3, 3]])
    s = collision_stats(codes, code_num=8)
    assert s["collision_rate"] == pytest.approx((6 - 3) / 6)  # 3 distinct tuples
    assert s["collided_share"] == pytest.approx(5 / 6)  # all but [3, 3] share their tuple
    assert s["max_group"] == 3 and s["n_distinct"] == 3
    assert s["usage_l1"] == pytest.approx(3 / 8)  # codes 0, 1, 3
    # level 1 counts: code0 2, code1 3, code3 1 -> p = 2/6, 3/6, 1/6
    entropy = -sum(p * math.log(p) for p in (2 / 6, 3 / 6, 1 / 6))
    assert s["perplexity_l1"] == pytest.approx(math.exp(entropy))
    # sorted counts (0,0,0,0,0,1,2,3), K=8: sum (2i - 9) c_(i) = 3*1 + 5*2 + 7*3 = 34, over K * N = 48
    assert s["gini_l1"] == pytest.approx(34 / 48)
    uniform = collision_stats(torch.arange(8)[:, None].repeat(1, 2), code_num=8)
    assert uniform["gini"] == pytest.approx(0.0) and uniform["perplexity_l1"] == pytest.approx(8.0)


# -------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_strict(tmp_path: Path) -> None:
    model = small_model().eval()
    x = torch.randn(40, 12)
    table, stats = build_item_codes(model, x, 8, sk_epsilons=[0.003] * 3)
    cfg = load_config(None, [])
    path = tmp_path / "best.pth"
    save_rqvae(path, model, ItemCodes(table, 8), stats, cfg, extra={"input": {"tokenizer_input": "dual", "n_items": 40}})
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "etegrec.rqvae/1" and torch.equal(raw["item_codes"], table)
    assert raw["model_args"]["num_emb_list"] == [8, 8, 8] and raw["config"]["e_dim"] == cfg.tokenizer.e_dim
    loaded, _ = load_rqvae(path)
    assert torch.equal(loaded.get_codes(x), model.get_codes(x))
    with pytest.raises(ArtifactError, match="in_dim: file 12 vs needed 640"):
        load_rqvae(path, expected_args={"in_dim": 640})


def test_mismatched_checkpoint_gives_clear_error(tmp_path: Path) -> None:
    model = small_model()
    table = add_suffix(model.get_codes(torch.randn(10, 12)), 8)
    save_rqvae(tmp_path / "a.pth", model, ItemCodes(table, 8), {}, {"dataset": "Toy"}, extra={"producer": "unit test"})
    raw = torch.load(tmp_path / "a.pth", weights_only=True)
    del raw["state_dict"]["rq.codebooks.2.weight"]
    raw["state_dict"]["decoder.mlp_layers.1.weight"] = torch.zeros(3, 3)
    raw["state_dict"]["rq.vq_layers.0.embedding.weight"] = torch.zeros(8, 4)
    torch.save(raw, tmp_path / "b.pth")
    with pytest.raises(ArtifactError) as err:
        load_rqvae(tmp_path / "b.pth")
    msg = str(err.value)
    assert "missing keys ['rq.codebooks.2.weight']" in msg
    assert "unexpected keys ['rq.vq_layers.0.embedding.weight']" in msg
    assert "decoder.mlp_layers.1.weight: file (3, 3) vs model (16, 4)" in msg
    assert "unit test" in msg and "'Toy'" in msg and "step 3" in msg
    torch.save(model.state_dict(), tmp_path / "bare.pth")  # reference-code format
    with pytest.raises(ArtifactError, match="bare state dict"):
        load_rqvae(tmp_path / "bare.pth")


# -------------------------------------------------------------------------------------------- pretraining
def _tiny_dataset(root: Path, name: str, n: int = 300) -> None:
    rng = np.random.default_rng(0)
    d = root / name
    atomic_write_json(d / f"{name}.emb_map.json", {"[PAD]": 0, **{f"item{i}": i for i in range(1, n + 1)}})
    centers = rng.normal(size=(30, 16))
    collab = centers[rng.integers(0, 30, n)] + 0.3 * rng.normal(size=(n, 16))
    atomic_save_npy(d / f"{name}_emb_16.npy", collab.astype(np.float32))
    atomic_save_npy(d / f"{name}_sentence-transformer_text_8.npy", rng.normal(size=(n, 8)).astype(np.float32))


def test_pretrain_two_epochs_writes_checkpoints(tmp_path: Path) -> None:
    _tiny_dataset(tmp_path / "data", "Tiny")
    argv = [
        f"--data_path={tmp_path / 'data'}", "--dataset=Tiny", "--sasrec_hidden_size=16",
        "--num_emb_list", "8", "8", "8", "--code_num=8", "--layers", "32", "--e_dim=8",
        "--rq_epochs=2", "--rq_eval_step=1", "--rq_warmup_epochs=1", "--rq_batch_size=128", "--kmeans_iters=5",
        "--sk_epsilons", "0.0", "0.0", "0.003", f"--rq_ckpt_dir={tmp_path / 'ckpt'}", f"--log_dir={tmp_path / 'logs'}",
        "--rq_device=cpu",
    ]
    cfg = load_config(None, argv)
    with pytest.raises(ArtifactError, match="step 3"):
        resolve_rqvae_path(cfg)
    best = run(cfg)
    run_dir = best.parent
    assert best.name.startswith("best_collision_") and best.is_file()
    assert len(list(run_dir.glob("best_collision_*.pth"))) == 1 and len(list(run_dir.glob("best_gini_*.pth"))) == 1
    assert resolve_rqvae_path(cfg) == best
    assert json.loads((tmp_path / "ckpt" / "Tiny" / "latest.json").read_text())["run"] == run_dir.name
    raw = torch.load(best, weights_only=True)
    assert raw["item_codes"].shape == (300, 4)
    assert len(torch.unique(raw["item_codes"], dim=0)) == 300  # all IDs unique with the suffix
    assert raw["input"] == {**raw["input"], "tokenizer_input": "dual", "n_items": 300, "in_dim": 24}
    assert f"best_collision_{raw['metrics']['collision_rate']:.4f}" in best.name
    assert raw["metrics"]["collision_rate"] <= raw["metrics"]["collision_rate_nearest"]  # Sinkhorn at level 3
    model, _ = load_rqvae(best)
    assert model.model_args()["in_dim"] == 24
    assert list((tmp_path / "logs" / "Tiny" / "rqvae" / run_dir.name).glob("events.out.tfevents.*"))
    assert (run_dir / "config.yaml").is_file()


def test_killed_pretraining_run_is_never_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from etegrec.tokenizer import pretrain

    _tiny_dataset(tmp_path / "data", "Tiny")
    argv = [
        f"--data_path={tmp_path / 'data'}", "--dataset=Tiny", "--sasrec_hidden_size=16", "--tokenizer_input=collab",
        "--num_emb_list", "8", "8", "8", "--code_num=8", "--layers", "32", "--e_dim=8", "--rq_epochs=2",
        "--rq_eval_step=1", "--rq_batch_size=128", "--kmeans_iters=5", f"--rq_ckpt_dir={tmp_path / 'ckpt'}",
        f"--log_dir={tmp_path / 'logs'}", "--rq_device=cpu", "--tensorboard=false",
    ]  # fmt: skip
    cfg = load_config(None, argv)
    finished = run(cfg)
    real_save = pretrain.save_rqvae

    def killed_after_first_checkpoint(*args, **kwargs) -> None:
        real_save(*args, **kwargs)
        raise KeyboardInterrupt  # the state a kill leaves: a best file, the run not finished

    monkeypatch.setattr(pretrain, "save_rqvae", killed_after_first_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    unfinished = next(p for p in (tmp_path / "ckpt" / "Tiny").glob("*/best_*.pth") if p.parent != finished.parent)
    assert resolve_rqvae_path(cfg) == finished  # latest.json still names the finished run
    assert json.loads((finished.parent / "run_status.json").read_text())["finished"] is True
    explicit = load_config(None, [*argv, f"--rqvae_path={unfinished}"])
    with pytest.raises(ArtifactError, match=r"did not finish .*re-run step 3"):
        resolve_rqvae_path(explicit)


def test_main_script_flag_aliases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    spec = importlib.util.spec_from_file_location("rqvae_main", REPO_ROOT / "RQVAE" / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    (tmp_path / "c.npy").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cfg = main.build_config([
        "--num_emb_list", "256", "256", "256", "--layers", "1024", "512", "256", "--e_dim", "128",
        "--rq_batch_size", "2048", "--rq_epochs", "10", "--device", "cpu", "--sk_epsilons", "0.0", "0.0", "0.003",
        "--kmeans_iters", "7", "--collab_path", "c.npy", "--semantic_path", "/abs/t.npy", "--lr", "0.002",
    ])
    t = cfg.tokenizer
    assert (t.rq_batch_size, t.rq_epochs, t.rq_device, t.kmeans_iters, t.rq_lr) == (2048, 10, "cpu", 7, 0.002)
    assert t.layers == [1024, 512, 256] and t.sk_epsilons == [0.0, 0.0, 0.003]
    assert t.collab_emb_path == str(tmp_path / "c.npy") and t.text_emb_path == "/abs/t.npy"

    # Joint-training keys mean what they mean everywhere; the reference's --eval_step / --epochs get a warning.
    with caplog.at_level("WARNING", logger="etegrec.tokenizer"):
        cfg = main.build_config(["--cycle=3", "--eval_step=3", "--epochs=5", "--rq_eval_step=4"])
    assert (cfg.train.cycle, cfg.train.eval_step, cfg.train.epochs) == (3, 3, 5)
    assert cfg.tokenizer.rq_eval_step == 4 and cfg.tokenizer.rq_epochs != 5
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "--eval_step is joint training's eval_step" in warned and "--rq_eval_step=4" in warned
    assert f"--rq_epochs={cfg.tokenizer.rq_epochs}" in warned and "cycle" not in warned


def test_revive_dead_codes_moves_only_dead_codes_onto_residuals() -> None:
    torch.manual_seed(0)
    q = ResidualQuantizer(num_emb_list=[4, 4], e_dim=3)
    z = torch.randn(20, 3)
    before = [cb.weight.detach().clone() for cb in q.codebooks]
    dead = torch.tensor([[False, True, False, True], [False, False, False, False]])
    moved = q.revive_dead_codes(z, dead, torch.Generator().manual_seed(0))
    assert moved == [2, 0]
    w = q.codebooks[0].weight.detach()
    assert torch.equal(w[[0, 2]], before[0][[0, 2]]) and torch.equal(q.codebooks[1].weight.detach(), before[1])
    for row in w[[1, 3]]:  # a revived level-1 code is one of the level-1 residuals, i.e. a row of z
        assert bool((z == row).all(dim=1).any())


def test_code_log_probs_temperature_per_level() -> None:
    d = torch.tensor([[[0.0, 0.2], [0.0, 0.02]]])  # (1, L=2, K=2)
    lp = code_log_probs(d, torch.tensor([0.2, 0.02]))  # each level's gap divided by its own temperature -> 1
    torch.testing.assert_close(lp.exp()[0, 0], lp.exp()[0, 1])
    torch.testing.assert_close(lp.exp()[0, 0, 0] / lp.exp()[0, 0, 1], torch.tensor(math.e))


def test_nearest_code_gap_is_the_median_gap_per_level() -> None:
    # 3 vectors, 1 level, 3 codes: gaps 0.5 - 0.1 = 0.4, 0.3 - 0.2 = 0.1, 2.0 - 1.0 = 1.0 -> median 0.4
    d = torch.tensor([[0.1, 0.5, 0.9], [0.3, 0.2, 0.8], [2.0, 3.0, 1.0]]).unsqueeze(1)  # (N, 1, K)
    torch.testing.assert_close(nearest_code_gap(d), torch.tensor([0.4]))


def test_codes_with_margin_keep_previous_codes_unless_clearly_beaten() -> None:
    q = ResidualQuantizer(num_emb_list=[2, 2], e_dim=1)
    with torch.no_grad():
        q.codebooks[0].weight.copy_(torch.tensor([[0.0], [1.0]]))
        q.codebooks[1].weight.copy_(torch.tensor([[0.0], [0.3]]))
    z = torch.tensor([[0.55]])  # level 1: code 1 nearer by 0.55^2 - 0.45^2 = 0.1
    previous = torch.tensor([[0, 1]])
    # margin below the advantage: code 1 at level 1; the level-2 residual is then -0.45, whose nearest code
    # is 0, and the previous level-2 code is not kept (its prefix changed) even with a huge level-2 margin
    assert q.codes_with_margin(z, previous, torch.tensor([0.05, 100.0])).tolist() == [[1, 0]]
    # margin above the advantage: level 1 kept (residual 0.55, nearest level-2 code 1 = previous): all kept
    assert q.codes_with_margin(z, previous, torch.tensor([0.2, 0.0])).tolist() == [[0, 1]]
    # margin 0 with a strictly nearer code is the plain nearest-code assignment
    x = torch.randn(200, 1)
    assert torch.equal(q.codes_with_margin(x, torch.zeros(200, 2, dtype=torch.long), torch.zeros(2)), q(x).codes)


def test_build_item_codes_with_a_large_margin_changes_no_id() -> None:
    model = small_model().eval()
    x = torch.randn(64, 12)
    before, _ = build_item_codes(model, x, code_num=64)  # (N, L+1); code_num bounds the suffix only
    with torch.no_grad():
        for emb in model.rq.codebooks:
            emb.weight.add_(0.05 * torch.randn_like(emb.weight))  # the tokenizer moves
    moved, _ = build_item_codes(model, x, code_num=64)
    kept, _ = build_item_codes(model, x, code_num=64, previous=before, margins=torch.full((3,), 1e6))
    assert not torch.equal(moved, before) and torch.equal(kept, before)
