"""``mmebm bench kernel-tiles``: the Triton Langevin kernel's tiles and warps, timed and checked on a GPU.

For each (batch, weight dtype, BLOCK_B x BLOCK_H x BLOCK_D, num_warps): the median time of one K-step chain
(CUDA events, after one warm-up launch that also compiles), and the largest deviation of z_K from the
plain-torch reference chain run with the same given noise (fp32 weights: exact fp32 dots, so this is
summation order only; bf16 weights: bf16 dot operands, so it is larger). The row the kernel's default tiles
would pick is marked. Under TRITON_INTERPRET=1 it runs on CPU too (slow: use tiny shapes); times are never
asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch
from tqdm import tqdm

from mmebm_dist.bench.common import format_table, time_runs
from mmebm_dist.kernels._utils import langevin_flops_per_step, langevin_reference
from mmebm_dist.prior.energy import ACTIVATIONS, EnergyMLP


def _tile(text: str) -> tuple[int, int, int]:
    try:
        b, h, d = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"tile {text!r}: expected BxHxD, e.g. 16x32x32") from None
    return b, h, d


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 256, 1024, 4096], help="batch sizes B")
    parser.add_argument("--latent", type=int, default=32, help="latent width d")
    parser.add_argument("--hidden", type=int, default=200, help="hidden width H")
    parser.add_argument("--layers", type=int, default=2, help="hidden layers L (1-4)")
    parser.add_argument("--steps", type=int, default=60, help="Langevin steps K")
    parser.add_argument("--step-size", type=float, default=0.4)
    parser.add_argument("--activation", default="gelu", choices=ACTIVATIONS)
    parser.add_argument("--reference", default="laplace", choices=("laplace", "gaussian"),
                        help="p0; under laplace the error includes rare sign flips of -sign(z) at z = 0 "
                             "(a jump of s^2), so gaussian shows the arithmetic error alone")
    parser.add_argument("--tiles", type=_tile, nargs="+",
                        default=[(16, 32, 32), (32, 32, 32), (16, 64, 32), (64, 32, 32), (32, 64, 64)],
                        metavar="BxHxD", help="tile sizes BLOCK_B x BLOCK_H x BLOCK_D (powers of two >= 16)")
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8], help="num_warps values")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=("float32", "bfloat16"),
                        help="weight dtypes (the chain state is fp32 either way)")
    parser.add_argument("--repeats", type=int, default=10, help="timed chains per row (median)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of a table")


def run(args) -> int:
    from mmebm_dist.kernels import langevin_triton as lt

    device = torch.device(args.device)
    reason = lt.triton_can_launch(device)
    if reason is not None:
        raise SystemExit(f"mmebm bench kernel-tiles: {reason}")
    torch.manual_seed(0)
    energy = EnergyMLP(args.latent, args.hidden, args.layers, args.activation).to(device)
    energy.requires_grad_(False)
    plan = [(batch, dtype, tile, warps) for batch in args.batch for dtype in args.dtypes
            for tile in args.tiles for warps in args.warps]
    rows, references = [], {}
    progress = tqdm(plan, desc="bench kernel-tiles", disable=args.json, file=sys.stderr)
    for batch, dtype, tile, warps in progress:
        weights = [(w.to(getattr(torch, dtype)), b) for w, b in energy.weights()]
        gen = torch.Generator(device=device).manual_seed(batch)
        z0 = torch.randn(batch, args.latent, device=device, generator=gen)
        noise = torch.randn(args.steps, batch, args.latent, device=device, generator=gen)
        kwargs = dict(steps=args.steps, step_size=args.step_size, activation=args.activation,
                      reference=args.reference)
        if (batch, dtype) not in references:
            ref_weights = [(w.float(), b.float()) for w, b in weights]  # bf16-rounded weights, fp32 math
            references[(batch, dtype)] = langevin_reference(ref_weights, z0, noise=noise, **kwargs)[0]
        try:
            out = lt.langevin_triton(weights, z0, noise=noise, block_sizes=tile, num_warps=warps, **kwargs)
            error = (out.z - references[(batch, dtype)]).abs().max().item()
            def chain(_run, weights=weights, z0=z0, tile=tile, warps=warps, kwargs=kwargs):
                lt.langevin_triton(weights, z0, block_sizes=tile, num_warps=warps, **kwargs)

            seconds = statistics.median(time_runs(chain, device, args.repeats, cuda_events=True)[0])
            failure = None
        except Exception as exc:  # a tile the compiler rejects (out of shared memory) is a row, not a crash
            error, seconds, failure = None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        flops = langevin_flops_per_step(batch, args.latent, args.hidden, args.layers) * args.steps
        default_tile = lt._block_sizes(args.hidden, args.latent, getattr(torch, dtype))
        rows.append(dict(batch=batch, dtype=dtype, tile="x".join(map(str, tile)), num_warps=warps,
                         default=tile == default_tile and warps == 4,
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
          "error = max |z_K - reference| with the same noise; * = default tiles")
    header = ("batch", "weights", "tile BxHxD", "warps", "ms/chain", "GFLOP/s", "max abs error", "")
    print(format_table(header, [
        (str(r["batch"]), r["dtype"], r["tile"] + ("*" if r["default"] else ""), str(r["num_warps"]),
         "-" if r["ms_per_chain"] is None else f"{r['ms_per_chain']:.3f}",
         "-" if r["gflops"] is None else f"{r['gflops']:.0f}",
         "-" if r["max_abs_error"] is None else f"{r['max_abs_error']:.2e}",
         r["failure"] or "")
        for r in rows
    ]))
    return 0
