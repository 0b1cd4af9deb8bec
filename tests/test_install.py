"""The install files agree: every requirement has one exact pin in the lock, inside the requirement's range."""

from __future__ import annotations

import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO_ROOT


def _lines(name: str) -> list[str]:
    text = (REPO_ROOT / name).read_text(encoding="utf-8")
    return [line.split("#", 1)[0].strip() for line in text.splitlines() if line.split("#", 1)[0].strip()]


def test_every_requirement_is_locked_inside_its_range():
    locked = {}
    for line in _lines("constraints.txt"):
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints.txt: {line!r} is not an exact pin"
        assert canonicalize_name(req.name) not in locked, f"constraints.txt pins {req.name} twice"
        locked[canonicalize_name(req.name)] = spec.version
    # torch is installed first (CPU or CUDA build) by the README's command and CI, with the same pin
    assert "torch" not in locked
    (readme_pin,) = set(re.findall(r"pip install torch==([\w.]+)", (REPO_ROOT / "README.md").read_text()))
    (ci_pin,) = set(re.findall(r"install .*torch==([\w.]+)", (REPO_ROOT / ".ci" / "run").read_text()))
    assert readme_pin == ci_pin
    locked["torch"] = ci_pin
    for line in _lines("requirements.txt"):
        req = Requirement(line)
        version = locked.get(canonicalize_name(req.name))
        assert version is not None, f"{req.name} is in requirements.txt but not locked in constraints.txt"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside {req.specifier}"
