"""Live monitoring during training: joint and cross coherence on a small sample, as a flat dict of figures.

Called by the training loop every ``train.eval_every`` steps (on rank 0, or on every rank under ZeRO-3 where
weights are gathered collectively); it runs as a single process (no all_reduce) on the unwrapped model. The
classifiers, manifest hash and test tuples are read once per process and cached. The generated birds are
judged by their attributes (``mmebm_dist.evaluate.judges.birds``), with the same figure names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmebm_dist.config import Config
from mmebm_dist.evaluate.classifiers import ClassifierBundle, load_classifiers
from mmebm_dist.evaluate.coherence import measure_attribute_coherence, measure_coherence

MAX_DEFAULT_SAMPLES = 256
"""Cap on the default sample count (``eval.num_samples`` is sized for ``mmebm eval``, not for a hook)."""
BATCH = 128

_classifiers: dict[tuple[str, str, str], Any] = {}
"""Classifier bundles (digit data sets) and attribute judges (birds), per (directory, data hash, device)."""
_chunks: dict[tuple[str, int], list] = {}
_hashes: dict[str, str] = {}


def classifier_dir(cfg: Config) -> Path:
    """``eval.classifiers`` when set, else ``<data.path>/classifiers``."""
    return Path(cfg.eval.classifiers) if cfg.eval.classifiers else Path(cfg.data.path) / "classifiers"


def _cached_classifiers(cfg: Config, modalities: list[str], device: torch.device) -> ClassifierBundle:
    from mmebm_dist.data.shards import manifest_hash

    data = str(cfg.data.path)
    if data not in _hashes:
        _hashes[data] = manifest_hash(data)
    directory = classifier_dir(cfg)
    key = (str(directory), _hashes[data], str(device))
    if key not in _classifiers:
        if not (directory / "classifiers.pt").is_file():
            raise FileNotFoundError(
                f"periodic evaluation (train.eval_every={cfg.train.eval_every}) needs trained classifiers at "
                f"'{directory}' (eval.classifiers, default <data.path>/classifiers); train them with "
                f"`mmebm classifiers train --data {data} --out {directory}` or set train.eval_every=0")
        _classifiers[key] = load_classifiers(directory, manifest_hash=_hashes[data], data_path=data,
                                             modalities=modalities, device=device)
    return _classifiers[key]


def _cached_judge(cfg: Config, device: torch.device):
    from mmebm_dist.data.shards import manifest_hash
    from mmebm_dist.evaluate.judges.birds import load_judge

    data = str(cfg.data.path)
    if data not in _hashes:
        _hashes[data] = manifest_hash(data)
    key = (str(classifier_dir(cfg)), _hashes[data], str(device) + "/attributes")
    if key not in _classifiers:
        _classifiers[key] = load_judge(classifier_dir(cfg), data, manifest_hash=_hashes[data], device=device)
    return _classifiers[key]


def periodic_eval(model: torch.nn.Module, cfg: Config, step: int, *, num_samples: int | None = None) -> dict:
    """Joint coherence (prior samples), cross coherence, self coherence (source = target) and the aggregate-
    posterior ceiling on ``num_samples`` samples / test tuples (default min(eval.num_samples, 256)).

    Returns a flat dict of floats: ``joint_coherence``, ``joint_stderr``, ``cross_coherence``,
    ``cross_stderr``, ``self_coherence``, ``ceiling_coherence``, ``cross_to/<target>`` (mean over sources),
    and ``classifier_min_accuracy`` (the loop logs ``step`` itself). Seeded by ``train.seed`` so that steps
    are compared on the same test tuples and noise.
    """
    from mmebm_dist.evaluate.generate import read_chunks
    from mmebm_dist.evaluate.judges.birds import is_birds, read_attribute_chunks

    model = getattr(model, "module", model)  # tolerate a DDP wrapper
    device = next(model.parameters()).device
    n = num_samples if num_samples is not None else min(cfg.eval.num_samples, MAX_DEFAULT_SAMPLES)
    if n <= 0:
        raise ValueError(f"periodic evaluation needs a positive sample count, got {n}")
    attributes = is_birds(cfg.data.path)
    if attributes:
        judge = _cached_judge(cfg, device)
        accuracy = [v for k, v in judge.test_accuracy.items() if k != "mean"]
    else:
        classifiers = _cached_classifiers(cfg, list(model.modalities), device)
        accuracy = list(classifiers.test_accuracy.values())
    key = (str(cfg.data.path), n)
    if key not in _chunks:
        read = read_attribute_chunks if attributes else read_chunks
        _chunks[key] = read(cfg.data.path, num=n, batch_size=min(BATCH, n))
    was_training = model.training
    model.eval()
    try:
        common = {"num_samples": n, "batch_size": min(BATCH, n), "seed": cfg.train.seed,
                  "all_reduce": lambda t: t}
        if attributes:
            out = measure_attribute_coherence(model, judge, _chunks[key], **common)
        else:
            out = measure_coherence(model, classifiers, _chunks[key], **common)
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
