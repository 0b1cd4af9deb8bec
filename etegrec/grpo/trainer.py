"""GRPO fine-tuning of a trained ETEGRec recommender (README step 5).

``run(cfg, accelerator)`` loads a joint-training checkpoint (``--sft_ckpt``: model, tokenizer and item codes
come from it alone), evaluates it on validation, then alternates rollouts and policy updates (maths in
``etegrec.grpo.algorithm``) with validation every ``grpo_eval_step`` epochs, keeps the best model, stops
early, and finally tests the SFT model and the kept model side by side. The kept checkpoint is never worse
than the SFT model on validation: the SFT weights are the first candidate and only a strictly better
validation score replaces them.

One update (``gradient_accumulation_steps`` = k micro-batches of ``grpo_batch_size`` histories per process):
1. Rollouts for all k micro-batches with the current weights, eval mode (no dropout), no gradient: G items per
   history from ``generation.sample`` (the constrained decoder of evaluation, so every sample is an item),
   rewards, group advantages, and the frozen reference's next-token distributions on the sampled prefixes
   (``etegrec.grpo.rollouts``).
2. ``grpo_num_iterations`` passes over the k micro-batches: teacher-forced log-probs of the samples through the
   DDP-wrapped ``generation.SequenceScorer`` (so gradients are all-reduced; the reference code bypassed the
   wrapper), loss / k, backward -- gradients of the first k-1 micro-batches stay local (``no_sync``) -- then
   one clipped optimiser step. The old log-probs are those of the first pass, taken before any step, i.e. of
   the weights that sampled (as TRL does for its first iteration); the sampler's own sequence log-probs must
   agree and their largest gap is logged (``logp_gap``). Rollouts come first for the whole update rather than
   one ``accelerator.accumulate`` block per micro-batch so that every micro-batch of an update and every pass
   refer to the same old policy.

Deviations from the reference trainer, besides those listed in ``algorithm``: ``--sft_ckpt`` alone rebuilds
everything (no ``--rqvae_ckpt`` / ``--code_json``), architecture keys cannot be overridden
(``etegrec.grpo.config``); tokenizer and item codes stay those of the checkpoint (as in the reference) and are
copied into every GRPO checkpoint, which holds the entries of a joint-training checkpoint under its own format
tag, so ``load_joint`` and evaluation read it like any other while only GRPO resumes it; the SFT model is
evaluated before training and is the fallback; ``gradient_accumulation_steps``, ``grpo_max_grad_norm`` and
``grpo_reward_type`` are honoured; the alignment adapters (unused by GRPO) are frozen so weight decay does not
touch them; hit rate is ``mean(sampled == target)``, not ``reward >= 1``; every process checks after each
epoch that all replicas hold the same weights.

Checkpoints and resuming (the guarantees of joint training): ``best.pt`` is the kept model; ``last.pt`` is written
after the SFT evaluation and after every epoch, with optimiser, scheduler and trainer state (``GRPOState``, plus the
kept model's weights under ``trainer["best_model"]``, since ``best.pt`` may already hold a later epoch when a run
stops between the two writes). ``--resume=<run>_grpo/last.pt`` continues that run in its own folder with its own
config (other values given are ignored, with a warning): the reference comes from the SFT checkpoint (checked by
its SHA-256 against the one the run started from) and rollouts and data order are re-seeded every epoch from
(seed, epoch, rank), so a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from etegrec.artifacts import ArtifactError, DatasetFiles, atomic_write_json, load_item_map, load_splits
from etegrec.config import Config, GRPOConfig, resolve_path
from etegrec.errors import TrainingError
from etegrec.grpo.algorithm import gather_tokens, grpo_loss, masked_log_softmax, token_kl
from etegrec.grpo.config import check_architecture, read_resume_checkpoint, resumed_grpo_config
from etegrec.grpo.rollouts import Rollouts, check_group_size, collect_rollouts, rollout_stats
from etegrec.rec.checkpoint import GRPO_CKPT_FORMAT, load_joint, save_joint
from etegrec.rec.data import SequenceDataset, eval_loader, item_vectors_by_id, train_loader
from etegrec.rec.evaluate import evaluate
from etegrec.rec.generation import SequenceScorer
from etegrec.rec.model import GenerativeRecommender
from etegrec.rec.schedule import build_scheduler
from etegrec.runtime import Deadline, cpu_state, seed_epoch, start_training_run

logger = logging.getLogger("etegrec.grpo")


@dataclass
class GRPOState:
    """Progress of a GRPO run, stored in every ``last.pt`` (enough to resume after any epoch)."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimiser updates done (TensorBoard x-axis)
    best_epoch: int = 0  # epoch of the kept model; 0 = the SFT model
    best_score: float = -math.inf
    best_valid: dict[str, float] = field(default_factory=dict)
    patience: int = 0  # evaluations without improvement
    done: bool = False  # early stop or epoch limit reached
    num_processes: int = 1
    sft_sha256: str = ""  # of the SFT weights the reference model holds
    sft_valid: dict[str, float] = field(default_factory=dict)
    evaluations: list[dict[str, Any]] = field(default_factory=list)


class GRPOTrainer:
    """Holds policy, reference, data, optimiser and progress of one GRPO run; ``fit()`` runs it."""

    def __init__(self, cfg: Config, accelerator: Any) -> None:
        resume_path = resolve_path(cfg.train.resume) if cfg.train.resume else None
        resume = read_resume_checkpoint(resume_path) if resume_path is not None else None
        if resume is not None:
            cfg = resumed_grpo_config(resume_path, resume, cfg.to_dict())
        _check_launch(cfg, accelerator)
        self.cfg, self.acc, self.device = cfg, accelerator, accelerator.device
        self.run_dir, self.tb = start_training_run(cfg, accelerator, resume_path, suffix="_grpo")
        logger.info(
            "GRPO run %s from %s on %d process(es), device %s",
            self.run_dir,
            cfg.grpo.sft_ckpt,
            accelerator.num_processes,
            self.device,
        )
        logger.info(
            "GRPO settings: %s, gradient_accumulation_steps=%d",
            dataclasses.asdict(cfg.grpo),
            cfg.train.gradient_accumulation_steps,
        )
        files = DatasetFiles.from_config(cfg)
        item_map = load_item_map(files)
        self._load_sft(n_items=len(item_map) - 1)
        self._load_data(files, item_map)
        self._build_optimizer()
        self.state = GRPOState(
            done=cfg.grpo.grpo_epochs < 1, num_processes=accelerator.num_processes, sft_sha256=self.sft_sha256
        )
        self.best_weights: dict[str, Tensor] = {}  # the kept model's
        if resume is not None:
            self._restore(resume, resume_path)

    # ------------------------------------------------------------------ set-up helpers
    def _load_sft(self, n_items: int) -> None:
        """Policy, frozen reference, tokenizer and item codes: from the SFT checkpoint alone."""
        sft_ckpt = self.cfg.grpo.sft_ckpt
        # map_location "cpu": torch.load rejects "cpu:N", the device of CPU ranks
        sft = load_joint(sft_ckpt, map_location="cpu", n_items=n_items)
        check_architecture(self.cfg, sft.cfg, sft_ckpt)
        self.sft_sha256 = _weights_sha256(sft.model.state_dict())
        self.tokenizer = sft.tokenizer  # unchanged by GRPO; copied into every checkpoint
        self.codes = sft.item_codes  # unchanged by GRPO; copied into every checkpoint
        self.trie = self.codes.trie(self.device)
        check_group_size(self.cfg.grpo, self.trie)
        self.policy = sft.model.to(self.device).eval()  # eval mode for the whole run: no dropout
        for adapter in (self.policy.enc_adapter, self.policy.dec_adapter):  # not part of the GRPO forward
            adapter.requires_grad_(False)
        self.reference = SequenceScorer(model=copy.deepcopy(self.policy)).requires_grad_(False).eval()

    def _load_data(self, files: DatasetFiles, item_map: dict[str, int]) -> None:
        """Training histories (sharded), validation and test loaders, and the cosine reward's item vectors."""
        cfg, tr = self.cfg, self.cfg.train
        splits = load_splits(files, item_map, cfg.data.max_his_len)
        self.train_loader = train_loader(
            SequenceDataset(splits["train"], cfg.data.max_his_len),
            self.codes,
            cfg.grpo.grpo_batch_size,
            history_suffix=cfg.model.history_suffix,
            seed=tr.seed,
            window=tr.bucket_window,
            num_replicas=self.acc.num_processes,
            rank=self.acc.process_index,
            num_workers=tr.num_workers,
        )
        self.eval_loaders = {
            s: eval_loader(
                SequenceDataset(splits[s], cfg.data.max_his_len),
                self.codes,
                tr.eval_batch_size,
                history_suffix=cfg.model.history_suffix,
                num_workers=tr.num_workers,
            )
            for s in ("valid", "test")
        }
        cosine = cfg.grpo.grpo_reward_type == "cosine"
        self.item_vectors = item_vectors_by_id(cfg, self.codes.n_items).to(self.device) if cosine else None

    def _build_optimizer(self) -> None:
        """AdamW over the trainable policy weights, its schedule sized by the updates the run takes."""
        g, tr = self.cfg.grpo, self.cfg.train
        scorer = SequenceScorer(model=self.policy)
        optimizer = torch.optim.AdamW(
            [p for p in scorer.parameters() if p.requires_grad], lr=g.grpo_lr, weight_decay=tr.weight_decay
        )
        self.updates_per_epoch = math.ceil(len(self.train_loader) / tr.gradient_accumulation_steps)
        if g.grpo_epoch_updates:
            self.updates_per_epoch = min(self.updates_per_epoch, g.grpo_epoch_updates)
        self.scheduler = build_scheduler(
            optimizer,
            kind=tr.lr_scheduler_type,
            warmup_steps=0,
            total_steps=max(1, self.updates_per_epoch * g.grpo_epochs * g.grpo_num_iterations),
        )
        self.scorer, self.optimizer = self.acc.prepare(scorer, optimizer)

    def _restore(self, obj: dict[str, Any], path: Path) -> None:
        """Load policy, optimiser, scheduler, progress and kept weights of an interrupted run."""
        trainer = dict(obj["trainer"])
        self.best_weights = trainer.pop("best_model")
        st = self.state = GRPOState(**trainer)
        if st.sft_sha256 != self.sft_sha256:
            raise ArtifactError(
                f"{path}: the SFT checkpoint's weights changed since this GRPO run started (SHA-256 "
                f"{self.sft_sha256[:12]}, run started from {st.sft_sha256[:12]}), so the reference model would "
                "differ. Restore the original checkpoint, or start a new GRPO run with --sft_ckpt"
            )
        self.policy.load_state_dict(obj["model"], strict=True)
        self.optimizer.load_state_dict(obj["optimizers"]["grpo"])
        self.scheduler.load_state_dict(obj["schedulers"]["grpo"])
        if st.num_processes != self.acc.num_processes:
            logger.warning(
                "%s was written by %d process(es), this run has %d: the histories each process sees differ, so the "
                "continuation will not equal an uninterrupted run",
                path,
                st.num_processes,
                self.acc.num_processes,
            )
            st.num_processes = self.acc.num_processes
        logger.info(
            "resumed from %s after epoch %d (step %d, best valid %.6f at epoch %d, patience %d)",
            path,
            st.epoch,
            st.step,
            st.best_score,
            st.best_epoch,
            st.patience,
        )

    # ------------------------------------------------------------------ checkpoints
    def _save(self, name: str, metrics: dict[str, Any], weights: dict[str, Tensor], with_state: bool) -> None:
        """``best.pt`` (weights only) or ``last.pt`` (also optimiser, scheduler, trainer state and kept weights)."""
        if self.acc.is_main_process:
            model = copy.deepcopy(self.policy)
            model.load_state_dict(weights)
            resumable = {
                "optimizers": {"grpo": self.optimizer.state_dict()},
                "schedulers": {"grpo": self.scheduler.state_dict()},
                "trainer": {**asdict(self.state), "best_model": self.best_weights},
                "rng": {"scheme": "re-seeded every epoch from (seed, epoch, rank)", "seed": self.cfg.train.seed},
            }
            save_joint(
                self.run_dir / name,
                cfg=self.cfg,
                model=model,
                tokenizer=self.tokenizer,
                item_codes=self.codes,
                epoch=self.state.epoch if with_state else self.state.best_epoch,
                phase="grpo",
                metrics=metrics,
                ckpt_format=GRPO_CKPT_FORMAT,
                **(resumable if with_state else {}),
            )
        self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ one epoch
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training histories (``updates_per_epoch`` updates); returns its mean statistics."""
        g, accum = self.cfg.grpo, self.cfg.train.gradient_accumulation_steps
        seed_epoch(self.cfg.train.seed, epoch, self.acc.process_index)
        self.train_loader.batch_sampler.set_epoch(epoch)
        batches = iter(self.train_loader)
        totals: dict[str, float] = {}
        done = 0
        bar = tqdm(total=self.updates_per_epoch, desc=f"GRPO epoch {epoch}", disable=not self.acc.is_main_process,
                   leave=False)
        while done < self.updates_per_epoch and (micro := list(itertools.islice(batches, accum))):
            rollouts = [
                collect_rollouts(self.policy, self.reference, self.trie, batch.to(self.device), g, self.item_vectors)
                for batch in micro
            ]
            local = policy_update(self.scorer, rollouts, self.optimizer, self.scheduler, self.acc, g)
            names = sorted(local)
            mean = self.acc.reduce(torch.tensor([local[n] for n in names], device=self.device), "mean")
            stats = dict(zip(names, mean.tolist()))
            stats["lr"] = self.scheduler.get_last_lr()[0]
            self.state.step += 1
            done += 1
            self.tb.scalars(self.state.step, stats, prefix="grpo/")
            for name, value in stats.items():
                totals[name] = totals.get(name, 0.0) + value
            bar.update(1)
            bar.set_postfix(reward=f"{stats['reward']:.3f}", hit=f"{stats['hit_rate']:.3f}", kl=f"{stats['kl']:.2e}",
                            zero_var=f"{stats['zero_var_share']:.2f}")
        bar.close()
        return {name: value / max(done, 1) for name, value in totals.items()}

    # ------------------------------------------------------------------ evaluation
    def _evaluate(self, model: GenerativeRecommender, split: str) -> dict[str, float]:
        tr = self.cfg.train
        return evaluate(model, self.trie, self.eval_loaders[split], self.acc, tr.num_beams, list(tr.metrics))

    def _start_from_sft(self) -> None:
        """Validate the SFT model: the first candidate of the kept model."""
        st = self.state
        st.sft_valid = self._evaluate(self.policy, "valid")
        logger.info("SFT checkpoint, valid: %s", json.dumps(st.sft_valid))
        st.best_score, st.best_valid = st.sft_valid[self.cfg.train.valid_metric], st.sft_valid
        st.evaluations.append({"epoch": 0, "valid": st.sft_valid})
        self.best_weights = cpu_state(self.policy)
        self._save("best.pt", {"valid": st.sft_valid, "kept": "sft"}, self.best_weights, with_state=False)
        self._save("last.pt", {"valid": st.sft_valid}, self.best_weights, with_state=True)
        self.tb.scalars(0, st.sft_valid, prefix="valid/")

    def _validate(self, epoch: int, train_stats: dict[str, float]) -> None:
        """Validate, keep ``best.pt`` on strict improvement, count patience, stop early."""
        st, key, g = self.state, self.cfg.train.valid_metric, self.cfg.grpo
        valid = self._evaluate(self.policy, "valid")
        st.evaluations.append({"epoch": epoch, "valid": valid, "train": train_stats})
        self.tb.scalars(epoch, valid, prefix="valid/")
        if valid[key] > st.best_score:
            st.best_epoch, st.best_score, st.best_valid, st.patience = epoch, valid[key], valid, 0
            self.best_weights = cpu_state(self.policy)
            self._save("best.pt", {"valid": valid, "kept": "grpo"}, self.best_weights, with_state=False)
            logger.info("epoch %d valid %s=%.6f: new best, saved %s", epoch, key, valid[key], self.run_dir / "best.pt")
            return
        st.patience += 1
        logger.info(
            "epoch %d valid %s=%.6f (best %.6f at epoch %d, %d/%d evaluations without gain)",
            epoch,
            key,
            valid[key],
            st.best_score,
            st.best_epoch,
            st.patience,
            g.grpo_early_stop,
        )
        if st.patience >= g.grpo_early_stop:
            logger.info("early stop after epoch %d", epoch)
            st.done = True

    # ------------------------------------------------------------------ the run
    def fit(self, deadline: float | None = None) -> dict[str, Any]:
        """Run (or continue) GRPO, then test the SFT and the kept model; returns the metrics before / after.

        ``deadline`` (Unix seconds, None = none): GRPO stops at the first epoch boundary from which one more epoch,
        a validation and the test (two models) would end past it; the kept model is tested as usual and the result
        says ``stopped_by_budget``. ``last.pt`` does not mark such a run done, so ``--resume`` continues it.
        """
        st, g = self.state, self.cfg.grpo
        budget = Deadline(deadline)
        if not st.evaluations:  # a fresh run
            start = time.perf_counter()
            self._start_from_sft()  # validates the SFT model
            budget.record("eval", time.perf_counter() - start)
        stopped = False
        while not st.done and not stopped:
            epoch, start = st.epoch + 1, time.perf_counter()
            train_stats = self._train_epoch(epoch)
            st.epoch = epoch
            logger.info("epoch %d train: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in train_stats.items()))
            _check_replicas_agree(self.policy, self.acc)
            budget.record("epoch", time.perf_counter() - start)
            if epoch % g.grpo_eval_step == 0 or epoch == g.grpo_epochs:
                start = time.perf_counter()
                self._validate(epoch, train_stats)
                budget.record("eval", time.perf_counter() - start)
            st.done = st.done or epoch >= g.grpo_epochs
            self._save("last.pt", {"valid": st.evaluations[-1]["valid"]}, cpu_state(self.policy), with_state=True)
            stopped = not st.done and not budget.room_for("epoch", "eval", "eval", "eval", accelerator=self.acc)
        if stopped:
            logger.info("time budget: GRPO stops after epoch %d, before the deadline", st.epoch)
        return {**self._test(), "epochs": st.epoch, "stopped_by_budget": stopped}

    def _test(self) -> dict[str, Any]:
        """Test the SFT and the kept model, write ``metrics.json`` and the final ``best.pt``."""
        st, key = self.state, self.cfg.train.valid_metric
        kept = "sft" if st.best_epoch == 0 else "grpo"
        if kept == "sft":
            logger.info("no GRPO epoch beat the SFT model on valid %s; the kept checkpoint is the SFT model", key)
        self.policy.load_state_dict(self.best_weights)
        sft_test = self._evaluate(self.reference.model, "test")
        kept_test = sft_test if kept == "sft" else self._evaluate(self.policy, "test")
        summary = {
            "sft_ckpt": self.cfg.grpo.sft_ckpt,
            "run_dir": str(self.run_dir),
            "kept": kept,
            "best_epoch": st.best_epoch,
            "valid_metric": key,
            "sft": {"valid": st.sft_valid, "test": sft_test},
            "grpo": {"valid": st.best_valid, "test": kept_test},
            "evaluations": st.evaluations,
        }
        final = {"valid": st.best_valid, "test": kept_test, "kept": kept}
        self._save("best.pt", final, self.best_weights, with_state=False)
        if self.acc.is_main_process:
            atomic_write_json(self.run_dir / "metrics.json", summary)
        self.tb.scalars(st.epoch, sft_test, prefix="test_sft/")
        self.tb.scalars(st.epoch, kept_test, prefix="test_grpo/")
        columns = {"SFT valid": st.sft_valid, "GRPO valid": st.best_valid, "SFT test": sft_test, "GRPO test": kept_test}
        logger.info(
            "before / after GRPO (kept: %s, epoch %d):\n%s",
            kept,
            st.best_epoch,
            _comparison_table(columns, list(self.cfg.train.metrics)),
        )
        self.tb.close()
        return summary


# ------------------------------------------------------------------------------------------------ update
STAT_NAMES = (
    "loss",
    "policy",
    "kl",
    "clip_fraction",
    "ratio",
    "reward",
    "hit_rate",
    "graded",
    "zero_var_share",
    "adv_abs",
    "adv_range",
    "logp_gap",
)


def policy_update(
    scorer: nn.Module,
    rollouts: list[Rollouts],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    accelerator: Any,
    cfg: GRPOConfig,
) -> dict[str, float]:
    """``grpo_num_iterations`` optimiser steps on one batch of rollouts, each accumulating over its micro-batches.

    Returns the mean statistics of the update on this process.
    """
    k = len(rollouts)
    old: list[Tensor | None] = [None] * k
    sums = dict.fromkeys(STAT_NAMES, 0.0)
    count = 0
    for _ in range(cfg.grpo_num_iterations):
        for i, ro in enumerate(rollouts):
            sync = i == k - 1
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(scorer)
            with ctx:
                log_probs_all = masked_log_softmax(scorer(ro.history, ro.codes), ro.allowed, cfg.grpo_temperature)
                log_probs = gather_tokens(log_probs_all, ro.codes.reshape(-1, ro.codes.shape[-1]))  # (N, C)
                if old[i] is None:  # first pass: the weights that sampled these rollouts
                    old[i] = log_probs.detach()
                    gap = (old[i].sum(-1) - ro.sample_log_probs).abs().max().item()
                    sums["logp_gap"] = max(sums["logp_gap"], gap)
                res = grpo_loss(
                    log_probs,
                    old[i],
                    ro.advantages,
                    token_kl(log_probs_all, ro.ref_log_probs),
                    ro.informative,
                    clip_range=cfg.grpo_clip_range,
                    kl_coeff=cfg.grpo_kl_coeff,
                )
                if not torch.isfinite(res.loss):
                    raise TrainingError(
                        f"GRPO loss is not finite (policy={res.policy.item()}, kl={res.kl.item()}, "
                        f"ratio={res.ratio.item()}); lower grpo_lr or raise grpo_kl_coeff"
                    )
                accelerator.backward(res.loss / k)
            for name in ("loss", "policy", "kl", "clip_fraction", "ratio"):
                sums[name] += getattr(res, name).item()
            count += 1
        if cfg.grpo_max_grad_norm > 0:
            accelerator.clip_grad_norm_(scorer.parameters(), cfg.grpo_max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    stats = {name: sums[name] / count for name in ("loss", "policy", "kl", "clip_fraction", "ratio")}
    for ro in rollouts:
        for name, value in rollout_stats(ro).items():
            stats[name] = stats.get(name, 0.0) + value / k
    stats["logp_gap"] = sums["logp_gap"]
    return stats


def _check_launch(cfg: Config, accelerator: Any) -> None:
    """A GRPO run needs an SFT checkpoint and an Accelerator that leaves gradient accumulation to it."""
    if not cfg.grpo.sft_ckpt:
        raise ValueError("cfg.grpo.sft_ckpt is empty; pass --sft_ckpt=myckpt/<dataset>/<run>/best.pt (step 4 output)")
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            "GRPO accumulates gradients itself (config key gradient_accumulation_steps); build the Accelerator "
            "without gradient_accumulation_steps"
        )


def _check_replicas_agree(model: nn.Module, accelerator: Any) -> None:
    """Every process must hold the same weights (gradients are all-reduced by the DDP-wrapped scorer)."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)  # (1,)
    sums = accelerator.gather(checksum.to(accelerator.device))  # (world,)
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-9, atol=0.0):
        raise RuntimeError(f"GRPO replicas diverged (weight checksums {sums.tolist()}); gradients were not all-reduced")


def _weights_sha256(weights: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _comparison_table(columns: dict[str, dict[str, float]], names: list[str]) -> str:
    """Metrics side by side, one row per metric."""
    head = f"{'metric':<12}" + "".join(f"{c:>14}" for c in columns)
    rows = [f"{n:<12}" + "".join(f"{columns[c][n]:>14.6f}" for c in columns) for n in names]
    return "\n".join([head, *rows])


def run(cfg: Config, accelerator: Any, deadline: float | None = None) -> dict[str, Any]:
    """GRPO fine-tuning of ``cfg.grpo.sft_ckpt`` or continuation of ``cfg.train.resume``; returns metrics before/after.

    Writes ``<ckpt_dir>/<dataset>/<TIMESTAMP>_grpo/{best.pt,last.pt,metrics.json,config.yaml,argv.txt}``;
    ``best.pt`` is the kept model (the SFT weights unless a GRPO epoch is strictly better on validation). A resumed
    run uses the stored config and writes into the folder of its ``last.pt``. ``deadline``: Unix seconds by which
    it stops at an epoch boundary and tests (``GRPOTrainer.fit``).
    """
    return GRPOTrainer(cfg, accelerator).fit(deadline)
