"""Shared fixtures: the real datasets in ../shared/data (skipped cleanly when absent) and the slow marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("ETEGREC_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: long end-to-end test, run with --runslow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow; run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder with beauty_p5/ and scientific2018_cgr/; skips the test when it is not present."""
    if not (SHARED_DATA / "beauty_p5").is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set ETEGREC_SHARED_DATA)")
    return SHARED_DATA
