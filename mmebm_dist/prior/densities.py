"""Reference densities p0 of the shared latent: log-density, score (grad log p0) and sampling, by name.

Laplace(0, b): log p0(z) = -|z|/b - log(2b) per dimension, score -sign(z)/b.
Gaussian N(0, s^2): log p0(z) = -z^2/(2 s^2) - log(s sqrt(2 pi)) per dimension, score -z/s^2.
Gaussian mixture (learned, :class:`GaussianMixtureReference`): sum_c pi_c N(z; mu_c, Sigma_c), fitted to the
aggregate posterior inside the run; score -sum_c r_c(z) Sigma_c^{-1} (z - mu_c), r_c the responsibilities.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from mmebm_dist.kernels.names import FIXED_REFERENCES as FIXED_REFERENCES  # re-exported: the one list
from mmebm_dist.kernels.names import REFERENCES as REFERENCES


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


# FIXED_REFERENCES (given by a name and a scale: reference_density; the fused kernels compute them) and
# REFERENCES (those and gmm: GaussianMixtureReference, fitted in the run) are imported from kernels.names.


class GaussianMixtureReference(torch.nn.Module):
    """A learned reference p0: a full-covariance Gaussian mixture fitted to aggregate-posterior draws.

    Parameters live in buffers (saved in checkpoints, moved with the model): log mixture weights [C], means
    [C, d] and the Cholesky factors of the precisions [C, d, d] (P_c = L_c L_c^T, scikit-learn's
    ``precisions_cholesky_``) and of the covariances [C, d, d]. Until :meth:`fit` runs, it is the fixed
    ``base`` density (Laplace(0, 1) by default), so a run can train its encoders under the base first.

        log p0(z) = logsumexp_c [log pi_c + log N(z; mu_c, P_c^{-1})],  y_c = (z - mu_c) L_c
        log N = -|y_c|^2 / 2 + sum log diag L_c - d/2 log(2 pi);  score = -sum_c r_c(z) y_c L_c^T
    """

    name = "gmm"

    def __init__(self, latent_dim: int, components: int, base: ReferenceDensity | None = None):
        super().__init__()
        if components < 1:
            raise ValueError(f"a Gaussian-mixture reference needs >= 1 component, got {components}")
        self.base = base if base is not None else ReferenceDensity("laplace", 1.0)
        c, d = components, latent_dim
        self.register_buffer("log_weights", torch.full((c,), -math.log(c)))
        self.register_buffer("means", torch.zeros(c, d))
        self.register_buffer("precision_chol", torch.eye(d).repeat(c, 1, 1))
        self.register_buffer("covariance_chol", torch.eye(d).repeat(c, 1, 1))
        self.register_buffer("fitted_flag", torch.zeros((), dtype=torch.bool))
        self.fitted = False
        """Python mirror of ``fitted_flag`` (no host sync per call); set by :meth:`fit` and on load."""
        self.register_load_state_dict_post_hook(_sync_fitted)

    @property
    def components(self) -> int:
        return self.log_weights.shape[0]

    def fit(self, z: torch.Tensor, *, seed: int, max_iter: int = 500) -> dict[str, float]:
        """Fit to draws z [N, d] with scikit-learn's EM (k-means start, seeded); returns fit diagnostics."""
        from sklearn.mixture import GaussianMixture
        from threadpoolctl import threadpool_limits

        z64 = z.detach().double().cpu().numpy()
        if not 1 <= self.components <= len(z64):
            raise ValueError(f"model.prior.reference_components={self.components} needs at least as many "
                             f"fit draws, got {len(z64)}; raise model.prior.reference_fit_tuples")
        # numpy's BLAS threads capped at torch's (train.threads): uncapped, its spinning threads on a shared
        # 2-core machine made a 7 s fit take over 8 minutes.
        with threadpool_limits(limits=torch.get_num_threads()):
            gmm = GaussianMixture(n_components=self.components, covariance_type="full", max_iter=max_iter,
                                  random_state=seed).fit(z64)
        cov_chol = torch.linalg.cholesky(torch.from_numpy(gmm.covariances_))
        for buf, value in ((self.log_weights, torch.from_numpy(gmm.weights_).log()),
                           (self.means, torch.from_numpy(gmm.means_)),
                           (self.precision_chol, torch.from_numpy(gmm.precisions_cholesky_)),
                           (self.covariance_chol, cov_chol)):
            buf.copy_(value.to(buf.dtype))
        self.fitted_flag.fill_(True)
        self.fitted = True
        return {"reference_fit_loglik": float(gmm.score(z64)), "reference_fit_iters": float(gmm.n_iter_),
                "reference_fit_draws": float(len(z64))}

    def _component_terms(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [N, C, d], log pi_c + log N(z; c) [N, C]) for z [N, d]."""
        y = torch.einsum("ncd,cde->nce", z[:, None, :] - self.means, self.precision_chol)
        log_det = torch.diagonal(self.precision_chol, dim1=-2, dim2=-1).log().sum(-1)
        log_comp = (self.log_weights + log_det - 0.5 * y.pow(2).sum(-1)
                    - 0.5 * z.shape[-1] * math.log(2 * math.pi))
        return y, log_comp

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log p0(z): [..., d] -> [...]."""
        if not self.fitted:
            return self.base.log_prob(z)
        flat = z.reshape(-1, z.shape[-1])
        _, log_comp = self._component_terms(flat.to(self.means.dtype))
        return torch.logsumexp(log_comp, -1).to(z.dtype).reshape(z.shape[:-1])

    def score(self, z: torch.Tensor) -> torch.Tensor:
        """grad_z log p0(z) [N, d] for z [N, d] (analytic: responsibilities times each component's score)."""
        if not self.fitted:
            return self.base.score(z)
        y, log_comp = self._component_terms(z.to(self.means.dtype))
        resp = torch.softmax(log_comp, -1)  # (N, C)
        return -torch.einsum("nc,nce,cde->nd", resp, y, self.precision_chol).to(z.dtype)

    def sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Draws [n, d]: a component per row from the weights, then mu_c + A_c eps (A_c A_c^T = Sigma_c)."""
        if not self.fitted:
            return self.base.sample(shape, generator=generator, device=device, dtype=dtype)
        n, d = shape
        device = self.means.device if device is None else device
        comp = torch.multinomial(self.log_weights.exp().to(device), n, replacement=True, generator=generator)
        eps = torch.randn((n, d), generator=generator, device=device, dtype=self.means.dtype)
        chol = self.covariance_chol.to(device)[comp]  # (n, d, d)
        z = self.means.to(device)[comp] + torch.einsum("nde,ne->nd", chol, eps)
        return z.to(dtype)


def _sync_fitted(module: GaussianMixtureReference, _incompatible) -> None:
    module.fitted = bool(module.fitted_flag)


def reference_density(name: str, scale: float = 1.0) -> ReferenceDensity:
    """The reference density called ``name`` (``laplace`` or ``gaussian``) with the given scale."""
    if name not in FIXED_REFERENCES:
        raise ValueError(f"unknown reference density '{name}'; choose one of {', '.join(FIXED_REFERENCES)}")
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
