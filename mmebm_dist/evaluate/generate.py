"""Load a trained run for evaluation, read test tuples, and draw the samples shown in pictures.

A run directory (``mmebm train``) holds one ``checkpoints/step-NNNNNNN/`` per checkpoint (the step, 7 digits:
``step-0001500``) with ``train_state.json`` (step, config, data order incl. the manifest hash) and
``model.pt`` (consolidated fp32 weights); see mmebm_dist/rundir.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mmebm_dist import schedule
from mmebm_dist.config import Config, config_from_dict
from mmebm_dist.evaluate.coherence import Batch, chunk_seed, my_chunks, seeded
from mmebm_dist.rundir import CONFIG_FILE, load_model_weights, read_train_state


@dataclass
class LoadedRun:
    """A trained model ready for single-process evaluation, and where it came from."""

    run_dir: Path
    checkpoint: Path
    step: int
    cfg: Config
    model: torch.nn.Module
    manifest_hash: str | None
    """Manifest hash of the data the run was trained on (from train_state.json)."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_run(run_dir: str | Path, *, checkpoint: str | Path | None = None,
             device: torch.device | str = "cpu") -> LoadedRun:
    """Build the run's model from the checkpoint's config and load its consolidated weights (eval mode).

    ``run_dir``: a run directory, an export folder (``mmebm export``) or ``hf://USER/REPO`` (an export on
    the Hugging Face Hub). ``checkpoint``: a checkpoint directory or a name under ``RUN/checkpoints``;
    default: the newest complete (an export holds one).
    """
    from mmebm_dist import export
    from mmebm_dist.models import build_model

    run_dir = export.resolve_source(run_dir)
    if export.is_export(run_dir):
        if checkpoint is not None:
            raise ValueError(f"'{run_dir}' is an export of one checkpoint; drop --checkpoint {checkpoint}")
        exported = export.read_export(run_dir)
        ckpt, step, cfg = run_dir / export.WEIGHTS_FILE, exported.step, exported.cfg
        weights, manifest = exported.state_dict, exported.manifest_hash
    else:
        if not (run_dir / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"'{run_dir}' is not a run directory (no config.json) nor an export; "
                                    "pass the train.out_dir of a `mmebm train` run or an export folder")
        ckpt = export.find_checkpoint(run_dir, checkpoint)
        state = read_train_state(ckpt)
        step, cfg, weights = state.step, config_from_dict(state.config), None
        manifest = state.data_order.get("manifest_hash")
    model = build_model(cfg.model)
    if weights is None:
        load_model_weights(model, ckpt)
    else:
        model.load_state_dict(weights)
    if cfg.train.schedule:  # a staged run samples as the stage of its checkpoint did (p0 before the energy)
        model.set_stage(schedule.stage_at(schedule.of_config(cfg), max(step, 1)).name)
    model.to(device).eval()
    return LoadedRun(run_dir=run_dir, checkpoint=ckpt, step=step, cfg=cfg, model=model,
                     manifest_hash=manifest)


def check_data(run: LoadedRun, data_path: str | Path) -> str:
    """The manifest hash of ``data_path``; raises if the run was trained on other data (coherence would judge
    the model on data it never saw, with classifiers of unknown accuracy there)."""
    from mmebm_dist.data.shards import manifest_hash

    current = manifest_hash(data_path)
    if run.manifest_hash is not None and current != run.manifest_hash:
        raise ValueError(f"run '{run.run_dir}' was trained on data with manifest hash {run.manifest_hash}, "
                         f"but '{data_path}' has manifest hash {current}; pass --data pointing at the run's "
                         f"data (its config says data.path={run.cfg.data.path})")
    return current


def text_vocabularies(cfg: Config, data_path: str | Path, *, run_dir: str | Path | None = None) -> dict:
    """Vocabulary of every token (``categorical``) modality of the run, read from the export ``run_dir``
    when it holds them (``mmebm export``), else beside the data's manifest, so that pictures and reports can
    show generated captions as text; empty for image-only runs."""
    from mmebm_dist import export
    from mmebm_dist.data.text import vocabularies

    names = [m.name for m in cfg.model.modalities if m.likelihood == "categorical"]
    if not names:
        return {}
    exported = export.exported_vocabularies(run_dir) if run_dir is not None else {}
    if all(n in exported for n in names):
        return {n: exported[n] for n in names}
    found = vocabularies(data_path)
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"token modalities {missing} of the run have no vocabulary in '{data_path}' "
                                "(manifest.json lists none for them); pass --data pointing at the run's data")
    return {n: found[n] for n in names}


def read_chunks(data_path: str | Path, *, num: int, batch_size: int, split: str = "test", rank: int = 0,
                world_size: int = 1) -> list[Batch | None]:
    """The first ``num`` tuples of ``split`` (manifest order) cut into chunks of ``batch_size``; only the
    chunks rank ``rank`` handles (i % world_size == rank) are kept, the others are None. Every rank reads the
    same order, so the chunks do not depend on the number of processes. In an incomplete set only the tuples
    that hold every modality count (:func:`complete_tuples`), so every figure judges whole tuples."""
    from mmebm_dist.data.stream import make_loader

    if num <= 0:
        raise ValueError(f"number of tuples must be positive, got {num}")
    loader = make_loader(data_path, batch_size=batch_size, split=split, rank=0, world_size=1, num_workers=0,
                         shuffle_buffer=0, drop_last=False)
    planned = -(-num // batch_size)
    mine = set(my_chunks(planned, rank, world_size))
    chunks: list[Batch | None] = []
    buffer: list[Batch] = []
    buffered = 0

    def take(size: int) -> None:
        nonlocal buffer, buffered
        merged = {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}
        chunks.append({k: v[:size] for k, v in merged.items()} if len(chunks) in mine else None)
        buffered -= size
        buffer = [{k: v[size:] for k, v in merged.items()}] if buffered else []

    for batch in loader:
        batch = complete_tuples(batch)
        buffer.append(batch)
        buffered += int(batch["label"].numel())
        while len(chunks) < planned and buffered >= min(batch_size, num - len(chunks) * batch_size):
            take(min(batch_size, num - len(chunks) * batch_size))
        if len(chunks) == planned:
            break
    if len(chunks) < planned and buffered:  # the split holds fewer than ``num`` tuples
        take(buffered)
    if not chunks:
        raise ValueError(f"'{data_path}' split '{split}' yielded no tuples")
    return chunks


def complete_tuples(batch: Batch) -> Batch:
    """The tuples of a batch of an incomplete set that hold every modality, without the ``present`` mask
    (a batch without one is returned as is)."""
    present = batch.get("present")
    if present is None:
        return batch
    whole = present.all(1)
    return {k: v[whole] for k, v in batch.items() if k != "present"}


def init_distributed_from_env() -> tuple[int, int]:
    """(rank, world_size): initialises torch.distributed from torchrun/accelerate environment variables when
    WORLD_SIZE > 1 and it is not initialised yet (gloo on CPU, nccl on CUDA); (0, 1) for a plain launch."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------------ pictures


@torch.no_grad()
def joint_samples(model, n: int, *, seed: int, langevin_steps: int | None = None) -> dict[str, torch.Tensor]:
    """n joint samples (CPU tensors) from a generator seeded by ``seed``."""
    device = next(model.parameters()).device
    with seeded(chunk_seed(seed, "pictures/joint", 0), device) as gen:
        samples = model.generate_joint(n, langevin_steps=langevin_steps, generator=gen)
    return {k: v.cpu() for k, v in samples.items()}


@torch.no_grad()
def cross_samples(model, batch: Batch, *, seed: int) -> tuple[dict[str, torch.Tensor],
                                                                 dict[str, dict[str, torch.Tensor]]]:
    """(the source inputs per modality, generated[source][target]) for one batch of test tuples."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    generated = {}
    for src in model.modalities:
        with seeded(chunk_seed(seed, f"pictures/cross/{src}", 0), device) as gen:
            out = model.generate_conditional(batch, [src], generator=gen)
        generated[src] = {k: v.cpu() for k, v in out.items()}
    return {m: batch[m].cpu() for m in model.modalities}, generated
