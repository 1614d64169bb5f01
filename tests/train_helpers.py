"""Helpers shared by the training tests: tiny PolyMNIST shards from IDX files the test writes, tiny configs,
and the real CLI launched in a subprocess (plain or through ``accelerate launch``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]  # `accelerate launch` of this interpreter


def write_idx(directory: Path, *, train: int, test: int, seed: int = 0) -> Path:
    """Tiny MNIST-format IDX files: random strokes (pixels > 128 form the 'digit') with labels 0..9."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        images = (rng.random((n, 28, 28)) > 0.8).astype(np.uint8) * 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        header = (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (directory / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        header = (0x801).to_bytes(4, "big") + n.to_bytes(4, "big")
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(header + labels.tobytes())
    return directory


def build_tiny_polymnist(
    root: Path, *, modalities: int = 2, train: int = 64, test: int = 16, shard_size: int = 16,
    layout: str = "shards",
) -> Path:
    """PolyMNIST-style shards (3x28x28 per modality) built by the data package from tiny IDX files, in
    ``root/polymnist``; ``layout="folders"``: the authors' PNG folders (``--format folders``) in
    ``root/folders``."""
    from mmebm_dist.datasets.polymnist import BuildSpec, build_polymnist

    idx = write_idx(root / "idx", train=train, test=test)
    out = root / ("polymnist" if layout == "shards" else layout)
    build_polymnist(
        BuildSpec(
            source="idx",
            idx_dir=str(idx),
            modalities=modalities,
            out=str(out),
            num_samples=train,
            test_samples=test,
            shard_size=shard_size,
            workers=1,
            format=layout,
        ),
        progress=False,
    )
    return out


def trained_tiny_run(root: Path) -> tuple[Path, Path, Path]:
    """(data dir, run dir, config path): tiny 2-modality shards, their classifiers (one epoch) and an
    8-step EBM run of :func:`tiny_config`, everything through the real CLI."""
    from mmebm_dist.cli import main

    data = build_tiny_polymnist(root, modalities=2, train=64, test=16)
    cfg = tiny_config(root / "tiny.yaml", data)
    run_dir = root / "run"
    run_train(["--config", str(cfg), f"train.out_dir={run_dir}"])
    assert main(["classifiers", "train", "--data", str(data), "--epochs", "1", "--batch-size", "16",
                 "--shuffle-buffer", "0", "--num-workers", "0", "--device", "cpu"]) == 0
    return data, run_dir, cfg


def tiny_config(path: Path, data: Path, *, modalities: int = 2, **sections: dict) -> Path:
    """A config YAML for a tiny EBM-prior model on ``data`` (seconds per dozen steps on one thread)."""
    cfg = {
        "data": {"path": str(data), "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16},
        "model": {
            "modalities": [
                {"name": f"m{k}", "shape": [3, 28, 28], "family": "mlp"} for k in range(modalities)
            ],
            "latent_dim": 4,
            "width": 4,
            "prior": {
                "kind": "ebm",
                "hidden": 16,
                "lr": 1e-3,
                "langevin": {"steps": 4, "step_size": 0.1, "backend": "autograd"},
            },
        },
        "optim": {"lr": 3e-3},
        # fp32 on every machine (auto would pick bf16 on AMX CPUs and change the tests' arithmetic).
        "train": {"steps": 8, "log_every": 1, "checkpoint_every": 4, "image_every": 0, "threads": 1,
                  "mixed_precision": "no"},
    }
    for section, values in sections.items():
        cfg[section] = _merge(cfg.get(section, {}), values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    """Subprocess environment: one thread per process, no GPU probing surprises, repo importable."""
    out = dict(os.environ)
    out.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": str(REPO) + os.pathsep + out.get("PYTHONPATH", ""),
        }
    )
    return out


def run_train(
    args: list[str], *, launcher: list[str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``mmebm train ARGS`` as a subprocess (``python -m mmebm_dist.train`` under ``launcher`` when given)."""
    if launcher is None:
        cmd = [sys.executable, "-m", "mmebm_dist.train", *args]
    else:
        cmd = [*ACCELERATE, *launcher, "-m", "mmebm_dist.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def run_two_agents(train_args: list[str], port: int, rendezvous: tuple[str, ...] = (), timeout: float = 300
                   ) -> list[str]:
    """Two `accelerate launch --num_machines 2 --machine_rank 0/1 [RENDEZVOUS] -m mmebm_dist.train TRAIN_ARGS`
    agents of one process each on this host, meeting on 127.0.0.1:``port``; their outputs once both exit 0.
    Agent 1 starts only once agent 0 accepts connections on the port: both are on this host, so under c10d
    either may bind the store, and accelerate refuses to start machine rank 0 on a taken port (agent 1 then
    waits for a node that never comes). A hang or a failure
    kills both and shows both outputs (the agent that hangs is rarely the one whose output says why)."""
    agents: list[subprocess.Popen] = []

    def fail(why: str) -> None:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
        tails = [f"--- agent {i} (rc {a.wait()}):\n{a.communicate()[0][-3000:]}"
                 for i, a in enumerate(agents)]
        pytest.fail(why + "\n" + "\n".join(tails))

    for rank in (0, 1):
        command = [*ACCELERATE, "--multi_gpu", "--num_machines", "2", "--machine_rank", str(rank),
                   *rendezvous, "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
                   "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "-m", "mmebm_dist.train", *train_args]
        agents.append(subprocess.Popen(command, cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + 120
        while rank == 0 and agents[0].poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        else:
            if rank == 0:
                fail(f"agent 0 did not open the rendezvous port {port}")
    outputs = []
    try:
        outputs = [agent.communicate(timeout=timeout)[0] for agent in agents]
    except subprocess.TimeoutExpired:
        fail(f"agents still running after {timeout} s")
    if any(agent.returncode for agent in agents):
        fail("an agent failed")
    return outputs
