"""The errors that mean "the input is wrong", as opposed to a bug.

Every kind derives from ``EtegrecError``; its message is one sentence that names the file, line or key at fault
and the fix. Entry scripts print such an error as one line ``error: …`` and exit with status 2
(``etegrec.cli.run_script``); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class EtegrecError(Exception):
    """Bad input to some stage; the message says what to change."""


class ConfigError(EtegrecError, ValueError):
    """A configuration value or key is invalid; ``key`` is the config key at fault, when there is one."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ArtifactError(EtegrecError, RuntimeError):
    """A stage input is missing or inconsistent; the message names the file and the step that makes it."""


class PrepError(EtegrecError, ValueError):
    """Missing or unusable input to data preparation; the message says what to change."""


class TrainingError(EtegrecError, RuntimeError):
    """Training cannot go on (a loss became non-finite, no checkpoint could be saved); the message says which
    setting to change."""
