"""Atomic, resumable checkpoints: ``RUN_DIR/checkpoints/step-NNNNNNN/`` (7-digit step).

A checkpoint is written into ``checkpoints/.tmp-step-NNNNNNN`` by every rank (``accelerator.save_state``:
model, optimizer -- sharded under ZeRO --, scheduler, RNG states of every rank), completed by rank 0 with
``train_state.json`` (step, data position, config, data manifest hash) and ``model.pt`` (the consolidated fp32
state dict of the unwrapped model, for single-process evaluation), renamed to ``step-NNNNNNN`` and only then
pointed to by ``checkpoints/latest`` (a temp file ``os.replace``d). A directory is complete if and only if its
name has no ``.tmp-`` prefix, so a run killed at any moment never leaves a checkpoint that loads half-written.
Atomic against process death on one shared filesystem; not a guarantee against power loss (no fsync).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from mmebm_dist.rundir import (
    CHECKPOINTS,
    LATEST,
    MODEL_FILE,
    STATE_FILE,
    TrainState,
    atomic_write_text,
    complete_checkpoints,
    latest_checkpoint,
    read_train_state,
    step_dir_name,
)

log = logging.getLogger(__name__)


def consolidated_state_dict(accelerator: Accelerator, model: torch.nn.Module, ckpt_dir: Path) -> dict | None:
    """fp32 state dict of the unwrapped model on rank 0 (None elsewhere). Collective: call on every rank.

    Under DeepSpeed the fp32 master weights live in the (possibly sharded) optimizer states just saved in
    ``ckpt_dir``; DeepSpeed's zero_to_fp32 consolidates them (works for ZeRO-1/2/3, and under bf16 gives the
    fp32 masters rather than the bf16 compute copy). Otherwise ``accelerator.get_state_dict`` unwraps DDP.
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.wait_for_everyone()  # every rank's shard must be on disk
        if not accelerator.is_main_process:
            return None
        from accelerate.utils.constants import MODEL_NAME
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=MODEL_NAME)
    else:
        state = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return None
    return {
        k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu() for k, v in state.items()
    }


def save_checkpoint(
    accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, state: TrainState, *, keep: int
) -> Path:
    """Write checkpoint ``step-<state.step>`` atomically, keep the newest ``keep``. Call on every rank."""
    root = run_dir / CHECKPOINTS
    final = root / step_dir_name(state.step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed while writing this very step
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    weights = consolidated_state_dict(accelerator, model, tmp)
    if accelerator.is_main_process:
        torch.save(weights, tmp / MODEL_FILE)
        atomic_write_text(tmp / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=2) + "\n")
        if final.exists():  # an older run reached this step before being resumed from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _prune(root: Path, keep: int) -> None:
    """Remove all but the newest ``keep`` complete checkpoints, and temp directories of other steps."""
    complete = complete_checkpoints(root.parent)
    for old in complete[: max(0, len(complete) - max(1, keep))]:
        shutil.rmtree(old)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale)


def load_checkpoint(accelerator: Accelerator, ckpt_dir: Path) -> TrainState:
    """Restore model, optimizer, scheduler and every rank's RNG states from ``ckpt_dir``; return its state."""
    state = read_train_state(ckpt_dir)
    accelerator.load_state(str(ckpt_dir))
    return state


def load_initial_weights(model: torch.nn.Module, source: str | Path) -> Path:
    """``train.init_from``: load ``source``'s weights (a checkpoint directory, or a run directory's newest
    complete checkpoint) into a fresh ``model``; only the energy MLP's may be missing. Returns the
    checkpoint."""
    src = Path(source)
    ckpt = src if (src / MODEL_FILE).is_file() else latest_checkpoint(src)
    if ckpt is None:
        raise FileNotFoundError(f"train.init_from='{source}' is neither a checkpoint directory (holding "
                                f"{MODEL_FILE}) nor a run directory with a complete checkpoint")
    state = torch.load(ckpt / MODEL_FILE, map_location="cpu", weights_only=True)
    fix = "it must be a run of the same model.* settings (for model.prior.fit=posthoc: the fixed-prior run)"
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # a shape mismatch
        raise ValueError(f"train.init_from='{source}' ({ckpt}) does not fit this model: {exc}; "
                         f"{fix}") from exc
    missing = [k for k in result.missing_keys if not k.startswith("energy.")]
    if missing or result.unexpected_keys:
        raise ValueError(f"train.init_from='{source}' ({ckpt}) does not fit this model: missing "
                         f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}; {fix}")
    return ckpt
