"""The alternating schedule and the learning-rate schedules (etegrec/rec/schedule.py)."""

from __future__ import annotations

import io
import math

import pytest
import torch

from etegrec.rec.schedule import (
    ConfigWeights,
    LossWeights,
    build_scheduler,
    lr_lambda,
    plan_epoch,
    training_epochs,
)

W = ConfigWeights(
    id_vq_loss=1.0, id_kl_loss=0.1, id_dec_cl_loss=0.3, rec_code_loss=2.0, rec_kl_loss=0.01, rec_dec_cl_loss=0.03
)


def plans(n: int, **kw):
    args = {"cycle": 2, "warm_epoch": 0, "ablation": "none", "converged": False, "weights": W}
    args.update(kw)
    return [plan_epoch(e, **args) for e in range(n)]


def test_cycle_alternates_tokenizer_then_recommender_epochs() -> None:
    assert [p.phase for p in plans(6)] == ["tokenizer", "recommender"] * 3
    assert [p.phase for p in plans(6, cycle=3)] == ["tokenizer", "recommender", "recommender"] * 2
    tok, rec = plans(2)
    assert (tok.train_tokenizer, tok.train_recommender, tok.refresh_codes) == (True, False, True)
    assert (rec.train_tokenizer, rec.train_recommender, rec.refresh_codes) == (False, True, False)
    # L_IT = L_SQ + mu SIA + lambda PSA ; L_GR = L_REC + mu SIA + lambda PSA (weights from the id_/rec_ keys).
    assert tok.weights == LossWeights(rec=0.0, sq=1.0, sia=0.1, psa=0.3)
    assert rec.weights == LossWeights(rec=2.0, sq=0.0, sia=0.01, psa=0.03)


def test_warm_up_switches_alignment_off() -> None:
    p = plans(4, warm_epoch=2)
    assert p[0].weights == LossWeights(sq=1.0) and p[1].weights == LossWeights(rec=2.0)
    assert p[2].weights.sia == 0.1 and p[3].weights.psa == 0.03


def test_warm_phase_recommender_keeps_the_pretrained_ids_until_alignment_starts() -> None:
    p = plans(6, warm_epoch=4, warm_phase="recommender")
    assert [x.phase for x in p] == ["recommender"] * 4 + ["tokenizer", "recommender"]
    assert not any(x.refresh_codes or x.train_tokenizer for x in p[:4])  # no ID changes inside warm_epoch
    assert all(x.weights == LossWeights(rec=2.0) for x in p[:4])  # L_REC alone while warm
    assert p[4].weights == LossWeights(sq=1.0, sia=0.1, psa=0.3)
    # LR schedules are sized by the epochs each model really trains
    assert training_epochs(6, cycle=2, ablation="none", warm_epoch=4, warm_phase="recommender") == (1, 5)
    assert training_epochs(6, cycle=2, ablation="none", warm_epoch=4) == (3, 3)


@pytest.mark.parametrize(
    "ablation, tok_weights, rec_weights",
    [
        ("no_sia", LossWeights(sq=1.0, psa=0.3), LossWeights(rec=2.0, psa=0.03)),
        ("no_psa", LossWeights(sq=1.0, sia=0.1), LossWeights(rec=2.0, sia=0.01)),
        ("no_align", LossWeights(sq=1.0), LossWeights(rec=2.0)),
    ],
)
def test_alignment_ablations_zero_their_terms(ablation, tok_weights, rec_weights) -> None:
    tok, rec = plans(2, ablation=ablation)
    assert (tok.phase, tok.weights) == ("tokenizer", tok_weights)
    assert (rec.phase, rec.weights) == ("recommender", rec_weights)


def test_no_alt_trains_everything_jointly_every_epoch() -> None:
    for p in plans(3, ablation="no_alt", warm_epoch=1):
        assert (p.phase, p.train_tokenizer, p.train_recommender, p.refresh_codes) == ("joint", True, True, True)
    first, second = plans(2, ablation="no_alt", warm_epoch=1)
    assert first.weights == LossWeights(rec=2.0, sq=1.0)
    assert second.weights == LossWeights(rec=2.0, sq=1.0, sia=0.01, psa=0.03)


def test_no_ete_is_tiger_style() -> None:
    for p in plans(4, ablation="no_ete"):
        assert p == plan_epoch(0, cycle=2, warm_epoch=0, ablation="no_ete", converged=False, weights=W)
        assert (p.phase, p.train_tokenizer, p.refresh_codes, p.weights) == (
            "recommender",
            False,
            False,
            LossWeights(rec=2.0),
        )


@pytest.mark.parametrize("ablation", ["none", "no_alt", "no_ete"])
def test_converged_means_finetune_with_rec_loss_only(ablation) -> None:
    p = plan_epoch(7, cycle=2, warm_epoch=0, ablation=ablation, converged=True, weights=W)
    assert (p.phase, p.train_tokenizer, p.train_recommender, p.refresh_codes) == ("finetune", False, True, False)
    assert p.weights == LossWeights(rec=2.0)


def test_unknown_ablation_is_rejected() -> None:
    with pytest.raises(ValueError, match="no_ete"):
        plan_epoch(0, cycle=2, warm_epoch=0, ablation="no_tokenizer", converged=False, weights=W)


def test_training_epochs_count_each_optimizers_epochs() -> None:
    assert training_epochs(5, cycle=2, ablation="none") == (3, 2)  # epochs 0, 2, 4 tokenizer
    assert training_epochs(6, cycle=3, ablation="no_sia") == (2, 4)
    assert training_epochs(5, cycle=2, ablation="no_alt") == (5, 5)
    assert training_epochs(5, cycle=2, ablation="no_ete") == (0, 5)


def test_lr_lambda_by_hand() -> None:
    kw = {"warmup_steps": 2, "total_steps": 6}
    # warm-up: 0/2, 1/2; then cosine over 4 steps: step 4 is half-way -> 0.5 (1 + cos(pi/2)) = 0.5.
    assert [lr_lambda(s, kind="cosine", **kw) for s in (0, 1, 2, 4, 6, 9)] == pytest.approx([0, 0.5, 1, 0.5, 0, 0])
    assert lr_lambda(3, kind="cosine", **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert [lr_lambda(s, kind="linear", **kw) for s in (1, 4, 6)] == pytest.approx([0.5, 0.5, 0.0])
    assert [lr_lambda(s, kind="constant", **kw) for s in (1, 4, 60)] == pytest.approx([0.5, 1.0, 1.0])
    with pytest.raises(ValueError, match="cosine"):
        build_scheduler(
            torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), kind="step", warmup_steps=0, total_steps=1
        )


def test_scheduler_state_survives_a_weights_only_round_trip() -> None:
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([param], lr=0.1)
    sched = build_scheduler(opt, kind="cosine", warmup_steps=2, total_steps=10)
    for _ in range(3):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save(sched.state_dict(), buf)
    buf.seek(0)
    other_opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=0.1)
    other = build_scheduler(other_opt, kind="cosine", warmup_steps=2, total_steps=10)
    other.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(2):
        opt.step(), sched.step(), other_opt.step(), other.step()
    assert other.get_last_lr() == pytest.approx(sched.get_last_lr())
    assert sched.get_last_lr()[0] == pytest.approx(0.1 * lr_lambda(5, kind="cosine", warmup_steps=2, total_steps=10))


def test_tokenizer_freeze_epoch_skips_later_tokenizer_slots_and_keeps_the_recommender_epochs() -> None:
    p = plans(8, tokenizer_freeze_epoch=4)
    assert [x.phase for x in p] == ["tokenizer", "recommender"] * 2 + ["frozen", "recommender"] * 2
    assert not any(x.train_tokenizer or x.train_recommender or x.refresh_codes for x in p[4::2])
    assert all(x.weights == LossWeights() for x in p[4::2])  # nothing is computed in a skipped slot
    assert p[5] == p[1]._replace(weights=p[5].weights) and p[5].weights == p[3].weights
    assert training_epochs(8, cycle=2, ablation="none", tokenizer_freeze_epoch=4) == (2, 4)
    assert training_epochs(8, cycle=2, ablation="none") == (4, 4)
    # the ablations without cycles ignore it
    assert [x.phase for x in plans(4, ablation="no_ete", tokenizer_freeze_epoch=2)] == ["recommender"] * 4
    assert [x.phase for x in plans(4, ablation="no_alt", tokenizer_freeze_epoch=2)] == ["joint"] * 4
