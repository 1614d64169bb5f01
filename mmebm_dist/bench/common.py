"""Shared by the benchmarks: device sync, timed repeats of a callable, the thread count for a block, this
machine's dense-matmul roof and plain-text tables. Nothing here asserts a time."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA ``device`` (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    fn: Callable[[int], Any],
    device: torch.device,
    repeats: int,
    *,
    warmup: int = 1,
    cuda_events: bool = False,
) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of ``fn(i)`` for each of ``repeats`` runs after ``warmup`` untimed ones
    (``i`` counts every run from 0, e.g. to seed each one).

    Wall time runs from a synchronised ``device`` to the end of the call's work on it; with ``cuda_events`` on
    a CUDA device it is the time between CUDA events recorded around the call (its GPU time, without launch
    and synchronisation latency). CPU time (all threads of this process) is far less sensitive than wall time
    to other processes sharing the cores.
    """
    for i in range(warmup):
        fn(i)
    events = cuda_events and device.type == "cuda"
    wall, cpu = [], []
    for i in range(warmup, warmup + repeats):
        sync(device)
        start_cpu = time.process_time()
        if events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            wall.append(start.elapsed_time(end) / 1e3)
        else:
            start_wall = time.perf_counter()
            fn(i)
            sync(device)
            wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


@contextlib.contextmanager
def num_threads(n: int):
    """torch's intra-op thread count set to ``n`` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def matmul_roof_gflops(device: torch.device, size: int = 1024, repeats: int = 10) -> float:
    """Best fp32 size x size matmul rate on ``device`` over ``repeats + 1`` runs: the roof a benchmark's
    achieved GFLOP/s is compared with."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    wall, _ = time_runs(lambda i: torch.mm(a, b, out=out), device, repeats + 1, warmup=0)
    return 2 * size**3 / min(wall) / 1e9


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """``header`` and ``rows`` as lines of right-aligned columns two spaces apart."""
    lines = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines)
