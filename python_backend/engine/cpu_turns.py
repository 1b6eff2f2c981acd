"""CPU engines on one host take turns, one engine step at a time.

Each CPU engine runs PyTorch's OpenMP pool over every core. Two engines computing at once put two
such pools on the same cores, and OpenMP's barriers then wait on threads the kernel has parked: a
pool of members on one CPU slows down many times over, not twice. Holding a host-wide file lock
for the length of a step keeps one pool on the cores at a time, at a cost of one system call."""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

log = logging.getLogger(__name__)


def lock_path() -> Path:
    """One lock per user and host; $FASTSERVE_CPU_LOCK names another (engines that should share
    cores with each other but not with the rest)."""
    chosen = os.environ.get("FASTSERVE_CPU_LOCK")
    if chosen:
        return Path(chosen)
    return Path(tempfile.gettempdir()) / f"fastserve-cpu-{os.getuid()}.lock"


class CpuTurns(AbstractContextManager):
    """`with turns:` holds the host's CPU for one step. Where the lock file cannot be opened the
    engine runs without turns (a warning says so) rather than not at all."""

    def __init__(self, path: Path | None = None):
        self.path = path or lock_path()
        self._fd = -1
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            log.warning("fastserve: CPU engines will not take turns: cannot open %s (%s)", self.path, e)

    def __enter__(self) -> CpuTurns:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def turns_for(device_type: str, enabled: bool) -> AbstractContextManager:
    """The step guard for an engine on this device: CPU turns, or nothing."""
    if device_type == "cpu" and enabled:
        return CpuTurns()
    return nullcontext()
