"""``mmebm bench train``: training-step throughput and where a step's time goes, for 1 and 2 processes.

Each measurement runs in fresh processes (``accelerate launch`` for several; ``train.threads`` threads each)
and reports samples/s (all ranks), seconds per step, peak RSS per rank and per-phase times of the training
loop's own ``train_step`` (built by its ``setup``; accumulation, clipping, scheduler and runaway check
included): data wait, encode, Langevin, decode, objective (the rest of the forward), backward (local),
communication, optimizer (the rest of the step). Encoders, decoders and ``sample_prior`` are timed with
forward hooks and a wrapper on the unwrapped model, the forward and ``accelerator.backward`` with wrappers;
communication is backward-with-gradient-sync minus backward under ``no_sync`` (an estimate, as DDP overlaps
the all-reduce with the backward). Then the scaling efficiency of P processes against one, and the EBM prior's
overhead: the same model with ``model.prior.kind=laplace``. The arithmetic of one step (forward and backward,
counted over torch's flop registry on a plain copy of the model) gives the achieved GFLOP/s,
set beside this machine's dense fp32 matmul roof at the same thread count. Nothing here asserts a time.

``--compile off default`` measures the eager and the compiled step (``train.compile``) side by side in one
run, each with ``graph_breaks`` (dynamo's count while compiling the step; None eager) and ``kernels_per_step``
(one profiled step: on the CPU the leaf ops that compute, i.e. ATen ops eager and inductor's generated
kernels plus the ATen calls they keep compiled, views and allocations left out; on CUDA the device kernels):
the CPU's proxy for a GPU's kernel launches.
"""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from mmebm_dist.bench.common import matmul_roof_gflops, num_threads, sync

PHASES = ("data", "encode", "langevin", "decode", "objective", "backward", "communication", "optimizer")


# ------------------------------------------------------------------------------------------------ one rank


class PhaseTimer:
    """Wall time per phase, summed; ``sync`` makes CUDA work finish before a clock is read."""

    def __init__(self, device: torch.device):
        self.totals: dict[str, float] = defaultdict(float)
        self._open: dict[int, float] = {}
        self._device = device

    def now(self) -> float:
        sync(self._device)
        return time.perf_counter()

    def time_modules(self, modules: list[torch.nn.Module], phase: str) -> None:
        for module in modules:
            module.register_forward_pre_hook(lambda m, args: self._open.__setitem__(id(m), self.now()))
            module.register_forward_hook(lambda m, args, out, phase=phase: self._close(id(m), phase))

    def _close(self, key: int, phase: str) -> None:
        self.totals[phase] += self.now() - self._open.pop(key)

    def time_method(self, obj: Any, name: str, phase: str) -> None:
        inner = getattr(obj, name)

        def timed(*args, **kwargs):
            start = self.now()
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[phase] += self.now() - start

        setattr(obj, name, timed)


def _synthetic_batches(cfg):
    """One random batch of the modalities' shapes, repeated: ``(epoch, index, batch)`` as the loop reads."""
    generator = torch.Generator().manual_seed(0)
    batch = {
        m.name: torch.rand(cfg.data.batch_size, *m.shape, generator=generator) for m in cfg.model.modalities
    }
    batch["label"] = torch.randint(0, 10, (cfg.data.batch_size,), generator=generator)
    while True:
        yield 0, 0, batch


# Leaf ops that move no data through arithmetic: views, metadata and allocations (not kernels).
_NOT_KERNELS = frozenset({
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view",
    "aten::as_strided", "aten::reshape", "aten::expand", "aten::t", "aten::transpose", "aten::permute",
    "aten::squeeze", "aten::unsqueeze", "aten::select", "aten::slice", "aten::alias", "aten::detach",
    "aten::lift_fresh", "aten::resize_", "aten::set_", "aten::split", "aten::split_with_sizes",
    "aten::unbind", "aten::chunk", "aten::narrow", "aten::result_type", "aten::is_nonzero", "aten::item",
    "aten::_local_scalar_dense", "aten::unflatten", "aten::flatten", "aten::broadcast_tensors",
    "aten::_reshape_alias", "aten::numpy_T", "aten::contiguous", "aten::size", "aten::stride", "detach",
})


_KERNEL_EVENT = re.compile(r"^(\w+::\w|graph_\d+_cpp_)")
"""A CPU profiler event that can be a kernel: an operator (aten::, mkldnn::, ...) or an inductor C++ kernel
(``graph_<n>_cpp_fused_...``); the profiler's and dynamo's own markers (cache lookup, wrappers) are not."""


def kernels_per_step(run_step: Callable[[], Any], device: torch.device) -> int:
    """Kernels one call of ``run_step`` launches, from torch.profiler: CUDA kernels on a GPU; on the CPU the
    leaf CPU events that compute (ATen ops eager; inductor's kernels, recorded when
    ``torch._inductor.config.cpp.enable_kernel_profile`` was set before compiling, and the ATen calls it
    keeps compiled), views, metadata and allocations (``_NOT_KERNELS``) left out."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_step()
        sync(device)
    events = prof.events()
    if device.type == "cuda":
        return sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return sum(1 for e in events if not e.cpu_children and _KERNEL_EVENT.match(e.name)
               and e.name not in _NOT_KERNELS)


def worker(cfg, *, steps: int, warmup: int, synthetic: bool) -> dict[str, Any]:
    """Time ``steps`` calls of the loop's ``train_step`` on this rank (after ``warmup``), built by the loop's
    ``setup`` (nothing written to the run directory); returns this rank's figures."""
    from torch._dynamo.utils import counters

    from mmebm_dist.train.capture import compile_mode
    from mmebm_dist.train.loop import setup, train_step

    if compile_mode(cfg.train.compile, torch.device("cuda" if torch.cuda.is_available() else "cpu")) != "off":
        from torch._inductor import config as inductor_config

        inductor_config.cpp.enable_kernel_profile = True  # kernels_per_step sees inductor's kernels
    session = setup(cfg, record=False, batches=_synthetic_batches(cfg) if synthetic else None)
    accelerator, unwrapped = session.accelerator, session.unwrapped
    world, info = session.world, session.info

    captured = compile_mode(cfg.train.compile, accelerator.device) != "off"
    timer = PhaseTimer(accelerator.device)
    if not captured:  # hooks inside a compiled forward would split its graph (and its CUDA graph) per module
        timer.time_modules(list(unwrapped.encoders.values()), "encode")
        timer.time_modules(list(unwrapped.decoders.values()), "decode")
        timer.time_method(unwrapped, "sample_prior", "langevin")
    timer.time_method(session.model, "forward", "forward")
    timer.time_method(accelerator, "backward", "backward")
    counter = iter(range(1, warmup + 2 * steps + 1))

    def step() -> dict[str, float]:
        timer.totals.clear()
        session.data_wait = 0.0
        t0 = timer.now()
        train_step(session, next(counter))
        total = timer.now() - t0
        inner = {k: timer.totals[k] for k in ("encode", "langevin", "decode")}
        measured = session.data_wait + timer.totals["forward"] + timer.totals["backward"]
        return {
            "data": session.data_wait,
            **inner,
            "objective": timer.totals["forward"] - sum(inner.values()),
            "backward": timer.totals["backward"],
            "optimizer": total - measured,  # the rest: clipping, update, scheduler, runaway check
            "total": total,
        }

    compile_start = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - compile_start
    graph_breaks = sum(counters["graph_break"].values()) if captured else None
    accelerator.wait_for_everyone()
    synced = [step() for _ in range(steps)]
    kernels = kernels_per_step(step, accelerator.device)
    # DeepSpeed reduces (ZeRO-2/3 refuse no_sync) and steps the optimizer inside its backward: there the
    # backward phase holds communication and the optimizer step, and communication is not separated.
    separable = world > 1 and info["distributed_type"] != "DEEPSPEED"
    local = synced
    if separable:  # gradient sync off: the same backward without communication (replicas drift: timing only)
        with accelerator.no_sync(session.model):
            local = [step() for _ in range(steps)]
    accelerator.wait_for_everyone()

    mean = {k: statistics.fmean(s[k] for s in synced) for k in synced[0]}
    backward_local = statistics.fmean(s["backward"] for s in local)
    phases = {k: mean[k] for k in ("data", "encode", "langevin", "decode", "objective", "optimizer")}
    phases["backward"] = min(backward_local, mean["backward"])
    phases["communication"] = max(0.0, mean["backward"] - backward_local) if separable or world == 1 else None
    if captured:  # the forward is one compiled unit: its phases are not separated (s/step still is)
        phases.update(encode=None, langevin=None, decode=None, objective=None)
    elif unwrapped.energy is not None and cfg.model.prior.langevin.steps > 0 and phases["langevin"] == 0.0:
        raise RuntimeError(
            "no time was spent in model.sample_prior during the forward: the model no longer "
            "samples its prior there; update the Langevin timer in mmebm_dist/bench/train_step.py"
        )
    accelerator.end_training()
    return {
        "process_index": info["process_index"],
        "num_processes": world,
        "seconds_per_step": mean["total"],
        "phases_s": phases,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "graph_breaks": graph_breaks,
        "kernels_per_step": kernels,
        "warmup_s": warmup_s,
        "device": info["device"],
        "distributed_type": info["distributed_type"],
        "threads": info["threads"],
        "zero_stage": info["zero_stage"],
    }


# ------------------------------------------------------------------------------------------------ driver


class _FlopCount(TorchDispatchMode):
    """Counts the FLOPs of the ops torch's flop registry knows (convolutions, matmuls, attention), forward and
    backward. FlopCounterMode itself tracks modules with autograd hooks that refuse the torch.autograd.grad
    calls inside the EBM prior's forward, hence this plain dispatch mode over the same registry."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        count = flop_registry.get(func._overloadpacket)
        if count is None:
            decomposed = func.decompose(*args, **kwargs)  # e.g. linear -> addmm, counted below
            if decomposed is not NotImplemented:
                return decomposed
        out = func(*args, **kwargs)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def step_flops(cfg) -> float:
    """FLOPs of one training step's forward and backward at cfg.data.batch_size, counted on a plain
    (uncompiled, fp32, single-process) copy of the model and a synthetic batch: the arithmetic of the step,
    whatever runs it (convolutions and matmuls; elementwise work is not counted)."""
    from mmebm_dist.models import build_model

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    batch = next(_synthetic_batches(cfg))[2]
    with _FlopCount() as counter:
        model(batch)["loss"].backward()
    return float(counter.total)


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Unsupported|Failed)\b: ")


def _worker_error(stderr: str, keep: int = 4000) -> str:
    """A failed worker's stderr cut to ``keep`` characters: its first exception line (a compiler's message
    may be followed by pages of graph), then the tail."""
    first = next((line for line in stderr.splitlines() if _EXCEPTION_LINE.match(line)), None)
    tail = stderr[-keep:]
    return tail if first is None or first in tail else f"{first}\n[...]\n{tail}"


def _launch(
    processes: int, worker_spec: dict[str, Any], threads: int, accelerate_config: str | None
) -> list[dict]:
    """Run the worker in ``processes`` fresh processes (accelerate launch when > 1: DDP or the given YAML);
    ``worker_spec``: config, steps, warmup, synthetic, overrides (see :func:`_worker_main`)."""
    from mmebm_dist.train.distributed import free_port

    with tempfile.TemporaryDirectory(prefix="mmebm-bench-") as tmp:
        out = Path(tmp) / "rank"
        module = ["-m", "mmebm_dist.bench.train_step", json.dumps({**worker_spec, "out": str(out)})]
        launch = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(processes),
            "--main_process_port",
            str(free_port()),
        ]
        if processes == 1:
            cmd = [sys.executable, *module]
        elif accelerate_config:
            cmd = [*launch, "--config_file", accelerate_config, *module]
        else:
            cmd = [
                *launch,
                "--multi_gpu",
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                *module,
            ]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark worker failed ({' '.join(cmd)}):\n{_worker_error(proc.stderr)}")
        return [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank-*.json"))]


def _measurement(
    cfg, prior: str, processes: int, ranks: list[dict], steps: int, config_path: str, flops: float,
    roof: float,
) -> dict:
    from mmebm_dist.config import config_hash
    from mmebm_dist.train.capture import mode_name

    if len(ranks) != processes or {r["num_processes"] for r in ranks} != {processes}:
        raise RuntimeError(
            f"asked for {processes} processes, the workers report "
            f"{[(r['process_index'], r['num_processes']) for r in ranks]}"
        )
    seconds = max(r["seconds_per_step"] for r in ranks)  # the step ends when the slowest rank is done
    phases = {
        k: None if ranks[0]["phases_s"][k] is None else statistics.fmean(r["phases_s"][k] for r in ranks)
        for k in PHASES
    }
    return {
        "bench": "train",
        "config": config_path,
        "config_hash": config_hash(cfg),
        "prior": prior,
        "compile": mode_name(cfg.train.compile),
        "processes": processes,
        "threads_per_process": ranks[0]["threads"],
        "batch_size": cfg.data.batch_size,
        "steps": steps,
        "samples_per_s": processes * cfg.data.batch_size / seconds,
        "seconds_per_step": seconds,
        "gflop_per_step": processes * flops / 1e9,  # one optimiser step of all processes
        "achieved_gflops": processes * flops / seconds / 1e9,
        "roof_gflops": roof,
        "roof_threads": processes * ranks[0]["threads"],
        "roof_fraction": processes * flops / seconds / 1e9 / roof,
        "phases_ms": {k: None if v is None else 1e3 * v for k, v in phases.items()},
        "graph_breaks": ranks[0]["graph_breaks"],
        "kernels_per_step": ranks[0]["kernels_per_step"],
        "warmup_s": max(r["warmup_s"] for r in ranks),
        "peak_rss_mb": [round(r["peak_rss_mb"], 1) for r in sorted(ranks, key=lambda r: r["process_index"])],
        "device": ranks[0]["device"],
        "distributed_type": ranks[0]["distributed_type"],
        "zero_stage": ranks[0]["zero_stage"],
        "langevin_steps": cfg.model.prior.langevin.steps,
        "model_width": cfg.model.width,
    }


def _cell(value: float | None) -> str:
    return f"{'-':>8}" if value is None else f"{value:>8.2f}"


def _table(rows: list[dict]) -> str:
    head = (
        f"{'prior':8} {'compile':>15} {'mode':>7} {'procs':>5} {'batch':>5} {'samples/s':>10} {'s/step':>8} "
        + " ".join(f"{p[:8]:>8}" for p in PHASES)
        + f" {'rss MB':>14} {'scaling':>7} {'ebm +%':>7} {'GFLOP/s':>8} {'% roof':>6}"
        + f" {'breaks':>6} {'kernels':>7} {'x eager':>7} {'kern /':>6}"
    )
    lines = [head, "-" * len(head), f"{'':63}" + "phase times in ms per step (mean over ranks)"]
    for r in rows:
        scaling = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else ""
        overhead = f"{100 * r['ebm_overhead']:.0f}" if "ebm_overhead" in r else ""
        mode = f"ZeRO-{r['zero_stage']}" if r["zero_stage"] else ("DDP" if r["processes"] > 1 else "single")
        breaks = "-" if r["graph_breaks"] is None else str(r["graph_breaks"])
        speedup = f"{r['speedup_vs_eager']:.2f}" if "speedup_vs_eager" in r else ""
        fewer = f"{r['kernels_fewer_than_eager']:.1f}" if "kernels_fewer_than_eager" in r else ""
        lines.append(
            f"{r['prior']:8} {r['compile']:>15} {mode:>7} {r['processes']:>5} {r['batch_size']:>5} "
            f"{r['samples_per_s']:>10.1f} "
            f"{r['seconds_per_step']:>8.4f} "
            + " ".join(_cell(r["phases_ms"][p]) for p in PHASES)
            + f" {'/'.join(f'{m:.0f}' for m in r['peak_rss_mb']):>14} {scaling:>7} {overhead:>7}"
            + f" {r['achieved_gflops']:>8.1f} {100 * r['roof_fraction']:>5.0f}%"
            + f" {breaks:>6} {r['kernels_per_step']:>7} {speedup:>7} {fewer:>6}"
        )
    roofs = sorted({(r["roof_threads"], r["roof_gflops"]) for r in rows})
    lines.append(
        "GFLOP/s: the step's convolution and matmul FLOPs (forward and backward) per second, all processes; "
        "% roof: against the dense fp32 1024^3 matmul rate at the same total thread count ("
        + ", ".join(f"{gflops:.1f} GFLOP/s at {threads} thread(s)" for threads, gflops in roofs)
        + "); breaks: dynamo graph breaks of the compiled step; kernels: per step (CPU: leaf compute ops); "
        "x eager: samples/s over the eager row's; kern /: eager kernels over these"
    )
    return "\n".join(lines)


def timed_config(path: str, overrides: list[str]):
    """The config a measurement times and the overrides that make it. A staged run (``train.schedule``) is
    timed as its joint stage, a plain run (``train.schedule=[]``): that is the EBM step (encoders, decoders
    and energy, prior samples in the forward); its reference stage's step is the Laplace row's, and the
    Laplace twin of a staged config could not load (its stages other than joint need the EBM)."""
    from mmebm_dist.config import load_config

    cfg = load_config(path, overrides)
    if cfg.train.schedule:
        print(f"{path} has a train.schedule: timing its joint stage (train.schedule=[]); its reference "
              "stage's step is the Laplace row's", file=sys.stderr)
        overrides = [*overrides, "train.schedule=[]"]
        cfg = load_config(path, overrides)
    return cfg, overrides


@dataclass(kw_only=True)
class TrainBenchOptions:
    """What ``mmebm bench train`` measures (its flags; the defaults are the command's)."""

    config: str
    """Experiment YAML (configs/...)."""
    batch_size: int | None = None
    """Per-process batch (None: data.batch_size)."""
    steps: int = 20
    """Timed steps per measurement."""
    warmup: int = 3
    """Untimed steps first."""
    processes: Sequence[int] = (1, 2)
    """Process counts to measure."""
    threads: int = 1
    """torch threads per process."""
    no_laplace: bool = False
    """Skip the Laplace-prior baseline (EBM overhead)."""
    synthetic: bool = False
    """Random batches of the modalities' shapes instead of the shards at data.path."""
    accelerate_config: str | None = None
    """Launch several processes with this accelerate YAML instead of plain DDP (``processes`` overrides its
    count)."""
    compile: Sequence[str] | None = None
    """train.compile modes to measure side by side (None: the config's)."""
    json: bool = False
    """Print one JSON object per measurement."""
    out: str | None = None
    """Also write the JSON lines to this file."""
    overrides: Sequence[str] = ()
    """Dotted config overrides."""


def run(args: TrainBenchOptions) -> int:
    from mmebm_dist.config import load_config

    overrides = list(args.overrides) + [f"train.threads={args.threads}"]
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    cfg, overrides = timed_config(args.config, overrides)
    base = {"config": args.config, "steps": args.steps, "warmup": args.warmup, "synthetic": args.synthetic}
    priors = [cfg.model.prior.kind]
    if cfg.model.prior.kind == "ebm" and not args.no_laplace:
        priors.append("laplace")
    modes = args.compile or [cfg.train.compile]
    rows = []
    roofs: dict[tuple[str, int], float] = {}
    flops: dict[str, float] = {}
    for mode in modes:
        for prior in priors:
            worker_overrides = overrides + [f"model.prior.kind={prior}", f"train.compile={mode}"]
            prior_cfg = load_config(args.config, worker_overrides)
            for processes in args.processes if prior == priors[0] else [1]:
                ranks = _launch(processes, {**base, "overrides": worker_overrides}, args.threads,
                                args.accelerate_config)
                # After the timed workers, so that neither the count nor the roof shares the cores with them.
                if prior not in flops:
                    flops[prior] = step_flops(prior_cfg)
                device = torch.device("cuda" if ranks[0]["device"].startswith("cuda") else "cpu")
                key = (device.type, processes * args.threads)
                if key not in roofs:
                    with num_threads(key[1]):
                        roofs[key] = matmul_roof_gflops(device)
                rows.append(_measurement(prior_cfg, prior, processes, ranks, args.steps, args.config,
                                         flops[prior], roofs[key]))
                if not args.json:
                    print(f"measured {prior} x {processes} process(es), train.compile={mode}",
                          file=sys.stderr)
    _relate(rows)
    lines = [json.dumps(r) for r in rows]
    print("\n".join(lines) if args.json else _table(rows))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


def _relate(rows: list[dict]) -> None:
    """Add the ratios between rows of one run: scaling over processes and the EBM's overhead (same compile
    mode), and a compiled row's speed-up and kernel reduction against the eager row of its prior and size."""
    by_key = {(r["compile"], r["prior"], r["processes"]): r for r in rows}
    for r in rows:
        one = by_key.get((r["compile"], r["prior"], 1))
        if r["processes"] > 1 and one is not None:
            r["scaling_efficiency"] = r["samples_per_s"] / (r["processes"] * one["samples_per_s"])
        ebm = by_key.get((r["compile"], "ebm", 1))
        if r["prior"] == "laplace" and ebm is not None:
            r["ebm_overhead"] = ebm["seconds_per_step"] / r["seconds_per_step"] - 1
        eager = by_key.get(("off", r["prior"], r["processes"]))
        if r["compile"] != "off" and eager is not None:
            r["speedup_vs_eager"] = r["samples_per_s"] / eager["samples_per_s"]
            r["kernels_fewer_than_eager"] = eager["kernels_per_step"] / max(r["kernels_per_step"], 1)


def _worker_main(spec_json: str) -> int:
    """Worker process body (``python -m mmebm_dist.bench.train_step SPEC``): SPEC is the JSON object
    :func:`_launch` writes (out, config, steps, warmup, synthetic, overrides)."""
    from mmebm_dist.config import load_config

    spec = json.loads(spec_json)
    cfg = load_config(spec["config"], spec["overrides"])
    result = worker(cfg, steps=spec["steps"], warmup=spec["warmup"], synthetic=spec["synthetic"])
    Path(f"{spec['out']}-{result['process_index']}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
