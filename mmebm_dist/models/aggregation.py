"""How the unimodal experts q_m(z | x_m) combine into q(z | X), registered by name.

Every aggregation returns the components of a uniform mixture (the form all three share):
``moe`` the experts themselves (MMVAE/MMVAE+), ``poe`` one product of the experts (MVAE), ``mopoe`` the
products of every non-empty subset (MoPoE). Products are closed-form only for Gaussian experts, so ``poe``
and ``mopoe`` require the Gaussian posterior family; they include a unit-Gaussian prior expert (as MVAE).

Incomplete tuples: ``masked_components`` takes a presence mask [B, M] and aggregates, per tuple, only the
present experts; components that use an absent expert are marked invalid ([C, B] bool) and carry no weight
in ``sample_mixture`` / ``mixture_log_prob``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch

from mmebm_dist.prior.densities import LocScaleFamily


def gaussian_product(loc: torch.Tensor, scale: torch.Tensor,
                     mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Products of Gaussian experts and a N(0, I) prior expert, one per row of ``mask``.

    loc, scale [M, B, d]; mask [C, M] (1 where the expert takes part), or [C, M, B] for a per-tuple choice.
    Precision-weighted: T = 1 + sum_m mask_m / s_m^2, loc_c = sum_m mask_m loc_m / s_m^2 / T,
    scale_c = T^(-1/2). Returns [C, B, d].
    """
    mask = mask.to(loc.dtype)
    precision = scale.pow(-2)  # (M, B, d)
    pattern = "cm,mbd->cbd" if mask.dim() == 2 else "cmb,mbd->cbd"
    total = 1.0 + torch.einsum(pattern, mask, precision)
    weighted = torch.einsum(pattern, mask, precision * loc)
    return weighted / total, total.rsqrt()


class Aggregation:
    """Base class: ``components`` gives the mixture components of q(z | x_S) for the given experts."""

    name = ""
    stratified = False
    """True when the objective is stratified over the components (one stratum per unimodal expert)."""
    needs_gaussian = False
    """True when the components are products of experts (closed form only for Gaussians)."""

    def components(self, loc: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts [M, B, d] (M = the modalities observed) -> mixture components [C, B, d]."""
        raise NotImplementedError

    def masked_components(self, loc: torch.Tensor, scale: torch.Tensor,
                          present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Components [C, B, d] of q(z | the present x) and valid [C, B] bool, for present [B, M] bool."""
        raise NotImplementedError


class MixtureOfExperts(Aggregation):
    """q(z | X) = (1/M) sum_m q_m(z | x_m)."""

    name, stratified = "moe", True

    def components(self, loc, scale):
        return loc, scale

    def masked_components(self, loc, scale, present):
        return loc, scale, present.T


class ProductOfExperts(Aggregation):
    """q(z | X) ∝ N(0, I) prod_m q_m(z | x_m)."""

    name, needs_gaussian = "poe", True

    def components(self, loc, scale):
        return gaussian_product(loc, scale, loc.new_ones(1, loc.shape[0]))

    def masked_components(self, loc, scale, present):
        loc, scale = gaussian_product(loc, scale, present.T.unsqueeze(0))
        return loc, scale, present.new_ones(1, present.shape[0])


class MixtureOfProducts(Aggregation):
    """q(z | X) = mean over the 2^M - 1 non-empty subsets S of the product N(0, I) prod_{m in S} q_m."""

    name, needs_gaussian = "mopoe", True

    def components(self, loc, scale):
        return gaussian_product(loc, scale, subset_mask(loc.shape[0], device=loc.device))

    def masked_components(self, loc, scale, present):
        subsets = subset_mask(loc.shape[0], device=loc.device).bool()  # (C, M)
        valid = ~(subsets[:, :, None] & ~present.T[None]).any(1)  # (C, B): the subset lies in the present
        return *self.components(loc, scale), valid


def subset_mask(m: int, *, device: torch.device | str | None = None) -> torch.Tensor:
    """[2^m - 1, m] 0/1 rows, one per non-empty subset of m experts (singletons first)."""
    rows = [[1.0 if i in subset else 0.0 for i in range(m)]
            for size in range(1, m + 1) for subset in itertools.combinations(range(m), size)]
    return torch.tensor(rows, device=device)


AGGREGATIONS: dict[str, Callable[[], Aggregation]] = {
    "moe": MixtureOfExperts,
    "poe": ProductOfExperts,
    "mopoe": MixtureOfProducts,
}
"""Aggregation name -> class."""


def build_aggregation(name: str) -> Aggregation:
    """The aggregation called ``name``."""
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation '{name}'; choose one of {', '.join(AGGREGATIONS)}")
    return AGGREGATIONS[name]()


def mixture_log_prob(z: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor, family: LocScaleFamily,
                     valid: torch.Tensor | None = None) -> torch.Tensor:
    """log of the uniform mixture over components: z [..., B, d], loc/scale [C, B, d] -> [..., B].

    log (1/C) sum_c q_c(z), computed with logsumexp over c; with ``valid`` [C, B] the mixture of tuple b is
    over its valid components only.
    """
    lead = z.dim() - 2
    zz = z.unsqueeze(lead)  # (..., 1, B, d)
    lq = family.log_prob(zz, loc, scale)  # (..., C, B)
    if valid is None:
        return torch.logsumexp(lq, dim=lead) - math.log(loc.shape[0])
    lq = lq.masked_fill(~valid, -math.inf)
    return torch.logsumexp(lq, dim=lead) - valid.sum(0).to(lq.dtype).log()


def sample_mixture(loc: torch.Tensor, scale: torch.Tensor, family: LocScaleFamily, particles: int, *,
                   generator: torch.Generator | None = None,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """Reparameterised draws from the uniform mixture: component chosen uniformly per draw (among the valid
    ones [C, B] of each tuple when ``valid`` is given). -> [K, B, d]."""
    c, b, _ = loc.shape
    if c == 1:
        return family.rsample(loc[0], scale[0], (particles,), generator=generator)
    if valid is None:
        idx = torch.randint(c, (particles, b), generator=generator, device=loc.device)  # (K, B)
    else:
        idx = torch.multinomial(valid.T.float(), particles, replacement=True, generator=generator).T
    cols = torch.arange(b, device=loc.device).expand(particles, b)
    return family.rsample(loc[idx, cols], scale[idx, cols], generator=generator)
