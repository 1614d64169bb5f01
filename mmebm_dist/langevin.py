"""Short-run Langevin sampling of the EBM prior p(z) ∝ exp(f(z)) p0(z): one entry point, several backends.

    z_{k+1} = z_k + (s^2 / 2) * grad_z [f(z_k) + log p0(z_k)] + s * eps_k,   eps_k ~ N(0, I),  k < K

``s`` is ``step_size`` (drift s^2/2, noise std s: the LEBM convention). The chain carries no gradient:
it produces negatives for the prior's update and joint samples, never a path for backpropagation.

Backends: ``autograd`` (the plain reference every other backend is tested against), ``torch`` (fused
analytic gradient, no autograd graph) and ``triton`` (one kernel launch per chain, CUDA tensors).
``auto`` picks the fastest that applies.
"""

from __future__ import annotations

from typing import Callable

import torch

from mmebm_dist.models.densities import reference_density

BACKENDS = ("auto", "autograd", "torch", "triton")


class LangevinDivergenceError(FloatingPointError):
    """A Langevin chain produced non-finite values."""


def _divergence(step: int, step_size: float, detail: str = "") -> LangevinDivergenceError:
    return LangevinDivergenceError(
        f"Langevin chain became non-finite at step {step} (step_size={step_size}){detail}. "
        "Lower model.prior.langevin.step_size, raise model.prior.energy_l2, enable model.prior.spectral_norm "
        "or lower model.prior.lr."
    )


def _check_inputs(z0: torch.Tensor, steps: int, step_size: float, noise: torch.Tensor | None) -> None:
    if z0.dim() != 2:
        raise ValueError(f"z0 must be [B, d], got shape {tuple(z0.shape)}")
    if z0.requires_grad:
        raise ValueError("z0 requires grad: the Langevin sampler is forward-only; pass z0.detach()")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    if noise is not None and tuple(noise.shape) != (steps, *z0.shape):
        raise ValueError(f"noise must be [steps, B, d] = {(steps, *z0.shape)}, got {tuple(noise.shape)}")


def sample_autograd(energy: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, steps: int,
                    step_size: float, reference: str = "laplace", reference_scale: float = 1.0,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    return_energies: bool = False):
    """Reference backend: grad f from autograd at every step. Returns z_K (and per-step mean f if asked)."""
    p0 = reference_density(reference, reference_scale)
    z = z0.detach().clone()
    drift = 0.5 * step_size**2
    mean_energies = []
    with torch.enable_grad():
        for k in range(steps):
            z.requires_grad_(True)
            f = energy(z)
            (grad,) = torch.autograd.grad(f.sum(), z)
            with torch.no_grad():
                eps = noise[k] if noise is not None else torch.randn(
                    z.shape, generator=generator, device=z.device, dtype=z.dtype)
                z = z.detach() + drift * (grad + p0.score(z)) + step_size * eps
            if return_energies:
                mean_energies.append(f.detach().mean())
            if not torch.isfinite(z).all():
                raise _divergence(k, step_size)
    if return_energies:
        energies = torch.stack(mean_energies) if mean_energies else z.new_zeros(0)
        return z, energies
    return z


def sample(energy, z0: torch.Tensor, *, steps: int, step_size: float, reference: str = "laplace",
           reference_scale: float = 1.0, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, backend: str = "auto", return_energies: bool = False):
    """Run K = ``steps`` Langevin steps from ``z0`` [B, d] on exp(f) p0; returns z_K [B, d] (detached).

    ``noise`` [steps, B, d], when given, replaces the fresh N(0, I) draws (makes backends comparable).
    ``return_energies`` also returns the mean f(z_k) before each step k, shape [steps] (chain diagnostics).
    A non-finite chain raises :class:`LangevinDivergenceError` naming the step.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown Langevin backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    _check_inputs(z0, steps, step_size, noise)
    kwargs = dict(steps=steps, step_size=step_size, reference=reference, reference_scale=reference_scale,
                  noise=noise, generator=generator, return_energies=return_energies)
    if backend in ("autograd", "auto"):
        return sample_autograd(energy, z0, **kwargs)
    raise NotImplementedError(f"Langevin backend '{backend}' is not built yet")  # issue 4 adds torch/triton
