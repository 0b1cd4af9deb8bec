"""Step 4: joint training of the RQ-VAE tokenizer and the T5 recommender (paper §3.4).

``run(cfg, accelerator)`` trains in two stages and returns the metrics:

1. **Alternating stage.** ``schedule.plan_epoch`` decides each epoch's phase: the first epoch of every cycle
   trains the tokenizer (L_SQ + mu*SIA + lambda*PSA, recommender frozen) and is followed by a re-computation of
   every item's code tuple (with suffix) and the code churn; the other epochs train the recommender
   (L_REC + mu*SIA + lambda*PSA, tokenizer frozen). From ``tokenizer_freeze_epoch`` on (0 = never) the
   tokenizer epochs are skipped and the IDs stay fixed. Validation (constrained beam search, ``valid_metric``)
   every ``eval_step`` epochs; the best model is ``best.pt``. The stage ends ("the tokenizer has converged")
   when ``early_stop`` evaluations pass without improvement or after ``epochs`` epochs.
2. **Finetune stage.** The best alternating model is reloaded, the tokenizer is frozen for good and the
   recommender trains on L_REC with a fresh AdamW (``finetune_lr``, cosine without warm-up) until
   ``finetune_early_stop`` evaluations (one per epoch) pass without improvement or ``finetune_epochs`` end.

Finally the best model is tested and printed beside the popularity baseline (and SASRec when available).
With a deadline (``run(..., deadline=)``, set by the benchmark's ``--time_budget``) training stops at the first
epoch boundary from which another epoch, a validation and the test would not fit, and the best model is tested.

Multi-process (accelerate, DDP-style): every process holds both models and trains on its share of each
epoch's batches; gradients are averaged over processes with one all-reduce per optimizer step. DDP wrappers
are not used because which model trains changes every epoch (DDP fixes its parameter set at wrap time). The
loss parts are averaged over processes whenever they are read, so a non-finite loss stops all processes at the
same step.

Deviations from the reference code:
* Frozen models are run under ``no_grad`` in eval mode; terms with weight 0 are not computed; the tokenizer runs
  once per step on the batch's distinct targets (the reference ran it twice in tokenizer epochs).
* Learning-rate schedules are sized by the optimizer steps each optimizer really takes; gradient accumulation
  really accumulates; the finetune hyper-parameters are config keys.
* The run resumes exactly (``--resume=<run>/last.pt``): sampler order and dropout are re-seeded per epoch from
  (seed, epoch, rank), and optimizer / scheduler / trainer state come from the checkpoint.
* The finetune stage starts from the best alternating checkpoint, keeps its best score (``best.pt`` is only
  replaced by a better model) and writes into the same files, never the reference's clashing ``{epoch}.pt``.
* SIA's code distributions are ``softmax(-distance / sia_tau)``; ``sia_tau=auto`` uses, per level, the median gap
  between the nearest and second-nearest code distance over the catalogue (re-measured at every code refresh).
  With L2-normalised tokenizer inputs all distances are far below 1, so the paper's ``softmax(-distance)`` is
  nearly uniform and SIA carries almost no signal. The same gap is the unit of ``code_refresh_margin``: a refresh
  keeps an item's code at a level unless another is nearer by more than that many gaps.
* Warm-up can be a share of each optimiser's steps (``warmup_ratio``); the tokenizer has its own weight decay.
* Speed and memory knobs the reference lacks (all off by default except bucketing): length-bucketed batches
  padded to the batch maximum (``bucket_window``), a per-batch token budget (``max_batch_tokens``), a random
  subset of records per epoch (``epoch_records``) and ``torch.compile`` of the recommender (``compile``).

Fast path on CUDA (the CPU path is the plain one): TF32 matmuls while training, fused AdamW, optional bfloat16
autocast of the recommender with fp32 master weights (``bf16: auto`` or ``true``; off by default since two bf16
runs on an H200 ended in NaN while fp32 + TF32 trained as fast), batches gathered on the device
(``data.DeviceBatches``), and no host synchronisation per step: loss parts are summed on the device
(``LossSums``) and read every ``sync_every`` optimiser steps (auto: 50) for the NaN check, TensorBoard and the
progress bar; a non-finite loss is reported with its part and the range of steps it fell in. On CPU every step
is read, as before.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from etegrec.artifacts import DatasetFiles, load_item_map, load_splits
from etegrec.config import Config, sia_temperature
from etegrec.errors import TrainingError
from etegrec.rec.checkpoint import build_recommender, read_joint, read_joint_resume, save_joint
from etegrec.rec.data import Batch, SequenceDataset, eval_loader, item_vectors_by_id, train_loader
from etegrec.rec.evaluate import evaluate
from etegrec.rec.losses import code_entropy, psa_loss, sia_loss, sq_loss
from etegrec.rec.model import EncoderOut
from etegrec.rec.schedule import ConfigWeights, EpochPlan, build_scheduler, plan_epoch, training_epochs
from etegrec.runtime import (
    Deadline,
    cuda_tf32,
    peak_memory_mb,
    resumed_config,
    seed_epoch,
    set_seed,
    start_training_run,
)
from etegrec.tokenizer.item_codes import ItemCodes, build_item_codes
from etegrec.tokenizer.pretrain import resolve_rqvae_path
from etegrec.tokenizer.quantizer import code_log_probs, nearest_code_gap
from etegrec.tokenizer.rqvae import RQVAE, load_rqvae, load_tokenizer_state

logger = logging.getLogger("etegrec.rec")


@dataclass
class TrainerState:
    """Progress of a run (stored in every checkpoint; enough to resume at an epoch boundary)."""

    stage: str = "alternating"  # alternating | finetune | done
    epoch: int = 0  # next epoch index within the stage
    epochs_done: int = 0  # epochs over both stages (seeds sampler and dropout)
    global_step: int = 0  # optimizer steps over both stages (TensorBoard x-axis)
    best_score: float = -math.inf
    best_epoch: int = -1  # epochs_done index of the best evaluation
    best_metrics: dict[str, float] = field(default_factory=dict)
    patience: int = 0  # evaluations without improvement in the current stage
    stage_ends: dict[str, str] = field(default_factory=dict)  # stage -> how it ended ("early stop after 28 epochs")


def bf16_enabled(setting: str, device: torch.device) -> bool:
    """The ``bf16`` config value on ``device``: auto = on with CUDA (where the GPU has bfloat16), off on CPU."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return setting == "true"


def adamw(params: Any, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on CUDA (its step counters then stay on the device: no host read)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True if device.type == "cuda" else None)


class LossSums:
    """Sums of the loss parts over a window of batches, kept on the device: adding a batch's losses costs no
    host synchronisation; ``read`` brings the window to the host once and starts the next one. The epoch index
    of the first batch at which each part was non-finite is kept too (a NaN step spreads NaN to every part).

    Args:
        names: the loss parts, in the order of the values given to ``add``.
        device: where the sums live.
    """

    def __init__(self, names: list[str], device: torch.device) -> None:
        self.names = names
        self.window = torch.zeros(len(names), dtype=torch.float64, device=device)  # (P,)
        self.first_bad = torch.full((len(names),), -1.0, dtype=torch.float64, device=device)  # (P,) -1 = finite
        self.first = 0  # index in the epoch of the window's first batch
        self.batches = 0  # batches in the window
        self.epoch = [0.0] * len(names)  # sums over the epoch's read windows (host)

    def add(self, values: Tensor) -> None:
        """Add one batch's (P,) loss parts."""
        self.first_bad.masked_fill_(~torch.isfinite(values) & (self.first_bad < 0), self.first + self.batches)
        self.window += values
        self.batches += 1

    def read(self, reduce: Any = None) -> tuple[dict[str, float], dict[str, int]]:
        """Mean of each part over the window (``reduce``: averages a tensor over processes), and the first
        non-finite batch of each part that had one (this process); the window restarts."""
        window = reduce(self.window) if reduce is not None else self.window
        both = torch.cat([window, self.first_bad]).tolist()  # the window's one host synchronisation
        sums, first_bad = both[: len(self.names)], both[len(self.names) :]
        self.epoch = [e + v for e, v in zip(self.epoch, sums)]
        means = {name: v / max(1, self.batches) for name, v in zip(self.names, sums)}
        self.window.zero_()
        self.first += self.batches
        self.batches = 0
        return means, {name: int(step) for name, step in zip(self.names, first_bad) if step >= 0}


class JointTrainer:
    """Holds models, data, optimizers and progress of one joint-training run; ``fit()`` runs it."""

    def __init__(self, cfg: Config, accelerator: Any) -> None:
        cfg.validate()  # also catches values set after loading (fail before loading anything)
        resume_path = cfg.path(cfg.train.resume) if cfg.train.resume else None
        resume = read_joint_resume(resume_path) if resume_path is not None else None
        if resume is not None:
            cfg = resumed_config(resume_path, resume, cfg.to_dict())
        self.cfg = cfg
        tc = cfg.train
        self.acc = accelerator
        self.device = accelerator.device
        self.world = accelerator.num_processes
        self.rank = accelerator.process_index
        self.is_main = accelerator.is_main_process

        self.run_dir, self.tb = start_training_run(cfg, accelerator, resume_path)
        logger.info(
            "joint training on %s, %d process(es) on %s, run folder %s",
            cfg.data.dataset,
            self.world,
            self.device,
            self.run_dir,
        )

        # ---- data, tokenizer and the item codes it assigns
        files = DatasetFiles.from_config(cfg)
        item_map = load_item_map(files)
        self.n_items = len(item_map) - 1
        splits = load_splits(files, item_map, cfg.data.max_his_len)
        self.vectors = item_vectors_by_id(cfg, self.n_items).to(self.device)  # (N+1, d_s)
        self._load_tokenizer(resume)

        # ---- recommender (same seed on every process -> identical initial weights)
        set_seed(tc.seed)
        self.model = build_recommender(cfg, self.tokenizer.model_args()).to(self.device)
        logger.info(
            "recommender: %.2f M parameters, tokenizer: %.2f M",
            sum(p.numel() for p in self.model.parameters()) / 1e6,
            sum(p.numel() for p in self.tokenizer.parameters()) / 1e6,
        )

        # ---- numerics and host synchronisation of the training steps
        self.bf16 = bf16_enabled(tc.bf16, self.device)
        self.sync_every = tc.sync_every or (50 if self.device.type == "cuda" else 1)
        if tc.compile:
            self.model.compile()  # compiles forward() in place: parameter names and checkpoints stay as they are
        logger.info("training numerics: bf16 autocast %s, TF32 %s, fused AdamW %s, loss read every %d step(s)%s",
                    "on" if self.bf16 else "off", "on" if self.device.type == "cuda" else "off",
                    "on" if self.device.type == "cuda" else "off", self.sync_every, ", torch.compile" * tc.compile)

        # ---- loaders
        self.train_set = SequenceDataset(splits["train"], cfg.data.max_his_len)
        self.train_loader = train_loader(
            self.train_set,
            self.codes,
            tc.batch_size,
            history_suffix=cfg.model.history_suffix,
            seed=tc.seed,
            window=tc.bucket_window,
            max_tokens=tc.max_batch_tokens,
            epoch_records=tc.epoch_records,
            num_replicas=self.world,
            rank=self.rank,
            num_workers=tc.num_workers,
            device=self.device,
        )
        self.eval_sets = {s: SequenceDataset(splits[s], cfg.data.max_his_len) for s in ("valid", "test")}

        self._build_optimizers()
        self.state = TrainerState()
        self.budget = Deadline(None)  # fit() sets the run's deadline
        if resume is not None:
            self._restore(resume)
        # (L,) distance unit per level: SIA's temperature under sia_tau=auto and the unit of code_refresh_margin
        self.code_gap = self._nearest_code_gap()  # None when neither uses it
        self._sia_entropy: list[Tensor] = []  # (2, L) per step of the current epoch: target / sequence entropy
        self._grad_norms: dict[str, list[Tensor]] = {"sia": [], "total": []}  # tokenizer encoder, sampled steps
        self._sia_steps = 0  # tokenizer-phase batches with SIA in the current epoch (every 10th is sampled)
        self._last_valid: dict[str, float] = {}  # latest validation metrics (compared after a code refresh)

    # ------------------------------------------------------------------ set-up helpers
    def _nearest_code_gap(self) -> Tensor | None:
        """(L,) median nearest/second-nearest code distance gap of the current tokenizer over the catalogue; None
        (not measured: it costs a pass over the catalogue) unless ``sia_tau=auto`` or ``code_refresh_margin`` > 0."""
        tc = self.cfg.train
        if sia_temperature(tc.sia_tau) is not None and tc.code_refresh_margin <= 0:
            return None
        gap = nearest_code_gap(self.tokenizer.catalogue_distances(self.vectors[1:]))  # (L,)
        logger.info("code distance unit (median nearest/second-nearest gap) per level: %s",
                    "/".join(f"{g:.4g}" for g in gap.tolist()))
        return gap

    @property
    def sia_tau(self) -> Tensor | float:
        """SIA temperature: the configured number, or the per-level distance gap (L,) under ``auto``."""
        fixed = sia_temperature(self.cfg.train.sia_tau)
        return self.code_gap if fixed is None else fixed

    def _load_tokenizer(self, resume: dict[str, Any] | None) -> None:
        """The tokenizer and its item codes: the resumed run's, else those of the pretrained RQ-VAE."""
        cfg, m = self.cfg, self.cfg.model
        if resume is not None:
            source = f"resume checkpoint {cfg.train.resume}"
            self.tokenizer = RQVAE(**resume["tokenizer_args"])
            load_tokenizer_state(self.tokenizer, resume["tokenizer"], source)
            codes = resume["item_codes"]
        else:
            path = resolve_rqvae_path(cfg)
            t = cfg.tokenizer
            self.tokenizer, obj = load_rqvae(
                path,
                expected_args={
                    "in_dim": int(self.vectors.shape[1]),
                    "layers": t.layers,
                    "e_dim": t.e_dim,
                    "num_emb_list": t.num_emb_list,
                },
            )
            source, codes = f"RQ-VAE checkpoint {path}", obj.get("item_codes")
            stats = obj.get("metrics", {})
            logger.info(
                "tokenizer: %s (collision rate %s, gini %s)", path, stats.get("collision_rate"), stats.get("gini")
            )
        self.tokenizer.to(self.device)
        self.codes = ItemCodes.from_file(codes, m.code_num, source, n_items=self.n_items, code_length=m.code_length)

    def _build_optimizers(self) -> None:
        """AdamW per model, schedules sized by the optimizer steps each really takes, and the loss weights."""
        tc = self.cfg.train
        self.steps_per_epoch = math.ceil(len(self.train_loader) / tc.gradient_accumulation_steps)
        tok_epochs, rec_epochs = training_epochs(
            tc.epochs, cycle=tc.cycle, ablation=tc.ablation, warm_epoch=tc.warm_epoch, warm_phase=tc.warm_phase,
            tokenizer_freeze_epoch=tc.tokenizer_freeze_epoch,
        )
        self.rec_opt = adamw(self.model.parameters(), tc.lr_rec, tc.weight_decay, self.device)
        self.id_opt = adamw(self.tokenizer.parameters(), tc.lr_id, tc.id_weight_decay, self.device)
        rec_steps, id_steps = rec_epochs * self.steps_per_epoch, tok_epochs * self.steps_per_epoch
        if tc.warmup_ratio > 0:
            rec_warmup, id_warmup = round(tc.warmup_ratio * rec_steps), round(tc.warmup_ratio * id_steps)
        else:
            rec_warmup, id_warmup = tc.warmup_steps, tc.warmup_steps // max(1, tc.cycle)
        self.rec_sched = self._scheduler(self.rec_opt, rec_warmup, rec_steps, "rec")
        self.id_sched = self._scheduler(self.id_opt, id_warmup, id_steps, "id")
        self.ft_opt: torch.optim.Optimizer | None = None
        self.ft_sched: Any = None
        self.weights = ConfigWeights(
            tc.id_vq_loss, tc.id_kl_loss, tc.id_dec_cl_loss, tc.rec_code_loss, tc.rec_kl_loss, tc.rec_dec_cl_loss
        )
        if tc.warm_epoch >= tc.epochs and tc.ablation not in ("no_align", "no_ete"):
            logger.warning(
                "warm_epoch=%d >= epochs=%d: SIA and PSA never switch on (as in ablation no_align); lower warm_epoch",
                tc.warm_epoch,
                tc.epochs,
            )

    def _scheduler(self, opt: torch.optim.Optimizer, warmup: int, total: int, name: str) -> Any:
        if total > 0 and warmup >= total:
            logger.warning(
                "%s schedule: warm-up of %d steps >= the %d steps this optimizer takes, so its learning rate never "
                "reaches its peak; lower warmup_steps (e.g. to %d) or use warmup_ratio",
                name,
                warmup,
                total,
                max(1, total // 10),
            )
        return build_scheduler(opt, kind=self.cfg.train.lr_scheduler_type, warmup_steps=warmup, total_steps=total)

    def _restore(self, obj: dict[str, Any]) -> None:
        self.model.load_state_dict(obj["model"], strict=True)
        self.state = TrainerState(**obj["trainer"])
        opts, scheds = obj["optimizers"], obj["schedulers"]
        self.rec_opt.load_state_dict(opts["rec"])
        self.id_opt.load_state_dict(opts["id"])
        self.rec_sched.load_state_dict(scheds["rec"])
        self.id_sched.load_state_dict(scheds["id"])
        if self.state.stage == "finetune":
            self._make_finetune_optimizer()
            self.ft_opt.load_state_dict(opts["finetune"])
            self.ft_sched.load_state_dict(scheds["finetune"])
        logger.info(
            "resumed from %s: stage %s, epoch %d, best %s=%.4f",
            self.cfg.train.resume,
            self.state.stage,
            self.state.epoch,
            self.cfg.train.valid_metric,
            self.state.best_score,
        )

    def _make_finetune_optimizer(self) -> None:
        tc = self.cfg.train
        self.ft_opt = adamw(self.model.parameters(), tc.finetune_lr, tc.weight_decay, self.device)
        self.ft_sched = self._scheduler(self.ft_opt, 0, tc.finetune_epochs * self.steps_per_epoch, "finetune")

    # ------------------------------------------------------------------ checkpoints
    def _save(self, name: str, plan_phase: str, metrics: dict[str, float]) -> None:
        """Write ``<run>/<name>`` on the main process; every process waits for it."""
        if self.is_main:
            opts = {"rec": self.rec_opt.state_dict(), "id": self.id_opt.state_dict()}
            scheds = {"rec": self.rec_sched.state_dict(), "id": self.id_sched.state_dict()}
            if self.ft_opt is not None:
                opts["finetune"], scheds["finetune"] = self.ft_opt.state_dict(), self.ft_sched.state_dict()
            save_joint(
                self.run_dir / name,
                cfg=self.cfg,
                model=self.model,
                tokenizer=self.tokenizer,
                item_codes=self.codes,
                epoch=self.state.epochs_done,
                phase=plan_phase,
                metrics=metrics,
                optimizers=opts,
                schedulers=scheds,
                trainer=asdict(self.state),
                rng={"scheme": "re-seeded every epoch from (seed, epochs_done, rank)", "seed": self.cfg.train.seed},
            )
        self.acc.wait_for_everyone()

    def _load_weights(self, name: str) -> None:
        """Load recommender, tokenizer and code table of ``<run>/<name>`` (every process reads the file)."""
        obj = read_joint(self.run_dir / name, map_location="cpu")
        self.model.load_state_dict(obj["model"], strict=True)
        load_tokenizer_state(self.tokenizer, obj["tokenizer"], str(self.run_dir / name))
        self.codes.update(obj["item_codes"])

    # ------------------------------------------------------------------ one training step
    def _losses(self, b: Batch, plan: EpochPlan) -> dict[str, Tensor]:
        """The unweighted loss terms whose weight is > 0 in this phase."""
        w = plan.weights
        align = w.sia > 0 or w.psa > 0
        parts: dict[str, Tensor] = {}
        first = b.distinct  # (M,) one row per distinct target
        enc_u = dec_u = z_e = h_d = None
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)
        with torch.set_grad_enabled(plan.train_recommender), autocast:
            if w.rec > 0:
                out = self.model(b.history_codes, b.target_codes)
                parts["rec"] = out.loss_rec.float()
                if align:
                    enc_u = EncoderOut(out.enc.hidden[first], out.enc.mask[first])
                    dec_u = out.dec_hidden[first]
            elif align:  # tokenizer phase: only the distinct rows, decoder only at BOS (causal: same state)
                enc_u = self.model.encode(b.history_codes[first])
                if w.psa > 0:
                    dec_u = self.model.decode(enc_u, b.target_codes[first, :0]).hidden  # (M, 1, d)
            if w.sia > 0:
                z_e = self.model.sequence_latent(enc_u).float()  # (M, e)
            if w.psa > 0:
                h_d = self.model.preference_latent(dec_u).float()  # (M, d_s)
        if w.sq > 0 or align:
            with torch.set_grad_enabled(plan.train_tokenizer):
                tout = self.tokenizer(self.vectors[b.target[first]])  # one forward on the M distinct targets
            if w.sq > 0:
                parts["sq"] = sq_loss(tout.loss_recon, tout.loss_rq, self.cfg.train.alpha)
            if w.sia > 0:
                # Grad reaches z_E when the recommender trains and the codebooks when the tokenizer trains.
                seq_lp = code_log_probs(self.tokenizer.rq(z_e).distances, self.sia_tau)  # (M, L, K)
                target_lp = code_log_probs(tout.distances, self.sia_tau)  # (M, L, K)
                parts["sia"] = sia_loss(target_lp, seq_lp)
                entropies = [code_entropy(target_lp.detach()), code_entropy(seq_lp.detach())]  # 2 x (L,)
                self._sia_entropy.append(torch.stack(entropies))
            if w.psa > 0:
                parts["psa"] = psa_loss(h_d, tout.recon, self.cfg.train.psa_tau)
        return parts

    def accumulate(self, b: Batch, plan: EpochPlan, scale: int = 1) -> tuple[list[str], Tensor]:
        """Backward of one batch's weighted loss divided by ``scale`` (the batches that share an optimizer step).

        Returns the names of the unweighted loss parts and their (P,) values, left on the device (``LossSums``).
        """
        parts = self._losses(b, plan)
        values = torch.stack([v.detach().float() for v in parts.values()])  # (P,) stays on the device
        total = sum(getattr(plan.weights, k) * v for k, v in parts.items())
        has_sia = plan.train_tokenizer and "sia" in parts  # a tokenizer step that SIA's gradient reaches
        sample_grads = has_sia and scale == 1 and self._sia_steps % 10 == 0
        self._sia_steps += int(has_sia)
        if sample_grads:
            self._grad_norms["sia"].append(self._encoder_grad_norm(plan.weights.sia * parts["sia"]))
        (total / scale).backward()
        if sample_grads:
            self._grad_norms["total"].append(self._encoder_grad_norm(None))
        return list(parts), values

    def read_losses(self, sums: LossSums, plan: EpochPlan, groups: list, bar: Any = None) -> dict[str, float]:
        """Read a window of loss sums (averaged over processes); raise on a non-finite part, else log it."""
        s = self.state
        first, last = sums.first, sums.first + sums.batches - 1
        means, first_bad = sums.read(partial(self.acc.reduce, reduction="mean") if self.world > 1 else None)
        bad = [k for k, v in means.items() if not math.isfinite(v)]
        if bad:
            steps = f"step {first}" if first == last else f"steps {first}-{last}"
            shown = ", ".join(f"{k}={v:.4g}" for k, v in means.items())
            earliest = min(first_bad.values(), default=None)
            origin = "" if earliest is None or first == last else (
                f"; first non-finite: {', '.join(k for k, v in first_bad.items() if v == earliest)} at step {earliest}")
            raise TrainingError(
                f"non-finite loss at epoch {s.epochs_done} ({plan.phase} phase), {steps} of the epoch (global step "
                f"{s.global_step}): {shown}; non-finite parts: {bad}{origin}. Lower the learning rate (lr_rec / "
                "lr_id / finetune_lr) or the weight of the failing term, or raise warmup_steps"
            )
        logged = {f"loss_{k}": v for k, v in means.items()}
        logged["loss_total"] = sum(getattr(plan.weights, k) * v for k, v in means.items())
        self.tb.scalars(s.global_step, logged, prefix="train/")
        self.tb.scalars(s.global_step, {name: sch.get_last_lr()[0] for name, _, sch, _ in groups}, prefix="lr/")
        if bar is not None:
            done = max(1, last + 1)
            bar.set_postfix({k: f"{v / done:.4f}" for k, v in zip(sums.names, sums.epoch)}, refresh=False)
        return means

    def start_phase(self, plan: EpochPlan) -> list[tuple[str, torch.optim.Optimizer, Any, torch.nn.Module]]:
        """Train mode and gradients for the model(s) ``plan`` trains, eval mode and none for the other; returns
        the (name, optimizer, schedule, module) groups its steps update."""
        self.model.train(plan.train_recommender)
        self.tokenizer.train(plan.train_tokenizer)
        for p in self.model.parameters():
            p.requires_grad_(plan.train_recommender)
        for p in self.tokenizer.parameters():
            p.requires_grad_(plan.train_tokenizer)
        if plan.phase == "finetune":
            return [("finetune", self.ft_opt, self.ft_sched, self.model)]
        groups = []
        if plan.train_tokenizer:
            groups.append(("id", self.id_opt, self.id_sched, self.tokenizer))
        if plan.train_recommender:
            groups.append(("rec", self.rec_opt, self.rec_sched, self.model))
        return groups

    def optimizer_step(self, groups: list) -> None:
        """Average gradients over processes, clip, step optimizers and schedules, clear gradients."""
        for _, opt, sched, module in groups:
            params = [p for p in module.parameters() if p.grad is not None]
            if self.world > 1 and params:
                # Every process runs the same graph, so the same parameters have gradients everywhere.
                flat = torch.cat([p.grad.reshape(-1) for p in params])
                flat = self.acc.reduce(flat, reduction="mean")
                for p, g in zip(params, flat.split([p.numel() for p in params])):
                    p.grad.copy_(g.view_as(p))
            if self.cfg.train.max_grad_norm > 0 and params:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.train.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self, plan: EpochPlan) -> dict[str, float]:
        tc = self.cfg.train
        s = self.state
        seed_epoch(tc.seed, s.epochs_done, self.rank)
        self.train_loader.batch_sampler.set_epoch(s.epochs_done)
        groups = self.start_phase(plan)
        n_batches = len(self.train_loader)
        accum = tc.gradient_accumulation_steps
        sums: LossSums | None = None
        self._sia_entropy, self._grad_norms, self._sia_steps = [], {"sia": [], "total": []}, 0
        steps, seen, start = 0, 0, time.perf_counter()
        bar = tqdm(
            total=n_batches,
            desc=f"epoch {s.epochs_done} {plan.phase}",
            disable=not self.is_main,
            dynamic_ncols=True,
            leave=False,
            file=sys.stdout,
        )
        with cuda_tf32(self.device.type == "cuda"):
            for i, batch in enumerate(self.train_loader):
                batch = batch.to(self.device)
                group_start = (i // accum) * accum
                group_size = min(accum, n_batches - group_start)
                names, values = self.accumulate(batch, plan, group_size)
                sums = sums or LossSums(names, self.device)
                sums.add(values)
                seen += batch.target.shape[0]
                bar.update(1)
                if i + 1 == group_start + group_size:
                    self.optimizer_step(groups)
                    s.global_step += 1
                    steps += 1
                    if steps % self.sync_every == 0 or i + 1 == n_batches:
                        self.read_losses(sums, plan, groups, bar)
        bar.close()
        seconds = time.perf_counter() - start
        means = {f"loss_{k}": v / max(1, n_batches) for k, v in zip(sums.names, sums.epoch)} if sums else {}
        speed = seen * self.world / max(seconds, 1e-9)
        self.tb.scalars(s.epochs_done, {f"seq_per_s_{plan.phase}": speed}, prefix="speed/")
        self._log_sia_diagnostics(plan)
        logger.info(
            "epoch %d %-11s | %s | %.1f s, %.1f seq/s, peak memory %.0f MB",
            s.epochs_done,
            plan.phase,
            " ".join(f"{k}={v:.4f}" for k, v in means.items()) or "nothing to train",
            seconds,
            speed,
            peak_memory_mb(self.device),
        )
        return means

    # ------------------------------------------------------------------ codes and evaluation
    def _encoder_grad_norm(self, loss: Tensor | None) -> Tensor:
        """L2 norm of ``loss``'s gradient on the tokenizer encoder (None: of the gradients already accumulated).

        A 0-dim tensor left on the device (no host synchronisation per step).
        """
        params = [p for p in self.tokenizer.encoder.parameters() if p.requires_grad]
        if loss is None:
            grads = [p.grad for p in params if p.grad is not None]
        else:
            grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
            grads = [g for g in grads if g is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        return torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))

    def _log_sia_diagnostics(self, plan: EpochPlan) -> None:
        """Log the epoch's mean per-level SIA entropies and the SIA gradient norm reaching the tokenizer encoder."""
        if not self._sia_entropy:
            return
        entropy = torch.stack(self._sia_entropy).mean(0).tolist()  # 2 x L: the epoch's one host read of them
        shown = {f"entropy_{side}_l{level + 1}": entropy[row][level]
                 for row, side in enumerate(("target", "sequence")) for level in range(len(entropy[0]))}
        sampled = [k for k, v in self._grad_norms.items() if v]
        means = torch.stack([torch.stack(self._grad_norms[k]).mean() for k in sampled]).tolist() if sampled else []
        norms = dict(zip(sampled, means))  # one host read
        if norms:
            shown["grad_norm_encoder_sia"], shown["grad_norm_encoder_total"] = norms["sia"], norms["total"]
        tau = torch.as_tensor(self.sia_tau).reshape(-1).tolist()  # L values (or one)
        shown.update({f"tau_l{level + 1}": t for level, t in enumerate(tau)})
        self.tb.scalars(self.state.epochs_done, shown, prefix="sia/")
        logger.info(
            "epoch %d SIA (%s) | entropy target %s, sequence %s nats (uniform %.3f) | tau %s%s",
            self.state.epochs_done,
            plan.phase,
            "/".join(f"{v:.3f}" for v in entropy[0]),
            "/".join(f"{v:.3f}" for v in entropy[1]),
            math.log(self.model.code_num),
            "/".join(f"{t:.4g}" for t in tau),
            f" | encoder grad norm: SIA {norms['sia']:.3g}, total {norms['total']:.3g}" if norms else "",
        )

    def _refresh_codes(self) -> None:
        """Recompute every item's ID with the updated tokenizer; log churn and codebook health.

        The distance unit (``code_gap``) is re-measured on the updated tokenizer first; with
        ``code_refresh_margin`` > 0 an item keeps its code at a level unless another is nearer by that many units.
        """
        self.code_gap = self._nearest_code_gap()
        margin = self.cfg.train.code_refresh_margin
        new, stats = build_item_codes(  # (N, C), same assignment rule as pretraining (Sinkhorn where sk_epsilons > 0)
            self.tokenizer,
            self.vectors[1:],  # (N, d_s) items 1..N in id order
            self.model.code_num,
            sk_epsilons=self.cfg.tokenizer.sk_epsilons,
            sk_iters=self.cfg.tokenizer.sk_iters,
            previous=self.codes.stored() if margin > 0 else None,
            margins=margin * self.code_gap if margin > 0 else None,
        )
        if self.world > 1:
            from accelerate.utils import broadcast

            new = broadcast(new.to(self.device), from_process=0).cpu()  # bitwise-identical tables everywhere
        churn = self.codes.churn(new)
        self.codes.update(new)
        health = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        self.tb.scalars(self.state.epochs_done, {**churn, **health}, prefix="codes/")
        first_change = [churn[f"churn_first_level{level}"] for level in range(1, self.codes.code_length)]
        logger.info(
            "item codes recomputed: churn %.4f (prefix %.4f; first change at level 1/2/...: %s), collision rate "
            "%.4f, max group %d, gini %.3f, min usage %.3f",
            churn["churn"],
            churn["prefix_churn"],
            "/".join(f"{share:.4f}" for share in first_change),
            stats["collision_rate"],
            stats["max_group"],
            stats["gini"],
            stats["min_usage"],
        )

    def _evaluate(self, split: str) -> dict[str, float]:
        tc = self.cfg.train
        loader = eval_loader(self.eval_sets[split], self.codes, tc.eval_batch_size,
                             history_suffix=self.cfg.model.history_suffix, num_workers=tc.num_workers)
        return evaluate(self.model, self.codes.trie(self.device), loader, self.acc, tc.num_beams, tc.metrics)

    def _validate(self, phase: str, patience_limit: int) -> None:
        """Validate, keep ``best.pt`` on improvement, count patience."""
        s, tc = self.state, self.cfg.train
        start = time.perf_counter()
        metrics = self._evaluate("valid")
        self._last_valid = metrics
        self.budget.record("eval", time.perf_counter() - start)
        score = metrics[tc.valid_metric]
        improved = score > s.best_score
        if improved:
            s.best_score, s.best_epoch, s.best_metrics, s.patience = score, s.epochs_done, metrics, 0
        else:
            s.patience += 1
        self.tb.scalars(s.epochs_done, metrics, prefix="valid/")
        logger.info(
            "valid epoch %d | %s | %s (best %.4f at epoch %d, patience %d/%d, %.1f s)",
            s.epochs_done,
            " ".join(f"{k}={v:.4f}" for k, v in metrics.items()),
            "improved" if improved else "no improvement",
            s.best_score,
            s.best_epoch,
            s.patience,
            patience_limit,
            time.perf_counter() - start,
        )
        if improved:
            self._save("best.pt", phase, metrics)

    # ------------------------------------------------------------------ stages
    def _validate_refresh(self) -> None:
        """Validate the unchanged recommender on the refreshed item IDs; log the change from the last validation.

        Not used for model selection or patience: it shows what the new IDs alone cost or gain.
        """
        metric = self.cfg.train.valid_metric
        before = self._last_valid.get(metric)
        after = self._evaluate("valid")[metric]
        shown = {f"{metric}_after": after}
        if before is not None:
            shown[f"{metric}_change"] = after - before
        self.tb.scalars(self.state.epochs_done, shown, prefix="refresh/")
        logger.info(
            "valid after the code refresh of epoch %d | %s=%.4f (last validation %s)",
            self.state.epochs_done,
            metric,
            after,
            "none" if before is None else f"{before:.4f}, change {after - before:+.4f}",
        )

    def _start_finetune(self) -> None:
        """Freeze the tokenizer for good and continue from the best alternating model."""
        s, tc = self.state, self.cfg.train
        if tc.finetune_epochs < 1:
            s.stage = "done"
            return
        self._load_weights("best.pt")
        self._make_finetune_optimizer()
        s.stage, s.epoch, s.patience = "finetune", 0, 0
        logger.info(
            "tokenizer frozen for good; finetuning the recommender from epoch %d's model (lr %g)",
            s.best_epoch,
            tc.finetune_lr,
        )

    def _plan(self, converged: bool) -> EpochPlan:
        """What the current epoch trains (``converged``: the tokenizer is frozen for good)."""
        tc = self.cfg.train
        return plan_epoch(self.state.epoch, cycle=tc.cycle, warm_epoch=tc.warm_epoch, ablation=tc.ablation,
                          converged=converged, weights=self.weights, warm_phase=tc.warm_phase,
                          tokenizer_freeze_epoch=tc.tokenizer_freeze_epoch)

    def _out_of_time(self) -> bool:
        """Whether another epoch, a validation and the test would end past the deadline (same on every process)."""
        if self.state.stage == "done":
            return False
        return not self.budget.room_for("epoch", "eval", "eval", accelerator=self.acc)

    def _end_stage(self, why: str) -> None:
        """Record (in ``stage_ends``, for the result) and log why the current stage ends at this epoch boundary."""
        s = self.state
        s.stage_ends[s.stage] = f"{why} after {s.epoch} epoch{'' if s.epoch == 1 else 's'}"
        logger.info("%s stage ended: %s", s.stage, s.stage_ends[s.stage])

    def _stop_for_budget(self) -> None:
        """Leave the training loops for the test; validate first when no best model exists yet."""
        s = self.state
        self._end_stage("time budget")
        logger.info("time budget: stopping after %d epochs (%s stage, epoch %d): one more epoch, a validation and "
                    "the test would end past the deadline", s.epochs_done, s.stage, s.epoch)
        if s.best_epoch < 0:  # validated as the epoch just trained, as the loop would have done
            s.epochs_done -= 1
            self._validate(s.stage, self.cfg.train.early_stop)
            s.epochs_done += 1
            self._save("last.pt", s.stage, s.best_metrics)

    def fit(self, deadline: float | None = None) -> dict[str, Any]:
        """Run (or continue) both stages, test the best model, return the metrics.

        ``deadline`` (Unix seconds, None = none): training stops at the first epoch boundary from which one more
        epoch, a validation and the test (each as long as the longest so far) would end past it; the best model
        (validated then if no validation has run yet) is tested, and the result says ``stopped_by_budget``.
        ``last.pt`` keeps the stage, so ``--resume`` continues such a run.
        """
        s, tc = self.state, self.cfg.train
        self.budget = Deadline(deadline)
        start = time.perf_counter()
        stopped = False
        while s.stage == "alternating" and not stopped:
            epoch_start = time.perf_counter()
            plan = self._plan(converged=False)
            if plan.phase == "frozen" and s.epoch < tc.tokenizer_freeze_epoch + tc.cycle:
                logger.info("tokenizer frozen from epoch %d (tokenizer_freeze_epoch): the alternating stage goes on "
                            "with recommender epochs only", s.epochs_done)
            if any(plan.weights):
                self._train_epoch(plan)
            if plan.refresh_codes:
                self._refresh_codes()
                if tc.eval_after_refresh:
                    self._validate_refresh()
            self.budget.record("epoch", time.perf_counter() - epoch_start)
            last = s.epoch + 1 >= tc.epochs
            if (s.epoch + 1) % tc.eval_step == 0 or (last and s.best_epoch < 0):
                self._validate(plan.phase, tc.early_stop)
            s.epoch += 1
            s.epochs_done += 1
            if s.patience >= tc.early_stop or s.epoch >= tc.epochs:
                self._end_stage("early stop" if s.patience >= tc.early_stop else "epoch limit")
                self._start_finetune()
            self._save("last.pt", plan.phase, s.best_metrics)
            stopped = self._out_of_time()
        while s.stage == "finetune" and not stopped:
            epoch_start = time.perf_counter()
            plan = self._plan(converged=True)
            self._train_epoch(plan)
            self.budget.record("epoch", time.perf_counter() - epoch_start)
            self._validate(plan.phase, tc.finetune_early_stop)
            s.epoch += 1
            s.epochs_done += 1
            if s.patience >= tc.finetune_early_stop or s.epoch >= tc.finetune_epochs:
                self._end_stage("early stop" if s.patience >= tc.finetune_early_stop else "epoch limit")
                s.stage = "done"
            self._save("last.pt", plan.phase, s.best_metrics)
            stopped = self._out_of_time()
        if stopped:
            self._stop_for_budget()
        return self._test(time.perf_counter() - start, stopped)

    def _test(self, seconds: float, stopped_by_budget: bool) -> dict[str, Any]:
        from etegrec.pipeline import comparison_table

        tc = self.cfg.train
        self._load_weights("best.pt")
        test = self._evaluate("test")
        label = "ETEGRec" if tc.ablation == "none" else f"ETEGRec ({tc.ablation})"
        logger.info(
            "best epoch %d: valid %s",
            self.state.best_epoch,
            " ".join(f"{k}={v:.4f}" for k, v in self.state.best_metrics.items()),
        )
        logger.info("test %s", " ".join(f"{k}={v:.4f}" for k, v in test.items()))
        self.tb.scalars(self.state.epochs_done, test, prefix="test/")
        self.tb.close()
        if self.is_main:
            logger.info(
                "test metrics (%s, training %.0f s):\n%s",
                self.cfg.data.dataset,
                seconds,
                comparison_table(self.cfg, {label: test}),
            )
        return {
            "valid": dict(self.state.best_metrics),
            "test": test,
            "best_epoch": self.state.best_epoch,
            "epochs": self.state.epochs_done,
            "stopped_by_budget": stopped_by_budget,
            "stage_ends": dict(self.state.stage_ends),
            "run_dir": str(self.run_dir),
            "best_checkpoint": str(self.run_dir / "best.pt"),
        }


def run(cfg: Config, accelerator: Any, deadline: float | None = None) -> dict[str, Any]:
    """Joint training (both stages) and test; returns ``{"valid", "test", "best_epoch", "run_dir", ...}``.

    ``deadline``: Unix seconds by which the run stops at an epoch boundary and tests (``JointTrainer.fit``).
    """
    return JointTrainer(cfg, accelerator).fit(deadline)
