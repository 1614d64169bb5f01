"""The training loop, single process: a tiny config trains, writes its run directory, and the eval hook and
sample grids leave the training trajectory unchanged."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from train_helpers import REPO, build_tiny_polymnist, run_train, tiny_config

from mmebm_dist.config import config_from_dict, load_config
from mmebm_dist.rundir import read_jsonl
from mmebm_dist.train.metrics import image_grid

LOSS_TERMS = ("loss", "elbo", "kl_z", "energy_gap", "energy_pos", "energy_neg", "langevin_grad_norm")


@pytest.fixture(scope="module")
def data5(tmp_path_factory) -> Path:
    """As many modalities as configs/tiny.yaml declares (five): 96 train tuples in 6 shards."""
    modalities = len(load_config(REPO / "configs/tiny.yaml").model.modalities)
    return build_tiny_polymnist(
        tmp_path_factory.mktemp("data5"), modalities=modalities, train=96, shard_size=16
    )




def test_tiny_config_trains_and_writes_run_dir(data5, tmp_path):
    """`python -m mmebm_dist.train --config configs/tiny.yaml`: 30 steps, loss falls, run-dir files parse."""
    run = tmp_path / "run"
    steps = 30
    proc = run_train(
        [
            "--config",
            str(REPO / "configs/tiny.yaml"),
            f"data.path={data5}",
            f"train.out_dir={run}",
            f"train.steps={steps}",
            "data.batch_size=16",
            "data.num_workers=1",
            "train.log_every=1",
            "train.image_every=10",
            "train.checkpoint_every=10",
            "train.keep_checkpoints=2",
            "train.threads=1",
        ]
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["step"] == steps and summary["world_size"] == 1

    cfg = config_from_dict(json.loads((run / "config.json").read_text()))
    assert cfg.train.steps == steps and cfg.data.path == str(data5)
    (command,) = (run / "commands.log").read_text().splitlines()
    assert command.split("\t")[1] == "world_size=1" and f"train.out_dir={run}" in command.split("\t")[2]

    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    for key in (
        *LOSS_TERMS,
        *(f"rec/{m.name}" for m in cfg.model.modalities),
        "lr/model",
        "lr/energy",
        "samples_per_s",
        "world_size",
        "wall_time_s",
        "epoch",
        "epoch_batch",
    ):
        assert key in records[-1], key
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.9 * first, (first, last)
    # 96 tuples, batch 16, one worker: 6 batches per epoch, so step 30 ends epoch 4 (0-based).
    assert (records[-1]["epoch"], records[-1]["epoch_batch"]) == (5, 0)

    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["latest", "step-0000020", "step-0000030"]  # keep_checkpoints=2 pruned step 10
    assert (run / "checkpoints/latest").read_text().strip() == "step-0000030"
    state = json.loads((run / "checkpoints/step-0000030/train_state.json").read_text())
    assert state["step"] == steps and state["config"]["train"]["steps"] == steps
    assert len(state["data_order"]["manifest_hash"]) > 8

    from mmebm_dist.models import build_model
    from mmebm_dist.rundir import load_model_weights

    model = load_model_weights(build_model(cfg.model), run / "checkpoints/step-0000030")
    assert torch.isfinite(torch.cat([p.flatten() for p in model.parameters()])).all()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, steps + 1))
    assert {f"samples/joint/{m.name}" for m in cfg.model.modalities} <= set(events.Tags()["images"])
    assert [e.step for e in events.Images("samples/joint/m0")] == [10, 20, 30]


def test_eval_hook_and_images_leave_training_unchanged(data2, tmp_path, in_process):
    """The periodic evaluation passed to train() is called every eval_every steps and logged; it (and the
    sample grids) draw random numbers, yet the losses equal those of a run without them: they run on isolated
    RNG streams. Without an evaluation, eval_every > 0 is refused."""
    from mmebm_dist.train.loop import train

    calls = []

    def periodic_eval(model, cfg, step):
        calls.append(step)
        torch.randn(1000)  # consumes the global RNG, as a real evaluation would
        return {"joint_coherence": 0.25, "cross_coherence": 0.5}

    config = tiny_config(tmp_path / "c.yaml", data2)
    plain = train(load_config(config, [f"train.out_dir={tmp_path / 'plain'}"]))
    hooked_cfg = load_config(
        config, [f"train.out_dir={tmp_path / 'hooked'}", "train.eval_every=3", "train.image_every=2"]
    )
    with pytest.raises(ValueError, match="train.eval_every"):
        train(hooked_cfg)
    hooked = train(hooked_cfg, evaluate=periodic_eval)
    assert calls == [3, 6]
    assert plain["terms"] == hooked["terms"]
    records = read_jsonl(tmp_path / "hooked/metrics.jsonl")
    evals = [r for r in records if "eval/joint_coherence" in r]
    assert [(r["step"], r["eval/cross_coherence"]) for r in evals] == [(3, 0.5), (6, 0.5)]
    plain_losses = [r["loss"] for r in read_jsonl(tmp_path / "plain/metrics.jsonl")]
    assert plain_losses == [r["loss"] for r in records if "loss" in r]


def test_lr_schedule_accumulation_and_clipping(data2, tmp_path, in_process):
    """lr decays by optim.lr_decay every lr_decay_every optimizer steps (not micro-batches); with grad_accum=2
    an optimizer step consumes two batches; grad_clip logs the pre-clip norm."""
    from mmebm_dist.train.loop import train

    cfg = load_config(
        tiny_config(tmp_path / "c.yaml", data2),
        [
            f"train.out_dir={tmp_path / 'run'}",
            "train.steps=6",
            "optim.grad_accum=2",
            "optim.lr_decay=0.5",
            "optim.lr_decay_every=2",
            "optim.grad_clip=1.0",
            "optim.lr=0.004",
        ],
    )
    train(cfg)
    records = read_jsonl(tmp_path / "run/metrics.jsonl")
    assert [r["lr/model"] for r in records] == pytest.approx([0.004, 0.002, 0.002, 0.001, 0.001, 0.0005])
    assert [r["lr/energy"] / r["lr/model"] for r in records] == pytest.approx([0.25] * 6)  # energy group 1e-3
    # 64 tuples / batch 8 = 8 micro-batches per epoch = 4 optimizer steps of 2 micro-batches.
    assert [(r["epoch"], r["epoch_batch"]) for r in records] == [
        (0, 2),
        (0, 4),
        (0, 6),
        (1, 0),
        (1, 2),
        (1, 4),
    ]
    assert all(r["grad_norm"] > 0 for r in records)
    assert records[-1]["samples_seen"] == 6 * 2 * 8


def test_fresh_run_refuses_a_directory_with_checkpoints(data2, tmp_path, in_process):
    from mmebm_dist.train.loop import train

    cfg = load_config(
        tiny_config(tmp_path / "c.yaml", data2), [f"train.out_dir={tmp_path / 'run'}", "train.steps=2"]
    )
    train(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg)


def test_resume_cli_errors(tmp_path):
    from mmebm_dist.commands.train import resolve_config
    from mmebm_dist.config import ConfigError

    with pytest.raises(ConfigError, match="config.json does not exist"):
        resolve_config(types.SimpleNamespace(config=None, resume=str(tmp_path), overrides=[]))


def test_image_grid_places_samples_row_major():
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    grid = image_grid(images)  # 5 samples -> 2 per row, 3 rows, last cell black
    assert grid.shape == (3, 6, 4)
    assert grid[0, ::2, ::2].tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 0.0]]


def test_bench_worker_times_every_phase(data2, tmp_path, in_process):
    """`mmebm bench train`'s per-rank worker (in process, synthetic batches): every phase of a step is timed,
    the phases add up to the step, and the table/JSON rows carry samples/s and peak RSS."""
    from mmebm_dist.bench.train_step import PHASES, _measurement, _table, worker

    cfg = load_config(tiny_config(tmp_path / "c.yaml", data2))
    result = worker(cfg, steps=2, warmup=1, synthetic=True)
    phases = result["phases_s"]
    assert set(phases) == set(PHASES) and phases["communication"] == 0.0
    for phase in ("encode", "langevin", "decode", "backward", "optimizer"):
        assert phases[phase] > 0, phase
    assert sum(phases.values()) == pytest.approx(result["seconds_per_step"], rel=1e-6)
    row = _measurement(cfg, "ebm", 1, [result], 2, "c.yaml", flops=3e9, roof=50.0)
    assert row["samples_per_s"] == pytest.approx(8 / result["seconds_per_step"])
    assert row["achieved_gflops"] == pytest.approx(3 / result["seconds_per_step"])
    assert row["roof_fraction"] == pytest.approx(row["achieved_gflops"] / 50)
    assert row["peak_rss_mb"][0] > 50
    assert "ebm" in _table([row])


def test_bench_times_a_staged_config_as_its_joint_stage(data2, tmp_path, in_process):
    """A config with train.schedule (reference -> energy -> joint) is timed as its joint stage: its first
    steps are reference-prior steps that never sample the EBM prior (the H200 check of 2026-12-04 failed on
    configs/polymnist_ebm.yaml there), and its Laplace twin would not load with stages that need the EBM."""
    from mmebm_dist.bench.train_step import timed_config, worker
    from mmebm_dist.config import ConfigError

    staged = ["train.schedule=[{stage: reference, steps: 4}, {stage: energy, steps: 2}, "
              "{stage: joint, steps: 2}]"]
    path = str(tiny_config(tmp_path / "c.yaml", data2))
    with pytest.raises(ConfigError, match="train.schedule"):
        load_config(path, [*staged, "model.prior.kind=laplace"])
    cfg, overrides = timed_config(path, staged)
    assert cfg.train.schedule == [] and overrides[-1] == "train.schedule=[]"
    assert timed_config(path, [])[1] == []  # a plain run is timed as it is
    assert load_config(path, [*overrides, "model.prior.kind=laplace"]).model.prior.kind == "laplace"
    assert worker(cfg, steps=1, warmup=1, synthetic=True)["phases_s"]["langevin"] > 0
    with pytest.raises(RuntimeError, match="no time was spent in model.sample_prior"):
        worker(load_config(path, staged), steps=1, warmup=1, synthetic=True)


def test_posthoc_prior_trains_only_the_energy_of_the_loaded_model(data2, tmp_path, in_process):
    """model.prior.fit=posthoc with train.init_from: the fixed-prior run's weights load, only the energy
    moves (encoders, decoders bit-identical to the source checkpoint), the result evaluates like any EBM run,
    and the settings that cannot work are refused with the key to set."""
    from mmebm_dist.config import ConfigError
    from mmebm_dist.evaluate.generate import load_run
    from mmebm_dist.rundir import latest_checkpoint
    from mmebm_dist.train.loop import train

    path = tiny_config(tmp_path / "c.yaml", data2)
    source = tmp_path / "laplace"
    train(load_config(path, [f"train.out_dir={source}", "train.steps=4", "model.prior.kind=laplace"]))
    before = torch.load(latest_checkpoint(source) / "model.pt", weights_only=True)

    posthoc = tmp_path / "posthoc"
    overrides = [f"train.out_dir={posthoc}", "train.steps=4", "model.prior.fit=posthoc"]
    summary = train(load_config(path, [*overrides, f"train.init_from={source}"]))
    assert {"loss", "energy_gap", "energy_pos", "energy_neg"} <= set(summary["terms"])
    assert "elbo" not in summary["terms"]  # the decoders never ran
    after = torch.load(latest_checkpoint(posthoc) / "model.pt", weights_only=True)
    assert set(after) - set(before) == {k for k in after if k.startswith("energy.")} != set()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    loaded = load_run(posthoc)
    assert loaded.model.energy is not None and loaded.cfg.model.prior.fit == "posthoc"
    assert loaded.model.generate_joint(3)["m0"].shape == (3, 3, 28, 28)

    with pytest.raises(ValueError, match="train.init_from"):
        train(load_config(path, [f"train.out_dir={tmp_path / 'x'}", "model.prior.fit=posthoc"]))
    with pytest.raises(FileNotFoundError, match="train.init_from"):
        train(load_config(path, [*overrides, f"train.init_from={tmp_path / 'nothing'}"]))
    with pytest.raises(ValueError, match="does not fit this model"):
        train(load_config(path, [f"train.out_dir={tmp_path / 'y'}", "model.prior.fit=posthoc",
                                 "model.width=8", f"train.init_from={source}"]))
    with pytest.raises(ConfigError, match="model.prior.kind=ebm"):
        train(load_config(path, [f"train.out_dir={tmp_path / 'z'}", "model.prior.fit=posthoc",
                                 "model.prior.kind=laplace", f"train.init_from={source}"]))


def test_setup_and_train_step_are_the_loop(data2, tmp_path, in_process):
    """setup() + train_step() (what `mmebm bench train` times) give train()'s losses and data position, and
    setup(record=False) writes nothing."""
    from accelerate.state import AcceleratorState

    from mmebm_dist.train.loop import setup, train, train_step

    path = tiny_config(tmp_path / "c.yaml", data2)
    train(load_config(path, [f"train.out_dir={tmp_path / 'run'}", "train.steps=3"]))
    logged = read_jsonl(tmp_path / "run/metrics.jsonl")
    AcceleratorState._reset_state(True)
    session = setup(load_config(path, [f"train.out_dir={tmp_path / 'bench'}", "train.steps=3"]), record=False)
    for step in (1, 2, 3):
        terms = train_step(session, step)
        assert {k: float(v) for k, v in terms.items()} == {k: logged[step - 1][k] for k in terms}
        assert (session.state.epoch, session.state.epoch_batch) == (0, step)
    session.accelerator.end_training()
    assert not (tmp_path / "bench").exists()


def test_dry_run_builds_model_and_data_and_writes_nothing(data2, tmp_path):
    from mmebm_dist.models import build_model

    path = tiny_config(tmp_path / "c.yaml", data2)
    run = tmp_path / "run"
    proc = run_train(["--config", str(path), f"train.out_dir={run}", "--dry-run"])
    summary = json.loads(proc.stdout[proc.stdout.index("{\n"): proc.stdout.rindex("}") + 1])
    cfg = load_config(path, [f"train.out_dir={run}"])
    assert summary["config"] == json.loads(json.dumps(summary["config"])) and config_from_dict(
        summary["config"]) == cfg
    assert summary["parameters"] == sum(p.numel() for p in build_model(cfg.model).parameters()) > 0
    assert summary["batch"]["m0"] == [8, 3, 28, 28]
    assert f"{summary['parameters']:,} parameters" in proc.stdout
    assert not run.exists()


def test_cli_errors_print_one_line_and_debug_shows_the_traceback(tmp_path):
    import subprocess
    import sys

    from train_helpers import env

    def mmebm(*args, **extra_env):
        return subprocess.run([sys.executable, "-m", "mmebm_dist", *args], cwd=REPO,
                              env={**env(), **extra_env}, capture_output=True, text=True, timeout=300)

    bad = ["train", "--config", "configs/tiny.yaml", "data.batch_size=0"]
    proc = mmebm(*bad)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "mmebm train: ConfigError: config key 'data.batch_size' must be in [1, 1048576], got 0")
    missing = mmebm("train", "--config", "configs/tiny.yaml", f"data.path={tmp_path / 'none'}", "--dry-run")
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert f"{tmp_path / 'none'}/manifest.json" in missing.stderr.strip().splitlines()[-1]
    for debug in (mmebm(*bad, MMEBM_DEBUG="1"), mmebm(*bad, "--debug")):
        assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
        assert debug.stderr.strip().splitlines()[-1].startswith("mmebm_dist.config.ConfigError: config key")


def test_bench_counts_kernels_per_step_and_relates_compiled_rows_to_eager():
    """kernels_per_step: leaf compute ops eager (a view is none), inductor's fused kernel once compiled; the
    ratios of a run join each compiled row to the eager row of its prior and process count."""
    from torch._inductor import config as inductor_config

    from mmebm_dist.bench.train_step import _relate, kernels_per_step

    x = torch.ones(4, 4)

    def three_ops():
        return (x + 1).view(16).mul(2).sum()

    cpu = torch.device("cpu")
    assert kernels_per_step(three_ops, cpu) == 3  # add, mul, sum
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        fused = torch.compile(three_ops)
        fused()
        assert kernels_per_step(fused, cpu) == 1  # one generated C++ kernel
    rows = [{"compile": c, "prior": p, "processes": 1, "samples_per_s": s, "kernels_per_step": k,
             "seconds_per_step": 1 / s} for c, p, s, k in
            [("off", "ebm", 10.0, 300), ("default", "ebm", 25.0, 30), ("off", "laplace", 20.0, 100)]]
    _relate(rows)
    assert rows[1]["speedup_vs_eager"] == 2.5 and rows[1]["kernels_fewer_than_eager"] == 10
    assert "speedup_vs_eager" not in rows[0] and rows[2]["ebm_overhead"] == pytest.approx(1.0)
