"""Cross-process file locks (``fcntl.flock``) for processes that share one output folder.

The operating system releases a lock when its process dies, so a killed process never leaves a stale lock.
Lock files stay in place: deleting one while another process waits on it would let two processes hold "the
same" lock. Each ``FileLock`` opens its own descriptor, so two objects exclude each other even inside one
process.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Self  # Python >= 3.11; annotations only

logger = logging.getLogger("etegrec.locks")


class FileLock:
    """An exclusive lock on ``path`` (created when missing); the holder's pid is written into the file."""

    def __init__(self, path: Path, waiting_for: str = "") -> None:
        self.path = Path(path)
        self.waiting_for = waiting_for or str(self.path)  # logged when another process holds the lock
        self._fd: int | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; with ``blocking`` wait for it (logging once), else return False when it is held."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                os.close(fd)
                return False
            logger.info("waiting for another process: %s (lock %s)", self.waiting_for, self.path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Give the lock up (no-op when not held)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
