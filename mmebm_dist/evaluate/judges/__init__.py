"""Judges of generated samples, one per kind of data set: digit classifiers, bird attributes.

A judge reads what each generated modality says (``read``) and what each modality of a real test tuple fixes
(``known``); :func:`mmebm_dist.evaluate.coherence.measure_coherence` compares the two. The data set's
manifest chooses the judge (:func:`judge_module`): each kind's module exposes ``load_judge``,
``read_test_chunks`` and ``train(options: judges.options.TrainOptions)`` (``mmebm classifiers train``).
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

from mmebm_dist.evaluate.interfaces import UNSTATED, Judge  # noqa: F401  (read from here too)

JUDGE_MODULES = {
    "digits": "mmebm_dist.evaluate.judges.digits",
    "birds": "mmebm_dist.evaluate.judges.birds",
}
"""Kind of data -> the module of its judge."""
KIND_OF_BUILDER = {"birds": "birds"}
"""``mmebm data`` builder (the manifest's ``builder.command``) -> kind of data; any other builder: digits."""


def data_kind(data_dir: str | os.PathLike) -> str:
    """The kind of data set in ``data_dir`` (a key of JUDGE_MODULES), from its manifest's builder."""
    from mmebm_dist.data.shards import read_manifest

    builder = read_manifest(data_dir).get("builder", {}).get("command")
    return KIND_OF_BUILDER.get(builder, "digits")


def judge_module(data_dir: str | os.PathLike) -> ModuleType:
    """The module of the judge that fits the data set in ``data_dir``."""
    return importlib.import_module(JUDGE_MODULES[data_kind(data_dir)])

