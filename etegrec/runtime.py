"""Process setup shared by every stage: seeding, the Accelerator, logging, run folders, TensorBoard.

Why ``Accelerator(cpu=True)`` without CUDA: with accelerate >= 1.x, ``accelerate launch`` of a MULTI_GPU
config on a machine without CUDA starts N processes that each run alone (world size 1) unless the
Accelerator is told to use the CPU; with ``cpu=True`` they form one gloo process group.
"""

from __future__ import annotations

import logging
import os
import random
import resource
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from etegrec.config import Config, dump_yaml
from etegrec.errors import ConfigError

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
    from etegrec.artifacts import atomic_write_text

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


def new_run_dir(root: Path, stamp: str, accelerator: Any) -> Path:
    """``<root>/<stamp>[-k]``, created by the main process and shared with the others (``-k`` when two runs
    start in the same second)."""
    from accelerate.utils import broadcast_object_list

    name: list[str | None] = [None]
    if accelerator.is_main_process:
        run_dir, k = root / stamp, 1
        while run_dir.exists():
            run_dir, k = root / f"{stamp}-{k}", k + 1
        run_dir.mkdir(parents=True)
        name = [run_dir.name]
    if accelerator.num_processes > 1:
        broadcast_object_list(name, from_process=0)
    return root / str(name[0])


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
