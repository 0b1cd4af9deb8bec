"""GRPO: hand-computed maths (tier a), rollouts through the constrained decoder (tier b), a tiny run (tier c)."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from etegrec.grpo.algorithm import (
    compute_rewards,
    gather_tokens,
    group_advantages,
    grpo_loss,
    masked_log_softmax,
    shared_prefix_length,
    token_kl,
)


# ----------------------------------------------------------------------------- tier (a): pure maths
def test_group_advantages_hand_example():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 2.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    out = group_advantages(rewards)
    # row 0: mean 0.25, deviations (.75, -.25, -.25, -.25), unbiased var = .75 / 3 = .25, std .5
    # row 1: mean 1, deviations +-1, unbiased var = 4 / 3, std 1.154700538
    s = 1 / math.sqrt(4 / 3)
    expected = torch.tensor([[1.5, -0.5, -0.5, -0.5], [s, -s, s, -s], [0.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(out.advantages, expected, atol=1e-6)
    assert out.informative.tolist() == [True, True, False]


def test_zero_variance_group_gives_zero_advantage_and_no_nan():
    rewards = torch.tensor([[0.0, 0.0], [1.5, 1.5], [0.3, 0.3 + 1e-9]])
    out = group_advantages(rewards)
    assert torch.equal(out.advantages, torch.zeros_like(rewards))
    assert not out.informative.any()
    # the loss of an all-degenerate batch is exactly 0 with zero, finite gradients
    logits = torch.randn(6, 4, 5, requires_grad=True)
    codes = torch.randint(0, 5, (6, 4))
    lp_all = masked_log_softmax(logits, None, 1.0)
    lp = gather_tokens(lp_all, codes)
    kl = token_kl(lp_all, masked_log_softmax(torch.randn(6, 4, 5), None, 1.0))
    res = grpo_loss(
        lp,
        lp.detach() - 0.3,
        out.advantages.reshape(-1),
        kl,
        out.informative.repeat_interleave(2),
        clip_range=0.2,
        kl_coeff=0.1,
    )
    res.loss.backward()
    assert res.loss.item() == 0.0
    assert torch.isfinite(logits.grad).all() and torch.count_nonzero(logits.grad) == 0
    assert res.clip_fraction.item() == 0.0 and res.policy.item() == 0.0 and res.ratio.item() == 1.0


def test_rewards_prefix_and_cosine_by_hand():
    target_codes = torch.tensor([[3, 1, 4, 1]])  # (B=1, C=4)
    sampled_codes = torch.tensor([[[3, 1, 4, 1], [3, 1, 5, 9], [2, 1, 4, 1], [3, 9, 4, 1]]])  # (1, 4, 4)
    assert shared_prefix_length(sampled_codes, target_codes).tolist() == [[4, 2, 0, 1]]
    items = torch.tensor([[7, 2, 3, 4]])
    target = torch.tensor([7])
    r = compute_rewards(items, sampled_codes, target, target_codes, alpha=0.5, reward_type="prefix")
    # hit + 0.5 * prefix / 4
    assert torch.allclose(r.reward, torch.tensor([[1.5, 0.25, 0.0, 0.125]]))
    assert r.hit.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    vectors = torch.zeros(8, 2)
    vectors[7] = torch.tensor([2.0, 0.0])
    vectors[2] = torch.tensor([1.0, 1.0])  # cos 45 deg
    vectors[3] = torch.tensor([0.0, 3.0])  # cos 90 deg
    vectors[4] = torch.tensor([-1.0, 0.0])  # cos 180 deg
    r = compute_rewards(
        items, sampled_codes, target, target_codes, alpha=0.5, reward_type="cosine", item_vectors=vectors
    )
    assert torch.allclose(r.reward, torch.tensor([[1.5, 0.5 / math.sqrt(2), 0.0, -0.5]]), atol=1e-6)
    r = compute_rewards(items, sampled_codes, target, target_codes, alpha=0.5, reward_type="none")
    assert r.reward.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="prefix, cosine, none"):
        compute_rewards(items, sampled_codes, target, target_codes, alpha=0.5, reward_type="ndcg")


def test_clipped_objective_hand_example():
    old = torch.log(torch.tensor([[0.2, 0.4], [0.5, 0.3], [0.1, 0.1]]))
    ratio = torch.tensor([[1.5, 0.9], [0.5, 1.1], [3.0, 3.0]])
    log_probs = (old + torch.log(ratio)).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.0])
    kl = torch.tensor([[0.1, 0.3], [0.2, 0.0], [5.0, 5.0]])
    informative = torch.tensor([True, True, False])
    res = grpo_loss(log_probs, old, adv, kl, informative, clip_range=0.2, kl_coeff=0.5)
    # sample 0 (A=+1): min(1.5, 1.2) = 1.2 (clipped), min(.9, .9) = .9 -> (-1.2+.05 - .9+.15)/2 = -0.95
    # sample 1 (A=-2): min(-1, -1.6) = -1.6 (clipped), -2.2 -> (1.6+.1 + 2.2+0)/2 = 1.95
    # sample 2 is in a zero-variance group: left out; loss = (-0.95 + 1.95) / 3 samples
    assert res.loss.item() == pytest.approx(1 / 3, abs=1e-6)
    assert res.policy.item() == pytest.approx(-(1.2 + 0.9 - 1.6 - 2.2) / 4, abs=1e-6)
    assert res.clip_fraction.item() == pytest.approx(0.5)
    assert res.ratio.item() == pytest.approx(1.0, abs=1e-6)
    assert res.kl.item() == pytest.approx(10.6 / 6, abs=1e-6)
    res.loss.backward()
    # d/dlogp of -rho*A/(2*3) where unclipped, 0 where the clip is active or the group is degenerate
    expected = torch.tensor([[0.0, -0.9 / 6], [0.0, 2.2 / 6], [0.0, 0.0]])
    assert torch.allclose(log_probs.grad, expected, atol=1e-6)


def test_masked_log_softmax_and_exact_kl_by_hand():
    lp = masked_log_softmax(torch.tensor([2.0, 0.0, 100.0]), torch.tensor([True, True, False]), temperature=2.0)
    z = math.log(math.e + 1)
    assert torch.allclose(lp, torch.tensor([1 - z, -z, -math.inf]))
    allowed = torch.tensor([[[True, True, False]]])  # (N=1, C=1, K=3)
    policy_logits = torch.log(torch.tensor([[[0.5, 0.5, 0.9]]])).requires_grad_(True)
    ref_logits = torch.log(torch.tensor([[[0.25, 0.75, 0.9]]]))
    kl = token_kl(masked_log_softmax(policy_logits, allowed, 1.0), masked_log_softmax(ref_logits, allowed, 1.0))
    # 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75)
    assert kl.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    kl.sum().backward()
    assert torch.isfinite(policy_logits.grad).all() and policy_logits.grad[0, 0, 2] == 0
    same = masked_log_softmax(ref_logits, allowed, 1.0)
    assert token_kl(same, same).abs().max() < 1e-7


# ----------------------------------------------------------------------------- tier (b): rollouts
def _batch(codes, history, target):
    """A training batch: histories (B, S), target ids (B,) and their codes (B, C)."""
    from etegrec.rec.data import Batch
    from etegrec.rec.losses import first_occurrence

    return Batch(history_codes=history, target_codes=codes.table[target], target=target,
                 distinct=first_occurrence(target))


def _tiny_model_and_trie(seed: int = 0):
    from etegrec.config import ModelConfig
    from etegrec.rec.model import GenerativeRecommender
    from etegrec.tokenizer.item_codes import ItemCodes

    torch.manual_seed(seed)
    cfg = ModelConfig(
        encoder_layers=1, decoder_layers=1, d_model=16, d_ff=32, num_heads=2, d_kv=8, code_num=6, code_length=3
    )
    model = GenerativeRecommender(cfg=cfg, semantic_dim=4, latent_dim=4).eval()
    # 20 distinct items over a 6 x 6 x 6 code space
    flat = torch.randperm(6**3, generator=torch.Generator().manual_seed(seed))[:20]
    codes = ItemCodes(torch.stack([flat // 36, (flat // 6) % 6, flat % 6], dim=1), code_num=6)  # 20 items, C = 3
    return model, codes


def test_rollouts_are_valid_items_with_consistent_log_probs():
    from etegrec.config import GRPOConfig
    from etegrec.grpo.rollouts import collect_rollouts
    from etegrec.rec.generation import SequenceScorer

    model, codes = _tiny_model_and_trie()
    trie = codes.trie()
    history = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, -1, 5, 0, 2]])  # (B=2, S=2*C), -1 = pad
    target = torch.tensor([3, 11])
    cfg = GRPOConfig(grpo_group_size=8, grpo_temperature=1.5)
    ro = collect_rollouts(model, SequenceScorer(model=copy.deepcopy(model)), trie, _batch(codes, history, target), cfg,
                          None)
    items = trie.lookup(ro.codes)  # (B, G)
    assert (items >= 1).all() and (items <= trie.n_items).all()
    assert torch.equal(items, ro.items)  # the codes decode to the reported items
    assert torch.equal(ro.rewards.hit, (items == target[:, None]).float())
    # every sampled token is allowed by the trie, and the reference (a copy) equals the sampler's distribution
    tok = ro.codes.reshape(-1, 3)
    assert ro.allowed.gather(-1, tok.unsqueeze(-1)).all()
    ref_seq = gather_tokens(ro.ref_log_probs, tok).sum(-1)
    assert torch.allclose(ref_seq, ro.sample_log_probs, atol=1e-4)
    assert torch.isfinite(ro.advantages).all()


def test_beam_rollouts_are_the_policys_top_items_with_its_own_log_probs():
    from etegrec.config import GRPOConfig
    from etegrec.grpo.rollouts import collect_rollouts
    from etegrec.rec.generation import SequenceScorer, beam_search

    model, codes = _tiny_model_and_trie(seed=2)
    trie = codes.trie()
    history = torch.tensor([[0, 1, 2, 3, 4, 5], [-1, -1, -1, 5, 0, 2]])
    top = beam_search(model, trie, history, num_beams=5, top_k=5)
    target = top.items[:, 2]  # the third-best item of each history: a hit inside every group
    cfg = GRPOConfig(grpo_group_size=5, grpo_rollout="beam", grpo_temperature=1.5)
    ro = collect_rollouts(model, SequenceScorer(model=copy.deepcopy(model)), trie, _batch(codes, history, target), cfg,
                          None)
    assert torch.equal(ro.items, top.items) and torch.equal(ro.codes, top.codes)  # the G best, best first
    assert all(len(set(row.tolist())) == 5 for row in ro.items)  # distinct: no group repeats an item
    assert torch.equal(ro.rewards.hit.sum(1), torch.ones(2)) and ro.group_informative.all()
    # the stored log-probs are the policy's masked, tempered distribution (what the update rescores), not the
    # beam's ranking score; the reference is a copy of the policy, so its distribution gives the same numbers
    ref_seq = gather_tokens(ro.ref_log_probs, ro.codes.reshape(-1, 3)).sum(-1)
    assert torch.allclose(ref_seq, ro.sample_log_probs, atol=1e-4)
    assert not torch.allclose(ro.sample_log_probs, top.scores.reshape(-1), atol=1e-3)
    with pytest.raises(ValueError, match="grpo_group_size=21 exceeds the catalogue"):
        collect_rollouts(model, SequenceScorer(model=copy.deepcopy(model)), trie, _batch(codes, history, target),
                         GRPOConfig(grpo_group_size=21, grpo_rollout="beam"), None)


def test_policy_update_changes_policy_and_keeps_reference_fixed():
    from etegrec.config import GRPOConfig
    from etegrec.grpo.rollouts import collect_rollouts
    from etegrec.grpo.trainer import policy_update
    from etegrec.rec.generation import SequenceScorer
    from etegrec.runtime import make_accelerator

    model, codes = _tiny_model_and_trie(seed=1)
    trie = codes.trie()
    reference = SequenceScorer(model=copy.deepcopy(model)).requires_grad_(False).eval()
    ref_before = {k: v.clone() for k, v in reference.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scorer = SequenceScorer(model=model)
    opt = torch.optim.AdamW(scorer.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    cfg = GRPOConfig(grpo_group_size=6, grpo_num_iterations=2, grpo_reward_type="prefix")
    history = torch.randint(0, 6, (5, 6))
    target = torch.randint(1, 21, (5,))
    ros = [collect_rollouts(model, reference, trie, _batch(codes, history, target), cfg, None) for _ in range(2)]
    stats = policy_update(scorer, ros, opt, sched, make_accelerator(), cfg)
    assert all(math.isfinite(v) for v in stats.values())
    assert stats["logp_gap"] < 1e-3  # sampler and teacher-forced scorer agree on the rollout policy
    assert 0.0 <= stats["zero_var_share"] <= 1.0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("token_embeddings" in k for k in changed) and any("t5.decoder" in k for k in changed)
    assert all(torch.equal(v, ref_before[k]) for k, v in reference.state_dict().items())


def test_gradient_accumulation_equals_one_big_batch():
    from etegrec.config import GRPOConfig
    from etegrec.grpo.algorithm import Rewards
    from etegrec.grpo.rollouts import Rollouts, collect_rollouts
    from etegrec.grpo.trainer import policy_update
    from etegrec.rec.generation import SequenceScorer
    from etegrec.runtime import make_accelerator

    model, codes = _tiny_model_and_trie(seed=2)
    trie = codes.trie()
    reference = SequenceScorer(model=copy.deepcopy(model)).requires_grad_(False).eval()
    cfg = GRPOConfig(grpo_group_size=4, grpo_max_grad_norm=0.0, grpo_kl_coeff=0.5)
    torch.manual_seed(3)
    parts = [
        collect_rollouts(
            model, reference, trie, _batch(codes, torch.randint(0, 6, (4, 6)), torch.randint(1, 21, (4,))), cfg, None
        )
        for _ in range(2)
    ]
    whole = Rollouts(
        *(
            Rewards(*(torch.cat(t) for t in zip(*fields))) if isinstance(fields[0], Rewards) else torch.cat(fields)
            for fields in zip(*parts)
        )
    )
    results = []
    for rollouts in (parts, [whole]):
        policy = copy.deepcopy(model)
        scorer = SequenceScorer(model=policy)
        opt = torch.optim.SGD(scorer.parameters(), lr=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
        policy_update(scorer, rollouts, opt, sched, make_accelerator(), cfg)
        results.append(policy.state_dict())
    moved = [k for k, v in results[0].items() if not torch.equal(v, model.state_dict()[k])]
    assert moved  # one step over two accumulated micro-batches = one step over their union
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])


# ----------------------------------------------------------------------------- tier (c): tiny runs
@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A tiny dataset and a briefly trained joint checkpoint (L_REC only) saved with the joint format."""
    from tiny_data import make_tiny_dataset

    from etegrec.artifacts import DatasetFiles, load_item_map, load_splits
    from etegrec.rec.checkpoint import build_recommender, save_joint
    from etegrec.rec.data import SequenceDataset, train_loader
    from etegrec.tokenizer.item_codes import ItemCodes
    from etegrec.tokenizer.rqvae import load_rqvae

    root = tmp_path_factory.mktemp("grpo")
    cfg = make_tiny_dataset(root, n_users=30)
    tokenizer, obj = load_rqvae(cfg.tokenizer.rqvae_path)
    torch.manual_seed(0)
    model = build_recommender(cfg, tokenizer.model_args())
    files = DatasetFiles.from_config(cfg)
    splits = load_splits(files, load_item_map(files), cfg.data.max_his_len)
    codes = ItemCodes(obj["item_codes"], cfg.model.code_num)
    loader = train_loader(SequenceDataset(splits["train"], cfg.data.max_his_len), codes, 32,
                          history_suffix=True, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model.train()
    for epoch in range(8):
        loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            opt.zero_grad()
            model(batch.history_codes, batch.target_codes).loss_rec.backward()
            opt.step()
    path = root / "ckpt" / "tiny" / "sft" / "best.pt"
    save_joint(
        path,
        cfg=cfg,
        model=model.eval(),
        tokenizer=tokenizer,
        item_codes=codes,
        epoch=8,
        phase="finetune",
        metrics={},
    )
    return path, cfg


def test_config_comes_from_the_checkpoint(sft_checkpoint, tmp_path):
    import yaml

    from etegrec.config import ConfigError
    from etegrec.grpo.config import load_grpo_config

    path, sft_cfg = sft_checkpoint
    cfg = load_grpo_config([f"--sft_ckpt={path}", "--grpo_lr=0.001", "--grpo_group_size", "3", "--num_beams=12"])
    assert cfg.model == sft_cfg.model and cfg.tokenizer.num_emb_list == [8, 8, 8]
    assert (cfg.grpo.grpo_lr, cfg.grpo.grpo_group_size, cfg.train.num_beams) == (0.001, 3, 12)
    assert cfg.grpo.sft_ckpt == str(path)
    with pytest.raises(ConfigError, match="d_model=32 .*differs from the SFT checkpoint"):
        load_grpo_config([f"--sft_ckpt={path}", "--d_model=32"])
    with pytest.raises(ConfigError, match="lr_rec"):
        load_grpo_config([f"--sft_ckpt={path}", "--lr_rec=0.5"])
    load_grpo_config([f"--sft_ckpt={path}", "--d_model=16"])  # equal to the checkpoint: allowed
    with pytest.raises(ConfigError, match="--sft_ckpt"):
        load_grpo_config(["--grpo_lr=0.001"])
    # a config file may carry other stages' keys (ignored) but not another architecture
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"epochs": 999, "grpo_epochs": 7, "d_model": 16}))
    cfg = load_grpo_config(["--config", str(good), f"--sft_ckpt={path}"])
    assert cfg.train.epochs == sft_cfg.train.epochs and cfg.grpo.grpo_epochs == 7
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": {"d_model": 64}}))
    with pytest.raises(ConfigError, match="d_model"):
        load_grpo_config(["--config", str(bad), f"--sft_ckpt={path}"])


def _grpo_cfg(path, *extra):
    from etegrec.grpo.config import load_grpo_config

    return load_grpo_config(
        [
            f"--sft_ckpt={path}",
            "--grpo_group_size=4",
            "--grpo_batch_size=16",
            "--gradient_accumulation_steps=2",
            "--grpo_epochs=2",
            "--grpo_early_stop=2",
            "--num_beams=10",
            "--eval_batch_size=16",
            *extra,
        ]
    )


def test_short_run_changes_policy_and_never_keeps_worse_than_sft(sft_checkpoint):
    from etegrec.grpo.trainer import run
    from etegrec.rec.checkpoint import load_joint, read_joint
    from etegrec.runtime import make_accelerator

    path, _ = sft_checkpoint
    sft = read_joint(path)
    cfg = _grpo_cfg(path, "--grpo_lr=0.003")
    summary = run(cfg, make_accelerator())
    key = summary["valid_metric"]
    run_dir = Path(summary["run_dir"])
    assert run_dir.name.endswith("_grpo") and run_dir.parent == path.parent.parent
    assert summary["grpo"]["valid"][key] >= summary["sft"]["valid"][key]
    assert json.loads((run_dir / "metrics.json").read_text())["kept"] == summary["kept"]
    # the policy moved (last.pt), the alignment adapters did not, and the files are weights_only-loadable
    last = torch.load(run_dir / "last.pt", weights_only=True)
    moved = [k for k, v in last["model"].items() if not torch.equal(v, sft["model"][k])]
    assert moved and not any("adapter" in k for k in moved)
    kept = load_joint(run_dir / "best.pt")
    assert kept.raw["phase"] == "grpo" and torch.equal(kept.item_codes.stored(), sft["item_codes"])
    assert kept.raw["metrics"]["test"] == summary["grpo"]["test"]


def test_a_passed_deadline_stops_grpo_after_one_epoch_and_tests_the_kept_model(sft_checkpoint):
    import time

    from etegrec.grpo.trainer import run
    from etegrec.runtime import make_accelerator

    path, _ = sft_checkpoint
    summary = run(_grpo_cfg(path, "--grpo_epochs=5"), make_accelerator(), deadline=time.time())
    assert summary["stopped_by_budget"] and summary["epochs"] == 1
    assert all(0.0 <= v <= 1.0 for v in summary["grpo"]["test"].values())
    last = torch.load(Path(summary["run_dir"]) / "last.pt", weights_only=True)
    assert not last["trainer"]["done"]  # resumable


def test_kept_checkpoint_is_the_sft_model_when_grpo_only_hurts(sft_checkpoint, monkeypatch):
    from etegrec.grpo import trainer
    from etegrec.rec.checkpoint import read_joint
    from etegrec.runtime import make_accelerator

    path, _ = sft_checkpoint
    sft = read_joint(path)
    # A destructive learning rate changes the weights; on 30 users even a wrecked model can validate higher by
    # chance, so every GRPO epoch's validation is reported lower than the SFT model's: best.pt must keep the SFT
    # weights.
    evaluate = trainer.GRPOTrainer._evaluate

    def worse_after_sft(self, model, split):
        metrics = evaluate(self, model, split)
        if split == "valid" and self.state.evaluations:  # the SFT model's validation is the first
            metrics = {name: value - 1.0 for name, value in metrics.items()}
        return metrics

    monkeypatch.setattr(trainer.GRPOTrainer, "_evaluate", worse_after_sft)
    summary = trainer.run(_grpo_cfg(path, "--grpo_lr=1.0", "--grpo_max_grad_norm=0", "--grpo_epochs=1"),
                          make_accelerator())
    assert summary["kept"] == "sft" and summary["best_epoch"] == 0
    assert summary["grpo"] == {"valid": summary["sft"]["valid"], "test": summary["sft"]["test"]}
    best = read_joint(Path(summary["run_dir"]) / "best.pt")
    assert all(torch.equal(v, sft["model"][k]) for k, v in best["model"].items())


def _flat(obj, prefix=""):
    """Nested dicts and lists as one {"a/0/b": leaf} dict."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else None
    if items is None:
        return {prefix: obj}
    return {k: v for key, value in items for k, v in _flat(value, f"{prefix}/{key}").items()}


def _assert_same_results(got, expected, rel=1e-6):
    """Equal nested results: numeric leaves within ``rel`` (pytest.approx), every other leaf exactly."""
    got, expected = _flat(got), _flat(expected)
    assert got.keys() == expected.keys()
    numeric = [k for k, v in expected.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    assert {k: got[k] for k in numeric} == pytest.approx({k: expected[k] for k in numeric}, rel=rel, abs=1e-9)
    assert {k: got[k] for k in got.keys() - set(numeric)} == {k: expected[k] for k in expected.keys() - set(numeric)}


def test_resumed_run_equals_an_uninterrupted_one(sft_checkpoint, monkeypatch):
    from etegrec.artifacts import ArtifactError
    from etegrec.grpo import trainer
    from etegrec.grpo.config import load_grpo_config
    from etegrec.rec.checkpoint import read_joint
    from etegrec.runtime import make_accelerator

    path, _ = sft_checkpoint
    args = ("--grpo_lr=0.003", "--tensorboard=false")
    straight = trainer.run(_grpo_cfg(path, *args), make_accelerator())

    class Interrupted(Exception):
        pass

    real_epoch, calls = trainer.GRPOTrainer._train_epoch, []

    def stop_in_second_epoch(self, *a):
        calls.append(1)
        if len(calls) == 2:
            raise Interrupted
        return real_epoch(self, *a)

    runs = path.parent.parent
    before = set(runs.iterdir())
    monkeypatch.setattr(trainer.GRPOTrainer, "_train_epoch", stop_in_second_epoch)
    with pytest.raises(Interrupted):
        trainer.run(_grpo_cfg(path, *args), make_accelerator())
    monkeypatch.undo()
    (run_dir,) = set(runs.iterdir()) - before
    last = read_joint(run_dir / "last.pt")
    assert (last["epoch"], last["trainer"]["epoch"], last["trainer"]["done"]) == (1, 1, False)

    # the run's own config wins over values given with --resume; a best.pt cannot be resumed
    cfg = load_grpo_config([f"--resume={run_dir / 'last.pt'}", "--grpo_lr=0.5", "--sft_ckpt=elsewhere.pt"])
    assert (cfg.grpo.grpo_lr, cfg.grpo.sft_ckpt) == (0.003, str(path))
    with pytest.raises(ArtifactError, match="not the last.pt of a GRPO run"):
        load_grpo_config([f"--resume={run_dir / 'best.pt'}"])
    resumed = trainer.run(cfg, make_accelerator())

    assert resumed.pop("run_dir") == str(run_dir) and (run_dir / "metrics.json").is_file()
    straight_dir = Path(straight.pop("run_dir"))
    _assert_same_results(resumed, straight)  # metrics, kept epoch, train stats
    for name in ("last.pt", "best.pt"):
        a, b = read_joint(run_dir / name), read_joint(straight_dir / name)
        assert a["epoch"] == b["epoch"]
        _assert_same_results(a["metrics"], b["metrics"])
        assert all(torch.allclose(a["model"][k], b["model"][k], atol=1e-6, rtol=0) for k in b["model"])
    a, b = (read_joint(d / "last.pt")["trainer"] for d in (run_dir, straight_dir))
    assert a["epoch"] == 2 and a["done"]
    _assert_same_results({**a, "best_model": None}, {**b, "best_model": None})


def test_wrong_kind_of_checkpoint_or_no_checkpoint_is_one_clear_error(sft_checkpoint, tmp_path):
    from etegrec.artifacts import ArtifactError
    from etegrec.grpo.config import load_grpo_config
    from etegrec.grpo.trainer import run
    from etegrec.rec.checkpoint import GRPO_CKPT_FORMAT, read_joint
    from etegrec.rec.trainer import JointTrainer
    from etegrec.runtime import make_accelerator

    path, sft_cfg = sft_checkpoint
    summary = run(_grpo_cfg(path, "--grpo_epochs=1", "--tensorboard=false"), make_accelerator())
    grpo_last = Path(summary["run_dir"]) / "last.pt"
    assert read_joint(grpo_last)["format"] == GRPO_CKPT_FORMAT  # its own kind; still a readable recommender

    # main.py --resume=<run>_grpo/last.pt: the joint trainer names the file and the command that resumes it
    cfg = copy.deepcopy(sft_cfg)
    cfg.train.resume = str(grpo_last)
    with pytest.raises(ArtifactError, match=r"is a GRPO checkpoint; continue its run with `python train_grpo.py"):
        JointTrainer(cfg, make_accelerator())
    cfg.train.resume = str(path)  # a joint-training checkpoint without trainer state
    with pytest.raises(ArtifactError, match="no optimiser or trainer state"):
        JointTrainer(cfg, make_accelerator())

    # a file that is no checkpoint at all, as --sft_ckpt, as GRPO's --resume and as main.py's --resume
    text = tmp_path / "x.pt"
    text.write_text("hello\n")
    for argv in ([f"--sft_ckpt={text}"], [f"--resume={text}"]):
        with pytest.raises(ArtifactError, match=f"{text} is not a readable joint checkpoint"):
            load_grpo_config(argv)
    cfg.train.resume = str(text)
    with pytest.raises(ArtifactError, match=f"{text} is not a readable joint checkpoint"):
        JointTrainer(cfg, make_accelerator())


def test_beam_group_larger_than_the_catalogue_is_a_config_error_before_training(sft_checkpoint, monkeypatch):
    import etegrec.grpo.trainer
    from etegrec.errors import ConfigError
    from etegrec.grpo.trainer import run
    from etegrec.runtime import make_accelerator

    path, _ = sft_checkpoint
    monkeypatch.setattr(etegrec.grpo.trainer, "collect_rollouts", lambda *a: pytest.fail("reached the rollouts"))
    cfg = _grpo_cfg(path, "--grpo_rollout=beam", "--grpo_group_size=100000", "--tensorboard=false")
    with pytest.raises(ConfigError, match=r"grpo_group_size=100000 exceeds the catalogue \(\d+ items\)") as err:
        run(cfg, make_accelerator())
    assert err.value.key == "grpo_group_size"


@pytest.mark.slow
def test_two_process_cpu_run(sft_checkpoint):
    """The user's launcher (2 processes, gloo on CPU): replicas stay equal (checked every epoch by the trainer)."""
    import socket
    import subprocess

    path, _ = sft_checkpoint
    repo = Path(__file__).resolve().parent.parent
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(repo / "accelerate_config_ddp.yaml"),
            "--main_process_port",
            str(port),
            str(repo / "train_grpo.py"),
            f"--sft_ckpt={path}",
            "--grpo_group_size=4",
            "--grpo_batch_size=8",
            "--gradient_accumulation_steps=2",
            "--grpo_epochs=2",
            "--grpo_lr=0.003",
            "--num_beams=10",
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stdout and "before / after GRPO" in proc.stdout
