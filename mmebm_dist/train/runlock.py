"""One writer per run directory: rank 0 holds an exclusive ``flock`` on ``RUN_DIR/.lock`` for the whole run.

The kernel drops the lock when the holder exits or crashes, so a crash never leaves a stale lock behind (the
file stays, the lock does not). The file records the holder's host and PID for the refusal message. On NFS,
Linux emulates ``flock`` with POSIX byte-range locks, which the server enforces across clients. Forked
children (DataLoader workers) do not keep the lock (:mod:`mmebm_dist.locks`).
"""

from __future__ import annotations

from pathlib import Path

from mmebm_dist.locks import try_lock, unlock

LOCK_FILE = ".lock"


class RunDirLockedError(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """Context manager: take ``RUN_DIR/.lock`` exclusively or raise naming the holder's host and PID."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        fd, holder = try_lock(self.path)
        if fd is None:
            raise RunDirLockedError(
                f"{self.path.parent} is in use by {holder}; wait for that run to end (or stop it) "
                "before resuming, or choose another train.out_dir"
            )
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            unlock(self._fd)
            self._fd = None
