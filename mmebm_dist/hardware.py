"""What the hardware computes natively: resolves ``train.mixed_precision=auto`` to ``bf16`` or ``no``.

bf16 autocast pays only where bf16 matmuls run in hardware: CUDA GPUs of compute capability >= 8.0 (Ampere
and later) and CPUs with AMX-BF16 or AVX512-BF16 (Linux /proc/cpuinfo flags ``amx_bf16``, ``avx512_bf16``).
Elsewhere torch emulates bf16 (measured 10x slower than fp32 on an AVX2-only AMD EPYC), so auto keeps fp32.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MIXED_PRECISIONS = ("auto", "no", "bf16")
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    """The CPU feature flags from /proc/cpuinfo (empty where the file is missing: not Linux)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` runs bf16 matmuls in hardware, the evidence in words)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        name = torch.cuda.get_device_name(device)
        return major >= 8, f"{name}, compute capability {major}.{minor} (bf16 tensor cores from 8.0)"
    if device.type == "cpu":
        found = sorted(cpu_flags() & set(CPU_BF16_FLAGS))
        capability = torch.backends.cpu.get_cpu_capability()
        if found:
            return True, f"CPU flags {', '.join(found)} (torch CPU capability {capability})"
        return False, f"no {' or '.join(CPU_BF16_FLAGS)} CPU flag (torch CPU capability {capability})"
    return False, f"device type {device.type} (bf16 auto-detection covers cuda and cpu)"


def resolve_mixed_precision(value: str, device: torch.device, *, announce: bool = True) -> str:
    """``train.mixed_precision`` as accelerate takes it: ``auto`` becomes ``bf16`` where native, else ``no``.

    ``announce`` logs the choice and its evidence (pass it on rank 0 only). YAML reads a bare ``no`` as
    false, which the config loader keeps as the string ``false``: it means ``no``.
    """
    value = "no" if value == "false" else value
    if value not in MIXED_PRECISIONS:
        raise ValueError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, got '{value}'")
    if value != "auto":
        return value
    native, evidence = native_bf16(device)
    chosen = "bf16" if native else "no"
    if announce:
        log.info("train.mixed_precision=auto -> %s: %s", "bf16 autocast" if native else "fp32", evidence)
    return chosen
