"""Decoder likelihoods p(x_m | z, w_m), registered by name: log density summed over a sample, and the mean.

``laplace`` and ``gaussian`` treat the decoder output as the location with a fixed scale from the modality's
config (MMVAE+: Laplace, 0.75); ``bernoulli`` treats it as logits (x in [0, 1] allowed, as a soft target).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn import functional as F

from mmebm_dist.config import ModalityConfig


class Likelihood:
    """Base class: ``event_dims`` trailing axes form one sample and are summed in :meth:`log_prob`."""

    def __init__(self, event_dims: int, scale: float = 1.0):
        self.event_dims, self.scale = event_dims, float(scale)

    def _sum_event(self, t: torch.Tensor) -> torch.Tensor:
        return t.sum(dim=tuple(range(-self.event_dims, 0)))

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """log p(x | params) summed over the event axes (broadcasting): [..., *shape] -> [...]."""
        raise NotImplementedError

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        """E[x | params], clamped to the data range [0, 1]."""
        return params.clamp(0.0, 1.0)


class LaplaceLikelihood(Likelihood):
    """Laplace(x; loc = decoder output, scale fixed): -|x - loc| / b - log(2b) per element."""

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self._sum_event(-(x - params).abs() / self.scale - math.log(2 * self.scale))


class GaussianLikelihood(Likelihood):
    """N(x; mean = decoder output, std fixed): -(x - mu)^2 / (2 s^2) - log(s sqrt(2 pi)) per element."""

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        const = math.log(self.scale * math.sqrt(2 * math.pi))
        return self._sum_event(-0.5 * ((x - params) / self.scale) ** 2 - const)


class BernoulliLikelihood(Likelihood):
    """Bernoulli(x; logits = decoder output): x log sigmoid(l) + (1 - x) log sigmoid(-l) per element."""

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        x = x.expand_as(params) if x.shape != params.shape else x
        return self._sum_event(-F.binary_cross_entropy_with_logits(params, x, reduction="none"))

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(params)


LIKELIHOODS: dict[str, Callable[[int, float], Likelihood]] = {
    "laplace": LaplaceLikelihood,
    "gaussian": GaussianLikelihood,
    "bernoulli": BernoulliLikelihood,
}
"""Likelihood name -> class taking (event_dims, scale)."""


def build_likelihood(mod: ModalityConfig) -> Likelihood:
    """The likelihood of modality ``mod`` (its ``likelihood`` name and ``likelihood_scale``)."""
    return LIKELIHOODS[mod.likelihood](len(mod.shape), mod.likelihood_scale)
