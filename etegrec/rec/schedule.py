"""The alternating-optimisation schedule (paper §3.4) as one pure function, plus LR schedules.

``plan_epoch`` maps (epoch, cycle, warm_epoch, ablation, converged) to what an epoch does: its phase, which
model trains, the weight of every loss term by name, and whether item codes are recomputed afterwards.

Phases:
* ``tokenizer``   first epoch of each cycle: L_IT = id_vq_loss*L_SQ + id_kl_loss*L_SIA + id_dec_cl_loss*L_PSA,
                  recommender frozen; codes recomputed after the epoch.
* ``recommender`` the other cycle-1 epochs: L_GR = rec_code_loss*L_REC + rec_kl_loss*L_SIA + rec_dec_cl_loss*L_PSA,
                  tokenizer frozen.
* ``joint``       ablation ``no_alt``: every loss every epoch, both models train (SIA/PSA weighted by the rec_*
                  keys); codes recomputed after every epoch.
* ``frozen``      a tokenizer slot from ``tokenizer_freeze_epoch`` on: nothing trains and the codes stay, so the
                  rest of the alternating phase trains the recommender on fixed item IDs at its own rate.
* ``finetune``    once the alternating phase has converged: tokenizer frozen for good, L_REC only.

Epochs before ``warm_epoch`` have SIA and PSA switched off (reference behaviour); with ``warm_phase="recommender"``
the cycle's first epoch trains the recommender there too, so the pretrained item IDs stay fixed until the
alignment losses give the tokenizer a recommendation signal (the reference trains L_SQ alone, which re-assigns
IDs the recommender has just learnt without any such signal). Ablations (paper Table 4):
``no_sia``/``no_psa``/``no_align`` zero the matching weights; ``no_ete`` keeps the pretrained tokenizer frozen
and trains the recommender on L_REC only (TIGER-style). Terms with weight 0 are never computed by the trainer.

Deviations from the reference code: schedules are sized by the optimizer steps each optimizer really takes
(the reference sizes the recommender's cosine over all epochs although it only steps in half of them), and
the finetune phase's hyper-parameters are config keys instead of constants.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.optim.lr_scheduler import LambdaLR

from etegrec.config import ABLATIONS, LR_SCHEDULERS

PHASES = ("tokenizer", "recommender", "joint", "frozen", "finetune")


class ConfigWeights(NamedTuple):
    """The configured loss weights (config keys of the same names)."""

    id_vq_loss: float
    id_kl_loss: float
    id_dec_cl_loss: float
    rec_code_loss: float
    rec_kl_loss: float
    rec_dec_cl_loss: float


class LossWeights(NamedTuple):
    """Weight of each loss term in one epoch: L_REC, L_SQ, L_SIA, L_PSA."""

    rec: float = 0.0
    sq: float = 0.0
    sia: float = 0.0
    psa: float = 0.0


class EpochPlan(NamedTuple):
    """What one epoch does."""

    phase: str
    train_tokenizer: bool
    train_recommender: bool
    weights: LossWeights
    refresh_codes: bool  # recompute every item's codes after the epoch


def plan_epoch(
    epoch: int,
    *,
    cycle: int,
    warm_epoch: int,
    ablation: str,
    converged: bool,
    weights: ConfigWeights,
    warm_phase: str = "tokenizer",
    tokenizer_freeze_epoch: int = 0,
) -> EpochPlan:
    """The plan of ``epoch`` (0-based, counted within the alternating phase; ignored once converged).

    Args:
        epoch: epoch index of the alternating phase.
        cycle: epochs per cycle (the first trains the tokenizer).
        warm_epoch: epochs at the start with SIA and PSA off.
        ablation: one of ``ABLATIONS``.
        converged: the tokenizer is frozen for good (finetune phase).
        weights: configured loss weights.
        warm_phase: what a cycle's first epoch trains before ``warm_epoch``: ``tokenizer`` | ``recommender``.
        tokenizer_freeze_epoch: first epoch whose tokenizer slot is skipped (``frozen``); 0 = never.
    """
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation={ablation!r}; use one of: {', '.join(ABLATIONS)}")
    if converged:
        return EpochPlan("finetune", False, True, LossWeights(rec=weights.rec_code_loss), False)
    if ablation == "no_ete":
        return EpochPlan("recommender", False, True, LossWeights(rec=weights.rec_code_loss), False)
    if ablation == "no_alt":
        phase, w = (
            "joint",
            LossWeights(weights.rec_code_loss, weights.id_vq_loss, weights.rec_kl_loss, weights.rec_dec_cl_loss),
        )
    elif epoch % cycle == 0 and 0 < tokenizer_freeze_epoch <= epoch:
        return EpochPlan("frozen", False, False, LossWeights(), False)
    elif epoch % cycle == 0 and (epoch >= warm_epoch or warm_phase == "tokenizer"):
        phase, w = "tokenizer", LossWeights(0.0, weights.id_vq_loss, weights.id_kl_loss, weights.id_dec_cl_loss)
    else:
        phase, w = "recommender", LossWeights(weights.rec_code_loss, 0.0, weights.rec_kl_loss, weights.rec_dec_cl_loss)
    if epoch < warm_epoch or ablation == "no_align":
        w = w._replace(sia=0.0, psa=0.0)
    elif ablation == "no_sia":
        w = w._replace(sia=0.0)
    elif ablation == "no_psa":
        w = w._replace(psa=0.0)
    return EpochPlan(
        phase=phase,
        train_tokenizer=phase in ("tokenizer", "joint"),
        train_recommender=phase in ("recommender", "joint"),
        weights=w,
        refresh_codes=phase in ("tokenizer", "joint"),
    )


def training_epochs(
    epochs: int, *, cycle: int, ablation: str, warm_epoch: int = 0, warm_phase: str = "tokenizer",
    tokenizer_freeze_epoch: int = 0,
) -> tuple[int, int]:
    """(epochs that train the tokenizer, epochs that train the recommender) in an alternating phase of ``epochs``."""
    plans = [
        plan_epoch(e, cycle=cycle, warm_epoch=warm_epoch, ablation=ablation, converged=False,
                   weights=ConfigWeights(1, 1, 1, 1, 1, 1), warm_phase=warm_phase,
                   tokenizer_freeze_epoch=tokenizer_freeze_epoch)
        for e in range(epochs)
    ]
    return sum(p.train_tokenizer for p in plans), sum(p.train_recommender for p in plans)


def lr_lambda(step: int, *, kind: str, warmup_steps: int, total_steps: int) -> float:
    """LR multiplier after ``step`` optimizer steps: linear warm-up, then cosine / linear decay or constant.

    Matches transformers' ``get_{cosine,linear,constant}_schedule_with_warmup`` (half-cycle cosine to 0).
    """
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if kind == "constant":
        return 1.0
    progress = min(1.0, float(step - warmup_steps) / float(max(1, total_steps - warmup_steps)))
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"lr_scheduler_type={kind!r}; use one of: {', '.join(LR_SCHEDULERS)}")


class _Lambda:
    """LambdaLR multiplier; ``LambdaLR.state_dict`` stores its ``__dict__`` (plain ints and a str)."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int) -> None:
        lr_lambda(0, kind=kind, warmup_steps=warmup_steps, total_steps=total_steps)  # validate ``kind`` now
        self.kind, self.warmup_steps, self.total_steps = kind, warmup_steps, total_steps

    def __call__(self, step: int) -> float:
        return lr_lambda(step, kind=self.kind, warmup_steps=self.warmup_steps, total_steps=self.total_steps)


def build_scheduler(optimizer: torch.optim.Optimizer, *, kind: str, warmup_steps: int, total_steps: int) -> LambdaLR:
    """A LambdaLR over ``total_steps`` optimizer steps with ``warmup_steps`` of linear warm-up."""
    return LambdaLR(optimizer, _Lambda(kind, warmup_steps, total_steps))
