"""Graceful stop on SIGTERM / SIGUSR1 / SIGINT (Ctrl-C): every rank finishes its step, one checkpoint is
written, the run exits with :data:`EXIT_PREEMPTED`. Repeated signals only set the same flag, and once one has
arrived they stay ignored until the process exits, so none interrupts the stop checkpoint or the teardown.

SLURM sends SIGTERM before a preemption and, with ``#SBATCH --signal=B:USR1@SECONDS``, SIGUSR1 ahead of the
time limit. The signal may reach only some ranks, so the flag is all-reduced (max) once per step: all ranks
agree on the step after which they stop, and the checkpoint is taken there.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import torch

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by SIGTERM/SIGUSR1/SIGINT after writing its checkpoint (EX_TEMPFAIL: resume
it)."""

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

STEP_HOOKS: list[Callable[[int, torch.nn.Module], None]] = []
"""Called as ``hook(step, model)`` after every optimizer step, before the stop check and the checkpoint:
lets tests act at an exact step (send a signal, freeze a rank, corrupt weights) without timing."""


def run_step_hooks(step: int, model: torch.nn.Module) -> None:
    for hook in STEP_HOOKS:
        hook(step, model)


class StopRequest:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag that every rank reads at the same step (a context manager that
    installs the handlers and, on exit, restores the previous ones, or ignores these signals from then on
    when one was received: the process is ending with its stop checkpoint and a repeat must not kill it)."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_IGN if self.received is not None else handler)

    def _handle(self, signum: int, frame: object) -> None:
        # Only a flag: the step in progress completes. Repeats are ignored on purpose: on preemption SLURM
        # signals every process and the launcher forwards its own copy, so a worker often gets two.
        self.received = self.received or signal.Signals(signum)

    def agreed(self, device: torch.device) -> str | None:
        """The signal's name if any rank received one, on every rank (a collective); None otherwise."""
        code = 0 if self.received is None else int(self.received)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([code], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            code = int(flag.item())
        return signal.Signals(code).name if code else None
