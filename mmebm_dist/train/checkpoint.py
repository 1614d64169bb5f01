"""Atomic, resumable checkpoints: ``RUN_DIR/checkpoints/step-NNNNNNN/`` (7-digit step).

A checkpoint is written into ``checkpoints/.tmp-step-NNNNNNN`` by every rank (``accelerator.save_state``:
model, optimizer -- sharded under ZeRO --, scheduler, RNG states of every rank), completed by rank 0 with
``train_state.json`` (step, data position, config, data manifest hash) and ``model.pt`` (the consolidated fp32
state dict of the unwrapped model, for single-process evaluation), renamed to ``step-NNNNNNN`` and only then
pointed to by ``checkpoints/latest`` (a temp file ``os.replace``d). A directory is complete if and only if its
name has no ``.tmp-`` prefix, so a run killed at any moment never leaves a checkpoint that loads half-written.
Every file is fsynced before the rename, and the directory after it, so the rename never publishes data
still in the page cache. A resume checks the files it is about to load (JSON parses, zip CRCs, safetensors
headers) and falls back to an older checkpoint, saying which file is corrupt, when the newest does not load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors import SafetensorError

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

NO_SPACE_HINT = ("free space on that filesystem or lower train.keep_checkpoints, then continue with "
                 "`mmebm train --resume RUN_DIR`")

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
    accelerator: Accelerator, model: torch.nn.Module, run_dir: Path, state: TrainState, *, keep: int,
    extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``step-<state.step>`` atomically, keep the newest ``keep``. Call on every rank;
    ``extra(directory)`` (every rank) adds files before the checkpoint is published.

    A failed write (a full disk) removes the partial temp directory and raises naming the checkpoint; the
    previous checkpoints are untouched."""
    root = run_dir / CHECKPOINTS
    final = root / step_dir_name(state.step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a run killed while writing this very step
            shutil.rmtree(tmp)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        weights = consolidated_state_dict(accelerator, model, tmp)
        if extra is not None:
            extra(tmp)
        if accelerator.is_main_process:
            torch.save(weights, tmp / MODEL_FILE)
            atomic_write_text(tmp / STATE_FILE, json.dumps(dataclasses.asdict(state), indent=2) + "\n")
            write_file_list(tmp)
            fsync_tree(tmp)
    except (OSError, RuntimeError, SafetensorError) as exc:
        if isinstance(exc, torch.distributed.DistError):  # a collective failed, not the write
            raise
        raise _write_error(exc, final, tmp, run_dir) from exc
    if accelerator.is_main_process:
        if final.exists():  # an older run reached this step before being resumed from an earlier checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _fsync_dir(root)
        _prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def remove_stale_temps(accelerator: Accelerator, run_dir: Path) -> list[Path]:
    """Remove the ``.tmp-step-*`` directories a killed run left (rank 0, which holds the run lock, so no
    writer is using them), logging each: they are never complete, and would otherwise make a fresh run or a
    resume without a complete checkpoint refuse the directory. Call on every rank."""
    removed = sorted((Path(run_dir) / CHECKPOINTS).glob(".tmp-step-*")) if accelerator.is_main_process else []
    for stale in removed:
        log.warning("removing %s: a checkpoint left half-written by a killed run", stale)
        shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return removed


def fsync_tree(directory: Path) -> None:
    """fsync every file under ``directory`` and every directory in it (so a later rename publishes data that
    is on disk, not in the page cache)."""
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _looks_like_no_space(exc: BaseException, where: Path) -> bool:
    """ENOSPC, or torch's zip writer failing ("unexpected pos", "file write failed") on a filesystem with
    less than 1 MiB free (that writer reports a full disk without the errno)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "StorageFull" in text or "os error 28" in text:  # safetensors' writer wraps the OS error
        return True
    if "unexpected pos" in text or "file write failed" in text:
        probe = where if where.exists() else where.parent
        return shutil.disk_usage(probe).free < 2**20
    return False


def _write_error(exc: BaseException, final: Path, tmp: Path, run_dir: Path) -> OSError:
    """The error to raise for a failed checkpoint write, after removing its partial temp directory."""
    shutil.rmtree(tmp, ignore_errors=True)
    previous = complete_checkpoints(run_dir)
    kept = f"the previous checkpoint {previous[-1]} is untouched" if previous else "no earlier checkpoint"
    if _looks_like_no_space(exc, final.parent):
        return OSError(errno.ENOSPC, f"No space left on device while writing {final} ({kept}); "
                                     f"{NO_SPACE_HINT}")
    return OSError(getattr(exc, "errno", None) or errno.EIO, f"writing {final} failed: {exc} ({kept})")


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
    with safe_deepspeed_loads():
        accelerator.load_state(str(ckpt_dir))
    return state


@contextlib.contextmanager
def safe_deepspeed_loads():
    """Make DeepSpeed's checkpoint reader unpickle with ``weights_only=True`` (it passes ``False``, which lets
    a planted checkpoint run code), allowing only the DeepSpeed classes its checkpoints hold. No-op without
    DeepSpeed."""
    try:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    except ImportError:
        yield
        return
    original = TorchCheckpointEngine.load

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)

    TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        TorchCheckpointEngine.load = original


def _deepspeed_safe_globals() -> list:
    """The non-tensor types found in DeepSpeed ZeRO checkpoints (loss scalers, the ZeRO stage enum)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, DynamicLossScaler, ZeroStageEnum]


class CheckpointError(RuntimeError):
    """No checkpoint of the run (or not the one asked for) loads."""


FILE_LIST = "files.json"
"""Written last into every checkpoint: ``{relative path: size in bytes}`` of each file it holds, so a resume
refuses a checkpoint with any file missing, emptied or replaced (accelerate itself skips RNG states it cannot
load without a word, and the resume then silently stops being exact)."""

RNG_STATE_KEYS = ("random_state", "numpy_random_seed", "torch_manual_seed")
"""What accelerate's ``random_states_<rank>.pkl`` must hold for a resume to restore every rank's streams."""


def write_file_list(ckpt_dir: Path) -> None:
    """Record the name and size of every file of ``ckpt_dir`` in its :data:`FILE_LIST` (rank 0, after every
    rank's files are written)."""
    files = {p.relative_to(ckpt_dir).as_posix(): p.stat().st_size for p in sorted(ckpt_dir.rglob("*"))
             if p.is_file() and p.name != FILE_LIST}
    atomic_write_text(ckpt_dir / FILE_LIST, json.dumps(files, indent=1) + "\n")


def file_list_problem(ckpt_dir: Path) -> str | None:
    """Why ``ckpt_dir``'s files differ from its :data:`FILE_LIST` (one missing or of another size), or None.

    A checkpoint written before the list existed must hold at least the RNG states of rank 0."""
    listing = ckpt_dir / FILE_LIST
    if not listing.is_file():
        legacy = ckpt_dir / "random_states_0.pkl"
        return None if legacy.is_file() else f"{legacy} is missing (without it a resume is not exact)"
    try:
        files = json.loads(listing.read_text())
    except (OSError, ValueError) as exc:
        return f"{listing}: {type(exc).__name__}: {exc}"
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        return f"{listing} is not a mapping of file names to sizes"
    for name, size in files.items():
        path = ckpt_dir / name
        if not path.is_file():
            return f"{path} is missing (listed in {FILE_LIST})"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {FILE_LIST} says {size} (truncated or replaced)"
    return None


def _rng_state_problem(path: Path) -> str | None:
    """Why accelerate's RNG-state file ``path`` would not restore the streams (accelerate skips such a file
    without a word)."""
    from accelerate.utils import load

    try:
        states = load(path, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure means the states would not load
        return f"unreadable RNG states: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    missing = [k for k in RNG_STATE_KEYS if not isinstance(states, dict) or k not in states]
    return f"RNG states without {', '.join(missing)}" if missing else None


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` (a checkpoint file) cannot load, or None: unparsable JSON, a torch zip archive that is
    not one or fails its CRCs, a safetensors file whose header or size is wrong, RNG states that lack a stream
    (read by torch's ``weights_only`` unpickler, which builds no arbitrary object)."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            return _safetensors_problem(path)
        elif path.suffix in (".bin", ".pt", ".pth", ".pkl"):
            with open(path, "rb") as f:
                magic = f.read(2)
            if magic[:1] == b"\x80":  # torch's legacy (pickle) format, which DeepSpeed writes: no checksum
                return None
            if magic != b"PK" or not zipfile.is_zipfile(path):
                return "not a torch zip archive (truncated or overwritten)"
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"CRC mismatch in its member {bad}"
            if path.name.startswith("random_states_"):
                return _rng_state_problem(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then exactly the bytes it describes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if length > size - 8:
            return f"header length {length} exceeds the file size {size}"
        header = json.loads(f.read(length))
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"size {size} bytes, but its header describes {8 + length + end}"
    return None


def _any_rank(accelerator: Accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is True on any rank (a collective)."""
    if accelerator.num_processes == 1:
        return flag
    value = torch.tensor([int(flag)], device=accelerator.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _try_load(
    accelerator: Accelerator, ckpt: Path, check: Callable[[TrainState, Path], object] | None
) -> tuple[TrainState | None, str | None]:
    """Check this rank's share of ``ckpt``'s files, agree across ranks, run ``check`` on its train state (it
    raises to refuse the resume), then load; (state, None) or (None, why) on every rank alike."""
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    mine = files[accelerator.process_index :: accelerator.num_processes]
    problem = next((f"{p}: {why}" for p in mine if (why := checkpoint_problem(p))), None)
    if problem is None and not (ckpt / STATE_FILE).is_file():
        problem = f"{ckpt / STATE_FILE} is missing"
    if problem is None and accelerator.is_main_process:
        problem = file_list_problem(ckpt)
    if _any_rank(accelerator, problem is not None):
        return None, problem or "a file another rank checked is corrupt (see its log line)"
    if check is not None:
        check(read_train_state(ckpt), ckpt)
    state = None
    try:
        state = load_checkpoint(accelerator, ckpt)
    except (OSError, RuntimeError, ValueError, KeyError, EOFError) as exc:
        problem = f"loading {ckpt} failed: {type(exc).__name__}: {exc}"
    if _any_rank(accelerator, problem is not None):
        return None, problem or f"loading {ckpt} failed on another rank (see its log line)"
    return state, None


def load_resumable(
    accelerator: Accelerator,
    run_dir: Path,
    name: str | None = None,
    check: Callable[[TrainState, Path], object] | None = None,
) -> tuple[Path, TrainState, list[Path]]:
    """Load checkpoint ``name`` (a ``step-NNNNNNN`` of the run) or else the newest one that loads, warning
    about each newer one that does not; ``check(state, ckpt)`` may refuse a checkpoint before its state is
    loaded. Returns the checkpoint, its state and the complete checkpoints newer than it (for
    :func:`set_aside` once the resume is accepted)."""
    found = complete_checkpoints(run_dir)
    if name is not None:
        chosen = Path(run_dir) / CHECKPOINTS / Path(name).name
        if chosen not in found:
            names = ", ".join(p.name for p in found) or "none"
            raise CheckpointError(f"--checkpoint {name}: no complete checkpoint {chosen}; "
                                  f"complete ones: {names}")
        candidates = [chosen]
    else:
        candidates = list(reversed(found))
    for ckpt in candidates:
        state, problem = _try_load(accelerator, ckpt, check)
        if state is not None:
            if ckpt != found[-1]:
                log.warning("resuming from %s, not the newest checkpoint %s", ckpt, found[-1].name)
            return ckpt, state, found[found.index(ckpt) + 1 :]
        log.warning("checkpoint %s does not load: %s", ckpt, problem)
        if name is not None:
            raise CheckpointError(f"--checkpoint {name} does not load: {problem}")
    raise CheckpointError(f"no checkpoint in {Path(run_dir) / CHECKPOINTS} loads ({len(candidates)} tried); "
                          "see the warnings above for each file, or start a fresh run")


def set_aside(accelerator: Accelerator, newer: list[Path]) -> None:
    """Rename checkpoints newer than the one resumed from to ``*.abandoned`` (rank 0): they are then neither
    resumed nor counted by ``train.keep_checkpoints``, and stay for inspection."""
    if accelerator.is_main_process:
        for path in newer:
            target = path.with_name(path.name + ".abandoned")
            for n in range(1, 1000):
                if not target.exists():
                    break
                target = path.with_name(f"{path.name}.abandoned.{n}")
            path.rename(target)
            log.warning("moved %s aside to %s (newer than the resumed checkpoint)", path, target.name)
    accelerator.wait_for_everyone()


def load_model_weights(model: torch.nn.Module, ckpt_dir: str | Path) -> torch.nn.Module:
    """Load a checkpoint's consolidated ``model.pt`` into a plain single-process model."""
    path = Path(ckpt_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is '{ckpt_dir}' a complete checkpoint directory?")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model


def load_initial_weights(model: torch.nn.Module, source: str | Path) -> Path:
    """``train.init_from``: load ``source``'s weights (a checkpoint directory, or a run directory's newest
    complete checkpoint) into a fresh ``model``; only the energy MLP's and a learned reference's (``p0.*``,
    fitted in this run) may be missing. Returns the checkpoint."""
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
    missing = [k for k in result.missing_keys if not k.startswith(("energy.", "p0."))]
    if missing or result.unexpected_keys:
        raise ValueError(f"train.init_from='{source}' ({ckpt}) does not fit this model: missing "
                         f"{missing[:5]}, unexpected {list(result.unexpected_keys)[:5]}; {fix}")
    return ckpt
