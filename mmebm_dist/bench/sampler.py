"""``mmebm bench langevin``: Langevin sampler backends against autograd and this machine's dense-matmul roof.

Per row (backend, batch): median wall time of one K-step chain over ``--repeats`` runs after one warm-up;
chain-steps x samples per second = K B / t; speed-up against autograd measured in the same run; achieved
GFLOP/s from the matmul FLOPs of forward f and grad_z f per step, 4B(dH + (L-1)H^2) + 2BH (see
mmebm_dist.kernels._utils.langevin_flops_per_step), and that as a fraction of the best 1024x1024 fp32 matmul
rate measured in the same run. Peak memory: on CPU the peak-RSS growth of one chain in a fresh subprocess (so
the allocator's reuse of earlier runs' pages cannot hide it); on CUDA torch.cuda.max_memory_allocated growth.
One extra row per backend at K = ``--long-steps`` shows whether memory grows with K. Times are never asserted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from mmebm_dist.bench.common import format_table, matmul_roof_gflops, num_threads, time_runs
from mmebm_dist.config import OptionError
from mmebm_dist.kernels._utils import langevin_flops_per_step
from mmebm_dist.kernels.langevin_torch import NOISE_CHUNK, WORKERS_ENV, auto_workers
from mmebm_dist.prior.energy import EnergyMLP
from mmebm_dist.prior.langevin import resolve_backend, sample


@dataclass(kw_only=True)
class LangevinBenchOptions:
    """What ``mmebm bench langevin`` times (its flags; the defaults are the command's)."""

    batch: Sequence[int] = (16, 256, 1024)
    """Batch sizes B."""
    latent: int = 32
    """Latent width d."""
    hidden: int = 200
    """Hidden width H of the energy MLP."""
    layers: int = 2
    """Hidden layers L of the energy MLP (1-4)."""
    steps: int = 60
    """Langevin steps K per chain."""
    long_steps: int = 240
    """K of the extra memory-vs-K row per backend (at the middle batch); 0 skips it."""
    step_size: float = 0.4
    """Langevin step size s."""
    activation: str = "leaky_relu"
    """Activation of the energy MLP (one of ``ACTIVATIONS``)."""
    reference: str = "laplace"
    """Reference density p0: laplace or gaussian."""
    backends: Sequence[str] | None = None
    """Backends to time (None: autograd and torch, plus triton on CUDA)."""
    repeats: int = 5
    """Timed chains per row (the median is reported)."""
    threads: int = 2
    """torch intra-op threads (CPU)."""
    device: str = "cpu"
    """Device to time on."""
    workers: int | None = None
    """torch backend on CPU ($MMEBM_LANGEVIN_WORKERS): 0 = intra-op threads, N = N row-split chains; None:
    auto."""
    no_memory: bool = False
    """Skip the peak-memory measurement."""
    json: bool = False
    """One JSON object per row instead of a table."""


def shape_matmul_ms(args, batch: int, steps: int, device: torch.device, repeats: int = 5) -> float:
    """Median ms of the chain's matmuls alone (forward and backward of every layer, K times, into preallocated
    outputs, no elementwise work), the faster of one thread and all threads: what a chain of this shape would
    take if matmuls were all it did."""
    best = _shape_matmul_ms(args, batch, steps, device, repeats)
    if device.type == "cpu" and torch.get_num_threads() > 1:
        with num_threads(1):
            best = min(best, _shape_matmul_ms(args, batch, steps, device, repeats))
    return best


def _shape_matmul_ms(args, batch: int, steps: int, device: torch.device, repeats: int) -> float:
    d, h, layers = args.latent, args.hidden, args.layers
    w_in, w_hid = torch.randn(h, d, device=device), torch.randn(max(layers - 1, 1), h, h, device=device)
    z, a, g, out_z = (torch.randn(batch, d, device=device), torch.empty(batch, h, device=device),
                      torch.randn(batch, h, device=device), torch.empty(batch, d, device=device))

    def matmuls(_run: int) -> None:
        for _ in range(steps):
            torch.mm(z, w_in.t(), out=a)
            for layer in range(layers - 1):
                torch.mm(g, w_hid[layer].t(), out=a)
                torch.mm(g, w_hid[layer], out=a)
            torch.mm(g, w_in, out=out_z)

    wall, _ = time_runs(matmuls, device, repeats)
    return 1e3 * statistics.median(wall)


def buffer_bytes(backend: str, batch: int, latent: int, hidden: int, layers: int, activation: str,
                 workers: int = 0) -> int | None:
    """Analytic working memory of one chain, flat in K: buffers plus weight copies; None for autograd."""
    fp32 = 4
    weight_copies = latent * hidden + (layers - 1) * hidden * hidden  # W^T (torch) / packed W (triton)
    if backend == "torch":
        # a_1..a_L, one act(a) buffer unless leaky_relu (in place), g_l (two when L > 1: ping-pong); z, sign,
        # eps; W^T per worker; a row-split chain also holds NOISE_CHUNK steps of fresh noise
        hidden_buffers = layers + (0 if activation == "leaky_relu" else 1) + min(layers, 2)
        noise_chunk = NOISE_CHUNK * batch * latent if workers > 1 else 0
        return fp32 * (hidden_buffers * batch * hidden + 3 * batch * latent + max(workers, 1) * weight_copies
                       + noise_chunk)
    if backend == "triton":
        return fp32 * ((layers + 2) * batch * hidden + batch * latent + weight_copies)  # pre, grad, z
    return None


def _setup(args, batch: int, device: torch.device):
    torch.manual_seed(0)
    energy = EnergyMLP(args.latent, args.hidden, args.layers, args.activation)
    energy = energy.to(device).requires_grad_(False)
    z0 = torch.randn(batch, args.latent, device=device)
    return energy, z0


def _chain(args, energy, z0, backend: str, steps: int, seed: int) -> torch.Tensor:
    generator = torch.Generator(device=z0.device).manual_seed(seed)
    return sample(energy, z0, steps=steps, step_size=args.step_size, reference=args.reference,
                  generator=generator, backend=backend)


def time_chain(args, backend: str, batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Median wall and process-CPU seconds of one chain over ``args.repeats`` runs (after one warm-up run).

    CPU time (all threads of this process) is reported beside wall time because it is far less sensitive to
    other processes sharing the cores.
    """
    energy, z0 = _setup(args, batch, device)
    wall, cpu = time_runs(lambda i: _chain(args, energy, z0, backend, steps, seed=i), device, args.repeats)
    return statistics.median(wall), statistics.median(cpu)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


def memory_probe(arg_json: str) -> None:
    """Subprocess body: peak-RSS growth (KiB) of one chain after set-up and a warm-up, printed as JSON."""
    spec = json.loads(arg_json)
    args = LangevinBenchOptions(**spec["args"])
    torch.set_num_threads(args.threads)
    # Warm up the libraries (thread pools, BLAS buffers) on one row and one step so they are not counted.
    energy, z0 = _setup(args, 1, torch.device("cpu"))
    _chain(args, energy, z0, spec["backend"], 1, seed=0)
    energy, z0 = _setup(args, spec["batch"], torch.device("cpu"))
    before = _rss_kib("VmRSS")
    _chain(args, energy, z0, spec["backend"], spec["steps"], seed=0)
    print(json.dumps({"peak_kib": _rss_kib("VmHWM") - before}))


def peak_memory_mib(args, backend: str, batch: int, steps: int, device: torch.device) -> float:
    """Peak memory growth of one chain (MiB): CUDA allocator peak, or peak RSS of a fresh CPU subprocess."""
    if device.type == "cuda":
        energy, z0 = _setup(args, batch, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _chain(args, energy, z0, backend, steps, seed=0)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    fields = ("latent", "hidden", "layers", "activation", "reference", "step_size", "threads")
    spec = json.dumps({"args": {k: getattr(args, k) for k in fields}, "batch": batch, "steps": steps,
                       "backend": backend})
    code = "import sys; from mmebm_dist.bench.sampler import memory_probe; memory_probe(sys.argv[1])"
    result = subprocess.run([sys.executable, "-c", code, spec], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe for backend={backend} batch={batch} failed:\n"
                           f"{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_kib"] / 1024


def _format_table(rows: list[dict]) -> str:
    header = ("backend", "workers", "batch", "d", "H x L", "K", "ms/chain", "cpu ms", "steps*samples/s",
              "vs autograd", "GFLOP/s", "% roof", "% shape roof", "peak MiB", "buffers MiB")
    return format_table(header, [
        (r["backend"], str(r["workers"]), str(r["batch"]), str(r["latent"]), r["mlp"], str(r["steps"]),
         f"{r['ms_per_chain']:.2f}", f"{r['cpu_ms_per_chain']:.2f}",
         f"{r['chain_steps_x_samples_per_s']:.3g}",
         "-" if r["speedup_vs_autograd"] is None else f"{r['speedup_vs_autograd']:.2f}x",
         f"{r['gflops']:.1f}", f"{100 * r['roof_fraction']:.0f}%", f"{100 * r['shape_roof_fraction']:.0f}%",
         "-" if r["peak_mib"] is None else f"{r['peak_mib']:.2f}",
         "-" if r["buffer_mib"] is None else f"{r['buffer_mib']:.2f}")
        for r in rows
    ])


def run(args: LangevinBenchOptions) -> int:
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.workers is not None:
        os.environ[WORKERS_ENV] = str(args.workers)  # read by the torch backend (and the memory probes)
    backends = args.backends or (["autograd", "torch"] + (["triton"] if device.type == "cuda" else []))
    energy, z0 = _setup(args, args.batch[0], device)
    for backend in backends:  # fail before timing anything if a backend cannot run here
        chosen = resolve_backend(energy, z0, backend)
        if chosen != backend:
            raise OptionError(f"mmebm bench langevin: backend '{backend}' would run as '{chosen}' here")
    roof = matmul_roof_gflops(device)
    plan = [(b, batch, args.steps) for batch in args.batch for b in backends]
    if args.long_steps:
        middle = sorted(args.batch)[len(args.batch) // 2]
        plan += [(b, middle, args.long_steps) for b in backends]
    rows, autograd_ms = [], {}
    shape_ms = {}
    for backend, batch, steps in tqdm(plan, desc="bench langevin", disable=args.json, file=sys.stderr):
        if (batch, steps) not in shape_ms:
            shape_ms[(batch, steps)] = shape_matmul_ms(args, batch, steps, device)
        seconds, cpu_seconds = time_chain(args, backend, batch, steps, device)
        if backend == "autograd":
            autograd_ms[(batch, steps)] = seconds
        flops = langevin_flops_per_step(batch, args.latent, args.hidden, args.layers) * steps
        workers = auto_workers(batch) if backend == "torch" and device.type == "cpu" else 0
        buffers = buffer_bytes(backend, batch, args.latent, args.hidden, args.layers, args.activation,
                               workers)
        rows.append(dict(
            backend=backend, batch=batch, latent=args.latent, mlp=f"{args.hidden}x{args.layers}", steps=steps,
            ms_per_chain=1e3 * seconds, chain_steps_x_samples_per_s=steps * batch / seconds,
            speedup_vs_autograd=None, gflops=flops / seconds / 1e9,
            roof_fraction=flops / seconds / 1e9 / roof,
            shape_roof_fraction=shape_ms[(batch, steps)] / 1e3 / seconds,
            peak_mib=None if args.no_memory else peak_memory_mib(args, backend, batch, steps, device),
            buffer_mib=None if buffers is None else buffers / 2**20,
            activation=args.activation, reference=args.reference, threads=args.threads, workers=workers,
            device=str(device),
            roof_gflops=roof, seconds_per_chain=seconds, cpu_ms_per_chain=1e3 * cpu_seconds,
        ))
    for row in rows:
        ref = autograd_ms.get((row["batch"], row["steps"]))
        if ref is not None:
            row["speedup_vs_autograd"] = ref / row["seconds_per_chain"]
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print("% shape roof: time of the chain's matmuls alone (same shapes, best of 1 and all threads, no "
              "elementwise work) over the chain's time")
        print(f"dense fp32 matmul roof (1024^3, best of 10) on {device}: {roof:.1f} GFLOP/s; {args.threads} "
              f"threads; FLOPs per step 4B(dH + (L-1)H^2) + 2BH; {args.activation}, {args.reference} p0")
        print(_format_table(rows))
    return 0
