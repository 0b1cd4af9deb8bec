"""The only place that imports RecBole: small, documented fixes that let recbole 1.2.1 run with current libraries.

RecBole 1.2.1 (the last release) breaks with today's NumPy and PyTorch; rather than pinning old versions
(``requirements.txt`` keeps ``numpy>=1.26``), this module fixes exactly five things and nothing else:

1. **NumPy >= 2.0** removed ``np.float_``, ``np.complex_`` and ``np.unicode_``. RecBole's
   ``Config.compatibility_settings`` reads them (to re-create ``np.float`` etc.), so every ``Config(...)`` raises
   ``AttributeError``. We restore the three aliases (to ``np.float64``, ``np.complex128``, ``np.str_``, their
   NumPy-1 values) before RecBole is imported. The aliases stay set for the process: they only add names that
   NumPy 2 no longer has.
2. **torch >= 2.6** defaults ``torch.load(weights_only=True)``; RecBole's checkpoint pickles its ``Config``
   object, so ``Trainer.evaluate(load_best_model=True)`` fails. ``CheckpointTrainer`` saves the best-validation
   checkpoint as the epoch and the model's tensors only, to a file name the caller makes unique (RecBole's own
   ``<model>-<local time>.pth`` is shared by two runs started in the same second), and
   ``load_best_checkpoint`` reads it back with ``weights_only=True``.
3. **``recbole.quick_start``** imports ``ray`` (which needs ``pkg_resources``). We never import it: the model,
   trainer and data helpers are imported from their own modules below.
4. **Process-global side effects of RecBole's ``Config``**: it parses ``sys.argv`` (so our own
   ``--dataset=beauty`` would silently override its dataset name) and overwrites ``CUDA_VISIBLE_DEVICES``.
   ``make_config`` hides ``sys.argv`` and restores the environment variable. Its trainer also writes TensorBoard
   files to ``./log_tensorboard`` in the current directory; ``tensorboard_dir`` sends them to a folder we choose.
5. **Importing RecBole switches on autograd anomaly detection for the whole process**
   (``recbole/model/sequential_recommender/sine.py`` calls ``torch.autograd.set_detect_anomaly(True)`` at import):
   every later backward pass, joint training's included, then checks every operation's output for NaN (on a GPU
   a host wait per operation) and runs far slower. The setting from before the import is restored right after it.

Known and left alone: under pandas >= 3 (copy-on-write) RecBole's missing-value filling
(``Dataset._fill_nan``, ``fillna(inplace=True)`` on a column) does nothing and warns ``ChainedAssignmentError``.
The ``.inter`` file ``etegrec.embeddings.sasrec`` writes has no missing values, so nothing depends on it; the
warning (and RecBole's other deprecation noise) is silenced for RecBole's own modules only.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

_NUMPY1_ALIASES = {"float_": np.float64, "complex_": np.complex128, "unicode_": np.str_}
for _name, _value in _NUMPY1_ALIASES.items():
    if _name not in np.__dict__:
        setattr(np, _name, _value)

for _category in (FutureWarning, UserWarning, DeprecationWarning):
    warnings.filterwarnings("ignore", category=_category, module=r"recbole\.")
with contextlib.suppress(ImportError, AttributeError):
    from pandas.errors import ChainedAssignmentError

    warnings.filterwarnings("ignore", category=ChainedAssignmentError, module=r"recbole\.")

# RecBole is imported only now, after the aliases exist (fix 1).
_ANOMALY_MODE = torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()
import recbole.trainer.trainer as _recbole_trainer_module
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed

torch.autograd.set_detect_anomaly(_ANOMALY_MODE[0], check_nan=_ANOMALY_MODE[1])  # fix 5

__all__ = [
    "CheckpointTrainer",
    "Config",
    "SASRec",
    "create_dataset",
    "data_preparation",
    "init_seed",
    "load_best_checkpoint",
    "make_config",
    "tensorboard_dir",
]


def make_config(*, model: str, dataset: str, config_dict: dict[str, Any], device: torch.device) -> Config:
    """Build a RecBole ``Config`` from ``config_dict`` alone and place it on ``device``.

    ``sys.argv`` is hidden while RecBole parses it, and ``CUDA_VISIBLE_DEVICES`` is restored afterwards.
    CUDA is queried first, so the GPUs this process sees are fixed before RecBole touches the variable.
    """
    torch.cuda.is_available()  # initialise the CUDA device list with the user's own environment
    saved_argv, saved_cuda = sys.argv, os.environ.get("CUDA_VISIBLE_DEVICES")
    sys.argv = sys.argv[:1]
    try:
        config = Config(model=model, dataset=dataset, config_dict=config_dict)
    finally:
        sys.argv = saved_argv
        if saved_cuda is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved_cuda
    config["device"] = device
    config["use_gpu"] = device.type == "cuda"
    return config


@contextlib.contextmanager
def tensorboard_dir(path: Path) -> Iterator[None]:
    """While active, RecBole trainers write their TensorBoard files to ``path`` instead of ``./log_tensorboard``."""
    from torch.utils.tensorboard import SummaryWriter

    original = _recbole_trainer_module.get_tensorboard
    _recbole_trainer_module.get_tensorboard = lambda logger: SummaryWriter(str(path))
    try:
        yield
    finally:
        _recbole_trainer_module.get_tensorboard = original


class CheckpointTrainer(Trainer):
    """RecBole's ``Trainer`` whose best-validation checkpoint is ``saved_model_file`` and holds tensors only."""

    def __init__(self, config: Config, model: torch.nn.Module, saved_model_file: Path) -> None:
        super().__init__(config, model)
        self.saved_model_file = str(saved_model_file)

    def _save_checkpoint(self, epoch: int, verbose: bool = True, **kwargs: Any) -> None:
        if not self.config["single_spec"] and self.config["local_rank"] != 0:
            return
        from etegrec.artifacts import atomic_torch_save

        state = {"epoch": epoch, "state_dict": self.model.state_dict(), "other_parameter": self.model.other_parameter()}
        atomic_torch_save(Path(kwargs.get("saved_model_file", self.saved_model_file)), state)


def load_best_checkpoint(trainer: CheckpointTrainer) -> int:
    """Load the best-validation weights ``trainer.fit`` saved (``weights_only=True``); return their epoch."""
    checkpoint = torch.load(trainer.saved_model_file, map_location=trainer.device, weights_only=True)
    trainer.model.load_state_dict(checkpoint["state_dict"])
    trainer.model.load_other_parameter(checkpoint.get("other_parameter"))
    return int(checkpoint["epoch"])
