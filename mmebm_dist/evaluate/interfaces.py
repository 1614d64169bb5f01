"""The types the evaluation modules share (a leaf: it imports no other evaluation module): a batch, what a
judge reads, what a generative model offers; ``coherence``, ``judges`` and the measuring modules import them
from here rather than from each other."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

NUM_CLASSES = 10
Batch = dict[str, torch.Tensor]


class GenerativeModel(Protocol):
    """The part of the model API (docs/architecture.md) that coherence needs."""

    modalities: list[str]

    def generate_joint(self, n: int, *, langevin_steps: int | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]: ...

    def generate_conditional(self, batch: dict[str, torch.Tensor], sources: Sequence[str], *,
                             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]: ...

    def aggregate_posterior_z(self, batch: dict[str, torch.Tensor], *,
                              generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor,
               private: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]: ...


UNSTATED = -1
"""Value of an attribute a reading says nothing about (a caption that does not mention it)."""


class Predictor(Protocol):
    """Anything that labels a batch of one modality: the trained classifier bundle or a test stand-in."""

    def predict(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Class labels int64 [B] for the batch x [B, *shape] of modality ``name``."""
        ...


class Judge(Protocol):
    """Reads attribute values off modalities; for class-labelled data the one value is the class label."""

    attributes: Sequence[str] | None
    """Names of the values read, reported one by one in eval.json; None: a single class label."""
    test_accuracy: dict[str, float]
    """Test accuracy of the judge's learned readers (per modality or attribute); it bounds the figures."""
    classifiers: Predictor | None
    """Per-modality class predictors whose features give the Frechet distance and whose labels judge posterior
    refinement; None for a judge that reads otherwise (those figures are then skipped)."""

    def read(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """int64 [B, A]: the values modality ``name`` states in batch x (UNSTATED where it says nothing)."""
        ...

    def known(self, name: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """int64 [B, A]: what modality ``name`` of the test tuples fixes (its true or stated values)."""
        ...

    def describe(self) -> dict:
        """The ``classifiers`` entry of eval.json: where the judge came from and its test accuracy."""
        ...
