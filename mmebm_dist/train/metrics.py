"""Run-directory logging: ``metrics.jsonl`` (a JSON record per logged step), mirrored to the trackers.

Trackers (``train.trackers``) are accelerate's: ``tensorboard`` (RUN/tb), ``mlflow``, ``wandb``, handed to
``Accelerator(log_with=...)`` by :func:`make_trackers` and started by ``accelerator.init_trackers`` on rank 0;
they receive every numeric value of a record (``accelerator.log``), the resolved config as parameters (on the
run's first segment), and sample grids (TensorBoard images, wandb images, MLflow artifacts).
``accelerator.end_training`` closes them. Only rank 0 writes. On resume, records after the checkpoint's step
are dropped so that the log reads as one uninterrupted run (``mmebm_dist.rundir.truncate_jsonl``),
TensorBoard purges the same steps (``purge_step``), and MLflow and wandb continue the run whose id the first
segment stored in RUN/trackers.json.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import uuid
from pathlib import Path
from typing import Any

import torch
from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker
from einops import rearrange

from mmebm_dist.config import Config, ConfigError, config_to_dict, flatten_dotted
from mmebm_dist.data import grid
from mmebm_dist.rundir import (
    CONFIG_FILE,
    METRICS_FILE,
    TB_DIR,
    TRACE_DIR,
    TRACKERS_FILE,
    JsonlAppender,
    atomic_write_text,
)

PROJECT = "mmebm_dist"
"""MLflow experiment and wandb project of a run unless ``MLFLOW_EXPERIMENT_NAME`` / ``WANDB_PROJECT`` say."""


class RunTensorBoardTracker(TensorBoardTracker):
    """accelerate's TensorBoard tracker writing RUN/tb; a resumed run purges the events that a killed run
    wrote after its checkpoint (``SummaryWriter(purge_step=...)``), as the loop purges metrics.jsonl."""

    def __init__(self, run_dir: Path):
        super().__init__(TB_DIR, run_dir)
        self.resume_step = 0

    def start(self) -> None:
        if self.resume_step:
            self.init_kwargs["purge_step"] = self.resume_step + 1
        super().start()


def make_trackers(cfg: Config, *, resume: bool) -> list[GeneralTracker]:
    """The trackers of ``train.trackers`` (not started), for ``Accelerator(log_with=...)``. A resumed run
    continues the MLflow / wandb runs named in RUN/trackers.json. A tracker whose package is missing is a
    :class:`ConfigError` naming the extra that installs it."""
    run_dir = Path(cfg.train.out_dir)
    ids = stored_tracker_ids(run_dir) if resume else {}
    trackers: list[GeneralTracker] = []
    for name in cfg.train.trackers:
        if name != "tensorboard" and importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.trackers lists '{name}', which is not installed: pip install "
                              f"'mmebm_dist[{name}]' (or drop it from train.trackers)")
        if name == "tensorboard":
            trackers.append(RunTensorBoardTracker(run_dir))
        elif name == "mlflow":
            trackers.append(MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT),
                                          run_id=ids.get("mlflow"), run_name=run_dir.name))
        elif name == "wandb":
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name,
                                         id=ids.get("wandb") or uuid.uuid4().hex[:16], resume="allow",
                                         dir=str(run_dir)))
    return trackers


def stored_tracker_ids(run_dir: Path) -> dict[str, str]:
    """{tracker: run id} that RUN/trackers.json holds ({} before the first segment started its trackers)."""
    path = Path(run_dir) / TRACKERS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def tracker_params(cfg: Config) -> dict[str, Any]:
    """The resolved config as flat tracker parameters: dotted keys; lists, tuples and None as text."""
    return {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
            for k, v in flatten_dotted(config_to_dict(cfg)).items()}


def image_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """TensorBoard's grid: ``images`` [N, C, H, W] as one [C, rows*H, nrow*W] image, no gaps, missing cells
    black (``mmebm_dist.data.grid.image_grid``)."""
    nrow = nrow or max(1, math.isqrt(images.shape[0]))
    tiles = rearrange(images, "n c h w -> n h w c").numpy()
    return rearrange(torch.from_numpy(grid.image_grid(tiles, nrow, pad=0, fill=0)), "h w c -> c h w")


CAPTION_TILE = (64, 128)
"""(height, width) of the tile a generated caption is drawn into for a TensorBoard grid."""


def run_vocabularies(run_dir: Path) -> dict[str, Any]:
    """Vocabularies of the token modalities of the run's data (``config.json`` -> ``data.path``)."""
    from mmebm_dist.data.text import vocabularies

    config = Path(run_dir) / CONFIG_FILE
    if not config.is_file():
        raise FileNotFoundError(
            f"drawing a token modality needs the run's vocabulary, found through {config} (data.path), "
            "which does not exist; pass vocabularies= to MetricsWriter"
        )
    return vocabularies(json.loads(config.read_text())["data"]["path"])


def text_grid_images(ids: torch.Tensor, vocab: Any) -> torch.Tensor:
    """float [N, 3, H, W]: the decoded captions of token ids [N, L] drawn as image tiles (grey-ruled, so
    neighbours in a grid stay apart)."""
    from mmebm_dist.data.text import caption_tiles

    height, width = CAPTION_TILE
    tiles = torch.from_numpy(caption_tiles(ids.detach().cpu().numpy(), vocab, height=height, width=width))
    tiles[:, :, -1, :] = tiles[:, :, :, -1] = 0.6  # a grey rule below and right of each tile
    return tiles


class MetricsWriter:
    """Appends metric records to ``metrics.jsonl`` and mirrors scalars and image grids to the accelerator's
    trackers (:func:`make_trackers`), which it starts.

    Create it on every rank; it writes only when ``enabled`` (rank 0), so call sites need no rank checks.
    ``config`` (the resolved config) is stored as the trackers' parameters on a fresh run (``start_step`` 0),
    and on a resume by a tracker added to ``train.trackers`` since (its run starts then).
    Token modalities (integer ids [N, L]) are drawn as caption tiles with ``vocabularies`` (modality name ->
    ``mmebm_dist.data.text.Vocabulary``; default: read from the run's data set when first needed).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        start_step: int = 0,
        vocabularies: dict[str, Any] | None = None,
        accelerator: Any = None,
        config: Config | None = None,
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = run_dir / METRICS_FILE
        self.vocabularies = vocabularies
        self.accelerator = accelerator
        if not enabled:
            return
        self._jsonl = JsonlAppender(self.path, start_step=start_step)
        if accelerator is None or not accelerator.log_with:
            return
        for tracker in accelerator.log_with:
            if isinstance(tracker, RunTensorBoardTracker):
                tracker.resume_step = start_step
        params = tracker_params(config) if config is not None else None
        accelerator.init_trackers(self.run_dir.name, config=params if start_step == 0 else None)
        stored = stored_tracker_ids(self.run_dir)
        ids = {t.name: run_id for t in accelerator.trackers if (run_id := _run_id(t))}
        for tracker in accelerator.trackers:  # a tracker added on --resume starts its run with the config
            if start_step > 0 and params is not None and tracker.name in ids and tracker.name not in stored:
                tracker.store_init_configuration(params)
        if ids:
            atomic_write_text(self.run_dir / TRACKERS_FILE, json.dumps({**stored, **ids}, indent=2) + "\n")

    @property
    def trackers(self) -> list[GeneralTracker]:
        return list(self.accelerator.trackers) if self.enabled and self.accelerator is not None else []

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold ``step``); numeric values also go to the trackers as scalars."""
        if not self.enabled:
            return
        self._jsonl.write(record)
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.trackers and scalars:
            self.accelerator.log(scalars, step=int(record["step"]))

    def images(self, step: int, samples: dict[str, torch.Tensor], prefix: str = "samples/joint") -> None:
        """One grid per image-shaped modality ([N, C, H, W] or [N, H, W]) and per token modality (integer ids
        [N, L], drawn as caption tiles); float vector modalities are skipped. Drawn even with no tracker, so
        that a missing vocabulary fails the same way whatever train.trackers says."""
        if not self.enabled:
            return
        from mmebm_dist.data.text import is_token_modality

        for name, x in samples.items():
            if is_token_modality(x):
                x = text_grid_images(x, self._vocabulary(name))
            elif x.dim() == 3:
                x = x.unsqueeze(1)
            if x.dim() != 4:
                continue
            picture = image_grid(x.detach().float().cpu().clamp(0, 1))  # (C, H, W)
            for tracker in self.trackers:
                log_grid(tracker, f"{prefix}/{name}", picture, step)

    def _vocabulary(self, name: str) -> Any:
        if self.vocabularies is None:
            self.vocabularies = run_vocabularies(self.run_dir)
        if name not in self.vocabularies:
            raise KeyError(
                f"token modality '{name}' has no vocabulary (known: {sorted(self.vocabularies)}); its data "
                "set must list a 'vocab' file for it in manifest.json"
            )
        return self.vocabularies[name]

    def flush(self) -> None:
        for tracker in self.trackers:
            if isinstance(tracker, TensorBoardTracker):
                tracker.writer.flush()

    def close(self) -> None:
        """Close metrics.jsonl (``accelerator.end_training`` closes the trackers)."""
        if self.enabled:
            self._jsonl.close()


def _run_id(tracker: GeneralTracker) -> str | None:
    """The id under which a resumed run finds ``tracker``'s run again (None: TensorBoard needs none)."""
    if isinstance(tracker, MLflowTracker):
        return tracker.active_run.info.run_id
    if isinstance(tracker, WandBTracker):
        return tracker.run.id
    return None


def log_grid(tracker: GeneralTracker, tag: str, picture: torch.Tensor, step: int) -> None:
    """A sample grid (C, H, W) in [0, 1] to one tracker: a TensorBoard image, a wandb image, an MLflow
    artifact ``TAG/step-NNNNNNN.png``."""
    if isinstance(tracker, TensorBoardTracker):
        tracker.log_images({tag: picture.unsqueeze(0)}, step=step)  # add_images of a batch of one
        return
    pixels = (rearrange(picture, "c h w -> h w c") * 255).round().to(torch.uint8).numpy()
    if pixels.shape[-1] == 1:
        pixels = pixels[..., 0]
    if isinstance(tracker, WandBTracker):
        tracker.log_images({tag: [pixels]}, step=step)
    elif isinstance(tracker, MLflowTracker):
        import mlflow

        mlflow.log_image(pixels, artifact_file=f"{tag}/step-{step:07d}.png")


def sample_digests(batch: dict[str, Any], modalities: list[str]) -> list[str]:
    """A short content hash per sample of ``batch`` (its ``__key__`` when the loader provides one)."""
    if "__key__" in batch:
        return [str(k) for k in batch["__key__"]]
    import hashlib

    arrays = [batch[name].detach().cpu().contiguous() for name in modalities]
    digests = []
    for i in range(arrays[0].shape[0]):
        h = hashlib.sha1()
        for a in arrays:
            h.update(a[i].numpy().tobytes())
        digests.append(h.hexdigest()[:16])
    return digests


class SampleTrace:
    """Per-rank audit of the data each rank read: ``trace/rank-<i>.jsonl`` (``mmebm train --trace-samples``).

    Records: ``{"event": "start", ...process description}``, one ``{"step", "epoch", "index", "samples"}`` per
    micro-batch, and ``{"event": "end", "param_digest"}``. It proves disjoint data across ranks and that a
    resumed run sees no sample twice; it hashes every sample, so it is off by default.
    """

    def __init__(self, run_dir: Path, process_index: int, *, start_step: int, modalities: list[str]):
        self.path = run_dir / TRACE_DIR / f"rank-{process_index}.jsonl"
        self.modalities = modalities
        self._jsonl = JsonlAppender(self.path, start_step=start_step)

    def write(self, record: dict[str, Any]) -> None:
        self._jsonl.write(record)

    def batch(self, step: int, epoch: int, index: int, batch: dict[str, Any]) -> None:
        self.write(
            {"step": step, "epoch": epoch, "index": index, "samples": sample_digests(batch, self.modalities)}
        )

    def close(self) -> None:
        self._jsonl.close()
