"""Live monitoring during training: joint and cross coherence on a small sample, as a flat dict of figures.

Called by the training loop every ``train.eval_every`` steps (on rank 0, or on every rank under ZeRO-3 where
weights are gathered collectively); it runs as a single process (no all_reduce) on the unwrapped model. The
judge the data set calls for (``mmebm_dist.evaluate.judges``), the manifest hash and the test tuples are read
once per process and cached; every judge gives the same figure names.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmebm_dist.config import Config
from mmebm_dist.evaluate.coherence import measure_coherence
from mmebm_dist.evaluate.judges import Judge, judge_module

MAX_DEFAULT_SAMPLES = 256
"""Cap on the default sample count (``eval.num_samples`` is sized for ``mmebm eval``, not for a hook)."""
BATCH = 128

_judges: dict[tuple[str, str, str], Judge] = {}
"""Judges per (classifier directory, data hash, device)."""
_chunks: dict[tuple[str, int], list] = {}
_hashes: dict[str, str] = {}


def classifier_dir(cfg: Config) -> Path:
    """``eval.classifiers`` when set, else ``<data.path>/classifiers``."""
    return Path(cfg.eval.classifiers) if cfg.eval.classifiers else Path(cfg.data.path) / "classifiers"


def _cached_judge(cfg: Config, modalities: list[str], device: torch.device) -> Judge:
    from mmebm_dist.data.shards import manifest_hash

    data = str(cfg.data.path)
    if data not in _hashes:
        _hashes[data] = manifest_hash(data)
    directory = classifier_dir(cfg)
    key = (str(directory), _hashes[data], str(device))
    if key not in _judges:
        try:
            _judges[key] = judge_module(data).load_judge(directory, data, manifest_hash=_hashes[data],
                                                         modalities=modalities, device=device)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"periodic evaluation (train.eval_every={cfg.train.eval_every}): {exc}; "
                                    "or set train.eval_every=0") from exc
    return _judges[key]


def periodic_eval(model: torch.nn.Module, cfg: Config, step: int, *, num_samples: int | None = None) -> dict:
    """Joint coherence (prior samples), cross coherence, self coherence (source = target) and the aggregate-
    posterior ceiling on ``num_samples`` samples / test tuples (default min(eval.num_samples, 256)).

    Returns a flat dict of floats: ``joint_coherence``, ``joint_stderr``, ``cross_coherence``,
    ``cross_stderr``, ``self_coherence``, ``ceiling_coherence``, ``cross_to/<target>`` (mean over sources),
    and ``classifier_min_accuracy`` (the loop logs ``step`` itself). Seeded by ``train.seed`` so that steps
    are compared on the same test tuples and noise.
    """
    model = getattr(model, "module", model)  # tolerate a DDP wrapper
    device = next(model.parameters()).device
    n = num_samples if num_samples is not None else min(cfg.eval.num_samples, MAX_DEFAULT_SAMPLES)
    if n <= 0:
        raise ValueError(f"periodic evaluation needs a positive sample count, got {n}")
    judge = _cached_judge(cfg, list(model.modalities), device)
    accuracy = [v for k, v in judge.test_accuracy.items() if k != "mean"]
    key = (str(cfg.data.path), n)
    if key not in _chunks:
        _chunks[key] = judge_module(cfg.data.path).read_test_chunks(cfg.data.path, num=n,
                                                                    batch_size=min(BATCH, n))
    was_training = model.training
    model.eval()
    try:
        out = measure_coherence(model, judge, _chunks[key], num_samples=n, batch_size=min(BATCH, n),
                                seed=cfg.train.seed, all_reduce=lambda t: t)
    finally:
        model.train(was_training)
    names = out["modalities"]
    matrix = out["cross"]["matrix"]
    figures = {
        "joint_coherence": out["joint"]["coherence"],
        "joint_stderr": out["joint"]["stderr"],
        "cross_coherence": out["cross"].get("coherence", float("nan")),
        "cross_stderr": out["cross"].get("stderr", float("nan")),
        "self_coherence": out["cross"]["self_coherence"],
        "ceiling_coherence": out["prior_ceiling"]["coherence"],
        "classifier_min_accuracy": min(accuracy, default=float("nan")),
    }
    if len(names) > 1:
        for j, target in enumerate(names):
            others = [matrix[i][j] for i in range(len(names)) if i != j]
            figures[f"cross_to/{target}"] = sum(others) / len(others)
    return figures
