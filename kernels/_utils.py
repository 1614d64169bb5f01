"""The Langevin contract every backend shares: the names, the argument check, the MLP spec the fused kernels
take, the FLOP count, and the one autograd reference (any energy callable) every backend is tested against.

The chain, for an MLP energy f with L hidden layers (pre-activations a_l, activations h_l = act(a_l)):

    a_1 = W_1 z + b_1,  a_l = W_l h_{l-1} + b_l,  f(z) = w_out . h_L + b_out
    grad_z f = W_1^T g_1,  g_L = w_out * act'(a_L),  g_{l-1} = (W_l^T g_l) * act'(a_{l-1})
    z <- z + (s^2 / 2) * (grad_z f(z) + score_p0(z)) + s * eps,   score = -sign(z)/b (laplace) | -z/b^2
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .names import ACTIVATIONS, FIXED_REFERENCES, LEAKY_SLOPE

Weights = list[tuple[torch.Tensor, torch.Tensor]]
Energy = Callable[[torch.Tensor], torch.Tensor]
"""An energy f as a function z [B, d] -> f(z) [B] (differentiable: the reference takes its gradient)."""
Score = Callable[[torch.Tensor], torch.Tensor]
"""A reference's grad log p0 as a function [B, d] -> [B, d] (a learned reference, e.g. a Gaussian mixture);
given to a chain, it replaces the named ``reference`` / ``reference_scale``."""


class FusedSpec(NamedTuple):
    """What the fused backends (torch, triton) need to reproduce an energy: the plain MLP
    f(z) = w_out . act(W_L ... act(W_1 z + b_1) ... + b_L) + b_out and nothing else."""

    weights: Weights
    """(W [out, in], b [out]) of every linear layer, hidden layers first, the output layer (out = 1) last."""
    activation: str
    """The hidden layers' activation, a name in :data:`ACTIVATIONS`."""
    leaky_slope: float = LEAKY_SLOPE
    """The negative slope of ``leaky_relu`` (unused by the other activations)."""


class ChainResult(NamedTuple):
    """What a fused chain returns; the caller turns ``diverged_at`` into its own error type."""

    z: torch.Tensor
    """z_K, [B, d], in z0's dtype."""
    energies: torch.Tensor | None
    """Mean f(z_k) before each step k, [K] fp32, when asked for; else None."""
    diverged_at: int | None
    """First step k whose update left a non-finite value in z (None when the chain stayed finite)."""


def mlp_shape(weights: Weights) -> tuple[int, int, int]:
    """(latent d, hidden H, hidden layers L) of ``[(W [out, in], b [out]) ...]``; raises on anything else."""
    if len(weights) < 2:
        raise ValueError(f"energy MLP needs a hidden layer and an output layer, got {len(weights)} layers")
    d, hidden, layers = weights[0][0].shape[1], weights[0][0].shape[0], len(weights) - 1
    expected_in = [d] + [hidden] * layers
    expected_out = [hidden] * layers + [1]
    for i, ((w, b), n_in, n_out) in enumerate(zip(weights, expected_in, expected_out, strict=True)):
        if tuple(w.shape) != (n_out, n_in) or tuple(b.shape) != (n_out,):
            raise ValueError(f"energy MLP layer {i}: expected weight {(n_out, n_in)} and bias {(n_out,)}, "
                             f"got {tuple(w.shape)} and {tuple(b.shape)} (hidden layers share one width)")
    return d, hidden, layers


def check_chain_inputs(z0: torch.Tensor, *, steps: int, step_size: float, noise: torch.Tensor | None,
                       reference: str = "laplace", reference_scale: float = 1.0,
                       reference_score: Score | None = None) -> None:
    """Validate what every chain takes, whatever computes its energy (the one check: every backend and the
    sampler call it)."""
    if reference_score is None and reference not in FIXED_REFERENCES:
        raise ValueError(f"unknown reference density '{reference}'; choose one of "
                         f"{', '.join(FIXED_REFERENCES)}")
    if not reference_scale > 0:
        raise ValueError(f"reference_scale must be positive, got {reference_scale}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if z0.dim() != 2:
        raise ValueError(f"z0 must be [B, d], got shape {tuple(z0.shape)}")
    if z0.requires_grad:
        raise ValueError("z0 requires grad: the Langevin sampler is forward-only; pass z0.detach()")
    if noise is not None and tuple(noise.shape) != (steps, *z0.shape):
        raise ValueError(f"noise must be [steps, B, d] = {(steps, *z0.shape)}, got {tuple(noise.shape)}")


def check_chain_args(weights: Weights, z0: torch.Tensor, *, steps: int, step_size: float, activation: str,
                     reference: str, reference_scale: float,
                     noise: torch.Tensor | None,
                     reference_score: Score | None = None) -> tuple[int, int, int]:
    """:func:`check_chain_inputs` plus what a fused backend's MLP must satisfy; returns (d, H, L)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; choose one of {', '.join(ACTIVATIONS)}")
    check_chain_inputs(z0, steps=steps, step_size=step_size, noise=noise, reference=reference,
                       reference_scale=reference_scale, reference_score=reference_score)
    d, hidden, layers = mlp_shape(weights)
    if z0.shape[1] != d:
        raise ValueError(f"z0 has latent width {z0.shape[1]} but the energy MLP takes {d}")
    for w, b in weights:
        if w.device != z0.device or b.device != z0.device:
            raise ValueError(f"energy weights are on {w.device} but z0 is on {z0.device}; move one of them")
    return d, hidden, layers


def langevin_flops_per_step(batch: int, latent: int, hidden: int, layers: int) -> int:
    """Matmul FLOPs of one step, forward f plus grad_z f: 4B(dH + (L-1)H^2) + 2BH (the output layer's dot)."""
    return 4 * batch * (latent * hidden + (layers - 1) * hidden * hidden) + 2 * batch * hidden


def score_p0(z: torch.Tensor, reference: str, scale: float) -> torch.Tensor:
    """grad log p0: -sign(z)/b for Laplace (0 at exactly 0, like torch.sign), -z/b^2 for Gaussian."""
    return -torch.sign(z) / scale if reference == "laplace" else -z / scale**2


def chain_score(reference: str, scale: float, reference_score: Score | None = None) -> Score:
    """grad log p0 as the function a chain calls each step: ``reference_score`` when given (a learned
    reference), else the named reference's :func:`score_p0`."""
    if reference_score is not None:
        return reference_score
    return lambda z: score_p0(z, reference, scale)


def activation_fn(name: str, leaky_slope: float = LEAKY_SLOPE) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise activation called ``name`` as a function of one tensor (the one factory: EnergyMLP,
    the reference and the traced chain take it from here; partials, so a model holding one pickles)."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return partial(F.gelu, approximate="tanh")
    if name == "leaky_relu":
        return partial(F.leaky_relu, negative_slope=leaky_slope)
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown energy activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")


def mlp_energy(weights: Weights, z: torch.Tensor, activation: str,
               leaky_slope: float = LEAKY_SLOPE) -> torch.Tensor:
    """f(z) [B] of the MLP given by ``weights`` (plain torch, differentiable)."""
    act = activation_fn(activation, leaky_slope)
    h = z
    for w, b in weights[:-1]:
        h = act(F.linear(h, w, b))
    w, b = weights[-1]
    return F.linear(h, w, b).squeeze(-1)


def spec_energy(spec: FusedSpec, dtype: torch.dtype | None = None) -> Energy:
    """The energy a :class:`FusedSpec` describes as a callable for :func:`langevin_reference`, its weights
    detached and cast to ``dtype`` when given (a bf16 MLP is compared in fp32 with bf16-valued weights)."""
    weights = [(w.detach().to(dtype or w.dtype), b.detach().to(dtype or b.dtype)) for w, b in spec.weights]
    return partial(mlp_energy, weights, activation=spec.activation, leaky_slope=spec.leaky_slope)


def langevin_reference(energy: Energy, z0: torch.Tensor, *, steps: int, step_size: float,
                       reference: str = "laplace", reference_scale: float = 1.0,
                       reference_score: Score | None = None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> ChainResult:
    """The chain with autograd's grad f of any energy callable: the reference every backend is tested
    against, and the sampler's ``autograd`` backend (the only place the update is taken by autograd).

    In z0's dtype; fresh noise is torch.randn(z.shape) per step with ``generator``. Stops at the first step
    whose update leaves z non-finite (``diverged_at``; z is then that step's result). ``energies``: mean f
    before each step, fp32 [steps]. ``reference_score`` (grad log p0 as a function) replaces the named one.
    """
    check_chain_inputs(z0, steps=steps, step_size=step_size, noise=noise, reference=reference,
                       reference_scale=reference_scale, reference_score=reference_score)
    drift = 0.5 * step_size**2
    score = chain_score(reference, reference_scale, reference_score)
    z = z0.detach().clone()
    energies = []
    for k in range(steps):
        with torch.enable_grad():
            z.requires_grad_(True)
            f = energy(z)
            (grad,) = torch.autograd.grad(f.sum(), z)
        with torch.no_grad():
            eps = noise[k].to(z.dtype) if noise is not None else torch.randn(
                z.shape, generator=generator, device=z.device, dtype=z.dtype)
            z = z.detach() + drift * (grad + score(z)) + step_size * eps
        energies.append(f.detach().float().mean())
        if not torch.isfinite(z).all():
            return ChainResult(z, torch.stack(energies), k)
    return ChainResult(z, torch.stack(energies) if energies else z.new_zeros(0, dtype=torch.float32), None)


def _activation_grad(name: str, grad: torch.Tensor, a: torch.Tensor, leaky_slope: float) -> torch.Tensor:
    """grad * act'(a), elementwise, for the activation called ``name`` (the aten backward of each)."""
    aten = torch.ops.aten
    if name == "leaky_relu":
        return aten.leaky_relu_backward(grad, a, leaky_slope, False)
    if name == "silu":
        return aten.silu_backward(grad, a)
    return aten.gelu_backward(grad, a, approximate="tanh" if name == "gelu_tanh" else "none")


def mlp_energy_grad(weights: Weights, z: torch.Tensor, activation: str,
                    leaky_slope: float = LEAKY_SLOPE) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(z) [B], grad_z f(z) [B, d]) of the MLP by the chain rule in the module docstring: plain ops, no
    autograd graph, so torch.compile traces it whole (torch.autograd.grad in a compiled region breaks it)."""
    act = activation_fn(activation, leaky_slope)
    pre, h = [], z
    for w, b in weights[:-1]:
        pre.append(F.linear(h, w, b))  # a_l  (B, H)
        h = act(pre[-1])
    w_out, b_out = weights[-1]
    f = F.linear(h, w_out, b_out).squeeze(-1)
    g = _activation_grad(activation, w_out.expand(z.shape[0], -1), pre[-1], leaky_slope)  # g_L  (B, H)
    for layer in range(len(pre) - 1, 0, -1):
        g = _activation_grad(activation, g @ weights[layer][0], pre[layer - 1], leaky_slope)
    return f, g @ weights[0][0]
