"""``mmebm bench scaling``: a model of a run on 8 to 512 GPUs under DDP and ZeRO-1/2/3, fed by measured
figures, and a multi-process CPU (gloo) check of its communication term. docs/scaling.md is its output.

Inputs, each measured (the files under docs/bench/ are parsed, nothing is typed in): the training step's time
per GPU (``mmebm bench train`` on an H200, ``--step-log``), the model's parameter count (built from
``--config``: gradient bytes = 4 x parameters), loader samples/s per worker (``mmebm bench data``,
``--data-log``), and a checkpoint's bytes and write time (this machine: the files a checkpoint of this model
holds, written and fsynced here). Assumptions, stated in the output: the interconnect's bus bandwidths and
latencies, 8 GPUs per node, weak scaling (the per-GPU batch is fixed), and no overlap of communication with
the backward (an upper bound on its share).

Communication per step, ring algorithms, hierarchical across nodes (reduce-scatter in the node, all-reduce of
each GPU's 1/g shard across the n nodes on its own NIC, all-gather in the node):
``t(V) = 2 (g-1)/g V / B_node + 2 (g-1) a_node + [n > 1] (2 (n-1)/n (V/g) / B_net + 2 (n-1) a_net)``. DDP
all-reduces the gradients (V = 4P bytes); ZeRO-1/2 reduce-scatter them and all-gather the updated parameters:
the same bytes; ZeRO-3 all-gathers the parameters again in the backward: 1.5 x.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GPUS = (8, 16, 32, 64, 128, 256, 512)
ENGINES = {"DDP": 1.0, "ZeRO-1": 1.0, "ZeRO-2": 1.0, "ZeRO-3": 1.5}
"""Bytes moved per step relative to an all-reduce of the gradients (see the module docstring)."""
PREEMPTIONS_PER_NODE_DAY = (0.1, 1.0)


@dataclasses.dataclass(kw_only=True)
class Interconnect:
    """Assumed fabric (an H100/H200 node: NVLink inside, one 400 Gb/s NIC per GPU across nodes)."""

    gpus_per_node: int = 8
    """GPUs per node."""
    node_gbytes_s: float = 360.0
    """Bus bandwidth of a ring inside a node (NVLink 4: 450 GB/s per direction; NCCL reaches ~80%)."""
    net_gbytes_s: float = 40.0
    """Bus bandwidth per GPU across nodes (400 Gb/s = 50 GB/s per NIC; ~80% achieved)."""
    node_latency_us: float = 5.0
    """Latency of one ring step inside a node."""
    net_latency_us: float = 10.0
    """Latency of one ring step across nodes."""


def allreduce_seconds(volume: float, gpus: int, net: Interconnect) -> float:
    """Seconds of a hierarchical ring all-reduce of ``volume`` bytes over ``gpus`` GPUs (module docstring)."""
    g = min(gpus, net.gpus_per_node)
    n = max(1, gpus // net.gpus_per_node)
    t = 2 * (g - 1) / g * volume / (net.node_gbytes_s * 1e9) + 2 * (g - 1) * net.node_latency_us * 1e-6
    if n > 1:
        t += 2 * (n - 1) / n * (volume / g) / (net.net_gbytes_s * 1e9)
        t += 2 * (n - 1) * net.net_latency_us * 1e-6
    return t


def young_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's optimal checkpoint interval sqrt(2 C M): a checkpoint costs C seconds, failures every M."""
    return math.sqrt(2 * checkpoint_s * mtbf_s)


# ------------------------------------------------------------------------------------------- measured inputs


def gpu_step(log: Path) -> dict:
    """Seconds per step and per-GPU batch of the EBM row of a ``mmebm bench train`` table."""
    for line in log.read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[0] == "ebm" and fields[2] == "1":
            return {"batch": int(fields[3]), "step_s": float(fields[5]), "source": str(log)}
    raise ValueError(f"{log}: no 'ebm ... 1 process' row of `mmebm bench train`; pass another --step-log")


def loader_rate(log: Path) -> dict:
    """Samples/s per worker: the largest worker count's row of a ``mmebm bench data`` table."""
    row = re.compile(r"^\S+\s+\d+\s+\S+\s+\d+\s+\d+")
    rows = [line.split() for line in log.read_text().splitlines() if row.match(line)]
    if not rows:
        raise ValueError(f"{log}: no rows of `mmebm bench data`; pass another --data-log")
    workers, rate = max((int(r[3]), float(r[4])) for r in rows)
    cpu = re.search(r"(\d+) CPUs", log.read_text())
    return {"workers": workers, "samples_s": rate, "per_worker": rate / max(1, workers),
            "host_cpus": int(cpu.group(1)) if cpu else None, "source": str(log)}


def model_size(config: str) -> dict:
    from mmebm_dist.config import load_config
    from mmebm_dist.models import build_model

    cfg = load_config(config)
    params = sum(p.numel() for p in build_model(cfg.model).parameters())
    return {"params": params, "grad_bytes": 4 * params, "amsgrad": cfg.optim.amsgrad, "config": config}


def checkpoint_cost(params: int, amsgrad: bool) -> dict:
    """Bytes and write seconds (fsynced, this machine) of a checkpoint's files for ``params`` fp32 parameters:
    model.pt and accelerate's weights (2 copies), Adam's moments twice (accelerate's optimizer state and
    optimizer_full.pt)."""
    moments = 3 if amsgrad else 2
    tensors = {"weights": 2, "moments": 2 * moments}
    total = sum(tensors.values()) * 4 * params
    with tempfile.TemporaryDirectory() as directory:
        start = time.perf_counter()
        for name, copies in tensors.items():
            path = Path(directory) / f"{name}.pt"
            torch.save([torch.zeros(params) for _ in range(copies)], path)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        seconds = time.perf_counter() - start
    return {"bytes": total, "write_s": seconds, "gbytes_s": total / seconds / 1e9}


# ------------------------------------------------------------------------------------------------- the tables


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def scaling_table(step: dict, size: dict, loader: dict, net: Interconnect) -> str:
    """Step time, communication and its share, samples/s and loader workers per GPU, for 8-512 GPUs."""
    rows = []
    for gpus in GPUS:
        t = allreduce_seconds(size["grad_bytes"], gpus, net)
        cells = [str(gpus), str(max(1, gpus // net.gpus_per_node))]
        for factor in sorted(set(ENGINES.values())):
            comm = factor * t
            cells += [f"{comm * 1e3:.2f}", f"{100 * comm / (step['step_s'] + comm):.1f}",
                      f"{100 * comm / (step['step_s'] / 3 + comm):.1f}"]
        step_s = step["step_s"] + t
        rate = gpus * step["batch"] / step_s
        workers = step["batch"] / step_s / loader["per_worker"]
        cells += [f"{rate:,.0f}", f"{workers:.2f}", f"{math.ceil(workers) * net.gpus_per_node}"]
        rows.append(cells)
    header = ["GPUs", "nodes", "DDP, ZeRO-1/2 ms", "share %", "share % at 3x", "ZeRO-3 ms", "share %",
              "share % at 3x", "samples/s (DDP)", "loader workers / GPU", "loader procs / node"]
    return _md(header, rows)


def memory_table(size: dict) -> str:
    """Bytes per GPU of weights, gradients and Adam's moments (fp32) under each engine."""
    p, moments = size["params"], (12 if size["amsgrad"] else 8)
    rows = []
    for gpus in (8, 64, 512):
        per = {"DDP": 4 + 4 + moments, "ZeRO-1": 4 + 4 + moments / gpus, "ZeRO-2": 4 + (4 + moments) / gpus,
               "ZeRO-3": (4 + 4 + moments) / gpus}
        rows.append([str(gpus)] + [f"{p * b / 2**20:,.1f}" for b in per.values()])
    return _md(["GPUs", "DDP MiB", "ZeRO-1 MiB", "ZeRO-2 MiB", "ZeRO-3 MiB"], rows)


def checkpoint_table(step: dict, ckpt: dict, net: Interconnect) -> str:
    """Young's checkpoint interval for the job's expected time between preemptions."""
    rows = []
    for gpus in GPUS:
        nodes = max(1, gpus // net.gpus_per_node)
        cells = [str(gpus)]
        for rate in PREEMPTIONS_PER_NODE_DAY:
            mtbf = 86400 / (rate * nodes)
            interval = young_interval_s(ckpt["write_s"], mtbf)
            cells += [f"{mtbf / 60:,.0f}", f"{interval:,.0f}", f"{interval / step['step_s']:,.0f}"]
        rows.append(cells)
    header = ["GPUs"]
    for rate in PREEMPTIONS_PER_NODE_DAY:
        header += [f"MTBF min ({rate}/node/day)", "interval s", "interval steps"]
    return _md(header, rows)


# ------------------------------------------------------------------------------------ the gloo (CPU) check


def _allreduce_worker(out: str) -> None:
    """Time gloo all-reduces of 1, 4 and 16 MiB on every rank; rank 0 writes (bytes, seconds) pairs."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    results = []
    for floats in (2**18, 2**20, 2**22):
        x = torch.ones(floats)
        for _ in range(2):
            dist.all_reduce(x)
        dist.barrier()
        start, reps = time.perf_counter(), 8
        for _ in range(reps):
            dist.all_reduce(x)
        results.append((4 * floats, (time.perf_counter() - start) / reps))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _fit_ring(points: list[tuple[int, float]], processes: int) -> tuple[float, float]:
    """(bus bytes/s, latency s per ring step) from t = 2 (p-1)/p V / B + 2 (p-1) a, least squares."""
    xs = [2 * (processes - 1) / processes * v for v, _ in points]
    ts = [t for _, t in points]
    mx, mt = sum(xs) / len(xs), sum(ts) / len(ts)
    slope = sum((x - mx) * (t - mt) for x, t in zip(xs, ts, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return 1 / slope, max(0.0, (mt - slope * mx) / (2 * (processes - 1)))


def gloo_check(config: str, processes: int) -> dict:
    """Fit the ring model to gloo all-reduces on ``processes`` CPU processes (1 thread each), predict the
    communication of ``config``'s training step, and measure it (``mmebm bench train``)."""
    from mmebm_dist.train.distributed import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with tempfile.TemporaryDirectory() as directory:
        out = Path(directory) / "allreduce.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                        "--master_port", str(free_port()), "-m", "mmebm_dist.bench.scaling",
                        "--allreduce-worker", str(out)], env=env, check=True, capture_output=True)
        points = json.loads(out.read_text())
    bandwidth, latency = _fit_ring(points, processes)
    bench = subprocess.run([sys.executable, "-m", "mmebm_dist", "bench", "train", "--config", config,
                            "--synthetic", "--processes", str(processes), "--threads", "1", "--no-laplace",
                            "--steps", "20", "--json"], env=env, check=True, capture_output=True, text=True)
    measured = json.loads(bench.stdout.strip().splitlines()[-1])
    grad_bytes = model_size(config)["grad_bytes"]
    ring = 2 * (processes - 1)
    predicted = ring / processes * grad_bytes / bandwidth + ring * latency
    step = measured["seconds_per_step"]
    comm = measured["phases_ms"]["communication"] / 1e3
    return {"processes": processes, "config": config, "allreduce": points, "bus_gbytes_s": bandwidth / 1e9,
            "latency_us": latency * 1e6, "grad_bytes": grad_bytes, "step_s": step,
            "predicted_comm_s": predicted, "measured_comm_s": comm,
            "predicted_share": predicted / step, "measured_share": comm / step}


def check_table(check: dict) -> str:
    rows = [[f"{v / 2**20:.0f} MiB", f"{t * 1e3:.2f}"] for v, t in check["allreduce"]]
    fit = (f"Fitted ring: bus bandwidth {check['bus_gbytes_s']:.2f} GB/s, {check['latency_us']:.0f} us per "
           f"ring step ({check['processes']} gloo processes, 1 thread each).")
    step = _md(["", "communication ms / step", "share of the step %"], [
        ["model (fitted ring, gradient bytes " + f"{check['grad_bytes'] / 2**20:.2f} MiB)",
         f"{check['predicted_comm_s'] * 1e3:.2f}", f"{100 * check['predicted_share']:.1f}"],
        ["measured (`mmebm bench train`, backward with sync - without)",
         f"{check['measured_comm_s'] * 1e3:.2f}", f"{100 * check['measured_share']:.1f}"]])
    ratio = check["measured_comm_s"] / check["predicted_comm_s"]
    note = (f"Measured / model: {ratio:.1f}x. The model prices the bytes and the ring's latency; the "
            "measured term (backward with gradient sync minus without) also holds the wait for the slowest "
            "rank, since DDP's all-reduce of a bucket starts only when every rank has reached it. Here the "
            "processes outnumber the cores, so that wait is large; it is not measured separately. On GPUs, "
            "with one process per device, that term is the step-time jitter across ranks.")
    return _md(["all-reduce", "ms"], rows) + "\n\n" + fit + "\n\n" + step + "\n\n" + note


# ----------------------------------------------------------------------------------------------------- CLI


def document(step: dict, size: dict, loader: dict, ckpt: dict, net: Interconnect, check: dict | None) -> str:
    """docs/scaling.md: the inputs, the three tables and the gloo check."""
    assumed = ", ".join(f"{f.name} {getattr(net, f.name)}" for f in dataclasses.fields(net))
    inputs = _md(["input", "value", "measured by"], [
        ["step time per GPU", f"{step['step_s'] * 1e3:.1f} ms at batch {step['batch']}", step["source"]],
        ["parameters / gradient bytes", f"{size['params']:,} / {size['grad_bytes'] / 2**20:.1f} MiB",
         f"{size['config']} (built here)"],
        ["loader samples/s per worker", f"{loader['per_worker']:,.0f} ({loader['samples_s']:,.0f} with "
         f"{loader['workers']} workers, {loader['host_cpus']} host CPUs)", loader["source"]],
        ["checkpoint bytes / write time", f"{ckpt['bytes'] / 2**20:.0f} MiB / {ckpt['write_s']:.2f} s "
         f"({ckpt['gbytes_s']:.2f} GB/s)", "written and fsynced on the machine that ran this command"],
    ])
    parts = [
        "# Scaling past one machine: a model fed by measured figures",
        "",
        "Generated by `mmebm bench scaling` (`mmebm_dist/bench/scaling.py`; its docstring gives the "
        "formulas); rerun it to refresh every number here. Weak scaling: the per-GPU batch stays fixed. "
        "Communication is not overlapped with the backward, so its share is an upper bound.",
        "",
        "## Inputs", "", inputs, "", f"Assumed interconnect: {assumed}.", "",
        "## Step, communication and loader, 8 to 512 GPUs", "",
        "`share % at 3x`: the share if the step were 3x faster (the GPU check's captured-step target).", "",
        scaling_table(step, size, loader, net), "",
        "## Memory per GPU for weights, gradients and Adam's moments (fp32)", "",
        memory_table(size), "",
        "## Checkpoint cadence against preemptions", "",
        "Young's interval sqrt(2 C M): C the checkpoint's write time above, M the job's mean time between "
        "preemptions (nodes x the per-node rate).", "",
        checkpoint_table(step, ckpt, net), "",
    ]
    parts += ["## Where it breaks first", "", breaking_points(step, size, loader, net), ""]
    if check is not None:
        parts += ["## The communication term against a measured run (CPU, gloo)", "", check_table(check), ""]
    return "\n".join(parts)


def breaking_points(step: dict, size: dict, loader: dict, net: Interconnect) -> str:
    """The limits the tables show, in numbers: loader CPUs, then communication latency at scale."""
    need = step["batch"] / step["step_s"] / loader["per_worker"]
    procs = math.ceil(need) * net.gpus_per_node
    procs3 = math.ceil(3 * need) * net.gpus_per_node
    big = max(GPUS)
    t = allreduce_seconds(size["grad_bytes"], big, net)
    nodes = big // net.gpus_per_node
    latency = 2e-6 * ((nodes - 1) * net.net_latency_us + (net.gpus_per_node - 1) * net.node_latency_us)
    memory = size["params"] * (20 if size["amsgrad"] else 16) / 2**20
    return (
        f"1. **The loader, at any scale**: a GPU consumes {step['batch'] / step['step_s']:,.0f} samples/s, "
        f"{need:.2f} loader workers' worth ({loader['per_worker']:,.0f} samples/s each): {procs} loader "
        f"processes per {net.gpus_per_node}-GPU node, and {procs3} at the 3x faster captured step, against "
        f"{loader['host_cpus']} CPUs on the measured host (which also run the 8 training processes). A node "
        f"needs >= {procs + net.gpus_per_node} cores, or raw-encoded shards (cheaper to decode; docs/bench/"
        f"cpu_data_raw.md).\n"
        f"2. **Communication latency, at hundreds of GPUs**: at {big} GPUs an all-reduce of "
        f"{size['grad_bytes'] / 2**20:.1f} MiB takes {t * 1e3:.2f} ms, {latency * 1e3:.2f} ms of it ring "
        f"latency ({nodes} nodes); its share ({100 * t / (step['step_s'] + t):.1f} %, "
        f"{100 * t / (step['step_s'] / 3 + t):.1f} % at 3x) grows with the node count, not the model. A "
        f"larger per-GPU batch or gradient accumulation divides it.\n"
        f"3. **Not memory**: weights, gradients and Adam's moments take {memory:.0f} MiB per GPU under DDP; "
        f"ZeRO saves memory this model does not need and ZeRO-3 moves 1.5x the bytes: DDP (or ZeRO-1 for "
        f"its smaller checkpoints per rank) is the engine to scale this model with.\n"
        f"4. **Checkpoints**: written every few minutes at most, even at {big} GPUs and one preemption per "
        f"node-day (table above): not a limit at this model's size."
    )


@dataclasses.dataclass(kw_only=True)
class ScalingBenchOptions:
    """What ``mmebm bench scaling`` models and checks (its flags; the defaults are the command's)."""

    config: str = "configs/polymnist_ebm.yaml"
    """The model to scale."""
    step_log: str = "docs/bench/h200_run1_train.log"
    """``mmebm bench train`` output on the GPU (the step time)."""
    data_log: str = "docs/bench/h200_check1_data.log"
    """``mmebm bench data`` output (loader samples/s per worker)."""
    check_processes: int = 4
    """gloo processes for the communication check (0: skip it)."""
    check_config: str = "configs/tiny.yaml"
    """The model of the gloo check."""
    json: str | None = None
    """Also write every figure to this JSON file."""
    figures: str | None = None
    """Render the document from figures an earlier ``json`` wrote (measures nothing)."""


def run(args: ScalingBenchOptions) -> int:
    if args.figures:
        f = json.loads(Path(args.figures).read_text())
        net = Interconnect(**f["interconnect"])
        print(document(f["step"], f["model"], f["loader"], f["checkpoint"], net, f["check"]))
        return 0
    step, loader = gpu_step(Path(args.step_log)), loader_rate(Path(args.data_log))
    size = model_size(args.config)
    ckpt = checkpoint_cost(size["params"], size["amsgrad"])
    check = gloo_check(args.check_config, args.check_processes) if args.check_processes > 1 else None
    net = Interconnect()
    print(document(step, size, loader, ckpt, net, check))
    if args.json:
        figures = {"step": step, "model": size, "loader": loader, "checkpoint": ckpt,
                   "interconnect": dataclasses.asdict(net), "check": check}
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # the gloo check's worker (gloo_check launches it); not a command
    if sys.argv[1:2] != ["--allreduce-worker"]:
        sys.exit("run `mmebm bench scaling`")
    _allreduce_worker(sys.argv[2])
