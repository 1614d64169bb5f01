"""Elastic resume: a checkpoint written by one engine and world size (one process, DDP, DeepSpeed ZeRO-1/2/3
on N processes) resumed by another (one process or DDP on M processes).

The format, and why: every checkpoint already holds the consolidated fp32 model (``model.pt``). Beside it
rank 0 now writes ``optimizer_full.pt`` -- Adam's state per parameter *name* (exp_avg, exp_avg_sq,
max_exp_avg_sq, step; under ZeRO gathered from the partitions with DeepSpeed's
``safe_get_full_optimizer_state``), the param groups' hyperparameters and the lr scheduler's state -- and
``engine.json`` (engine, ZeRO stage, world size). Both are engine-independent and load with plain torch.
torch.distributed.checkpoint cannot read DeepSpeed's ZeRO files, and DeepSpeed's universal checkpoint is an
offline conversion (ds_to_universal) whose result only DeepSpeed loads: neither covers ZeRO -> DDP or one
process, the case users hit. Cost: one more copy of the optimizer state on rank 0 (3x the fp32 model's bytes
with amsgrad; the tiny test model: ~40 kB).

A resume in the checkpoint's own layout loads accelerate's state as before (every rank's RNG streams
included). In another layout: model.pt is loaded before the model is wrapped, optimizer_full.pt and the
scheduler after; every rank's RNG streams are re-derived from (seed, step, rank, world size); the rest of
the epoch is re-planned over the new ranks (:mod:`mmebm_dist.data.replan`); a change of the global batch is
logged. A target of DeepSpeed (its partitioned optimizer state is created lazily at its first step) and a
checkpoint without ``optimizer_full.pt`` (written before this module) are refused, naming what is missing
and the command that resumes the checkpoint in its own layout.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from mmebm_dist.config import Config
from mmebm_dist.rundir import TrainState, complete_checkpoints, read_train_state
from mmebm_dist.train.checkpoint import CheckpointError, checkpoint_problem

ENGINE_FILE = "engine.json"
OPTIMIZER_FILE = "optimizer_full.pt"
REPLANNABLE = ("world_size", "num_workers", "batch_size")
"""Data-order keys whose change mid-epoch re-plans the rest of the epoch; any other change is refused."""

log = logging.getLogger(__name__)


def engine_of(accelerator: Accelerator) -> dict[str, Any]:
    """This job's layout: ``{"engine": "single" | "ddp" | "deepspeed", "zero_stage", "world_size"}``."""
    from mmebm_dist.train.distributed import zero_stage

    world = accelerator.num_processes
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        engine = "deepspeed"
    else:
        engine = "single" if world == 1 else "ddp"
    return {"engine": engine, "zero_stage": zero_stage(accelerator), "world_size": world}


def written_by(ckpt: Path) -> dict[str, Any]:
    """The layout that wrote ``ckpt``: its engine.json, or for an older checkpoint what its files show
    (DeepSpeed writes ``pytorch_model/``; the world size is in train_state.json; the stage unknown: None)."""
    path = ckpt / ENGINE_FILE
    if path.is_file():
        return json.loads(path.read_text())
    world = int(read_train_state(ckpt).data_order.get("world_size", 1))
    if (ckpt / "pytorch_model").is_dir():
        return {"engine": "deepspeed", "zero_stage": None, "world_size": world}
    return {"engine": "single" if world == 1 else "ddp", "zero_stage": 0, "world_size": world}


def describe_engine(layout: dict[str, Any]) -> str:
    """``one process``, ``DDP on 2 processes``, ``DeepSpeed ZeRO-2 on 2 processes``."""
    world = layout["world_size"]
    if layout["engine"] == "single":
        return "one process"
    if layout["engine"] == "ddp":
        return f"DDP on {world} processes"
    stage = layout.get("zero_stage")
    return f"DeepSpeed ZeRO-{stage if stage is not None else '?'} on {world} process{'es' * (world > 1)}"


def resume_command(layout: dict[str, Any], run_dir: Path) -> str:
    """The command that resumes ``run_dir`` in ``layout`` (launch/accelerate/ holds YAMLs for the same
    layouts; on a CPU-only machine the code picks gloo itself)."""
    world = layout["world_size"]
    if layout["engine"] == "single":
        return f"mmebm train --resume {run_dir}"
    if layout["engine"] == "ddp":
        return f"accelerate launch --multi_gpu --num_processes {world} -m mmebm_dist.train --resume {run_dir}"
    stage = layout.get("zero_stage") or 2
    return (f"accelerate launch --use_deepspeed --zero_stage {stage} --num_processes {world} "
            f"-m mmebm_dist.train --resume {run_dir}")


def same_layout(saved: dict[str, Any], current: dict[str, Any]) -> bool:
    """Whether accelerate's own state of ``saved`` loads into ``current`` (same engine, world size, stage)."""
    if (saved["engine"], saved["world_size"]) != (current["engine"], current["world_size"]):
        return False
    return saved.get("zero_stage") in (None, current["zero_stage"])


def elastic_checkpoint(accelerator: Accelerator, run_dir: Path, name: str | None) -> Path | None:
    """The checkpoint to resume elastically, or None when the one to resume (``name``, else the newest whose
    files pass their checks) was written in this job's layout (the ordinary resume then loads it).

    Raises CheckpointError naming the writer's layout and the command that resumes it where this job cannot:
    the checkpoint lacks optimizer_full.pt, or this job runs DeepSpeed."""
    current = engine_of(accelerator)
    found = complete_checkpoints(run_dir)
    candidates = [Path(run_dir) / "checkpoints" / Path(name).name] if name else list(reversed(found))
    for ckpt in candidates:
        if ckpt not in found:
            return None  # the ordinary resume reports it
        try:
            saved = written_by(ckpt)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # the ordinary resume names the bad file
            log.warning("checkpoint %s does not load: %s: %s", ckpt, type(exc).__name__, exc)
            if name:
                return None
            continue
        if same_layout(saved, current):
            return None
        problem = next((f"{p}: {why}" for p in sorted(ckpt.rglob("*"))
                        if p.is_file() and (why := checkpoint_problem(p))), None)
        if problem is not None:
            log.warning("checkpoint %s does not load: %s", ckpt, problem)
            continue
        wrote, here = describe_engine(saved), describe_engine(current)
        if not (ckpt / OPTIMIZER_FILE).is_file():
            raise CheckpointError(
                f"{ckpt} was written by {wrote} and this job is {here}; it holds no {OPTIMIZER_FILE} "
                f"(written before elastic resume existed), so its optimizer state cannot move; resume it as "
                f"it was written: `{resume_command(saved, run_dir)}`")
        if current["engine"] == "deepspeed":
            raise CheckpointError(
                f"{ckpt} was written by {wrote} and this job is {here}: resuming into DeepSpeed from another "
                f"layout is not supported (engine: deepspeed); resume with DDP or one process (e.g. "
                f"`{resume_command({**current, 'engine': 'ddp'}, run_dir)}`) or as it was written: "
                f"`{resume_command(saved, run_dir)}`")
        log.warning("%s was written by %s; this job is %s: resuming elastically (model.pt, %s)",
                    ckpt, wrote, here, OPTIMIZER_FILE)
        return ckpt
    return None


def _named_groups(unwrapped: torch.nn.Module, cfg: Config) -> list[list[tuple[str, torch.nn.Parameter]]]:
    """The model's optimizer groups (as build_optimizer made them) as (name, parameter) lists."""
    names = {id(p): n for n, p in unwrapped.named_parameters()}
    return [[(names[id(p)], p) for p in group["params"]] for group in unwrapped.param_groups(cfg.optim)]


def write_full_optimizer_state(accelerator: Accelerator, unwrapped: torch.nn.Module, optimizer: Any,
                               scheduler: Any, cfg: Config, directory: Path) -> None:
    """Write ``engine.json`` and ``optimizer_full.pt`` into ``directory`` (rank 0). Collective under
    DeepSpeed (each moment is gathered from the ranks' partitions): call on every rank."""
    groups = _named_groups(unwrapped, cfg)
    state: dict[str, dict[str, torch.Tensor]] = {}
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        from deepspeed.utils import safe_get_full_optimizer_state

        zero = optimizer.optimizer  # accelerate's wrapper -> ZeRO optimizer (-> torch Adam: base)
        base = zero.optimizer
        if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO-1/2 (DeepSpeed 0.19) link each parameter to its Adam moments once, right after the FIRST
            # group's first step: the later groups had no moments yet and stay unlinked ("exp_avg not found in
            # optimizer state fragment"). Linking again is cheap (views) and idempotent.
            zero._hp_optimizer_states_linked = False
            zero._lazy_init_hp_params_optimizer_state()
        for i, group in enumerate(groups):
            flat = next((base.state[q] for q in base.param_groups[i]["params"] if q in base.state), None)
            if flat is None:  # not stepped yet
                continue
            keys = sorted(k for k in flat if k != "step")  # same order on every rank: collectives
            for name, p in group:
                state[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in keys}
                state[name]["step"] = torch.as_tensor(flat["step"], dtype=torch.float32).cpu().clone()
    else:
        for group in groups:
            for name, p in group:
                if p in optimizer.state:
                    state[name] = {k: torch.as_tensor(v).detach().cpu().clone()
                                   for k, v in optimizer.state[p].items()}
    if accelerator.is_main_process:
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        named = [{"names": [n for n, _ in group], **h} for group, h in zip(groups, hyper, strict=True)]
        full = {"groups": named, "state": state, "scheduler": scheduler.state_dict()}
        torch.save(full, directory / OPTIMIZER_FILE)
        (directory / ENGINE_FILE).write_text(json.dumps(engine_of(accelerator)) + "\n")


def load_full_optimizer_state(optimizer: Any, scheduler: Any, unwrapped: torch.nn.Module, cfg: Config,
                              ckpt: Path) -> None:
    """Give this (non-DeepSpeed) job's optimizer and scheduler the state of ``ckpt``'s optimizer_full.pt."""
    path = ckpt / OPTIMIZER_FILE
    full = torch.load(path, map_location="cpu", weights_only=True)
    groups = _named_groups(unwrapped, cfg)
    mine = [[n for n, _ in group] for group in groups]
    theirs = [g["names"] for g in full["groups"]]
    if mine != theirs:
        raise CheckpointError(f"{path}: its parameter groups {[len(g) for g in theirs]} do not match this "
                              f"model's {[len(g) for g in mine]}; resume with the run's model.* settings")
    for group in groups:
        for name, p in group:
            if name in full["state"]:
                # torch's Adam keeps ``step`` on the CPU unless capturable/fused
                optimizer.state[p] = {k: v if k == "step" else v.to(p.device, p.dtype)
                                      for k, v in full["state"][name].items()}
    scheduler.load_state_dict(full["scheduler"])
    inner = getattr(scheduler, "scheduler", scheduler)
    for group, lr, base in zip(optimizer.param_groups, inner.get_last_lr(), inner.base_lrs, strict=True):
        group["lr"], group["initial_lr"] = lr, base


def reseed(seed: int, step: int, rank: int, world_size: int) -> None:
    """Seed python, numpy and torch on this rank from (seed, step, rank, world size): the RNG streams of a
    resume in another layout (the checkpoint's per-rank streams belong to other ranks)."""
    value = int(np.random.SeedSequence([seed, step, rank, world_size, 7]).generate_state(1)[0])
    set_seed(value)


def continue_epoch(state: TrainState, order: dict[str, Any], ckpt: Path) -> None:
    """Carry the data position of ``state`` (read under its ``data_order``) into ``order``: at an epoch
    boundary nothing to do; mid-epoch, a change of world size, workers or batch size closes the epoch's
    current segment (:mod:`mmebm_dist.data.replan` plans the rest), any other change is refused naming it."""
    if state.epoch_batch == 0 and not state.epoch_segments:
        return
    changed = {k: (state.data_order.get(k), v) for k, v in order.items() if state.data_order.get(k) != v}
    fixed = {k: c for k, c in changed.items() if k not in REPLANNABLE}
    if fixed:
        detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in fixed.items())
        raise ValueError(
            f"{ckpt} stopped mid-epoch ({state.epoch_batch} batches into epoch {state.epoch}) and the data "
            f"order changed ({detail}): the rest of the epoch cannot be re-planned across that change; "
            f"resume with the original data settings (world size, workers and batch size may change)")
    if changed:
        old = state.data_order
        state.epoch_segments = [*state.epoch_segments, {
            "world_size": old["world_size"], "num_workers": old["num_workers"],
            "batch_size": old["batch_size"], "batches": state.epoch_batch}]
        state.epoch_batch = 0
        log.warning("re-planning the rest of epoch %d over %s (segments so far: %s)", state.epoch,
                    ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()), state.epoch_segments)


def log_global_batch(saved: TrainState, cfg: Config, world: int) -> None:
    """Log a change of samples per optimizer step (batch x accumulation x world) and how to keep it."""
    old_world = int(saved.data_order.get("world_size", 1))
    before = saved.config["data"]["batch_size"] * saved.config["optim"]["grad_accum"] * old_world
    after = cfg.data.batch_size * cfg.optim.grad_accum * world
    if before == after:
        log.info("global batch kept: %d samples per step", after)
        return
    per_accum = cfg.data.batch_size * world
    hint = (f"; optim.grad_accum={before // per_accum} keeps it" if before % per_accum == 0 else
            "; no optim.grad_accum keeps it at this world size and batch size")
    log.warning("global batch changes from %d to %d samples per step (world size %d -> %d)%s", before,
                after, old_world, world, hint)
