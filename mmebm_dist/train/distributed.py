"""The Accelerator for every launch mode (single process, DDP, DeepSpeed ZeRO-1/2/3, multi-node).

The launcher and its YAML decide the mode; this module only builds the :class:`accelerate.Accelerator`, pushes
the experiment config into DeepSpeed's JSON, and holds every CPU-only workaround in one place
(see ``launch/README.md``).
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedType, InitProcessGroupKwargs

from mmebm_dist.config import Config
from mmebm_dist.hardware import resolve_mixed_precision

log = logging.getLogger(__name__)


def uses_deepspeed() -> bool:
    """True when ``accelerate launch --use_deepspeed`` (or a DeepSpeed YAML) started this process."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def launched_processes() -> int:
    """World size set by the launcher (torchrun / accelerate launch / SLURM wrapper); 1 for a plain run."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _cpu_workarounds(timeout: timedelta) -> dict:
    """The CPU-only workarounds, all here. Returns extra ``Accelerator`` kwargs; may create the process state.

    Measured with accelerate 1.15 / torch 2.13 CPU / deepspeed 0.19 on a machine without a GPU:
    - ``accelerate launch --multi_gpu --num_processes 2`` starts two processes and torch.distributed has world
      size 2, but ``Accelerator()`` reports DistributedType.NO, ``num_processes == 1`` and
      ``process_index == 0`` on both (no backend is chosen without CUDA): gradients would never be averaged
      and both ranks would read the same data and write the same files, silently. ``Accelerator(cpu=True)``
      gives MULTI_CPU over gloo with the real ranks. (``--cpu --num_processes 2``, or ``use_cpu: true`` in
      the YAML, starts only ONE process.)
    - Under ``--use_deepspeed`` the same bug appears one level down: DeepSpeed initialises torch.distributed
      by itself and accelerate again records world size 1 on every rank. Creating
      ``accelerate.PartialState(backend="gloo")`` before ``Accelerator(...)`` makes it read the real rank and
      world size (and keeps DistributedType.DEEPSPEED); ``cpu=True`` would drop DeepSpeed, so it is not used.
    - DeepSpeed's CPU communication backend JIT-compiles a shared-memory all-reduce C++ op the first time it
      starts (about 4 minutes on a loaded 2-core machine, cached afterwards under ~/.cache/torch_extensions).
      It is marked incompatible here so DeepSpeed uses plain gloo collectives, which is what these CPU runs
      are for (tests, demos); ``MMEBM_DEEPSPEED_SHM=1`` keeps the op.
    The data loader's default rank comes from torch.distributed, but the loop passes accelerate's rank and
    world size explicitly, so these checks also guard the data split. tests/test_distributed.py pins both.
    """
    if torch.cuda.is_available() or launched_processes() <= 1:
        return {}
    if uses_deepspeed():
        if os.environ.get("MMEBM_DEEPSPEED_SHM", "0") != "1":
            import deepspeed.ops

            # DeepSpeed caches this dict on purpose so that edits persist (deepspeed/ops/__init__.py).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        PartialState(backend="gloo", timeout=timeout)
        return {}
    return {"cpu": True}


def _local_device() -> torch.device:
    """The device this process will train on, known before the Accelerator exists (LOCAL_RANK's GPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def make_accelerator(cfg: Config, *, log_with: list | None = None) -> Accelerator:
    """Build the Accelerator for ``cfg``: mixed precision, gradient accumulation, manual scheduler stepping,
    and the trackers ``log_with`` (``mmebm_dist.train.metrics.make_trackers``).

    ``step_scheduler_with_optimizer=False``: accelerate would otherwise step a prepared scheduler once per
    *process* at every optimizer step, so the lr decay would depend on the world size. The loop steps it once.
    The config's ``train.mixed_precision`` wins over the launcher's (it is what the run directory records);
    ``auto`` is resolved here (:func:`mmebm_dist.hardware.resolve_mixed_precision`, logged on rank 0).
    ``train.dist_timeout_s`` is the process group's collective timeout.
    """
    precision = resolve_mixed_precision(cfg.train.mixed_precision, _local_device(),
                                        announce=int(os.environ.get("RANK", "0")) == 0)
    timeout = timedelta(seconds=cfg.train.dist_timeout_s)
    launcher_precision = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launcher_precision not in (None, "no", precision):
        log.warning(
            "the launcher asked for mixed precision '%s' but train.mixed_precision=%s (%s) is used; "
            "pass train.mixed_precision=%s to change it",
            launcher_precision,
            cfg.train.mixed_precision,
            precision,
            launcher_precision,
        )
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=cfg.optim.grad_accum,
        step_scheduler_with_optimizer=False,
        log_with=log_with or None,
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
        **_cpu_workarounds(timeout),
    )
    if accelerator.num_processes != launched_processes():
        raise RuntimeError(
            f"accelerate sees {accelerator.num_processes} process(es) but the launcher started "
            f"{launched_processes()} (WORLD_SIZE); see _cpu_workarounds in {__file__}"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _configure_deepspeed(accelerator, cfg)
    return accelerator


def _configure_deepspeed(accelerator: Accelerator, cfg: Config) -> None:
    """Make the experiment config win over DeepSpeed's JSON for batch size, accumulation and clipping.

    The JSON in launch/deepspeed/ chooses the ZeRO stage and its buckets; these three numbers must agree with
    the loop (there is no prepared DataLoader from which accelerate could fill ``auto`` values), so they are
    set here and every value that differed from the JSON is logged.
    """
    plugin = accelerator.state.deepspeed_plugin
    ds_config = plugin.deepspeed_config
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
    }
    for key, value in wanted.items():
        old = ds_config.get(key)
        if old not in (None, "auto") and old != value and accelerator.is_main_process:
            log.warning("DeepSpeed config %s=%s replaced by %s from the experiment config", key, old, value)
        ds_config[key] = value
    # train_batch_size is derived by DeepSpeed (micro x accumulation x world); an explicit one that disagrees
    # fails in deepspeed.initialize, so it is dropped rather than guessed.
    ds_config.pop("train_batch_size", None)


def zero_stage(accelerator: Accelerator) -> int:
    """The ZeRO stage (0 when DeepSpeed is not used)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    return int(
        accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    )


def describe(accelerator: Accelerator) -> dict:
    """What this process believes about the job: used by logs, the trace and the CPU-workaround test."""
    import torch.distributed as dist

    return {
        "process_index": accelerator.process_index,
        "local_process_index": accelerator.local_process_index,
        "num_processes": accelerator.num_processes,
        "torch_world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
        "distributed_type": str(accelerator.distributed_type.value),
        "zero_stage": zero_stage(accelerator),
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "threads": torch.get_num_threads(),
    }


def free_port() -> int:
    """A TCP port free on this machine now (for a rendezvous started right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
