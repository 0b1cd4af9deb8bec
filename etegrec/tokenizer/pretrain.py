"""Step 3: pretrain the RQ-VAE item tokenizer on the item vectors and save collision-checked checkpoints.

Input (``artifacts.load_item_vectors``): ``collab`` = the SASRec item vectors; ``dual`` (recommended) = the
SASRec vectors and the sentence-transformer text vectors, each L2-normalised per item when ``normalize`` is on
(default) and then concatenated, so both parts weigh equally in the reconstruction loss (256 + 384 = 640 dims
with the default models); ``text`` = text vectors only.

Procedure: seed; build the RQ-VAE; k-means (faiss) initialisation of every codebook over the encoder outputs of ALL
items, level by level on the residuals; AdamW with linear warm-up then linear decay to 0 at ``rq_epochs``,
gradient-norm clip 1.0, Sinkhorn-balanced assignment at the levels whose ``sk_epsilons`` entry is > 0; after every
epoch, codes that no item was assigned to are moved onto random current residuals of their level
(``rq_dead_code_reset``; without it the encoder drifts away from the k-means codebooks in the first epochs and most
codes die). Every ``rq_eval_step`` epochs (and after k-means, as epoch 0, logged only) the whole item set is
encoded in eval mode, assigned its item codes (below), and their health is logged and written to TensorBoard
(``<log_dir>/<dataset>/rqvae/<TIMESTAMP>/``): collision rate, collided share, largest collision group (also for
plain nearest-code assignment), per-level usage / perplexity / Gini, reconstruction and quantisation losses.

Outputs in ``<rq_ckpt_dir>/<dataset>/<TIMESTAMP>/``: ``best_collision_<cr>_gini_<g>.pth`` (strictly lower collision
rate, ties broken by the lower reconstruction loss) and ``best_gini_<g>_collision_<cr>.pth`` (strictly lower Gini),
each replacing the previous best of its kind, in the ``rqvae.save_rqvae`` format with the (N, L+1) item-code table;
``run_status.json`` (``"finished": false`` from the start, true at the end); and, once the run has finished,
``<rq_ckpt_dir>/<dataset>/latest.json`` naming its best files, which ``resolve_rqvae_path`` uses when
``rqvae_path`` is empty. A killed run never becomes ``latest.json``, and ``resolve_rqvae_path`` refuses a
checkpoint whose run folder says it did not finish. Training stops early after ``rq_patience`` evaluations without
a better ``best_collision``.

Final item codes: nearest code at the levels whose ``sk_epsilons`` entry is 0, Sinkhorn-balanced assignment
over the whole item set where it is > 0 (``RQVAE.get_codes(x, sk_epsilons=...)``), as TIGER / LC-Rec do for
their last level. With the default ``[0, 0, 0.003]`` every group of items sharing the first two codes gets
distinct third codes (when it has <= K items), so collisions come only from groups larger than K. Trained
tokenizers map near-identical items to the same nearest codes, so only the assignment step meets a collision
target reliably. Joint training re-derives codes with the same rule
(``item_codes.build_item_codes(..., sk_epsilons=...)``); the suffix token resolves any collision left.

Deviations from the reference code: faiss k-means over all items instead of scikit-learn on one batch; Sinkhorn
actually applied (the reference's fork parsed and ignored it); per-part normalisation of dual input on by default
(the fork mixed raw SASRec norms, far above 1, with unit text vectors, so the SASRec part dominated the
reconstruction loss); self-describing checkpoints with the code table; dead-code reset (not in the reference); the
k-means-initialised but untrained model (epoch 0) is never saved (its random-projection codes can collide less than
early trained ones, but it reconstructs nothing); no ``best_loss`` or rolling ``epoch_*`` files (the joint stage
uses ``best_collision``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from etegrec.artifacts import (
    STEP_RQVAE,
    ArtifactError,
    DatasetFiles,
    atomic_write_json,
    collab_emb_path,
    load_item_map,
    load_item_vectors,
    text_emb_path,
)
from etegrec.config import Config
from etegrec.errors import TrainingError
from etegrec.runtime import new_run_dir, pick_device, set_seed, start_run, timestamp
from etegrec.tokenizer.item_codes import ItemCodes, add_suffix, collision_stats
from etegrec.tokenizer.rqvae import RQVAE, save_rqvae

logger = logging.getLogger("etegrec.tokenizer")

MAX_GRAD_NORM = 1.0
POINTER = "latest.json"
RUN_STATUS = "run_status.json"


def ckpt_root(cfg: Config) -> Path:
    """``<rq_ckpt_dir>/<dataset>``: the folder of the dataset's RQ-VAE runs and ``latest.json``."""
    return cfg.path(cfg.tokenizer.rq_ckpt_dir) / cfg.data.dataset


def resolve_rqvae_path(cfg: Config) -> Path:
    """The tokenizer checkpoint for the next stage: ``rqvae_path`` if set, else the newest run's best_collision.

    Raises:
        ArtifactError: the file does not exist (the message names step 3).
    """
    if cfg.tokenizer.rqvae_path:
        path = cfg.path(cfg.tokenizer.rqvae_path)
        if not path.is_file():
            raise ArtifactError(f"rqvae_path={cfg.tokenizer.rqvae_path} ({path}) does not exist; it is made by {STEP_RQVAE}.")
        return _check_finished(path)
    root = ckpt_root(cfg)
    pointer = root / POINTER
    if pointer.is_file():
        try:
            path = root / json.loads(pointer.read_text())["best_collision"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ArtifactError(f"{pointer} is damaged; delete it and re-run {STEP_RQVAE}.") from None
        if path.is_file():
            return _check_finished(path)
        raise ArtifactError(f"{pointer} names {path}, which no longer exists; re-run {STEP_RQVAE}.")
    raise ArtifactError(
        f"no pretrained RQ-VAE for dataset {cfg.data.dataset!r}: {pointer} does not exist. It is made by "
        f"{STEP_RQVAE}; or set rqvae_path to a best_collision_*.pth file."
    )


def _check_finished(path: Path) -> Path:
    """``path``, unless its folder is a pretraining run that did not finish (a checkpoint from elsewhere passes)."""
    status = path.parent / RUN_STATUS
    if status.is_file():
        try:
            finished = json.loads(status.read_text()).get("finished") is True
        except (json.JSONDecodeError, AttributeError):
            finished = False
        if not finished:
            raise ArtifactError(
                f"{path} is from the RQ-VAE run {path.parent.name}, which did not finish ({status.name}: killed, "
                f"failed or still running); use a finished run's checkpoint (rqvae_path=...) or re-run {STEP_RQVAE}."
            )
    return path


def _lr_lambda(warmup: int, total: int):
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total`` steps."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


@torch.no_grad()
def evaluate(
    model: RQVAE, x: torch.Tensor, code_num: int, batch_size: int, sk_epsilons: list[float], sk_iters: int
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Item codes (N, L) of all items, their health metrics and mean losses, in eval mode.

    The codes are those saved in the checkpoint: nearest code, re-balanced by Sinkhorn over the whole item set
    at the levels whose epsilon is > 0 (``RQVAE.get_codes``). ``collision_rate_nearest`` and
    ``max_group_nearest`` describe plain nearest-code assignment (what the reference measured).
    """
    model.eval()
    recon, rq = 0.0, 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        recon += out.loss_recon.item() * len(out.codes)
        rq += out.loss_rq.item() * len(out.codes)
    nearest = model.get_codes(x, batch_size=batch_size).cpu()  # (N, L)
    codes = model.get_codes(x, batch_size=batch_size, sk_epsilons=sk_epsilons, sk_iters=sk_iters).cpu()  # (N, L)
    plain = collision_stats(nearest, code_num)
    stats = collision_stats(codes, code_num)
    stats.update(
        collision_rate_nearest=plain["collision_rate"], max_group_nearest=plain["max_group"],
        loss_recon=recon / len(x), loss_rq=rq / len(x),
    )
    return codes, stats


class _BestKeeper:
    """Keeps one best file per kind in the run folder; ``finish`` marks the run finished and points
    ``latest.json`` to it."""

    def __init__(self, run_dir: Path, root: Path) -> None:
        self.run_dir, self.root = run_dir, root
        self.files: dict[str, Path] = {}
        self.values: dict[str, tuple[float, ...]] = {"collision": (math.inf,), "gini": (math.inf,)}

    def offer(self, stats: dict[str, Any], save) -> bool:
        """Save for every kind this evaluation improves; True when the collision rate improved.

        Collision ranks by (collision rate of the saved codes, reconstruction loss): with Sinkhorn at the last
        level the rate is usually 0 at every evaluation, and the better-trained tokenizer then wins.
        """
        cr, g = stats["collision_rate"], stats["gini"]
        names = {
            "collision": ((cr, stats["loss_recon"]), f"best_collision_{cr:.4f}_gini_{g:.4f}.pth"),
            "gini": ((g,), f"best_gini_{g:.4f}_collision_{cr:.4f}.pth"),
        }
        improved = {k for k, (v, _) in names.items() if v < self.values[k]}
        for kind in improved:
            path = self.run_dir / names[kind][1]
            if not save(path):
                improved = set()
                break
            old = self.files.get(kind)
            if old is not None and old != path:
                old.unlink(missing_ok=True)
            self.files[kind], self.values[kind] = path, names[kind][0]
        return "collision" in improved

    def start(self) -> None:
        """Mark the run folder as unfinished (until ``finish``)."""
        atomic_write_json(self.run_dir / RUN_STATUS, {"finished": False, "pid": os.getpid()})

    def finish(self, epochs: int) -> None:
        """Mark the run finished, then make it the dataset's ``latest.json``."""
        pointer = {
            "best_collision": str(self.files["collision"].relative_to(self.root)),
            "best_gini": str(self.files["gini"].relative_to(self.root)),
            "run": self.run_dir.name,
            "collision_rate": self.values["collision"][0],
            "gini": self.values["gini"][0],
        }
        atomic_write_json(self.run_dir / RUN_STATUS, {"finished": True, "epochs": epochs, **pointer})
        atomic_write_json(self.root / POINTER, pointer)


def _fmt(stats: dict[str, Any], levels: int) -> str:
    lv = lambda key, f: "/".join(f % stats[f"{key}_l{l}"] for l in range(1, levels + 1))
    return (
        f"recon {stats['loss_recon']:.5f} rq {stats['loss_rq']:.5f} | collision {stats['collision_rate']:.4f} "
        f"(collided share {stats['collided_share']:.4f}, max group {stats['max_group']}; nearest code: "
        f"{stats['collision_rate_nearest']:.4f}, max group {stats['max_group_nearest']}) | usage {lv('usage', '%.3f')} "
        f"| perplexity {lv('perplexity', '%.0f')} | gini {stats['gini']:.4f}"
    )


class TokenizerPretrainer:
    """Holds the item vectors, the RQ-VAE, its optimiser and the kept checkpoints of one pretraining run;
    ``fit()`` runs it."""

    def __init__(self, cfg: Config) -> None:
        t = cfg.tokenizer
        set_seed(t.rq_seed)
        self.cfg, self.device, self.code_num = cfg, pick_device(t.rq_device, "rq_device"), cfg.model.code_num
        self.n_items = len(load_item_map(DatasetFiles.from_config(cfg))) - 1
        self.x = torch.from_numpy(load_item_vectors(cfg, self.n_items)).to(self.device)  # (N, d_s)
        root = ckpt_root(cfg)
        self.run_dir = new_run_dir(root, timestamp())
        log_dir = cfg.path(cfg.train.log_dir) / cfg.data.dataset / "rqvae" / self.run_dir.name
        self.tb = start_run(cfg, self.run_dir, log_dir / "pretrain.log", log_dir)
        self.input_info = {
            "tokenizer_input": t.tokenizer_input,
            "n_items": self.n_items,
            "in_dim": int(self.x.shape[1]),
            "normalize": t.normalize,
            "dataset": cfg.data.dataset,
            "collab_path": str(collab_emb_path(cfg)) if t.tokenizer_input in ("dual", "collab") else "",
            "text_path": str(text_emb_path(cfg)) if t.tokenizer_input in ("dual", "text") else "",
        }
        logger.info("RQ-VAE pretraining on %s: %d items x %d dims (%s), device %s, run %s", cfg.data.dataset,
                    self.n_items, self.x.shape[1], t.tokenizer_input, self.device, self.run_dir)

        self.model = RQVAE(
            in_dim=int(self.x.shape[1]), layers=t.layers, e_dim=t.e_dim, num_emb_list=t.num_emb_list,
            beta=t.beta, dropout_prob=t.dropout_prob, bn=t.bn,
        ).to(self.device)
        self.start = time.time()
        self.model.rq.init_kmeans(self.model.encode(self.x), iters=t.kmeans_iters, seed=t.rq_seed)
        logger.info("k-means codebook initialisation (%d iterations, all items): %.1f s", t.kmeans_iters,
                    time.time() - self.start)

        steps_per_epoch = math.ceil(self.n_items / t.rq_batch_size)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=t.rq_lr, weight_decay=t.rq_weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, _lr_lambda(t.rq_warmup_epochs * steps_per_epoch, t.rq_epochs * steps_per_epoch)
        )
        self.gen = torch.Generator().manual_seed(t.rq_seed)  # epoch order and dead-code samples
        self.keeper = _BestKeeper(self.run_dir, root)
        self.keeper.start()

    def _train_epoch(self, epoch: int) -> list[int]:
        """One pass over all items in a fresh order, then the dead-code reset; returns the codes revived per level."""
        t, model, n = self.cfg.tokenizer, self.model, self.n_items
        model.train()
        perm = torch.randperm(n, generator=self.gen).to(self.device)
        sums = torch.zeros(2, dtype=torch.float64)
        usage = torch.zeros(model.rq.num_levels, self.code_num, dtype=torch.long, device=self.device)  # (L, K)
        for i in range(0, n, t.rq_batch_size):
            xb = self.x[perm[i : i + t.rq_batch_size]]  # (B, d_s)
            out = model(xb, sk_epsilons=t.sk_epsilons, sk_iters=t.sk_iters)
            loss = out.loss_recon + out.loss_rq
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"RQ-VAE loss became {float(loss)} at epoch {epoch}; lower rq_lr (now {t.rq_lr}) or check the "
                    "input vectors"
                )
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            self.opt.step()
            self.sched.step()
            sums += torch.tensor([out.loss_recon.item(), out.loss_rq.item()], dtype=torch.float64) * len(xb)
            usage.scatter_add_(1, out.codes.t(), torch.ones_like(out.codes.t()))  # (L, K) += per-level counts
        revived = [0] * model.rq.num_levels
        if t.rq_dead_code_reset and bool((usage == 0).any()):
            sample = self.x[torch.randperm(n, generator=self.gen)[: t.rq_batch_size * 4].to(self.device)]  # (M, d_s)
            revived = model.rq.revive_dead_codes(model.encode(sample), usage == 0, self.gen)
        train = {"loss_recon": float(sums[0]) / n, "loss_rq": float(sums[1]) / n,
                 "lr": self.sched.get_last_lr()[0], **{f"revived_l{l + 1}": r for l, r in enumerate(revived)}}
        self.tb.scalars(epoch, train, prefix="train/")
        return revived

    def _evaluate(self) -> tuple[torch.Tensor, dict[str, Any]]:
        t = self.cfg.tokenizer
        return evaluate(self.model, self.x, self.code_num, t.rq_batch_size, t.sk_epsilons, t.sk_iters)

    def _validate(self, epoch: int, revived: list[int]) -> tuple[bool, dict[str, Any]]:
        """Assign and measure every item's codes, save the checkpoints this improves; returns (the collision
        ranking improved, the health statistics)."""
        codes, stats = self._evaluate()
        seconds = (time.time() - self.train_start) / epoch
        logger.info("epoch %d | %s | revived %s | %.2f s/epoch", epoch, _fmt(stats, self.model.rq.num_levels),
                    "/".join(map(str, revived)), seconds)
        self.tb.scalars(epoch, stats, prefix="eval/")
        return self.keeper.offer(stats, self._saver(codes, stats, epoch)), stats

    def _saver(self, codes: torch.Tensor, stats: dict[str, Any], epoch: int) -> Callable[[Path], bool]:
        """Writes this evaluation's checkpoint to a path; False (nothing written) when the suffix cannot make
        every ID unique."""

        def save(path: Path) -> bool:
            try:
                table = ItemCodes(add_suffix(codes, self.code_num), self.code_num)  # (N, L+1) with the suffix
            except ValueError as err:
                logger.warning("epoch %d: not saved: %s", epoch, err)
                return False
            producer = f"etegrec.tokenizer.pretrain run {self.run_dir.name}"
            save_rqvae(path, self.model, table, {**stats, "epoch": epoch}, self.cfg,
                       extra={"input": self.input_info, "producer": producer})
            return True

        return save

    def fit(self) -> Path:
        """Train with early stopping on the collision ranking; returns the best_collision checkpoint."""
        t = self.cfg.tokenizer
        best_epoch, bad_evals, epoch = 0, 0, 0
        _, stats = self._evaluate()
        logger.info("epoch 0 (k-means init, not a checkpoint candidate) | %s", _fmt(stats, self.model.rq.num_levels))
        self.tb.scalars(0, stats, prefix="eval/")
        bar = tqdm(range(1, t.rq_epochs + 1), desc="rqvae", dynamic_ncols=True, disable=None)
        self.train_start = time.time()
        for epoch in bar:
            revived = self._train_epoch(epoch)
            if epoch % t.rq_eval_step and epoch != t.rq_epochs:
                continue
            improved, stats = self._validate(epoch, revived)
            bar.set_postfix(collision=f"{stats['collision_rate']:.4f}", gini=f"{stats['gini']:.3f}")
            if improved:
                best_epoch, bad_evals = epoch, 0
                continue
            bad_evals += 1
            if bad_evals >= t.rq_patience:
                logger.info("early stop at epoch %d: no better (collision rate, reconstruction loss) in %d "
                            "evaluations", epoch, bad_evals)
                break
        bar.close()
        self.tb.close()
        if "collision" not in self.keeper.files:
            raise TrainingError(
                "no checkpoint could be saved: every evaluation had a collision group larger than "
                f"code_num={self.code_num}. Train with Sinkhorn (--sk_epsilons), longer, or with larger codebooks."
            )
        self.keeper.finish(epoch)
        logger.info(
            "done in %.0f s (%d epochs); best collision rate %.4f at epoch %d -> %s",
            time.time() - self.start, epoch, self.keeper.values["collision"][0], best_epoch,
            self.keeper.files["collision"],
        )
        return self.keeper.files["collision"]


def run(cfg: Config) -> Path:
    """Pretrain the tokenizer of ``cfg`` and return the best_collision checkpoint path."""
    return TokenizerPretrainer(cfg).fit()
