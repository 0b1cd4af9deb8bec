"""Process setup: each run's log file holds that run only; a session log holds every run."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from etegrec.errors import ConfigError
from etegrec.runtime import pick_device, setup_logging


@pytest.fixture
def clean_etegrec_logger() -> Iterator[None]:
    """Restore the package logger's handlers after the test (other tests log through it too)."""
    root = logging.getLogger("etegrec")
    before = list(root.handlers)
    yield
    for handler in list(root.handlers):  # a copy: removing while iterating would skip handlers
        if handler not in before:
            root.removeHandler(handler)
            handler.close()


def test_a_new_run_log_replaces_the_previous_run_log(tmp_path: Path, clean_etegrec_logger: None) -> None:
    log = logging.getLogger("etegrec.test")
    setup_logging(tmp_path / "bench.log", keep_for_session=True)
    setup_logging(tmp_path / "sasrec.log")
    log.info("sasrec line")
    setup_logging(tmp_path / "sasrec.log")  # the same file again: still one handler, no duplicated lines
    log.info("sasrec second line")
    setup_logging(tmp_path / "joint.log")
    log.info("joint line")

    assert (tmp_path / "sasrec.log").read_text().splitlines()[-1].endswith("sasrec second line")
    assert "joint line" not in (tmp_path / "sasrec.log").read_text()
    assert (tmp_path / "sasrec.log").read_text().count("sasrec line") == 1
    assert [line.split(": ", 1)[1] for line in (tmp_path / "joint.log").read_text().splitlines()] == ["joint line"]
    assert [line.split(": ", 1)[1] for line in (tmp_path / "bench.log").read_text().splitlines()] == [
        "sasrec line", "sasrec second line", "joint line"]


def test_cuda_device_without_cuda_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^rq_device='cuda:1' but CUDA is not available on this machine; use auto"):
        pick_device("cuda:1", "rq_device")
    assert pick_device("auto", "rq_device").type == "cpu"


def test_a_resumed_run_keeps_its_own_config_and_rejects_an_unreadable_one(tmp_path: Path) -> None:
    from etegrec.artifacts import ArtifactError
    from etegrec.config import Config
    from etegrec.runtime import resumed_config

    stored = Config()
    stored.train.lr_rec = 0.5
    path = tmp_path / "run" / "last.pt"
    cfg = resumed_config(path, {"config": stored.to_dict()}, {"lr_rec": 0.1, "resume": "elsewhere.pt"})
    assert cfg.train.lr_rec == 0.5 and cfg.train.resume == str(path)
    with pytest.raises(ArtifactError, match="last.pt: its stored config does not fit"):
        resumed_config(path, {"config": {**stored.to_dict(), "renamed_key": 1}}, {})


def test_epoch_seed_depends_on_seed_epoch_and_rank_only() -> None:
    import torch

    from etegrec.runtime import seed_epoch

    draws = []
    for seed, epoch, rank in [(1, 2, 0), (1, 2, 0), (1, 3, 0), (1, 2, 1)]:
        seed_epoch(seed, epoch, rank)
        draws.append(torch.rand(1).item())
    assert draws[0] == draws[1] and len(set(draws)) == 3


def test_processes_starting_in_the_same_second_get_distinct_run_folders(tmp_path: Path) -> None:
    import subprocess
    import sys

    # Four processes race for the same stamp; each must end up with its own folder (none may crash or share).
    script = (
        "import sys; from pathlib import Path; from etegrec.runtime import new_run_dir\n"
        "print(new_run_dir(Path(sys.argv[1]), 'same-second').name)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "runs")], stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    names = [p.communicate()[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(names) == ["same-second", "same-second-1", "same-second-2", "same-second-3"]


def test_deadline_leaves_room_for_the_longest_unit_of_each_kind() -> None:
    import time

    from etegrec.runtime import Deadline

    budget = Deadline(time.time() + 10.0)
    budget.record("epoch", 4.0)
    budget.record("epoch", 3.0)  # shorter: the longest epoch still counts
    budget.record("eval", 2.0)
    assert budget.room_for("epoch", "eval", "eval")  # 8 s of 10
    budget.record("eval", 3.5)
    assert not budget.room_for("epoch", "eval", "eval")  # 11 s
    assert budget.room_for("epoch", "never recorded")  # an unmeasured unit counts 0 s
    assert Deadline(None).room_for("epoch", "eval")
