"""The training loop: one readable function, the same code single-process, under DDP and under DeepSpeed ZeRO.

The launcher decides the parallelism (``accelerate launch`` + a YAML from launch/accelerate/); the loop sees a
prepared model, optimizer and scheduler. Every source of randomness in a step comes from torch's global RNG,
whose per-rank state is part of each checkpoint, and the data position (epoch, batches consumed) is too: a
resumed run continues exactly where the uninterrupted one would have been.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mmebm_dist import schedule
from mmebm_dist.config import Config, config_to_dict, save_config
from mmebm_dist.data.stream import DataSource, SkipTally, prefetch_to_device
from mmebm_dist.rundir import (
    CHECKPOINTS,
    CONFIG_FILE,
    TrainState,
    append_command,
    complete_checkpoints,
    latest_checkpoint,
    read_train_state,
)
from mmebm_dist.train import elastic, reference_fit
from mmebm_dist.train.capture import capture_step
from mmebm_dist.train.checkpoint import (
    load_initial_weights,
    load_model_weights,
    load_resumable,
    remove_stale_temps,
    save_checkpoint,
    set_aside,
)
from mmebm_dist.train.distributed import describe, make_accelerator, zero_stage
from mmebm_dist.train.heartbeat import Heartbeat, is_timeout
from mmebm_dist.train.metrics import MetricsWriter, SampleTrace, make_trackers
from mmebm_dist.train.resume import apply_optimizer_changes, optimizer_hyperparameters, resume_changes
from mmebm_dist.train.runlock import RunLock
from mmebm_dist.train.signals import StopRequest, run_step_hooks
from mmebm_dist.train.zero3 import hand_energy_gather

log = logging.getLogger("mmebm_dist.train")

IMAGE_SAMPLES = 16
"""Joint samples per TensorBoard grid (4 x 4)."""


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """Adam (AdamW when ``optim.weight_decay > 0``) over the model's parameter groups; amsgrad per config."""
    groups = model.param_groups(cfg.optim)
    kwargs = dict(lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), amsgrad=cfg.optim.amsgrad)
    if cfg.optim.weight_decay > 0:
        return torch.optim.AdamW(groups, weight_decay=cfg.optim.weight_decay, **kwargs)
    return torch.optim.Adam(groups, **kwargs)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LRScheduler:
    """Each group's lr of the current ``train.schedule`` stage (0 for a group the stage does not train),
    times ``optim.lr_decay`` every ``optim.lr_decay_every`` steps."""
    names = [g.get("name", f"group{i}") for i, g in enumerate(optimizer.param_groups)]
    lambdas = schedule.lr_lambdas(schedule.of_config(cfg), names, [g["lr"] for g in optimizer.param_groups],
                                  decay=cfg.optim.lr_decay, every=cfg.optim.lr_decay_every)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


@contextlib.contextmanager
def isolated_rng(device: torch.device):
    """Run a block without moving the training RNG streams (torch CPU/CUDA, numpy, python ``random``).

    Used around data-loader construction and iteration (a torch DataLoader draws its base seed from the global
    RNG when an iterator is created, which happens at different moments in an uninterrupted and in a resumed
    run) and around sampling for images and periodic evaluation (which may or may not run at a given step).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def data_order(cfg: Config, world_size: int, manifest: str) -> dict[str, Any]:
    """Everything that fixes which samples each rank reads, in which order (a mid-epoch resume keeps it)."""
    return {
        "manifest_hash": manifest,
        "batch_size": cfg.data.batch_size,
        "num_workers": cfg.data.num_workers,
        "shuffle_buffer": cfg.data.shuffle_buffer,
        "seed": cfg.train.seed,
        "world_size": world_size,
    }


def train_loader(cfg: Config, source: DataSource, *, rank: int, world_size: int, **options: Any):
    """``make_loader`` over ``source`` (the train split of ``data.path``, resolved once by :func:`setup`)
    with the run's batch size, workers, shuffle buffer and seed (the fields of :func:`data_order`);
    ``options``: the other ``make_loader`` arguments."""
    from mmebm_dist.data.stream import make_loader

    return make_loader(
        source,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.train.seed,
        rank=rank,
        world_size=world_size,
        split="train",
        **options,
    )


def micro_batches(
    cfg: Config,
    source: DataSource,
    *,
    rank: int,
    world_size: int,
    per_epoch: int,
    epoch: int,
    start: int,
    device: torch.device,
    skips: SkipTally | None = None,
    segments: Sequence[dict] = (),
    first_length: int | None = None,
) -> Iterator[tuple[int, int, dict]]:
    """Yield ``(epoch, index, batch)`` forever: ``per_epoch`` batches per epoch on every rank, then reshuffle.

    Reads ``source`` (resolved once: no manifest read per epoch). Starts at batch ``start`` of ``epoch``
    (exact resume through ``make_loader(skip_batches=...)``); ``skips`` counts what ``data.on_error=skip``
    skipped. ``segments``: the parts of ``epoch`` read under another layout (an elastic resume), whose rest
    holds ``first_length`` batches per rank.
    """
    length = per_epoch if first_length is None else first_length
    while True:
        with isolated_rng(device):
            loader = train_loader(
                cfg,
                source,
                rank=rank,
                world_size=world_size,
                epoch=epoch,
                on_error=cfg.data.on_error,
                skip_batches=start,
                epoch_length=length,
                segments=segments,
                check_sha256=cfg.data.check_sha256,
                pin_memory=device.type == "cuda",
            )
            loader = iter(skips.track(loader) if skips is not None else loader)
        for index in range(start, length):
            with isolated_rng(device):
                batch = next(loader, None)
            if batch is None:
                raise RuntimeError(
                    f"the loader of '{cfg.data.path}' ended after {index} batches of epoch {epoch} on rank "
                    f"{rank}, but epoch_batches promised {length}; check the shards (`mmebm data verify`)"
                )
            yield epoch, index, batch
        del loader
        epoch, start, segments, length = epoch + 1, 0, (), per_epoch


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _parameter_digest(model: torch.nn.Module) -> str:
    """Hash of every parameter's bytes: equal on all ranks iff the replicas agree (DDP, ZeRO-1/2)."""
    h = hashlib.sha1()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


Evaluator = Callable[[torch.nn.Module, Config, int], dict[str, Any]]
"""A periodic evaluation: (unwrapped model in eval mode, config, step) -> figures; the CLI passes
``mmebm_dist.evaluate.periodic.periodic_eval`` (the loop never imports evaluation code)."""


@dataclasses.dataclass(kw_only=True)
class Clock:
    """Wall-clock bookkeeping of one training segment: the window of the next metrics record, and the run's
    training time summed over resumed segments."""

    base_wall: float
    """Seconds of training before this segment (from the checkpoint)."""
    segment_start: float = dataclasses.field(default_factory=time.time)
    window_start: float = dataclasses.field(default_factory=time.time)
    window_steps: int = 0

    def wall_time(self, now: float) -> float:
        return self.base_wall + now - self.segment_start


@dataclasses.dataclass(kw_only=True, eq=False)
class TrainSession:
    """Everything a training step needs, built once by :func:`setup`; :func:`train_step` advances it."""

    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module
    """The prepared (DDP/DeepSpeed-wrapped) model."""
    unwrapped: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState
    batches: Iterator[tuple[int, int, dict]]
    """``(epoch, index, batch)`` micro-batches on this rank (:func:`micro_batches`)."""
    per_epoch: int
    """Micro-batches per epoch on every rank (0: unknown, for a synthetic stream)."""
    metrics: MetricsWriter
    trace: SampleTrace | None
    run_dir: Path
    info: dict[str, Any]
    """:func:`describe` of the process."""
    grad_norm: torch.Tensor | None = None
    """Pre-clip global gradient norm of the last synchronised step (``optim.grad_clip > 0``)."""
    data_wait: float = 0.0
    """Seconds spent waiting for micro-batches since the last metrics record."""
    last_batch: dict | None = None
    """The step's last micro-batch (the runaway guard re-runs it on the weights due to be checkpointed)."""
    skips: SkipTally = dataclasses.field(default_factory=SkipTally)
    """Samples and shards this process skipped under ``data.on_error=skip``."""
    data_skipped: int = 0
    """The skips of every rank, summed at the last metrics record (earlier resumed segments included)."""
    skipped_before: int = 0
    """The skips of the run's earlier segments (from the checkpoint this session resumed)."""
    stages: list[schedule.Stage] = dataclasses.field(default_factory=list)
    """``train.schedule`` resolved (:func:`mmebm_dist.schedule.of_config`)."""
    remainder: tuple[int, int] | None = None
    """(epoch, batches per rank) of an epoch whose rest was re-planned over this job's ranks."""

    def epoch_length(self, epoch: int) -> int:
        """Micro-batches per rank in ``epoch`` (fewer in the re-planned rest of an epoch)."""
        if self.remainder is not None and self.remainder[0] == epoch:
            return self.remainder[1]
        return self.per_epoch

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def samples_per_step(self) -> int:
        return self.cfg.data.batch_size * self.cfg.optim.grad_accum * self.world


def _build_model(cfg: Config, accelerator: Accelerator, *, from_checkpoint: bool,
                 moved: Path | None = None) -> tuple:
    """Model, optimizer and scheduler built with the run's seed and prepared by ``accelerator``; ``moved``:
    a checkpoint of another layout whose model.pt the model takes before it is wrapped (elastic resume)."""
    from mmebm_dist.models import build_model

    set_seed(cfg.train.seed)  # identical initial parameters on every rank
    model = build_model(cfg.model)
    if moved is not None:
        load_model_weights(model, moved)
    if cfg.train.init_from and not from_checkpoint:  # a resumed run takes its weights from its checkpoint
        source = load_initial_weights(model, cfg.train.init_from)
        log.info("initial weights from %s", source)
    reference_fit.attach(model, cfg)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    capture_step(model, optimizer, cfg, accelerator.device)
    prepared = accelerator.prepare(model, optimizer, scheduler)
    hand_energy_gather(model)  # ZeRO-3: the prior's fused chains gather the energy (train/zero3.py)
    return prepared


def _check_presence_order(cfg: Config, manifest: dict[str, Any]) -> None:
    """Every modality of the model is in the data (``manifest``: that of ``data.path``); an incomplete set's
    ``present`` mask is in the manifest's modality order and the model reads it in model.modalities order:
    they must be the same list."""
    from mmebm_dist.data.shards import is_incomplete, modality_names

    names = [m.name for m in cfg.model.modalities]
    absent = [n for n in names if n not in modality_names(manifest)]
    if absent:  # else a KeyError at the first batch
        raise ValueError(f"model.modalities {absent} are not in the data set '{cfg.data.path}' (it holds "
                         f"{modality_names(manifest)}); remove them from model.modalities or use data that "
                         "has them")
    if is_incomplete(manifest) and names != modality_names(manifest):
        raise ValueError(f"'{cfg.data.path}' is incomplete (its batches carry a presence mask in the order "
                         f"{modality_names(manifest)}); list model.modalities in that order, got {names}")


def _epoch_batches(cfg: Config, world: int, source: DataSource) -> int:
    from mmebm_dist.data.stream import epoch_batches

    per_epoch = epoch_batches(
        source,
        batch_size=cfg.data.batch_size,
        world_size=world,
        num_workers=cfg.data.num_workers,
        split="train",
    )
    if per_epoch < 1:
        raise ValueError(
            f"'{cfg.data.path}' gives no full batch of {cfg.data.batch_size} per rank with {world} "
            "processes; lower data.batch_size or build more samples"
        )
    _check_presence_order(cfg, source.manifest)
    return per_epoch


def _initial_state(cfg: Config, accelerator: Accelerator, optimizer, scheduler, ckpt: Path | None,
                   order: dict, resume: bool, record: bool, checkpoint: str | None,
                   moved: Path | None = None, unwrapped: torch.nn.Module | None = None) -> TrainState:
    """Step 0, or the state restored from the newest checkpoint that loads (or ``checkpoint``): model,
    optimizer, scheduler, RNG of every rank, then the optimizer overrides of a resume applied. ``moved``: a
    checkpoint of another layout, resumed elastically (:mod:`mmebm_dist.train.elastic`)."""
    run_dir = Path(cfg.train.out_dir)
    state = TrainState(step=0, epoch=0, epoch_batch=0, data_order=order, config=config_to_dict(cfg))
    if resume and ckpt is None:
        log.warning("no complete checkpoint in %s/%s: starting from step 0", run_dir, CHECKPOINTS)
    if ckpt is not None:
        fresh = optimizer_hyperparameters(optimizer)

        def refuse(saved: TrainState, path: Path) -> None:  # before loading: a changed model would not fit
            resume_changes(saved.config, cfg, path)

        if moved is not None:
            ckpt, state, newer = _load_moved(cfg, accelerator, optimizer, scheduler, unwrapped, moved)
        else:
            ckpt, state, newer = load_resumable(accelerator, run_dir, checkpoint, check=refuse)
        changes = resume_changes(state.config, cfg, ckpt)
        elastic.continue_epoch(state, order, ckpt)
        apply_optimizer_changes(optimizer, scheduler, fresh, changes)
        if record:
            set_aside(accelerator, newer)
        state.data_order, state.config = order, config_to_dict(cfg)
        log.info(
            "resumed from %s: step %d, epoch %d, batch %d", ckpt, state.step, state.epoch, state.epoch_batch
        )
    elif record and (run_dir / CHECKPOINTS).exists() and any((run_dir / CHECKPOINTS).iterdir()):
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; resume it with `mmebm train --resume {run_dir}`"
            " or choose another train.out_dir"
        )
    return state


def _load_moved(cfg: Config, accelerator: Accelerator, optimizer, scheduler, unwrapped: torch.nn.Module,
                ckpt: Path) -> tuple[Path, TrainState, list[Path]]:
    """Resume from ``ckpt`` written in another layout (its model.pt is already in the model): optimizer and
    scheduler from optimizer_full.pt, RNG streams re-derived per rank; returns as :func:`load_resumable`."""
    state = read_train_state(ckpt)
    elastic.load_full_optimizer_state(optimizer, scheduler, unwrapped, cfg, ckpt)
    elastic.reseed(cfg.train.seed, state.step, accelerator.process_index, accelerator.num_processes)
    elastic.log_global_batch(state, cfg, accelerator.num_processes)
    found = complete_checkpoints(cfg.train.out_dir)
    return ckpt, state, found[found.index(ckpt) + 1 :]


def setup(
    cfg: Config,
    *,
    resume: bool = False,
    trace_samples: bool = False,
    record: bool = True,
    batches: Iterator[tuple[int, int, dict]] | None = None,
    checkpoint: str | None = None,
) -> TrainSession:
    """Build the accelerator, model, optimizer, scheduler, state (restored when ``resume``) and data stream.

    ``record=False`` writes nothing to the run directory (``--dry-run``, benchmarks); ``batches`` replaces
    the stream of ``data.path`` (benchmarks on synthetic data; the epoch position is then not tracked).
    """
    from mmebm_dist.data.stream import resolve_source

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    accelerator = make_accelerator(cfg, log_with=make_trackers(cfg, resume=resume) if record else None)
    main = accelerator.is_main_process
    logging.getLogger("mmebm_dist").setLevel(logging.INFO if main else logging.WARNING)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.train.out_dir)
    rank, world = accelerator.process_index, accelerator.num_processes

    if record:
        remove_stale_temps(accelerator, run_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    moved = elastic.elastic_checkpoint(accelerator, run_dir, checkpoint) if ckpt is not None else None
    if moved is not None:  # refuse a changed model before its weights are loaded
        resume_changes(read_train_state(moved).config, cfg, moved)
    model, optimizer, scheduler = _build_model(cfg, accelerator, from_checkpoint=ckpt is not None,
                                               moved=moved)
    unwrapped = accelerator.unwrap_model(model)
    set_seed(cfg.train.seed, device_specific=True)  # per-rank Langevin noise and reparameterisation draws

    synthetic = batches is not None
    # The data set resolved once (over HTTP: one manifest fetch), handed to the planning and the loaders.
    source = None if synthetic else resolve_source(cfg.data.path, "train", cfg.data.shard_url or None)
    order = data_order(cfg, world, "synthetic" if synthetic else source.manifest_hash)
    per_epoch = 0 if synthetic else _epoch_batches(cfg, world, source)
    state = _initial_state(cfg, accelerator, optimizer, scheduler, ckpt, order, resume, record, checkpoint,
                           moved, unwrapped)
    remainder = None if synthetic else _remainder(cfg, source, state, rank, world)
    if record and main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
        append_command(run_dir, world)
    accelerator.wait_for_everyone()

    info = describe(accelerator)
    stages = schedule.of_config(cfg)
    extra = next((update for stage in stages for update in stage.extra_updates), None)
    if extra is not None and info["distributed_type"] == "DEEPSPEED":
        raise ValueError(f"{extra.setting} runs {extra.what} that drops the other parameters' gradients "
                         "before its optimizer step, which DeepSpeed does not allow; set it back to its "
                         "default or train without DeepSpeed")
    log.info(
        "process 0 of %d: %s, ZeRO stage %d, %d batches/epoch/rank, %d threads",
        world, info["distributed_type"], info["zero_stage"], per_epoch, info["threads"],
    )
    metrics = MetricsWriter(run_dir, enabled=main and record, start_step=state.step, accelerator=accelerator,
                            config=cfg)
    trace = None
    if trace_samples:
        trace = SampleTrace(run_dir, rank, start_step=state.step, modalities=list(unwrapped.modalities))
        trace.write({"event": "start", "start_step": state.step, **info})
    skips = SkipTally()  # data.on_error=skip: samples/shards this process skipped (logged as data_skipped)
    if batches is None:
        batches = micro_batches(
            cfg, source, rank=rank, world_size=world, per_epoch=per_epoch, epoch=state.epoch,
            start=state.epoch_batch, device=accelerator.device, skips=skips, segments=state.epoch_segments,
            first_length=remainder[1] if remainder else None,
        )
        batches = prefetch_to_device(batches, accelerator.device)  # CUDA: the next copy overlaps this step
    model.train()
    return TrainSession(
        cfg=cfg, accelerator=accelerator, model=model, unwrapped=unwrapped, optimizer=optimizer,
        scheduler=scheduler, state=state, batches=batches, per_epoch=per_epoch, metrics=metrics, trace=trace,
        run_dir=run_dir, info=info, stages=stages, skips=skips,
        skipped_before=state.data_skipped, data_skipped=state.data_skipped, remainder=remainder,
    )


def _remainder(cfg: Config, source: DataSource, state: TrainState, rank: int,
               world: int) -> tuple[int, int] | None:
    """(epoch, batches per rank) of the re-planned rest of ``state.epoch`` when earlier parts of it ran in
    another layout (logging what it holds); None otherwise. An empty rest moves ``state`` to the next
    epoch."""
    from mmebm_dist.data.replan import remainder_size

    if not state.epoch_segments:
        return None
    segments = state.epoch_segments
    plan = train_loader(cfg, source, rank=rank, world_size=world, epoch=state.epoch, segments=segments).plan
    batches, left, dropped = remainder_size(plan, segments)
    log.info("the rest of epoch %d: %d samples over %d ranks, %d batches of %d each; %d samples left out "
             "(they do not fill a batch on every rank)", state.epoch, left, world, batches,
             cfg.data.batch_size, dropped)
    if batches == 0:
        state.epoch, state.epoch_batch, state.epoch_segments = state.epoch + 1, 0, []
        return None
    return state.epoch, batches


def train_step(session: TrainSession, step: int) -> dict[str, torch.Tensor]:
    """Optimizer step ``step``: the model's ``on_step`` hook with the step's stage (:mod:`mmebm_dist.schedule`
    says what a stage changes), the optimizer state of groups that start training reset, ``optim.grad_accum``
    micro-batches (forward, backward, clipping at the sync, optimizer update), the stage's extra updates, the
    runaway check on every forward, the scheduler step and the state's position.

    Returns this rank's loss terms averaged over the micro-batches (detached float scalars).
    """
    cfg, accelerator, model, state = session.cfg, session.accelerator, session.model, session.state
    accum = cfg.optim.grad_accum
    step_terms: dict[str, torch.Tensor] = {}
    stage = schedule.stage_at(session.stages, step)
    session.unwrapped.on_step(step, stage)
    _reset_optimizer_state(session.optimizer, schedule.starting_groups(session.stages, step))
    for _ in range(accum):
        t0 = time.perf_counter()
        epoch, index, batch = next(session.batches)
        session.data_wait += time.perf_counter() - t0
        if session.trace is not None:
            session.trace.batch(step, epoch, index, batch)
        batch = _to_device(batch, accelerator.device)
        session.last_batch = batch
        with accelerator.accumulate(model):
            out = model(batch)
            accelerator.backward(out["loss"])
            if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                session.grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            session.optimizer.step()
            session.optimizer.zero_grad(set_to_none=True)
        terms = _checked_terms(session, out, step,
                               f"stage '{stage.name}' ({stage.index + 1} of {len(session.stages)}), ")
        for key, value in terms.items():
            step_terms[key] = step_terms.get(key, 0.0) + value / accum
    for update in stage.extra_updates:
        _extra_update(session, batch, step, update)
    session.scheduler.step()
    state.step, state.samples_seen = step, state.samples_seen + session.samples_per_step
    if index + 1 == session.epoch_length(epoch):
        state.epoch, state.epoch_batch, state.epoch_segments = epoch + 1, 0, []
    else:
        state.epoch, state.epoch_batch = epoch, index + 1
    return step_terms


def _extra_update(session: TrainSession, batch: dict, step: int, update: schedule.Update) -> None:
    """One of the stage's extra updates on ``batch``: the loss of ``update.objective`` (fresh random draws);
    the gradients of the groups outside ``update.groups`` are dropped before the optimizer step, so Adam
    leaves those parameters and their moments untouched."""
    model, optimizer = session.model, session.optimizer
    with session.unwrapped.objective(update.objective), session.accelerator.accumulate(model):
        out = model(batch)
        session.accelerator.backward(out["loss"])
        for group in optimizer.param_groups:
            if group.get("name") not in update.groups:
                for p in group["params"]:
                    p.grad = None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _checked_terms(session, out, step, f"{update.what} ({update.setting}), ")


def _checked_terms(session: TrainSession, out: dict, step: int, where: str) -> dict[str, torch.Tensor]:
    """The detached float scalars of a forward's output, checked for a runaway; a runaway names ``where``
    (the stage or update) and the last good checkpoint."""
    terms = {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0}
    try:
        session.unwrapped.check_runaway(terms, step)
    except FloatingPointError as exc:  # models.RunawayError
        raise _with_last_checkpoint(exc, session.run_dir, where) from None
    return terms


def _reset_optimizer_state(optimizer: torch.optim.Optimizer, names: list[str]) -> None:
    """Forget the optimizer state (Adam's moments and step count) of the named parameter groups."""
    inner = optimizer
    while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
        inner = inner.optimizer  # accelerate's AcceleratedOptimizer, DeepSpeed's ZeRO wrapper
    for group in inner.param_groups:
        if group.get("name") in names:
            for p in group["params"]:
                inner.state.pop(p, None)


def log_metrics(session: TrainSession, step: int, step_terms: dict[str, torch.Tensor], clock: Clock) -> dict:
    """Reduce the step's terms over ranks (collective) and write one metrics record; returns the reduced
    terms and starts the next timing window."""
    keys = sorted(step_terms)  # same order on every rank for the all-reduce
    values = session.accelerator.reduce(torch.stack([step_terms[k] for k in keys]), reduction="mean")
    reduced = dict(zip(keys, values.tolist(), strict=True))
    now, state = time.time(), session.state
    record = {
        "step": step,
        "epoch": state.epoch,
        "epoch_batch": state.epoch_batch,
        **reduced,
        "samples_per_s": clock.window_steps * session.samples_per_step / max(now - clock.window_start, 1e-9),
        "data_wait_s": session.data_wait / clock.window_steps,
        "world_size": session.world,
        "samples_seen": state.samples_seen,
        "wall_time_s": clock.wall_time(now),
    }
    if session.cfg.train.schedule:
        stage = schedule.stage_at(session.stages, step)
        record.update({"stage": stage.name, "stage_index": stage.index})
    names = [g.get("name", f"group{i}") for i, g in enumerate(session.optimizer.param_groups)]
    record.update({f"lr/{name}": lr for name, lr in zip(names, session.scheduler.get_last_lr(), strict=True)})
    if session.grad_norm is not None:
        record["grad_norm"] = float(session.grad_norm)
    record["data_skipped"] = session.data_skipped = run_skips(session)
    session.metrics.log(record)
    clock.window_start, clock.window_steps, session.data_wait = now, 0, 0.0
    return reduced


def run_skips(session: TrainSession) -> int:
    """Samples and shards skipped by every rank since the run began (a collective: call on all ranks)."""
    skipped = torch.tensor(float(session.skips.total), device=session.accelerator.device)
    return session.skipped_before + int(session.accelerator.reduce(skipped, reduction="sum").item())


def after_step(session: TrainSession, step: int, clock: Clock, evaluate: Evaluator | None,
               stopped_by: str | None = None) -> None:
    """Sample grids, periodic evaluation and checkpoint, each when its ``train.*_every`` says so (and a
    checkpoint when a stop signal arrived); the weights pass the runaway guard before they are saved."""
    cfg, accelerator = session.cfg, session.accelerator
    device = accelerator.device
    run_here = session.main or zero_stage(accelerator) == 3  # ZeRO-3 gathers partitioned weights collectively
    if cfg.train.image_every > 0 and step % cfg.train.image_every == 0 and run_here:
        session.metrics.images(step, _joint_samples(session.unwrapped, cfg, step, device))
    if cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0:
        if run_here:
            _periodic_eval(session, step, evaluate)
        accelerator.wait_for_everyone()
    periodic = cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0
    if periodic or step == cfg.train.steps or stopped_by:
        guarded = session.model if zero_stage(accelerator) == 3 else session.unwrapped  # ZeRO-3 gathers
        _guard_weights(guarded, session.unwrapped, session.last_batch, step, device, session.run_dir)
        session.state.wall_time = clock.wall_time(time.time())
        session.state.data_skipped = session.data_skipped = run_skips(session)
        session.metrics.flush()
        keep = cfg.train.keep_checkpoints
        def full_optimizer_state(directory: Path) -> None:
            elastic.write_full_optimizer_state(accelerator, session.unwrapped, session.optimizer,
                                               session.scheduler, cfg, directory)

        save_checkpoint(accelerator, session.model, session.run_dir, session.state, keep=keep,
                        extra=full_optimizer_state)


def finish(session: TrainSession) -> None:
    """Close the trace (with the parameter digest) and the metrics; end the accelerator's run."""
    if session.trace is not None:
        stage3 = zero_stage(session.accelerator) == 3
        digest = None if stage3 else _parameter_digest(session.unwrapped)
        end = {"event": "end", "step": session.state.step, "param_digest": digest}
        session.trace.write({**end, **session.info})
        session.trace.close()
    session.metrics.close()
    session.accelerator.wait_for_everyone()
    session.accelerator.end_training()


def train(
    cfg: Config, *, resume: bool = False, trace_samples: bool = False, evaluate: Evaluator | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.train.out_dir`` (resuming from its newest checkpoint that loads, or from
    ``checkpoint``, when ``resume``); ``evaluate`` runs every ``train.eval_every`` steps.

    Returns a summary (final step, last reduced loss terms, world size, run directory, and ``stopped_by``:
    the signal's name when SIGTERM/SIGUSR1 stopped the run after a checkpoint). Rank 0 holds the run
    directory's lock throughout; a collective that times out is reported naming the rank that stopped.
    """
    if cfg.train.eval_every > 0 and evaluate is None:
        raise ValueError("train.eval_every > 0 needs an evaluation: pass evaluate= (`mmebm train` passes "
                         "mmebm_dist.evaluate.periodic.periodic_eval) or set train.eval_every=0")
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = Path(cfg.train.out_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.out_dir '{run_dir}' is an existing file, not a directory; choose another "
                         "train.out_dir")
    lock = RunLock(run_dir) if rank == 0 else contextlib.nullcontext()
    with lock, StopRequest() as stop, Heartbeat(run_dir, rank, world, cfg.train.dist_timeout_s) as heartbeat:
        try:
            return _train(cfg, stop, heartbeat, resume=resume, trace_samples=trace_samples, evaluate=evaluate,
                          checkpoint=checkpoint)
        except RuntimeError as exc:
            if world > 1 and is_timeout(exc):
                raise heartbeat.explain_timeout(exc) from exc
            raise


def _train(cfg: Config, stop: StopRequest, heartbeat: Heartbeat, *, resume: bool, trace_samples: bool,
           evaluate: Evaluator | None, checkpoint: str | None) -> dict[str, Any]:
    """The body of :func:`train`, inside the run lock, the stop-signal handlers and the heartbeat."""
    session = setup(cfg, resume=resume, trace_samples=trace_samples, checkpoint=checkpoint)
    state = session.state
    heartbeat.start(state.step)
    stopped_by = None
    bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not session.main, desc="train",
               dynamic_ncols=True)
    clock = Clock(base_wall=state.wall_time)
    reduced: dict[str, float] = {}
    for step in range(state.step + 1, cfg.train.steps + 1):
        step_terms = train_step(session, step)
        clock.window_steps += 1
        bar.update(1)
        run_step_hooks(step, session.unwrapped)
        heartbeat.beat(step)
        stopped_by = stop.agreed(session.accelerator.device)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            reduced = log_metrics(session, step, step_terms, clock)
            bar.set_postfix(loss=f"{reduced['loss']:.4g}", refresh=False)
        after_step(session, step, clock, evaluate, stopped_by)
        if stopped_by:
            log.warning("%s: stopped after step %d with checkpoint %s; continue with "
                        "`mmebm train --resume %s`", stopped_by, step, latest_checkpoint(session.run_dir),
                        session.run_dir)
            break
    bar.close()
    finish(session)
    return {
        "step": state.step,
        "terms": reduced,
        "data_skipped": session.data_skipped,
        "world_size": session.world,
        "run_dir": str(session.run_dir),
        "is_main_process": session.main,
        "stopped_by": stopped_by,
    }


def _joint_samples(
    model: torch.nn.Module, cfg: Config, step: int, device: torch.device
) -> dict[str, torch.Tensor]:
    """Joint samples for TensorBoard from a generator seeded by the step (the training RNG is untouched)."""
    generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + step)
    model.eval()
    try:
        with torch.no_grad(), isolated_rng(device):
            return model.generate_joint(IMAGE_SAMPLES, generator=generator)
    finally:
        model.train()


def _periodic_eval(session: TrainSession, step: int, evaluate: Evaluator) -> None:
    """Run ``evaluate`` on the unwrapped model in eval mode on isolated RNG streams and log its figures."""
    model = session.unwrapped
    model.eval()
    try:
        with isolated_rng(session.accelerator.device):
            results = evaluate(model, session.cfg, step)
    finally:
        model.train()
    session.metrics.log(
        {"step": step, **{f"eval/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}}
    )


def _with_last_checkpoint(exc: FloatingPointError, run_dir: Path, prefix: str) -> FloatingPointError:
    from mmebm_dist.models.multimodal_vae import RunawayError

    last = latest_checkpoint(run_dir)
    where = f"the last good checkpoint is {last}" if last else "no checkpoint was written before it"
    return RunawayError(f"{prefix}{exc}; {where}")


def _guard_weights(
    model: torch.nn.Module, unwrapped: torch.nn.Module, batch: dict, step: int, device: torch.device,
    run_dir: Path,
) -> None:
    """Run the runaway guard on the weights about to be checkpointed (the step's own guard saw the loss of
    the weights before its optimizer step): one forward of the step's last batch, off the training RNG, with
    the buffers it may update (spectral-norm vectors) restored."""
    buffers = {name: b.clone() for name, b in unwrapped.named_buffers()}
    try:
        with isolated_rng(device), torch.no_grad():  # Langevin enables autograd where it needs it
            out = model(batch)
        terms = {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0}
        unwrapped.check_runaway(terms, step)
    except FloatingPointError as exc:
        prefix = f"step {step}: the weights due to be checkpointed fail the runaway guard: "
        raise _with_last_checkpoint(exc, run_dir, prefix) from None
    finally:
        with torch.no_grad():
            for name, b in unwrapped.named_buffers():
                b.copy_(buffers[name])
