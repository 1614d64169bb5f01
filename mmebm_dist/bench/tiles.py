"""``mmebm bench kernel-tiles``: the Triton Langevin kernels' tiles, precisions and warps, timed and checked.

For each (batch, dot precision, kernel and its tile, num_warps): the median time of one K-step chain (CUDA
events, after one warm-up launch that also compiles), and the largest deviation of z_K from the plain-torch
fp32 reference chain run with the same given noise (ieee: summation order only; tf32 / bf16: the operand
rounding too). Kernels: ``resident`` (weights on chip; its tile is the rows per program, BLOCK_B) and
``streaming`` (BLOCK_B x BLOCK_H x BLOCK_D tiles through scratch). The rows the launcher's defaults would
pick are marked. Under TRITON_INTERPRET=1 it runs on CPU too (slow: use tiny shapes); times are never
asserted.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mmebm_dist.bench.common import format_table, time_runs
from mmebm_dist.config import OptionError
from mmebm_dist.kernels._utils import FusedSpec, langevin_flops_per_step, langevin_reference, spec_energy
from mmebm_dist.prior.energy import EnergyMLP


@dataclass(kw_only=True)
class TilesBenchOptions:
    """What ``mmebm bench kernel-tiles`` times (its flags; the defaults are the command's)."""

    batch: Sequence[int] = (16, 256, 1024, 4096)
    """Batch sizes B."""
    latent: int = 32
    """Latent width d."""
    hidden: int = 200
    """Hidden width H."""
    layers: int = 2
    """Hidden layers L (1-4)."""
    steps: int = 60
    """Langevin steps K."""
    step_size: float = 0.4
    """Langevin step size s."""
    activation: str = "gelu"
    """Activation of the energy MLP (one of ``ACTIVATIONS``)."""
    reference: str = "laplace"
    """p0: laplace or gaussian."""
    kernels: Sequence[str] = ("resident", "streaming")
    """Which Triton kernels to time."""
    tiles: Sequence[tuple[int, int, int]] = ((16, 32, 32), (16, 64, 32), (16, 128, 32), (32, 64, 64))
    """Streaming kernel: BLOCK_B x BLOCK_H x BLOCK_D (powers of two >= 16)."""
    rows: Sequence[int] = (16, 32, 64)
    """Resident kernel: rows per program BLOCK_B (powers of two >= 16)."""
    warps: Sequence[int] = (4, 8)
    """num_warps values."""
    precisions: Sequence[str] = ("ieee", "tf32", "bf16")
    """Dot operands (fp32 accumulation, fp32 chain state in every case)."""
    repeats: int = 10
    """Timed chains per row (median)."""
    device: str = "cpu"
    """Device to time on."""
    json: bool = False
    """One JSON object per row instead of a table."""


def run(args: TilesBenchOptions) -> int:
    from mmebm_dist.kernels import langevin_triton as lt

    device = torch.device(args.device)
    reason = lt.triton_can_launch(device)
    if reason is not None:
        raise OptionError(f"mmebm bench kernel-tiles: {reason}")
    torch.manual_seed(0)
    energy = EnergyMLP(args.latent, args.hidden, args.layers, args.activation).to(device)
    energy.requires_grad_(False)
    tiles = {"resident": [(rows,) for rows in args.rows], "streaming": args.tiles}
    plan = [(batch, precision, kernel, tile, warps) for batch in args.batch for precision in args.precisions
            for kernel in args.kernels for tile in tiles[kernel] for warps in args.warps]
    rows, references = [], {}
    weights = energy.weights()
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    progress = tqdm(plan, desc="bench kernel-tiles", disable=args.json, file=sys.stderr)
    for batch, precision, kernel, tile, warps in progress:
        gen = torch.Generator(device=device).manual_seed(batch)
        z0 = torch.randn(batch, args.latent, device=device, generator=gen)
        noise = torch.randn(args.steps, batch, args.latent, device=device, generator=gen)
        kwargs = dict(steps=args.steps, step_size=args.step_size, activation=args.activation,
                      reference=args.reference, precision=precision, kernel=kernel, num_warps=warps)
        if kernel == "resident":
            kwargs["rows"] = tile[0]
        else:
            kwargs["block_sizes"] = tile
        if batch not in references:
            references[batch] = langevin_reference(spec_energy(FusedSpec(weights, args.activation)), z0,
                                                   noise=noise, steps=args.steps, step_size=args.step_size,
                                                   reference=args.reference).z
        try:
            out = lt.langevin_triton(weights, z0, noise=noise, **kwargs)
            error = (out.z - references[batch]).abs().max().item()
            def chain(_run, z0=z0, kwargs=kwargs):
                lt.langevin_triton(weights, z0, **kwargs)

            seconds = statistics.median(time_runs(chain, device, args.repeats, cuda_events=True)[0])
            failure = None
        except Exception as exc:  # a tile the compiler rejects (out of shared memory) is a row, not a crash
            error, seconds, failure = None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        flops = langevin_flops_per_step(batch, args.latent, args.hidden, args.layers) * args.steps
        if kernel == "resident":
            default = tile[0] == lt.rows_per_program(batch, sms) and warps == 4
        else:
            default = tile == lt._block_sizes(args.hidden, args.latent,
                                              torch.bfloat16 if precision == "bf16" else torch.float32)
            default = default and warps == 4 and "resident" not in args.kernels
        rows.append(dict(batch=batch, precision=precision, kernel=kernel, tile="x".join(map(str, tile)),
                         num_warps=warps, default=default,
                         ms_per_chain=None if seconds is None else 1e3 * seconds,
                         gflops=None if seconds is None else flops / seconds / 1e9,
                         max_abs_error=error, failure=failure, steps=args.steps, latent=args.latent,
                         mlp=f"{args.hidden}x{args.layers}", activation=args.activation,
                         reference=args.reference, device=str(device)))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"Triton Langevin kernel on {device} ({name}): "
          f"d={args.latent}, {args.hidden}x{args.layers} {args.activation}, {args.reference} p0, "
          f"K={args.steps}; "
          "error = max |z_K - fp32 reference| with the same noise; * = the launcher's default")
    header = ("batch", "dots", "kernel", "tile", "warps", "ms/chain", "GFLOP/s", "max abs error", "")
    print(format_table(header, [
        (str(r["batch"]), r["precision"], r["kernel"], r["tile"] + ("*" if r["default"] else ""),
         str(r["num_warps"]),
         "-" if r["ms_per_chain"] is None else f"{r['ms_per_chain']:.3f}",
         "-" if r["gflops"] is None else f"{r['gflops']:.0f}",
         "-" if r["max_abs_error"] is None else f"{r['max_abs_error']:.2e}",
         r["failure"] or "")
        for r in rows
    ]))
    return 0
