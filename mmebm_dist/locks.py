"""Exclusive ``flock`` locks held by one process only: forked children (DataLoader and builder workers) close
their copy at once, so a worker orphaned by a kill -9 of its parent never keeps a lock.

``flock`` belongs to the open file, which a fork shares: without this, the lock lives as long as the last
worker. The descriptor is also close-on-exec. The kernel drops the lock when its holder exits or crashes.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

_HELD: set[int] = set()
"""Descriptors of the locks this process holds (closed in forked children)."""


def _close_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


def try_lock(path: Path) -> tuple[int | None, str]:
    """Take ``path`` exclusively: (descriptor, "") or, when another process holds it, (None, its holder as
    recorded in the file: host, PID, since when). The holder line is written on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            return None, holder + _liveness(holder, path)
        try:  # the holder we waited behind may have removed the file (unlock(remove=True)): lock the new one
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.pwrite(fd, f"host {socket.gethostname()} PID {os.getpid()} (since {stamp})\n".encode(), 0)
    _HELD.add(fd)
    return fd, ""


def _liveness(holder: str, path: Path) -> str:
    """A note when the recorded holder is a process of this host that has exited (then a child it forked
    before this code closed inherited locks, or another program, holds the lock)."""
    match = re.match(r"host (\S+) PID (\d+)", holder)
    if not match or match.group(1) != socket.gethostname():
        return ""
    try:
        os.kill(int(match.group(2)), 0)
    except ProcessLookupError:
        return f" -- that process has exited; `fuser -v {path}` names the one still holding the lock"
    except PermissionError:
        pass
    return ""


def unlock(fd: int, remove: Path | None = None) -> None:
    """Release a lock taken by :func:`try_lock` (closing the only descriptor releases the flock), deleting
    its file ``remove`` first when given (:func:`try_lock` then never locks a deleted file)."""
    if remove is not None:
        with contextlib.suppress(FileNotFoundError):
            remove.unlink()
    _HELD.discard(fd)
    os.close(fd)


class OutputLockedError(RuntimeError):
    """Another process is writing the same output directory."""


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``.<out name>.lock`` beside ``out`` while a builder or importer writes ``out``: a second one
    aimed at the same folder is refused naming the first, instead of interleaving with it."""
    out = Path(out).resolve()
    path = out.parent / f".{out.name}.lock"
    fd, holder = try_lock(path)
    if fd is None:
        raise OutputLockedError(f"{out} is being written by {holder}; wait for it to finish or choose "
                                "another --out")
    try:
        yield
    finally:
        unlock(fd, remove=path)
