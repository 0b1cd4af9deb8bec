"""GRPO fine-tuning of a trained ETEGRec recommender (README step 5; spec §8, with the fixes of §11.1-20).

``run(cfg, accelerator)`` loads a joint-training checkpoint (``--sft_ckpt``: model, tokenizer and item codes
come from it alone), evaluates it on validation, then alternates rollouts and policy updates (maths in
``etegrec.grpo.algorithm``) with validation every ``grpo_eval_step`` epochs, keeps the best model, stops
early, and finally tests the SFT model and the kept model side by side. The kept checkpoint is never worse
than the SFT model on validation: the SFT weights are the first candidate and only a strictly better
validation score replaces them.

One update (``gradient_accumulation_steps`` = k micro-batches of ``grpo_batch_size`` histories per process):
1. Rollouts for all k micro-batches with the current weights, eval mode (no dropout), no gradient: G items per
   history from ``generation.sample`` (the constrained decoder of evaluation, so every sample is an item),
   rewards, group advantages, and the frozen reference's next-token distributions on the sampled prefixes.
2. ``grpo_num_iterations`` passes over the k micro-batches: teacher-forced log-probs of the samples through the
   DDP-wrapped scorer (so gradients are all-reduced; the reference code bypassed the wrapper), loss / k,
   backward -- gradients of the first k-1 micro-batches stay local (``no_sync``) -- then one clipped optimiser
   step. The old log-probs are those of the first pass, taken before any step, i.e. of the weights that
   sampled (as TRL does for its first iteration); the sampler's own sequence log-probs must agree and their
   largest gap is logged (``logp_gap``). Rollouts come first for the whole update rather than one
   ``accelerator.accumulate`` block per micro-batch so that every micro-batch of an update and every pass
   refer to the same old policy.

Deviations from the reference trainer (spec §8, §9, §11.1-20), besides those listed in ``algorithm``:
``--sft_ckpt`` alone rebuilds everything (no ``--rqvae_ckpt`` / ``--code_json``), architecture keys cannot be
overridden; tokenizer and item codes stay those of the checkpoint (as in the reference) and are copied into
every GRPO checkpoint, which has the joint format, so ``load_joint`` and evaluation read it like any other;
the SFT model is evaluated before training and is the fallback; ``gradient_accumulation_steps``,
``grpo_max_grad_norm`` and ``grpo_reward_type`` are honoured; the alignment adapters (unused by GRPO) are frozen
so weight decay does not touch them; hit rate is ``mean(sampled == target)``, not ``reward >= 1``; every
process checks after each epoch that all replicas hold the same weights.

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
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from etegrec import config as config_mod
from etegrec.artifacts import (
    ArtifactError,
    DatasetFiles,
    atomic_write_json,
    load_item_map,
    load_splits,
)
from etegrec.config import Config, ConfigError, GRPOConfig, config_from_dict
from etegrec.grpo.algorithm import (
    Rewards,
    compute_rewards,
    gather_tokens,
    group_advantages,
    grpo_loss,
    masked_log_softmax,
    token_kl,
)
from etegrec.rec.checkpoint import load_joint, read_joint, save_joint
from etegrec.rec.data import CodeTable, SequenceDataset, eval_loader, item_vectors_by_id, train_loader
from etegrec.rec.evaluate import evaluate
from etegrec.rec.generation import ItemTrie, sample, trim_history
from etegrec.rec.model import EncoderOut, GenerativeRecommender
from etegrec.rec.schedule import build_scheduler
from etegrec.runtime import TensorBoard, cpu_state, resumed_config, seed_epoch, start_training_run

logger = logging.getLogger("etegrec.grpo")

# Keys a GRPO run may set on top of the SFT checkpoint's config. Everything else comes from the checkpoint.
MUTABLE_KEYS = frozenset(f.name for f in dataclasses.fields(GRPOConfig)) | {
    "seed",
    "eval_batch_size",
    "num_beams",
    "metrics",
    "valid_metric",
    "gradient_accumulation_steps",
    "num_workers",
    "log_dir",
    "ckpt_dir",
    "tensorboard",
    "weight_decay",
    "lr_scheduler_type",
    "bucket_window",
    "data_path",
    "collab_emb_path",
    "text_emb_path",
}
# Keys that define the model, its item codes or its inputs: a config file that disagrees is an error.
ARCHITECTURE_KEYS = frozenset(f.name for f in dataclasses.fields(config_mod.ModelConfig)) | {
    "dataset",
    "max_his_len",
    "tokenizer_input",
    "normalize",
    "num_emb_list",
    "layers",
    "e_dim",
    "beta",
    "dropout_prob",
    "bn",
}


# --------------------------------------------------------------------------------------------- config
def _resolve_path(value: str) -> Path:
    """A path as typed by the user: relative to the working directory if it exists there, else the repo root."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return config_mod.REPO_ROOT / p


def checkpoint_config(path: Path) -> dict[str, Any]:
    """The flat config stored in a joint-training (or GRPO) checkpoint."""
    return dict(read_joint(path)["config"])


def load_grpo_config(argv: Sequence[str]) -> Config:
    """Config of a GRPO run: the SFT checkpoint's config, then ``--config FILE`` and ``--key=value`` on top.

    Only GRPO and run-time keys (``MUTABLE_KEYS``) may change. A command-line value for any other key must equal
    the checkpoint's; a config file may hold other stages' keys (ignored) but not a different architecture.
    With ``--resume=<run>_grpo/last.pt`` the config is that run's own (``runtime.resumed_config``).
    """
    path, rest = config_mod.add_config_argument(argv, None)
    cli = config_mod.typed_values(config_mod.parse_overrides(rest), "command line")
    from_file = config_mod.read_yaml_values(_resolve_path(path)) if path is not None else {}
    resume = cli.get("resume") or from_file.get("resume")
    if resume:
        resume_path = _resolve_path(resume)
        given = {k: v for k, v in from_file.items() if k in MUTABLE_KEYS | ARCHITECTURE_KEYS} | cli
        return _resumed_grpo_config(resume_path, read_resume_checkpoint(resume_path), given)
    sft = cli.get("sft_ckpt") or from_file.get("sft_ckpt")
    if not sft:
        raise ConfigError(
            "GRPO needs a joint-training checkpoint: add --sft_ckpt=myckpt/<dataset>/<run>/best.pt (step 4 output), "
            "or continue an interrupted GRPO run with --resume=myckpt/<dataset>/<run>_grpo/last.pt"
        )
    sft_path = _resolve_path(sft)
    cfg = config_from_dict(checkpoint_config(sft_path))
    cfg.train.resume = ""  # the SFT run's own resume point (if it was resumed); this run starts fresh
    base = cfg.to_dict()
    for source, values in ((str(path), from_file), ("command line", cli)):
        for leaf, value in values.items():
            section = config_mod.LEAVES[leaf][0]
            if leaf in MUTABLE_KEYS:
                setattr(getattr(cfg, section), leaf, value)
            elif value != base[leaf] and (source == "command line" or leaf in ARCHITECTURE_KEYS):
                raise ConfigError(
                    f"{leaf}={value!r} ({source}) differs from the SFT checkpoint's {leaf}={base[leaf]!r}; the "
                    "checkpoint fixes the model, its item codes and data. Drop the setting, or train a new "
                    "model with it (step 4). GRPO may change: " + ", ".join(sorted(MUTABLE_KEYS))
                )
    cfg.grpo.sft_ckpt = str(sft_path)
    return cfg.validate()


def read_resume_checkpoint(path: Path) -> dict[str, Any]:
    """The raw ``last.pt`` of a GRPO run, checked to hold everything a resumed run needs."""
    obj = read_joint(path)
    trainer = obj.get("trainer") or {}
    if obj.get("phase") != "grpo" or "grpo" not in obj.get("optimizers", {}) or "best_model" not in trainer:
        raise ArtifactError(
            f"{path} is not the last.pt of a GRPO run (phase {obj.get('phase')!r}, no GRPO optimiser or trainer "
            "state). Resume with --resume=myckpt/<dataset>/<run>_grpo/last.pt, or start GRPO from a joint-training "
            "checkpoint with --sft_ckpt=myckpt/<dataset>/<run>/best.pt"
        )
    return obj


def _resumed_grpo_config(path: Path, obj: dict[str, Any], given: dict[str, Any]) -> Config:
    """``runtime.resumed_config`` with ``sft_ckpt`` compared as the file it names."""
    if given.get("sft_ckpt"):
        given = {**given, "sft_ckpt": str(_resolve_path(given["sft_ckpt"]))}
    return resumed_config(path, obj, given)


# ---------------------------------------------------------------------------------------------- scorer
class GroupScorer(nn.Module):
    """Teacher-forced next-token logits of G code tuples per history, encoder run once per history.

    Wrapping this module (not the recommender's methods) in DDP makes the GRPO forward go through the wrapper,
    so gradients are all-reduced across processes.

    Args:
        model: the recommender being fine-tuned (its parameters are this module's parameters).
    """

    def __init__(self, *, model: GenerativeRecommender) -> None:
        super().__init__()
        self.model = model

    def forward(self, history_codes: Tensor, codes: Tensor) -> Tensor:
        """Logits at every level: history (B, S) -1 = pad, codes (B, G, C) -> (B*G, C, K) (temperature 1)."""
        batch, group, length = codes.shape
        enc = self.model.encode(trim_history(history_codes))  # hidden (B, S', d)
        enc = EncoderOut(hidden=enc.hidden.repeat_interleave(group, 0), mask=enc.mask.repeat_interleave(group, 0))
        flat = codes.reshape(batch * group, length)  # (B*G, C)
        hidden = self.model.decode(enc, flat[:, :-1]).hidden  # (B*G, C, d)
        tables = torch.stack([emb.weight for emb in self.model.token_embeddings])  # (C, K, d)
        return torch.einsum("ncd,ckd->nck", hidden, tables).float()  # (B*G, C, K)


def allowed_tokens(trie: ItemTrie, codes: Tensor) -> Tensor:
    """Trie children of every prefix of the given items: (N, C) codes -> (N, C, K) bool."""
    states = trie.prefix_states(codes)  # (N, C)
    return torch.stack([trie.next_states(lvl, states[:, lvl]) >= 0 for lvl in range(codes.shape[1])], dim=1)


# --------------------------------------------------------------------------------------------- rollouts
class Rollouts(NamedTuple):
    """One micro-batch of rollouts, flattened to N = B*G samples where noted."""

    history: Tensor  # (B, S) history codes, -1 = pad
    items: Tensor  # (B, G) sampled item ids
    codes: Tensor  # (B, G, C) sampled code tuples
    allowed: Tensor  # (N, C, K) bool, trie children of each sampled prefix
    ref_log_probs: Tensor  # (N, C, K) frozen reference, masked and tempered
    sample_log_probs: Tensor  # (N,) sequence log-probs reported by the sampler
    advantages: Tensor  # (N,)
    informative: Tensor  # (N,) bool, the sample's group has unequal rewards
    rewards: Rewards  # each (B, G)
    group_informative: Tensor  # (B,) bool


@torch.no_grad()
def collect_rollouts(
    policy: GenerativeRecommender,
    reference: GroupScorer,
    trie: ItemTrie,
    history: Tensor,
    target_items: Tensor,
    cfg: GRPOConfig,
    item_vectors: Tensor | None,
) -> Rollouts:
    """Sample G items per history with the current policy (eval mode) and score them (rewards, reference).

    Args:
        history: (B, S) history codes, -1 = pad.
        target_items: (B,) item ids of the held-out next item.
        item_vectors: (N_items + 1, d) for the cosine reward, else None.
    """
    g = cfg.grpo_group_size
    out = sample(policy, trie, history, num_samples=g, temperature=cfg.grpo_temperature)  # items (B, G)
    # sample() runs under inference_mode; plain copies may enter the autograd graph of the update
    out = type(out)(*(t.clone() for t in out))
    batch, _, length = out.codes.shape
    flat = out.codes.reshape(batch * g, length)  # (N, C)
    allowed = allowed_tokens(trie, flat)  # (N, C, K)
    ref_log_probs = masked_log_softmax(reference(history, out.codes), allowed, cfg.grpo_temperature)  # (N, C, K)
    target_codes = trie.item_codes[target_items - 1]  # (B, C)
    rewards = compute_rewards(
        out.items,
        out.codes,
        target_items,
        target_codes,
        alpha=cfg.grpo_reward_alpha,
        reward_type=cfg.grpo_reward_type,
        item_vectors=item_vectors,
    )
    adv = group_advantages(rewards.reward)
    return Rollouts(
        history=history,
        items=out.items,
        codes=out.codes,
        allowed=allowed,
        ref_log_probs=ref_log_probs,
        sample_log_probs=out.log_probs.reshape(-1),
        advantages=adv.advantages.reshape(-1),
        informative=adv.informative.repeat_interleave(g),
        rewards=rewards,
        group_informative=adv.informative,
    )


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


def rollout_stats(ro: Rollouts) -> dict[str, float]:
    """Rollout-side statistics of one micro-batch (means over samples or groups)."""
    adv = ro.advantages.view(ro.codes.shape[:2])  # (B, G)
    informative = ro.group_informative
    spread = (adv.amax(-1) - adv.amin(-1))[informative]  # (B_informative,)
    return {
        "reward": ro.rewards.reward.mean().item(),
        "hit_rate": ro.rewards.hit.mean().item(),
        "graded": ro.rewards.graded.mean().item(),
        "zero_var_share": 1.0 - informative.float().mean().item(),
        "adv_abs": ro.advantages.abs().mean().item(),
        "adv_range": spread.mean().item() if spread.numel() else 0.0,
    }


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
                    raise FloatingPointError(
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


# --------------------------------------------------------------------------------------------------- run
def _item_vectors(cfg: Config, n_items: int, device: torch.device) -> Tensor | None:
    """(N + 1, d) tokenizer input vectors with a zero padding row, for the cosine reward; else None."""
    if cfg.grpo.grpo_reward_type != "cosine":
        return None
    return item_vectors_by_id(cfg, n_items).to(device)


def _check_architecture(cfg: Config, stored: Config, path: str) -> None:
    ours, theirs = cfg.to_dict(), stored.to_dict()
    diff = {k: (ours[k], theirs[k]) for k in sorted(ARCHITECTURE_KEYS) if ours[k] != theirs[k]}
    if diff:
        raise ValueError(
            f"config disagrees with the SFT checkpoint {path} on {diff} (yours, checkpoint's); build the config "
            "with etegrec.grpo.trainer.load_grpo_config so the checkpoint's architecture is used"
        )


def _comparison_table(columns: dict[str, dict[str, float]], names: list[str]) -> str:
    """Metrics side by side, one row per metric."""
    head = f"{'metric':<12}" + "".join(f"{c:>14}" for c in columns)
    rows = [f"{n:<12}" + "".join(f"{columns[c][n]:>14.6f}" for c in columns) for n in names]
    return "\n".join([head, *rows])


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


def _weights_sha256(weights: dict[str, Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(weights):
        digest.update(name.encode())
        digest.update(weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run(cfg: Config, accelerator: Any) -> dict[str, Any]:
    """GRPO fine-tuning of ``cfg.grpo.sft_ckpt`` or continuation of ``cfg.train.resume``; returns metrics before/after.

    Writes ``<ckpt_dir>/<dataset>/<TIMESTAMP>_grpo/{best.pt,last.pt,metrics.json,config.yaml,argv.txt}``;
    ``best.pt`` is the kept model (the SFT weights unless a GRPO epoch is strictly better on validation). A resumed
    run uses the stored config and writes into the folder of its ``last.pt``.
    """
    resume_path = _resolve_path(cfg.train.resume) if cfg.train.resume else None
    resume = read_resume_checkpoint(resume_path) if resume_path is not None else None
    if resume is not None:
        cfg = _resumed_grpo_config(resume_path, resume, cfg.to_dict())
    g, tr = cfg.grpo, cfg.train
    if not g.sft_ckpt:
        raise ValueError("cfg.grpo.sft_ckpt is empty; pass --sft_ckpt=myckpt/<dataset>/<run>/best.pt (step 4 output)")
    if accelerator.gradient_accumulation_steps != 1:
        raise ValueError(
            "GRPO accumulates gradients itself (config key gradient_accumulation_steps); build the Accelerator "
            "without gradient_accumulation_steps"
        )
    main = accelerator.is_main_process
    device = accelerator.device
    run_dir, tb = start_training_run(cfg, accelerator, resume_path, suffix="_grpo")
    logger.info(
        "GRPO run %s from %s on %d process(es), device %s", run_dir, g.sft_ckpt, accelerator.num_processes, device
    )
    logger.info(
        "GRPO settings: %s, gradient_accumulation_steps=%d", dataclasses.asdict(g), tr.gradient_accumulation_steps
    )

    # ---- model, tokenizer, codes: from the checkpoint alone
    state = load_joint(g.sft_ckpt, map_location="cpu")  # torch.load rejects "cpu:N", the device of CPU ranks
    _check_architecture(cfg, state.cfg, g.sft_ckpt)
    sft_sha256 = _weights_sha256(state.model.state_dict())
    policy = state.model.to(device).eval()  # eval mode for the whole run: no dropout (see the module docstring)
    for adapter in (policy.enc_adapter, policy.dec_adapter):  # alignment adapters: not part of the GRPO forward
        adapter.requires_grad_(False)
    reference = GroupScorer(model=copy.deepcopy(policy)).requires_grad_(False).eval()
    trie = ItemTrie(item_codes=state.item_codes.to(device), code_num=cfg.model.code_num)

    # ---- data
    files = DatasetFiles.from_config(cfg)
    item_map = load_item_map(files)
    n_items = len(item_map) - 1
    if n_items != state.item_codes.shape[0]:
        raise ArtifactError(
            f"{files.item_map} has {n_items} items but the checkpoint's code table {state.item_codes.shape[0]}: the "
            f"checkpoint {g.sft_ckpt} was trained on other data. Point data_path at that data or retrain (step 4)."
        )
    splits = load_splits(files, item_map, cfg.data.max_his_len)
    codes = CodeTable(state.item_codes)
    train_dl = train_loader(
        SequenceDataset(splits["train"], cfg.data.max_his_len),
        codes,
        g.grpo_batch_size,
        seed=tr.seed,
        window=tr.bucket_window,
        num_replicas=accelerator.num_processes,
        rank=accelerator.process_index,
        num_workers=tr.num_workers,
    )
    valid_dl, test_dl = (
        eval_loader(
            SequenceDataset(splits[s], cfg.data.max_his_len), codes, tr.eval_batch_size, num_workers=tr.num_workers
        )
        for s in ("valid", "test")
    )
    item_vectors = _item_vectors(cfg, n_items, device)

    # ---- optimisation
    scorer = GroupScorer(model=policy)
    optimizer = torch.optim.AdamW(
        [p for p in scorer.parameters() if p.requires_grad], lr=g.grpo_lr, weight_decay=tr.weight_decay
    )
    accum = tr.gradient_accumulation_steps
    updates_per_epoch = math.ceil(len(train_dl) / accum)
    if g.grpo_epoch_updates:
        updates_per_epoch = min(updates_per_epoch, g.grpo_epoch_updates)
    scheduler = build_scheduler(
        optimizer,
        kind=tr.lr_scheduler_type,
        warmup_steps=0,
        total_steps=max(1, updates_per_epoch * g.grpo_epochs * g.grpo_num_iterations),
    )
    scorer, optimizer = accelerator.prepare(scorer, optimizer)
    metric_names, key = list(tr.metrics), tr.valid_metric

    # ---- progress: fresh, or that of the interrupted run
    st = GRPOState(done=g.grpo_epochs < 1, num_processes=accelerator.num_processes, sft_sha256=sft_sha256)
    best_weights: dict[str, Tensor] = {}
    if resume is not None:
        st, best_weights = _restore(resume, resume_path, policy, optimizer, scheduler, sft_sha256, accelerator)

    def validate(model: GenerativeRecommender, loader: Any) -> dict[str, float]:
        return evaluate(model, trie, loader, accelerator, tr.num_beams, metric_names)

    def save(name: str, metrics: dict[str, Any], weights: dict[str, Tensor], with_state: bool) -> None:
        """``best.pt`` (weights only) or ``last.pt`` (also optimiser, scheduler, trainer state and best weights)."""
        if main:
            model = copy.deepcopy(policy)
            model.load_state_dict(weights)
            resumable = {
                "optimizers": {"grpo": optimizer.state_dict()},
                "schedulers": {"grpo": scheduler.state_dict()},
                "trainer": {**asdict(st), "best_model": best_weights},
                "rng": {"scheme": "re-seeded every epoch from (seed, epoch, rank)", "seed": tr.seed},
            }
            save_joint(
                run_dir / name,
                cfg=cfg,
                model=model,
                tokenizer=state.tokenizer,
                item_codes=state.item_codes,
                epoch=st.epoch if with_state else st.best_epoch,
                phase="grpo",
                metrics=metrics,
                **(resumable if with_state else {}),
            )
        accelerator.wait_for_everyone()

    # ---- the SFT model is the first candidate
    if resume is None:
        st.sft_valid = validate(policy, valid_dl)
        logger.info("SFT checkpoint, valid: %s", json.dumps(st.sft_valid))
        st.best_score, st.best_valid = st.sft_valid[key], st.sft_valid
        st.evaluations.append({"epoch": 0, "valid": st.sft_valid})
        best_weights = cpu_state(policy)
        save("best.pt", {"valid": st.sft_valid, "kept": "sft"}, best_weights, with_state=False)
        save("last.pt", {"valid": st.sft_valid}, best_weights, with_state=True)
        tb.scalars(0, st.sft_valid, prefix="valid/")

    while not st.done:
        epoch = st.epoch + 1
        seed_epoch(tr.seed, epoch, accelerator.process_index)
        train_dl.batch_sampler.set_epoch(epoch)
        epoch_stats, st.step = _train_epoch(
            policy,
            scorer,
            reference,
            trie,
            train_dl,
            optimizer,
            scheduler,
            accelerator,
            g,
            accum,
            item_vectors,
            tb,
            st.step,
            epoch,
            updates_per_epoch,
        )
        st.epoch = epoch
        logger.info("epoch %d train: %s", epoch, " ".join(f"{k}={v:.4g}" for k, v in epoch_stats.items()))
        _check_replicas_agree(policy, accelerator)
        if epoch % g.grpo_eval_step == 0 or epoch == g.grpo_epochs:
            valid = validate(policy, valid_dl)
            st.evaluations.append({"epoch": epoch, "valid": valid, "train": epoch_stats})
            tb.scalars(epoch, valid, prefix="valid/")
            if valid[key] > st.best_score:
                st.best_epoch, st.best_score, st.best_valid, st.patience = epoch, valid[key], valid, 0
                best_weights = cpu_state(policy)
                save("best.pt", {"valid": valid, "kept": "grpo"}, best_weights, with_state=False)
                logger.info("epoch %d valid %s=%.6f: new best, saved %s", epoch, key, valid[key], run_dir / "best.pt")
            else:
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
        st.done = st.done or epoch >= g.grpo_epochs
        save("last.pt", {"valid": st.evaluations[-1]["valid"]}, cpu_state(policy), with_state=True)

    # ---- final: SFT vs kept model, valid and test
    kept = "sft" if st.best_epoch == 0 else "grpo"
    if kept == "sft":
        logger.info("no GRPO epoch beat the SFT model on valid %s; the kept checkpoint is the SFT model", key)
    policy.load_state_dict(best_weights)
    sft_test = validate(reference.model, test_dl)
    kept_test = sft_test if kept == "sft" else validate(policy, test_dl)
    summary = {
        "sft_ckpt": g.sft_ckpt,
        "run_dir": str(run_dir),
        "kept": kept,
        "best_epoch": st.best_epoch,
        "valid_metric": key,
        "sft": {"valid": st.sft_valid, "test": sft_test},
        "grpo": {"valid": st.best_valid, "test": kept_test},
        "evaluations": st.evaluations,
    }
    save("best.pt", {"valid": st.best_valid, "test": kept_test, "kept": kept}, best_weights, with_state=False)
    if main:
        atomic_write_json(run_dir / "metrics.json", summary)
    tb.scalars(st.epoch, sft_test, prefix="test_sft/")
    tb.scalars(st.epoch, kept_test, prefix="test_grpo/")
    columns = {"SFT valid": st.sft_valid, "GRPO valid": st.best_valid, "SFT test": sft_test, "GRPO test": kept_test}
    logger.info(
        "before / after GRPO (kept: %s, epoch %d):\n%s", kept, st.best_epoch, _comparison_table(columns, metric_names)
    )
    tb.close()
    return summary


def _restore(
    obj: dict[str, Any],
    path: Path,
    policy: GenerativeRecommender,
    optimizer: Any,
    scheduler: Any,
    sft_sha256: str,
    accelerator: Any,
) -> tuple[GRPOState, dict[str, Tensor]]:
    """Load policy, optimiser, scheduler and progress of an interrupted run; returns its state and kept weights."""
    trainer = dict(obj["trainer"])
    best_weights = trainer.pop("best_model")
    st = GRPOState(**trainer)
    if st.sft_sha256 != sft_sha256:
        raise ArtifactError(
            f"{path}: the SFT checkpoint's weights changed since this GRPO run started (SHA-256 {sft_sha256[:12]}, "
            f"run started from {st.sft_sha256[:12]}), so the reference model would differ. Restore the original "
            "checkpoint, or start a new GRPO run with --sft_ckpt"
        )
    policy.load_state_dict(obj["model"], strict=True)
    optimizer.load_state_dict(obj["optimizers"]["grpo"])
    scheduler.load_state_dict(obj["schedulers"]["grpo"])
    if st.num_processes != accelerator.num_processes:
        logger.warning(
            "%s was written by %d process(es), this run has %d: the histories each process sees differ, so the "
            "continuation will not equal an uninterrupted run",
            path,
            st.num_processes,
            accelerator.num_processes,
        )
        st.num_processes = accelerator.num_processes
    logger.info(
        "resumed from %s after epoch %d (step %d, best valid %.6f at epoch %d, patience %d)",
        path,
        st.epoch,
        st.step,
        st.best_score,
        st.best_epoch,
        st.patience,
    )
    return st, best_weights


def _check_replicas_agree(model: nn.Module, accelerator: Any) -> None:
    """Every process must hold the same weights (gradients are all-reduced by the DDP-wrapped scorer)."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)  # (1,)
    sums = accelerator.gather(checksum.to(accelerator.device))  # (world,)
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-9, atol=0.0):
        raise RuntimeError(f"GRPO replicas diverged (weight checksums {sums.tolist()}); gradients were not all-reduced")


def _train_epoch(
    policy: GenerativeRecommender,
    scorer: nn.Module,
    reference: GroupScorer,
    trie: ItemTrie,
    loader: Any,
    optimizer: Any,
    scheduler: Any,
    accelerator: Any,
    g: GRPOConfig,
    accum: int,
    item_vectors: Tensor | None,
    tb: TensorBoard,
    step: int,
    epoch: int,
    updates: int,
) -> tuple[dict[str, float], int]:
    """One pass over the training histories; returns the epoch's mean statistics and the global step."""
    batches: Iterator[Any] = iter(loader)
    totals: dict[str, float] = {}
    done = 0
    bar = tqdm(total=updates, desc=f"GRPO epoch {epoch}", disable=not accelerator.is_main_process, leave=False)
    while done < updates and (micro := list(itertools.islice(batches, accum))):
        rollouts = []
        for batch in micro:
            batch = batch.to(accelerator.device)
            rollouts.append(
                collect_rollouts(policy, reference, trie, batch.history_codes, batch.target, g, item_vectors)
            )
        local = policy_update(scorer, rollouts, optimizer, scheduler, accelerator, g)
        names = sorted(local)
        mean = accelerator.reduce(torch.tensor([local[n] for n in names], device=accelerator.device), "mean")
        stats = dict(zip(names, mean.tolist()))
        stats["lr"] = scheduler.get_last_lr()[0]
        step += 1
        done += 1
        tb.scalars(step, stats, prefix="grpo/")
        for name, value in stats.items():
            totals[name] = totals.get(name, 0.0) + value
        bar.update(1)
        bar.set_postfix(
            reward=f"{stats['reward']:.3f}",
            hit=f"{stats['hit_rate']:.3f}",
            kl=f"{stats['kl']:.2e}",
            zero_var=f"{stats['zero_var_share']:.2f}",
        )
    bar.close()
    return {name: value / max(done, 1) for name, value in totals.items()}, step
