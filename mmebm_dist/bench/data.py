"""``mmebm bench data``: loader samples/s for each data set and worker count (table, or JSON lines).

Each setting runs in a fresh process, so its peak RSS (the loader process and its DataLoader workers) is its
own. ``samples_per_cpu_s`` divides by the CPU time of the process that decodes (the main one with workers=0,
else the busiest DataLoader worker, read from /proc): on a shared machine it is what that process would
deliver on an idle core of its own, where wall-clock samples/s also measures the other tenants;
``samples_per_main_cpu_s`` is the same for the main process (which receives and converts the batches).
Pass several data sets (``--data a,b``) for a scale table or a png/raw comparison in one run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass

import torch


def measure(
    data: str, *, batch_size: int, batches: int, num_workers: int, shuffle_buffer: int, split: str
) -> dict:
    """Time ``batches`` batches after the first one (start-up, incl. worker launch, is reported apart).

    Reads the split's epoch stream as training does (shards split and shuffled), cycling shards with
    replacement only when the split holds fewer samples than the timed batches need."""
    from mmebm_dist.data.shards import read_manifest
    from mmebm_dist.data.stream import make_loader

    manifest = read_manifest(data)
    count = manifest["splits"][split]["count"]
    resampled = count < (batches + 1) * batch_size * max(1, num_workers)
    loader = make_loader(
        data,
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle_buffer=shuffle_buffer,
        rank=0,
        world_size=1,
        split=split,
        resampled=resampled,
    )
    start = time.perf_counter()
    it = iter(loader)
    first = next(it)
    ready, (main_cpu, worker_cpu) = time.perf_counter(), cpu_seconds()
    samples = 0
    for _ in range(batches):
        samples += len(next(it)["label"])
    end, (main_end, worker_end) = time.perf_counter(), cpu_seconds()
    it.close()  # shuts the DataLoader workers down: their peak RSS is then in RUSAGE_CHILDREN
    row = {
        "bench": "data",
        "data": data,
        "split": split,
        "split_samples": count,
        "shards": len(manifest["shards"]),
        "encoding": sorted({m.get("encoding", "png") for m in manifest["modalities"]}),
        "workers": num_workers,
        "batch_size": batch_size,
        "batches": batches,
        "samples": samples,
        "resampled": resampled,
        "seconds": end - ready,
        "samples_per_s": samples / (end - ready),
        "startup_s": ready - start,
        "modalities": [k for k in first if k not in ("label", "present")],
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }
    main_s = main_end - main_cpu
    workers_s = [worker_end[pid] - worker_cpu.get(pid, 0.0) for pid in worker_end]
    decoding = main_s if num_workers == 0 else max(workers_s, default=0.0)  # the busiest worker
    row.update({
        "main_cpu_s": main_s,
        "worker_cpu_s": sorted(workers_s, reverse=True),
        "samples_per_cpu_s": samples / max(decoding, 1e-9),
        "samples_per_main_cpu_s": samples / max(main_s, 1e-9),
        "samples_per_total_cpu_s": samples / max(main_s + sum(workers_s), 1e-9),
    })
    return row


def cpu_seconds() -> tuple[float, dict[int, float]]:
    """CPU seconds (user + system) of this process and of each live child (the DataLoader workers) by pid,
    from /proc: what the loader costs, whatever else runs on the machine (10 ms resolution for children)."""
    tick, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    children: dict[int, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the fields after the command name
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid
            children[int(pid)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return time.process_time(), children


def cpu_model() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _measure_in_child() -> None:
    """Entry point of the per-setting subprocess: JSON arguments on stdin, one JSON row on stdout."""
    print(json.dumps(measure(**json.loads(sys.stdin.read()))))


def measure_isolated(**kwargs) -> dict:
    """:func:`measure` in a fresh interpreter, so peak RSS belongs to this setting alone."""
    code = "from mmebm_dist.bench.data import _measure_in_child; _measure_in_child()"
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(kwargs), capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench data on {kwargs['data']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass(kw_only=True)
class DataBenchOptions:
    """What ``mmebm bench data`` measures (its flags; the defaults are the command's)."""

    data: str = "data/polymnist"
    """Comma-separated data set directories."""
    batch_size: int = 128
    """Samples per batch."""
    batches: int = 100
    """Timed batches per setting."""
    workers: str = "0,1,2"
    """Comma-separated worker counts."""
    shuffle_buffer: int = 0
    """Shuffle buffer."""
    split: str = "train"
    """Split to stream."""
    json: bool = False
    """Print JSON lines instead of a table."""
    out: str | None = None
    """Also write the JSON lines to this file."""
    markdown: str | None = None
    """Also write the table, the command line and the CPU model to this file."""


def run(args: DataBenchOptions) -> int:
    rows = []
    for data in args.data.split(","):
        for w in (int(x) for x in args.workers.split(",")):
            rows.append(
                measure_isolated(
                    data=data,
                    batch_size=args.batch_size,
                    batches=args.batches,
                    num_workers=w,
                    shuffle_buffer=args.shuffle_buffer,
                    split=args.split,
                )
            )
            rows[-1]["ratio_to_first"] = rows[-1]["samples_per_s"] / rows[0]["samples_per_s"]
    lines = [json.dumps(r) for r in rows]
    if args.json:
        print("\n".join(lines))
    else:
        print(
            f"loader ({args.split}, batch {args.batch_size}, {args.batches} timed batches, shuffle buffer "
            f"{args.shuffle_buffer}; {os.cpu_count()} CPUs: {cpu_model()})"
        )
        print(f"{'data':<28} {'samples':>8} {'enc':>4} {'workers':>7} {'samples/s':>10} {'per CPU-s':>10} "
              f"{'ratio':>6} {'RSS MiB':>8} {'worker RSS':>10}")
        for r in rows:
            per_cpu = f"{r['samples_per_cpu_s']:.0f}" if "samples_per_cpu_s" in r else "-"
            print(
                f"{r['data'][-28:]:<28} {r['split_samples']:>8} {','.join(r['encoding']):>4} "
                f"{r['workers']:>7} "
                f"{r['samples_per_s']:>10.0f} {per_cpu:>10} {r['ratio_to_first']:>6.2f} "
                f"{r['peak_rss_mib']:>8.0f} {r['worker_peak_rss_mib']:>10.0f}"
            )
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n".join(lines) + "\n")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown_table(rows, args))
    return 0


def markdown_table(rows: list[dict], args: DataBenchOptions) -> str:
    """The rows as a Markdown table headed by the command that made them, the CPU and the machine's load."""
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    out = [
        f"`mmebm {' '.join(sys.argv[1:])}`" if sys.argv[1:] else "`mmebm bench data`",
        "",
        f"CPU: {cpu_model()} ({os.cpu_count()} CPUs; load average {load} when written, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). Batch {args.batch_size}, {args.batches} "
        f"timed batches, shuffle buffer {args.shuffle_buffer}. samples/s is wall clock; per CPU-s divides by "
        "the decoding process's CPU time (workers=0).",
        "",
        "| data | samples | shards | encoding | workers | samples/s | per CPU-s | peak RSS MiB "
        "| worker peak RSS MiB |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        per_cpu = f"{r['samples_per_cpu_s']:.0f}" if "samples_per_cpu_s" in r else "-"
        out.append(
            f"| {r['data']} | {r['split_samples']} | {r['shards']} | {','.join(r['encoding'])} "
            f"| {r['workers']} | {r['samples_per_s']:.0f} | {per_cpu} | {r['peak_rss_mib']:.0f} "
            f"| {r['worker_peak_rss_mib']:.0f} |"
        )
    return "\n".join(out) + "\n"
