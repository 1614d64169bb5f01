"""The training loop: one readable function, the same code single-process, under DDP and under DeepSpeed ZeRO.

The launcher decides the parallelism (``accelerate launch`` + a YAML from launch/accelerate/); the loop sees a
prepared model, optimizer and scheduler. Every source of randomness in a step comes from torch's global RNG,
whose per-rank state is part of each checkpoint, and the data position (epoch, batches consumed) is too: a
resumed run continues exactly where the uninterrupted one would have been.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from mmebm_dist.config import Config, config_to_dict, save_config
from mmebm_dist.train.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_initial_weights,
    load_resumable,
    save_checkpoint,
    set_aside,
)
from mmebm_dist.train.distributed import describe, make_accelerator, zero_stage
from mmebm_dist.train.heartbeat import Heartbeat, is_timeout
from mmebm_dist.train.metrics import MetricsWriter, SampleTrace
from mmebm_dist.train.resume import apply_optimizer_changes, optimizer_hyperparameters, resume_changes
from mmebm_dist.train.runlock import RunLock
from mmebm_dist.train.signals import StopRequest, run_step_hooks

COMMANDS_LOG = "commands.log"
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


def compile_forward(model: torch.nn.Module, cfg: Config) -> None:
    """``torch.compile`` the model's forward in place when ``train.compile`` asks for it.

    Static shapes: a training step's shapes do not change, and with dynamic ones the graph of a helper called
    at several sizes (the per-modality decoders) gets a symbolic batch that the reparameterisation draws
    (``torch.rand(shape, generator=...)``) refuse.
    """
    if cfg.train.compile:
        model.forward = torch.compile(model.forward, dynamic=False)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config) -> torch.optim.lr_scheduler.LRScheduler:
    """Exponential decay: every group's lr times ``optim.lr_decay`` every ``optim.lr_decay_every`` steps."""
    decay, every = cfg.optim.lr_decay, cfg.optim.lr_decay_every
    if every <= 0:
        raise ValueError(f"optim.lr_decay_every must be positive, got {every}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: decay ** (step // every))


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


def train_loader(cfg: Config, *, rank: int, world_size: int, **options: Any):
    """``make_loader`` over the train split of ``data.path`` with the run's batch size, workers, shuffle
    buffer and seed (the fields of :func:`data_order`); ``options``: the other ``make_loader`` arguments."""
    from mmebm_dist.data.stream import make_loader

    return make_loader(
        cfg.data.path,
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
    cfg: Config, *, rank: int, world_size: int, per_epoch: int, epoch: int, start: int, device: torch.device
) -> Iterator[tuple[int, int, dict]]:
    """Yield ``(epoch, index, batch)`` forever: ``per_epoch`` batches per epoch on every rank, then reshuffle.

    Starts at batch ``start`` of ``epoch`` (exact resume through ``make_loader(skip_batches=...)``).
    """
    while True:
        with isolated_rng(device):
            loader = iter(
                train_loader(
                    cfg,
                    rank=rank,
                    world_size=world_size,
                    epoch=epoch,
                    on_error=cfg.data.on_error,
                    skip_batches=start,
                )
            )
        for index in range(start, per_epoch):
            with isolated_rng(device):
                batch = next(loader, None)
            if batch is None:
                raise RuntimeError(
                    f"the loader of '{cfg.data.path}' ended after {index} batches of epoch {epoch} on rank "
                    f"{rank}, but epoch_batches promised {per_epoch}; check the shards (`mmebm data verify`)"
                )
            yield epoch, index, batch
        del loader
        epoch, start = epoch + 1, 0


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _parameter_digest(model: torch.nn.Module) -> str:
    """Hash of every parameter's bytes: equal on all ranks iff the replicas agree (DDP, ZeRO-1/2)."""
    h = hashlib.sha1()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(
    cfg: Config, *, resume: bool = False, trace_samples: bool = False, checkpoint: str | None = None
) -> dict[str, Any]:
    """Train ``cfg`` into ``cfg.train.out_dir`` (resuming from its newest checkpoint that loads, or from
    ``checkpoint``, when ``resume``).

    Returns a summary (final step, last reduced loss terms, world size, run directory, and ``stopped_by``:
    the signal's name when SIGTERM/SIGUSR1 stopped the run after a checkpoint). Rank 0 holds the run
    directory's lock throughout; a collective that times out is reported naming the rank that stopped.
    """
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    run_dir = Path(cfg.train.out_dir)
    lock = RunLock(run_dir) if rank == 0 else contextlib.nullcontext()
    with lock, StopRequest() as stop, Heartbeat(run_dir, rank, world, cfg.train.dist_timeout_s) as heartbeat:
        try:
            return _train(cfg, stop, heartbeat, resume=resume, trace_samples=trace_samples,
                          checkpoint=checkpoint)
        except RuntimeError as exc:
            if world > 1 and is_timeout(exc):
                raise heartbeat.explain_timeout(exc) from exc
            raise


def _train(
    cfg: Config,
    stop: StopRequest,
    heartbeat: Heartbeat,
    *,
    resume: bool,
    trace_samples: bool,
    checkpoint: str | None,
) -> dict[str, Any]:
    """The body of :func:`train`, inside the run lock, the stop-signal handlers and the heartbeat."""
    from mmebm_dist.data.shards import manifest_hash
    from mmebm_dist.data.stream import epoch_batches
    from mmebm_dist.models import build_model

    if cfg.train.keep_checkpoints < 1:
        raise ValueError(
            f"train.keep_checkpoints must be at least 1 (resume needs one), got {cfg.train.keep_checkpoints}"
        )
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    logging.getLogger("mmebm_dist").setLevel(logging.INFO if main else logging.WARNING)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.train.out_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    device = accelerator.device

    if cfg.model.prior.fit == "posthoc" and not cfg.train.init_from:
        raise ValueError("model.prior.fit=posthoc trains only the energy of a trained model: set "
                         "train.init_from=<its run directory> (a fixed-prior run)")
    ckpt = latest_checkpoint(run_dir) if resume else None
    set_seed(cfg.train.seed)  # identical initial parameters on every rank
    model = build_model(cfg.model)
    if cfg.train.init_from and ckpt is None:  # a resumed run takes its weights from its own checkpoint
        source = load_initial_weights(model, cfg.train.init_from)
        log.info("initial weights from %s", source)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    compile_forward(model, cfg)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    unwrapped = accelerator.unwrap_model(model)
    modalities = list(unwrapped.modalities)
    set_seed(cfg.train.seed, device_specific=True)  # per-rank Langevin noise and reparameterisation draws

    manifest = manifest_hash(cfg.data.path)
    order = data_order(cfg, world, manifest)
    per_epoch = epoch_batches(
        cfg.data.path,
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

    state = TrainState(step=0, epoch=0, epoch_batch=0, data_order=order, config=config_to_dict(cfg))
    if resume and ckpt is None:
        log.warning("no complete checkpoint in %s/checkpoints: starting from step 0", run_dir)
    if ckpt is not None:
        fresh = optimizer_hyperparameters(optimizer)

        def refuse(saved: TrainState, path: Path) -> None:  # before loading: a changed model would not fit
            resume_changes(saved.config, cfg, path)

        ckpt, state, newer = load_resumable(accelerator, run_dir, checkpoint, check=refuse)
        changes = resume_changes(state.config, cfg, ckpt)
        _check_data_order(state, order, ckpt)
        apply_optimizer_changes(optimizer, scheduler, fresh, changes)
        set_aside(accelerator, newer)
        state.data_order, state.config = order, config_to_dict(cfg)
        log.info(
            "resumed from %s: step %d, epoch %d, batch %d", ckpt, state.step, state.epoch, state.epoch_batch
        )
    elif run_dir.joinpath("checkpoints").exists() and any(run_dir.joinpath("checkpoints").iterdir()):
        raise FileExistsError(
            f"{run_dir} already holds checkpoints; resume it with `mmebm train --resume {run_dir}`"
            " or choose another train.out_dir"
        )
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.json")
        _append_command(run_dir, world)
    accelerator.wait_for_everyone()
    heartbeat.start(state.step)

    info = describe(accelerator)
    log.info(
        "process 0 of %d: %s, ZeRO stage %d, %d batches/epoch/rank, %d threads",
        world,
        info["distributed_type"],
        info["zero_stage"],
        per_epoch,
        info["threads"],
    )
    metrics = MetricsWriter(run_dir, enabled=main, start_step=state.step)
    trace = None
    if trace_samples:
        trace = SampleTrace(run_dir, rank, start_step=state.step, modalities=modalities)
        trace.write({"event": "start", "start_step": state.step, **info})
    batches = micro_batches(
        cfg,
        rank=rank,
        world_size=world,
        per_epoch=per_epoch,
        epoch=state.epoch,
        start=state.epoch_batch,
        device=device,
    )
    every_rank_samples = zero_stage(accelerator) == 3  # ZeRO-3 gathers partitioned weights collectively
    samples_per_step = cfg.data.batch_size * cfg.optim.grad_accum * world
    group_names = [g.get("name", f"group{i}") for i, g in enumerate(optimizer.param_groups)]

    model.train()
    bar = tqdm(total=cfg.train.steps, initial=state.step, disable=not main, desc="train", dynamic_ncols=True)
    segment_start, window_start, window_steps, data_wait = time.time(), time.time(), 0, 0.0
    base_wall, reduced, grad_norm, stopped_by = state.wall_time, {}, None, None
    for step in range(state.step + 1, cfg.train.steps + 1):
        step_terms: dict[str, torch.Tensor] = {}
        for _ in range(cfg.optim.grad_accum):
            t0 = time.perf_counter()
            epoch, index, batch = next(batches)
            data_wait += time.perf_counter() - t0
            if trace is not None:
                trace.batch(step, epoch, index, batch)
            batch = _to_device(batch, device)
            with accelerator.accumulate(model):
                out = model(batch)
                accelerator.backward(out["loss"])
                if accelerator.sync_gradients and cfg.optim.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            terms = {k: v.detach().float() for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0}
            _check_runaway(unwrapped, terms, step, run_dir)
            for key, value in terms.items():
                step_terms[key] = step_terms.get(key, 0.0) + value / cfg.optim.grad_accum
        scheduler.step()
        state.step, state.samples_seen = step, state.samples_seen + samples_per_step
        state.epoch, state.epoch_batch = (epoch + 1, 0) if index + 1 == per_epoch else (epoch, index + 1)
        window_steps += 1
        bar.update(1)
        run_step_hooks(step, unwrapped)
        heartbeat.beat(step)
        stopped_by = stop.agreed(device)

        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            keys = sorted(step_terms)  # same order on every rank for the all-reduce
            values = accelerator.reduce(torch.stack([step_terms[k] for k in keys]), reduction="mean")
            reduced = dict(zip(keys, values.tolist(), strict=True))
            now = time.time()
            record = {
                "step": step,
                "epoch": state.epoch,
                "epoch_batch": state.epoch_batch,
                **reduced,
                "samples_per_s": window_steps * samples_per_step / max(now - window_start, 1e-9),
                "data_wait_s": data_wait / window_steps,
                "world_size": world,
                "samples_seen": state.samples_seen,
                "wall_time_s": base_wall + now - segment_start,
            }
            record.update(
                {f"lr/{name}": lr for name, lr in zip(group_names, scheduler.get_last_lr(), strict=True)}
            )
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            metrics.log(record)
            bar.set_postfix(loss=f"{reduced['loss']:.4g}", refresh=False)
            window_start, window_steps, data_wait = now, 0, 0.0

        if cfg.train.image_every > 0 and step % cfg.train.image_every == 0 and (main or every_rank_samples):
            metrics.images(step, _joint_samples(unwrapped, cfg, step, device))
        if cfg.train.eval_every > 0 and step % cfg.train.eval_every == 0:
            _periodic_eval(unwrapped, cfg, step, device, metrics, run_here=main or every_rank_samples)
            accelerator.wait_for_everyone()
        periodic = cfg.train.checkpoint_every > 0 and step % cfg.train.checkpoint_every == 0
        if periodic or step == cfg.train.steps or stopped_by:
            guarded = model if every_rank_samples else unwrapped  # ZeRO-3 gathers weights in its forward
            _guard_weights(guarded, unwrapped, batch, step, device, run_dir)
            state.wall_time = base_wall + time.time() - segment_start
            metrics.flush()
            save_checkpoint(accelerator, model, run_dir, state, keep=cfg.train.keep_checkpoints)
        if stopped_by:
            log.warning("%s: stopped after step %d with checkpoint %s; continue with "
                        "`mmebm train --resume %s`", stopped_by, step, latest_checkpoint(run_dir), run_dir)
            break
    bar.close()

    if trace is not None:
        digest = None if zero_stage(accelerator) == 3 else _parameter_digest(unwrapped)
        trace.write({"event": "end", "step": state.step, "param_digest": digest, **info})
        trace.close()
    metrics.close()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {
        "step": state.step,
        "terms": reduced,
        "world_size": world,
        "run_dir": str(run_dir),
        "is_main_process": main,
        "stopped_by": stopped_by,
    }


def _append_command(run_dir: Path, world: int) -> None:
    """Append this invocation (UTC time, world size, argv) to RUN_DIR/commands.log: how the run was made."""
    with open(run_dir / COMMANDS_LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\tworld_size={world}\t"
                f"{shlex.join(sys.argv)}\n")


def _check_data_order(state: TrainState, order: dict[str, Any], ckpt: Path) -> None:
    """A mid-epoch resume is exact only if the per-rank batch order is unchanged; else say what changed."""
    if state.epoch_batch == 0:
        return
    changed = {k: (state.data_order.get(k), v) for k, v in order.items() if state.data_order.get(k) != v}
    if changed:
        detail = ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items())
        raise ValueError(
            f"{ckpt} stopped mid-epoch ({state.epoch_batch} batches into epoch {state.epoch}) and the data "
            f"order changed ({detail}); resume with the original processes/data settings"
        )


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


def _periodic_eval(
    model: torch.nn.Module,
    cfg: Config,
    step: int,
    device: torch.device,
    metrics: MetricsWriter,
    *,
    run_here: bool,
) -> None:
    """Call ``mmebm_dist.evaluate.periodic.periodic_eval`` (imported only when ``train.eval_every > 0``)."""
    if not run_here:
        return
    from mmebm_dist.evaluate.periodic import periodic_eval

    model.eval()
    try:
        with isolated_rng(device):
            results = periodic_eval(model, cfg, step)
    finally:
        model.train()
    metrics.log(
        {"step": step, **{f"eval/{k}": float(v) for k, v in results.items() if isinstance(v, (int, float))}}
    )


def _check_runaway(model: torch.nn.Module, terms: dict, step: int, run_dir: Path) -> None:
    """``model.check_runaway`` with the last good checkpoint (the newest: all passed the guard) named."""
    try:
        model.check_runaway(terms, step)
    except FloatingPointError as exc:
        raise _with_last_checkpoint(exc, run_dir, "") from None


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
