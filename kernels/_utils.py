"""Shared pieces of the fused Langevin kernels: input checks, the FLOP count and the plain-torch reference.

The chain, for an MLP energy f with L hidden layers (pre-activations a_l, activations h_l = act(a_l)):

    a_1 = W_1 z + b_1,  a_l = W_l h_{l-1} + b_l,  f(z) = w_out . h_L + b_out
    grad_z f = W_1^T g_1,  g_L = w_out * act'(a_L),  g_{l-1} = (W_l^T g_l) * act'(a_{l-1})
    z <- z + (s^2 / 2) * (grad_z f(z) + score_p0(z)) + s * eps,   score = -sign(z)/b (laplace) | -z/b^2
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "leaky_relu", "silu")
REFERENCES = ("laplace", "gaussian")
DEFAULT_LEAKY_SLOPE = 0.2

Weights = list[tuple[torch.Tensor, torch.Tensor]]
Score = Callable[[torch.Tensor], torch.Tensor]
"""A reference's grad log p0 as a function [B, d] -> [B, d] (a learned reference, e.g. a Gaussian mixture);
given to a chain, it replaces the named ``reference`` / ``reference_scale``."""


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


def check_chain_args(weights: Weights, z0: torch.Tensor, *, steps: int, step_size: float, activation: str,
                     reference: str, reference_scale: float,
                     noise: torch.Tensor | None,
                     reference_score: Score | None = None) -> tuple[int, int, int]:
    """Validate the arguments every backend shares; returns (d, H, L)."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation '{activation}'; choose one of {', '.join(ACTIVATIONS)}")
    if reference_score is None and reference not in REFERENCES:
        raise ValueError(f"unknown reference density '{reference}'; choose one of {', '.join(REFERENCES)}")
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
    d, hidden, layers = mlp_shape(weights)
    if z0.shape[1] != d:
        raise ValueError(f"z0 has latent width {z0.shape[1]} but the energy MLP takes {d}")
    if noise is not None and tuple(noise.shape) != (steps, *z0.shape):
        raise ValueError(f"noise must be [steps, B, d] = {(steps, *z0.shape)}, got {tuple(noise.shape)}")
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


def activation_fn(name: str, leaky_slope: float = DEFAULT_LEAKY_SLOPE):
    """The elementwise activation called ``name`` as a function of one tensor."""
    if name == "gelu":
        return F.gelu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "leaky_relu":
        return lambda x: F.leaky_relu(x, leaky_slope)
    if name == "silu":
        return F.silu
    raise ValueError(f"unknown activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")


def mlp_energy(weights: Weights, z: torch.Tensor, activation: str,
               leaky_slope: float = DEFAULT_LEAKY_SLOPE) -> torch.Tensor:
    """f(z) [B] of the MLP given by ``weights`` (plain torch, differentiable)."""
    act = activation_fn(activation, leaky_slope)
    h = z
    for w, b in weights[:-1]:
        h = act(F.linear(h, w, b))
    w, b = weights[-1]
    return F.linear(h, w, b).squeeze(-1)


def langevin_reference(weights: Weights, z0: torch.Tensor, *, steps: int, step_size: float, activation: str,
                       reference: str = "laplace", reference_scale: float = 1.0,
                       noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                       leaky_slope: float = DEFAULT_LEAKY_SLOPE,
                       reference_score: Score | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chain in plain torch with autograd's grad f, in z0's dtype; returns (z_K, mean f before each step).

    Weights are cast to z0's dtype (a bf16 MLP is compared in fp32 with bf16-valued weights).
    ``reference_score`` (grad log p0 as a function) replaces the named reference when given.
    """
    check_chain_args(weights, z0, steps=steps, step_size=step_size, activation=activation,
                     reference=reference, reference_scale=reference_scale, noise=noise,
                     reference_score=reference_score)
    weights = [(w.detach().to(z0.dtype), b.detach().to(z0.dtype)) for w, b in weights]
    drift = 0.5 * step_size**2
    score = chain_score(reference, reference_scale, reference_score)
    z = z0.detach().clone()
    energies = []
    for k in range(steps):
        with torch.enable_grad():
            zg = z.requires_grad_(True)
            f = mlp_energy(weights, zg, activation, leaky_slope)
            (grad,) = torch.autograd.grad(f.sum(), zg)
        eps = noise[k].to(z.dtype) if noise is not None else torch.randn(
            z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = z.detach() + drift * (grad + score(z.detach())) + step_size * eps
        energies.append(f.detach().float().mean())
    return z, (torch.stack(energies) if energies else z.new_zeros(0, dtype=torch.float32))


def _activation_grad(name: str, grad: torch.Tensor, a: torch.Tensor, leaky_slope: float) -> torch.Tensor:
    """grad * act'(a), elementwise, for the activation called ``name`` (the aten backward of each)."""
    aten = torch.ops.aten
    if name == "leaky_relu":
        return aten.leaky_relu_backward(grad, a, leaky_slope, False)
    if name == "silu":
        return aten.silu_backward(grad, a)
    return aten.gelu_backward(grad, a, approximate="tanh" if name == "gelu_tanh" else "none")


def mlp_energy_grad(weights: Weights, z: torch.Tensor, activation: str,
                    leaky_slope: float = DEFAULT_LEAKY_SLOPE) -> tuple[torch.Tensor, torch.Tensor]:
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
