"""Reference densities p0 of the shared latent: log-density, score (grad log p0) and sampling, by name.

Laplace(0, b): log p0(z) = -|z|/b - log(2b) per dimension, score -sign(z)/b.
Gaussian N(0, s^2): log p0(z) = -z^2/(2 s^2) - log(s sqrt(2 pi)) per dimension, score -z/s^2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ReferenceDensity:
    """A factorised zero-location density over R^d with one scale parameter."""

    name: str
    scale: float = 1.0

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Sum over the last axis of the per-dimension log density: [..., d] -> [...]."""
        b = self.scale
        if self.name == "laplace":
            return (-z.abs() / b - math.log(2 * b)).sum(-1)
        return (-0.5 * (z / b) ** 2 - math.log(b * math.sqrt(2 * math.pi))).sum(-1)

    def score(self, z: torch.Tensor) -> torch.Tensor:
        """grad_z log p0(z), same shape as z (Laplace uses the subgradient 0 at z = 0)."""
        if self.name == "laplace":
            return -torch.sign(z) / self.scale
        return -z / self.scale**2

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draw samples of the given shape."""
        if self.name == "laplace":
            # Inverse CDF: u ~ U(-1/2, 1/2), z = -b sign(u) log(1 - 2|u|).
            u = torch.rand(shape, generator=generator, device=device, dtype=dtype) - 0.5
            u = u.clamp(-0.5 + 1e-7, 0.5 - 1e-7)
            return -self.scale * torch.sign(u) * torch.log1p(-2 * u.abs())
        return self.scale * torch.randn(shape, generator=generator, device=device, dtype=dtype)


REFERENCES = ("laplace", "gaussian")


def reference_density(name: str, scale: float = 1.0) -> ReferenceDensity:
    """The reference density called ``name`` (``laplace`` or ``gaussian``) with the given scale."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference density '{name}'; choose one of {', '.join(REFERENCES)}")
    if not scale > 0:
        raise ValueError(f"reference scale must be positive, got {scale}")
    return ReferenceDensity(name, float(scale))
