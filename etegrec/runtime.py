"""Run scaffolding shared by every stage: seeding, the Accelerator, logging, run folders, TensorBoard, resuming.

Every training stage starts the same way (``new_run_dir`` + ``start_run``: run folder, log file, TensorBoard,
the resolved config and command line in the folder), seeds each epoch with ``seed_epoch`` and stores CPU copies
of its weights (``cpu_state``); a resumed run takes its config from its checkpoint (``resumed_config``).

Why ``Accelerator(cpu=True)`` without CUDA: with accelerate >= 1.x, ``accelerate launch`` of a MULTI_GPU
config on a machine without CUDA starts N processes that each run alone (world size 1) unless the
Accelerator is told to use the CPU; with ``cpu=True`` they form one gloo process group.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import resource
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from etegrec.artifacts import atomic_write_text
from etegrec.config import Config, config_from_dict, dump_yaml
from etegrec.errors import ArtifactError, ConfigError

if TYPE_CHECKING:
    import torch

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
logger = logging.getLogger("etegrec")


def set_seed(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Seed one epoch of one process from ``(seed, epoch, rank)`` alone, so a resumed run draws what an
    uninterrupted one would (data order, dropout, rollouts)."""
    set_seed((seed * 100_003 + epoch * 1_009 + rank) % (2**31))


def make_accelerator(**kwargs: Any):
    """An ``accelerate.Accelerator`` that forms a real process group on CPU-only machines too."""
    import torch
    from accelerate import Accelerator

    if not torch.cuda.is_available():
        kwargs.setdefault("cpu", True)
    return Accelerator(**kwargs)


def setup_logging(
    log_file: Path | None = None, is_main: bool = True, level: int = logging.INFO, *, keep_for_session: bool = False
) -> logging.Logger:
    """Console logging (main process only) plus an optional log file; idempotent.

    A log file belongs to one run: a later call with another file (the next stage that ``main.py`` builds, the
    next benchmark run) closes it, so each file holds its own run only. ``keep_for_session=True`` opens a file
    that stays attached for the whole process and receives every later run's lines too (a benchmark's log).
    """
    root = logging.getLogger("etegrec")
    root.setLevel(level if is_main else logging.WARNING)
    root.propagate = False
    fmt = logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S")
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(fmt)
        root.addHandler(console)
    if log_file is None or not is_main:
        return root
    log_file = Path(os.path.abspath(log_file))  # as FileHandler stores it
    files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    if any(Path(h.baseFilename) == log_file for h in files):
        return root
    if not keep_for_session:
        for handler in files:
            if not getattr(handler, "etegrec_session", False):  # the previous run's file
                root.removeHandler(handler)
                handler.close()
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file, encoding="utf-8")
    handler.setFormatter(fmt)
    handler.etegrec_session = keep_for_session
    root.addHandler(handler)
    return root


def timestamp() -> str:
    """Run-folder stamp, e.g. ``Nov-27-2026_21-45-03`` (seconds, so runs in the same minute differ)."""
    return time.strftime("%b-%d-%Y_%H-%M-%S")


def write_run_info(run_dir: Path, cfg: Config, argv: list[str] | None = None) -> None:
    """Store the resolved config and command line beside a run's outputs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", dump_yaml(cfg, header="resolved configuration of this run"))
    atomic_write_text(run_dir / "argv.txt", " ".join(argv if argv is not None else sys.argv) + "\n")


class TensorBoard:
    """A SummaryWriter on the main process, a no-op elsewhere or when disabled."""

    def __init__(self, log_dir: Path | None, enabled: bool = True) -> None:
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}{name}", float(value), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def pick_device(name: str, key: str = "device") -> torch.device:
    """``auto`` = CUDA when present, else CPU; otherwise the named device (``key``: the config key, for errors)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r} but CUDA is not available on this machine; use auto or cpu", key)
    return torch.device(name)


def cpu_threads() -> int:
    """Threads torch uses on this process (respects OMP_NUM_THREADS)."""
    import torch

    return int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))


def new_run_dir(root: Path, stamp: str, accelerator: Any = None) -> Path:
    """``<root>/<stamp>[-k]``, created by the main process and shared with the others (``-k`` when two runs
    start in the same second, also when they are separate processes racing for the name)."""
    name: list[str | None] = [None]
    if accelerator is None or accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        run_dir, k = root / stamp, 1
        while True:
            try:
                run_dir.mkdir()  # atomic: exactly one process creates a given name
                break
            except FileExistsError:
                run_dir, k = root / f"{stamp}-{k}", k + 1
        name = [run_dir.name]
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(name, from_process=0)
    return root / str(name[0])


def start_run(cfg: Config, run_dir: Path, log_file: Path, tb_dir: Path, is_main: bool = True) -> TensorBoard:
    """Send the log to ``log_file``, store config and command line in ``run_dir``; returns the run's TensorBoard
    (at ``tb_dir``, when ``cfg.train.tensorboard`` is on)."""
    setup_logging(log_file, is_main=is_main)
    if is_main:
        write_run_info(run_dir, cfg)
    return TensorBoard(tb_dir, enabled=cfg.train.tensorboard and is_main)


class Run(NamedTuple):
    """Where a recommender training run writes."""

    dir: Path  # checkpoints, config.yaml, argv.txt (and metrics.json for GRPO)
    tb: TensorBoard


def start_training_run(cfg: Config, accelerator: Any, resume: Path | None, suffix: str = "") -> Run:
    """Start (or continue) a recommender training run.

    The folder is ``<ckpt_dir>/<dataset>/<TIMESTAMP><suffix>``, or that of the resumed ``last.pt``; its name also
    names the log ``<log_dir>/<dataset>/<name>.log`` and TensorBoard ``<log_dir>/<dataset>/tb/<name>``. All
    processes use the main process's clock for the name.
    """
    if resume is not None:
        run_dir = resume.resolve().parent
    else:
        run_dir = new_run_dir(cfg.path(cfg.train.ckpt_dir) / cfg.data.dataset, timestamp() + suffix, accelerator)
    logs = cfg.path(cfg.train.log_dir) / cfg.data.dataset
    tb = start_run(cfg, run_dir, logs / f"{run_dir.name}.log", logs / "tb" / run_dir.name, accelerator.is_main_process)
    return Run(dir=run_dir, tb=tb)


# ------------------------------------------------------------------------------------ checkpoints, resuming
def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of a module's weights that later training does not change (for checkpoints and kept models)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def load_checkpoint_file(path: Path, what: str, step: str, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with an ArtifactError naming the file when it is missing or is not
    a torch checkpoint (``what``: its kind, ``step``: the step that makes it)."""
    import torch

    if not path.is_file():
        raise ArtifactError(f"{what} {path} does not exist; it is made by {step}.")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # a damaged or foreign file: zip, pickle or unpickler errors (a text file: KeyError)
        raise ArtifactError(
            f"{path} is not a readable {what} ({type(err).__name__}: {err}); re-create it with {step}."
        ) from None


def stored_config(path: Path, obj: dict[str, Any]) -> Config:
    """The config a checkpoint was written with.

    Raises:
        ArtifactError: this version of the code cannot read it (keys renamed or removed since).
    """
    try:
        return config_from_dict(obj["config"])
    except ConfigError as err:
        raise ArtifactError(f"{path}: its stored config does not fit this version of the code ({err}).") from None


def resumed_config(path: Path, obj: dict[str, Any], given: dict[str, Any]) -> Config:
    """The interrupted run's own config, so that its continuation equals an uninterrupted run.

    Args:
        path: the run's ``last.pt`` (becomes the config's ``resume``).
        obj: its contents.
        given: flat values the caller asked for; those that differ from the run's are ignored, with a warning.
    """
    cfg = stored_config(path, obj)
    cfg.train.resume = str(path)
    stored = cfg.to_dict()
    ignored = {k: v for k, v in given.items() if k != "resume" and v != stored.get(k)}
    if ignored:
        logger.warning(
            "resuming %s with its own config (%s); these values are ignored: %s",
            path.parent.name,
            path.parent / "config.yaml",
            ignored,
        )
    return cfg.validate()


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work (for timing); no-op on CPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated GPU memory, or this process's peak resident memory on CPU (Linux reports KiB)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Deadline:
    """A wall-clock end for a run that can only stop between units of work (epochs, evaluations).

    ``at`` is Unix seconds (None = no limit). The run records how long each kind of unit took (the longest
    counts) and asks ``room_for`` before starting the next ones: a run stops at the first boundary from which
    the coming units, as long as the longest so far, would end past ``at``. With several processes the main
    process's answer holds for all (their clocks differ a little, and they must stop at the same boundary).
    """

    def __init__(self, at: float | None) -> None:
        self.at = at
        self.longest: dict[str, float] = {}

    def record(self, unit: str, seconds: float) -> None:
        self.longest[unit] = max(self.longest.get(unit, 0.0), seconds)

    def room_for(self, *units: str, accelerator: Any = None) -> bool:
        """Whether ``units`` (names given to ``record``; repeats count twice) fit before the deadline."""
        if self.at is None:
            return True
        fits = time.time() + sum(self.longest.get(unit, 0.0) for unit in units) <= self.at
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            flag = [fits]
            broadcast_object_list(flag, from_process=0)
            fits = bool(flag[0])
        return fits


@contextlib.contextmanager
def cuda_tf32(enabled: bool) -> Iterator[None]:
    """TF32 tensor-core matmuls for float32 work on CUDA inside the block (inputs rounded to a 10-bit mantissa,
    fp32 accumulation); the previous setting comes back afterwards, so decoding and code refreshes stay fp32.
    CPU matmuls are not affected either way."""
    import torch

    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
