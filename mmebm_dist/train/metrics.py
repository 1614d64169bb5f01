"""Run-directory logging: ``metrics.jsonl`` (a JSON record per logged step), TensorBoard scalars and grids.

Only rank 0 writes. On resume, records after the checkpoint's step are dropped so that the log reads as one
uninterrupted run (``mmebm_dist.rundir.truncate_jsonl``), and TensorBoard purges the same steps
(``purge_step``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from mmebm_dist.data import grid
from mmebm_dist.rundir import CONFIG_FILE, METRICS_FILE, TB_DIR, TRACE_DIR, JsonlAppender


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
    """Appends metric records to ``metrics.jsonl`` and mirrors scalars and image grids to TensorBoard.

    Create it on every rank; it writes only when ``enabled`` (rank 0), so call sites need no rank checks.
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
    ):
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = run_dir / METRICS_FILE
        self.vocabularies = vocabularies
        self._tb = None
        if not enabled:
            return
        self._jsonl = JsonlAppender(self.path, start_step=start_step)
        from torch.utils.tensorboard import SummaryWriter  # imported here: costs ~1 s, rank 0 only

        # purge_step drops events written after the checkpoint by a run that was then killed.
        self._tb = SummaryWriter(str(run_dir / TB_DIR), purge_step=start_step + 1 if start_step else None)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold ``step``); numeric values also go to TensorBoard as scalars."""
        if not self.enabled:
            return
        self._jsonl.write(record)
        step = int(record["step"])
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tb.add_scalar(key, value, step)

    def images(self, step: int, samples: dict[str, torch.Tensor], prefix: str = "samples/joint") -> None:
        """One grid per image-shaped modality ([N, C, H, W] or [N, H, W]) and per token modality (integer ids
        [N, L], drawn as caption tiles); float vector modalities are skipped."""
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
            self._tb.add_image(f"{prefix}/{name}", image_grid(x.detach().float().cpu().clamp(0, 1)), step)

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
        if self.enabled:
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


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
