"""Per-rank heartbeats that name the rank which stopped answering when a collective waits too long.

Every rank overwrites ``RUN_DIR/heartbeat/rank-<i>`` with its last completed step, wall time, host and PID
after each step (one ``pwrite`` of a fixed-width line: no rename, no fsync). A watchdog thread on every rank
logs, once per stall, which ranks are behind when this rank has made no progress for ``train.dist_timeout_s``
/ 2; and when the collective finally times out (``train.dist_timeout_s``, the process group's timeout),
:func:`explain_timeout` turns the backend's error into one naming the stalest rank.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_DIR = "heartbeat"
_WIDTH = 160


class Heartbeat:
    """This rank's heartbeat file plus a watchdog thread (context manager; the thread is a daemon)."""

    def __init__(self, run_dir: str | Path, rank: int, world_size: int, timeout_s: float) -> None:
        self.dir = Path(run_dir) / HEARTBEAT_DIR
        self.rank, self.world, self.timeout_s = rank, world_size, timeout_s
        self.step, self.last_beat = 0, time.time()
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="mmebm-heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        return self

    def start(self, step: int) -> None:
        """Open this rank's file and start the watchdog (called once rank 0 holds the run directory)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.dir / f"rank-{self.rank}", os.O_RDWR | os.O_CREAT, 0o644)
        self.beat(step)
        if self.world > 1:
            self._thread.start()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def beat(self, step: int) -> None:
        """Record that this rank completed ``step`` now."""
        self.step, self.last_beat = step, time.time()
        if self._fd is None:
            return
        line = f"{step} {self.last_beat:.3f} {socket.gethostname()} {os.getpid()}"
        os.pwrite(self._fd, line[:_WIDTH].ljust(_WIDTH).encode() + b"\n", 0)

    def _watch(self) -> None:
        """Log once per stall which ranks are behind when this rank has not progressed for timeout/2."""
        reported = -1
        while not self._stop.wait(max(1.0, self.timeout_s / 10)):
            waited = time.time() - self.last_beat
            if waited > self.timeout_s / 2 and reported != self.step:
                reported = self.step
                log.error("rank %d has waited %.0f s after step %d: %s", self.rank, waited, self.step,
                          describe_laggards(self.dir, self.world, self.rank, self.step))

    def explain_timeout(self, exc: BaseException) -> RuntimeError:
        """A RuntimeError naming the rank(s) that stopped answering, chained to the backend's ``exc``."""
        return RuntimeError(
            f"rank {self.rank}: a collective after step {self.step} timed out (train.dist_timeout_s="
            f"{self.timeout_s:g}): {describe_laggards(self.dir, self.world, self.rank, self.step)}; "
            f"backend error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
        )


def read_heartbeats(directory: Path, world_size: int) -> dict[int, tuple[int, float, str, str] | None]:
    """rank -> (step, time, host, pid) from each heartbeat file, None where it is missing or unreadable."""
    out: dict[int, tuple[int, float, str, str] | None] = {}
    for rank in range(world_size):
        try:
            step, stamp, host, pid = (directory / f"rank-{rank}").read_text().split()[:4]
            out[rank] = (int(step), float(stamp), host, pid)
        except (OSError, ValueError):
            out[rank] = None
    return out


def describe_laggards(directory: Path, world_size: int, my_rank: int, my_step: int) -> str:
    """'rank 1 (host h, PID p) stopped answering: last step 3, 12 s ago' for each other rank behind
    ``my_step``; if none is behind but some are ahead, this rank is the one behind; else the oldest."""
    beats = read_heartbeats(directory, world_size)
    now = time.time()
    others = {r: b for r, b in beats.items() if r != my_rank and b is not None}
    missing = [r for r, b in beats.items() if b is None]
    behind = [r for r, b in others.items() if b[0] < my_step]
    ahead = [r for r, b in others.items() if b[0] > my_step]
    if not behind and ahead:
        return (f"rank {my_rank} (this process, PID {os.getpid()}) is the one behind: it has not finished "
                f"step {my_step + 1} while rank(s) {ahead[:8]} did")
    if not behind and not missing and others:
        behind = [min(others, key=lambda r: others[r][1])]
    parts = [f"rank {r} (host {others[r][2]}, PID {others[r][3]}) stopped answering: last step "
             f"{others[r][0]}, {now - others[r][1]:.0f} s ago" for r in behind]
    parts += [f"rank {r} never wrote {directory}/rank-{r}" for r in missing]
    return "; ".join(parts) or "no other rank's heartbeat is behind this one"


def is_timeout(exc: BaseException) -> bool:
    """True for the error a collective raises when the process group's timeout expires (gloo and NCCL)."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text
