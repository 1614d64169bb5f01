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


# ------------------------------------------------------------------------------ location-scale families
# Posteriors q(z | x_m), q(w_m | x_m) and the private priors p(w_m) are factorised Laplace or Gaussian
# densities with a per-sample location and scale. The scale parameterisation is part of the family.

ETA = 1e-6
"""Floor added to every scale (MMVAE+'s ``Constants.eta``)."""


@dataclass(frozen=True)
class LocScaleFamily:
    """A factorised Laplace or Gaussian family: log density, reparameterised sampling, scale from raw output.

    Laplace scales use MMVAE+'s softmax(raw) * d + eta (the d scales of one sample sum to about d);
    Gaussian scales use softplus(raw) + eta (the usual form for product-of-experts aggregation).
    """

    name: str

    def scale_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """Map an unconstrained network output [..., d] to positive scales [..., d]."""
        if self.name == "laplace":
            return torch.softmax(raw, dim=-1) * raw.shape[-1] + ETA
        return torch.nn.functional.softplus(raw) + ETA

    def log_prob(self, x: torch.Tensor, loc: torch.Tensor | float,
                 scale: torch.Tensor | float) -> torch.Tensor:
        """Sum over the last axis of the per-dimension log density (broadcasting): [..., d] -> [...]."""
        if self.name == "laplace":
            return (-(x - loc).abs() / scale - torch.log(2 * torch.as_tensor(scale, dtype=x.dtype))).sum(-1)
        var_term = torch.log(torch.as_tensor(scale, dtype=x.dtype)) + 0.5 * math.log(2 * math.pi)
        return (-0.5 * ((x - loc) / scale) ** 2 - var_term).sum(-1)

    def standard_noise(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draws of the unit member (location 0, scale 1) of the family."""
        unit = reference_density(self.name, 1.0)
        return unit.sample(shape, generator=generator, device=device, dtype=dtype)

    def rsample(self, loc: torch.Tensor, scale: torch.Tensor, sample_shape: tuple[int, ...] = (), *,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draws loc + scale * eps: [*sample_shape, *loc.shape]."""
        shape = tuple(sample_shape) + tuple(torch.broadcast_shapes(loc.shape, scale.shape))
        eps = self.standard_noise(shape, generator=generator, device=loc.device, dtype=loc.dtype)
        return loc + scale * eps


POSTERIOR_FAMILIES = {"laplace": LocScaleFamily("laplace"), "gaussian": LocScaleFamily("gaussian")}


def posterior_family(name: str) -> LocScaleFamily:
    """The location-scale family called ``name`` (``laplace`` or ``gaussian``)."""
    if name not in POSTERIOR_FAMILIES:
        raise ValueError(f"unknown posterior family '{name}'; choose one of {', '.join(POSTERIOR_FAMILIES)}")
    return POSTERIOR_FAMILIES[name]
