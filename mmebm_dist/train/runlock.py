"""One writer per run directory: rank 0 holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for the whole run.

The kernel drops the lock when the holder exits or crashes, so a crash never leaves a stale lock behind (the
file stays, the lock does not). The file records the holder's host and PID for the refusal message. On NFS,
Linux emulates ``flock`` with POSIX byte-range locks, which the server enforces across clients.

A forked child (a DataLoader worker) would share the lock's open file and keep the lock after its parent
died; every forked child therefore closes its copy at once (``os.register_at_fork``), and the descriptor is
close-on-exec, so only the process that took the lock holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"

_HELD: set[int] = set()
"""Descriptors of the locks this process holds (closed in forked children)."""


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunDirLockedError(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """Context manager: take ``RUN_DIR/.lock`` exclusively or raise naming the holder's host and PID."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise RunDirLockedError(
                f"{self.path.parent} is in use by {holder}; wait for that run to end (or stop it) "
                "before resuming, or choose another train.out_dir"
            ) from None
        os.ftruncate(fd, 0)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        os.pwrite(fd, f"host {socket.gethostname()} PID {os.getpid()} (since {stamp})\n".encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            _HELD.discard(self._fd)
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None
