"""Fused short-run Langevin in plain torch (any device): the analytic energy gradient, no autograd graph.

    z <- z + (s^2 / 2) * (grad_z f(z) + score_p0(z)) + s * eps,   K steps
    f(z) = w_out . act(W_L ... act(W_1 z + b_1) ... + b_L) + b_out;   grad_z f by the chain rule (_utils.py)

Per step (batch B, latent d, hidden H, L hidden layers): matmul FLOPs 4B(dH + (L-1)H^2) (+2BH when energies
are asked for). Memory, allocated once per chain (flat in K): L [B, H] pre-activations, two [B, H] gradient
buffers (one when L = 1), one more [B, H] for act(a) with gelu/silu (leaky_relu is applied in place), and
three [B, d] (z, sign, eps). Bytes moved per step: about (3L + 2) B H 4 for the elementwise passes plus the
weights once per matmul (L2-resident at H = 200).

Why it is built this way (measured on the project's 2-core CPU, LeakyReLU MLP 32-200-200-1, K 60): a naive
no-autograd loop lost to autograd at batch >= 256 because of temporaries and extra elementwise passes. Here
every matmul writes into a preallocated buffer with its bias fused (addmm(out=)), activation and derivative
are single aten passes (leaky_relu_ in place; *_backward.grad_input(out=)), the drift s^2/2 is folded into
the last matmul's alpha (z.addmm_), W^T is made contiguous once per chain, and the output layer (w_out) is
folded into the first backward pass, so f itself is computed only when energies are asked for.
Divergence check: one sum of z per step into a [K] buffer (a non-finite z gives a non-finite sum), read only
when z_K is non-finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import (
    DEFAULT_LEAKY_SLOPE,
    ChainResult,
    Weights,
    check_chain_args,
    langevin_reference,
)

__all__ = ["langevin_reference", "langevin_torch"]

_aten = torch.ops.aten


class _Activation:
    """act(a) and g * act'(a) as single aten passes writing into given buffers."""

    def __init__(self, name: str, leaky_slope: float):
        self.name, self.slope = name, leaky_slope
        # leaky_relu is applied in place (the activation keeps a's sign, so act' is read back from act(a)).
        self.in_place = name == "leaky_relu"

    def forward(self, a: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """act(a) into ``out`` (``out is a`` for leaky_relu); returns out."""
        if self.name == "leaky_relu":
            return F.leaky_relu_(a, self.slope)
        if self.name == "silu":
            return _aten.silu.out(a, out=out)
        return _aten.gelu.out(a, approximate="tanh" if self.name == "gelu_tanh" else "none", out=out)

    def backward(self, grad: torch.Tensor, a: torch.Tensor, out: torch.Tensor, a_is_result: bool) -> None:
        """out = grad * act'(a); ``a`` holds act(a) instead when ``a_is_result`` (leaky_relu only)."""
        if self.name == "leaky_relu":
            _aten.leaky_relu_backward.grad_input(grad, a, self.slope, a_is_result, grad_input=out)
        elif self.name == "silu":
            _aten.silu_backward.grad_input(grad, a, grad_input=out)
        else:
            approximate = "tanh" if self.name == "gelu_tanh" else "none"
            _aten.gelu_backward.grad_input(grad, a, approximate=approximate, grad_input=out)


def _compute_dtype(z0: torch.Tensor) -> torch.dtype:
    return z0.dtype if z0.dtype in (torch.float32, torch.float64) else torch.float32


def langevin_torch(weights: Weights, z0: torch.Tensor, *, steps: int, step_size: float, activation: str,
                   reference: str = "laplace", reference_scale: float = 1.0,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   return_energies: bool = False, leaky_slope: float = DEFAULT_LEAKY_SLOPE) -> ChainResult:
    """Run K = ``steps`` Langevin steps from z0 [B, d] on exp(f) p0 with the MLP ``weights`` (no autograd).

    ``weights``: [(W [out, in], b [out]) ...], hidden layers then the output layer (out = 1). ``noise``
    [K, B, d] replaces fresh draws; otherwise each step draws N(0, I) [B, d] with ``generator`` (the same
    draws, in the same order, as the autograd reference). Computes in fp32 (fp64 if z0 is fp64); weights are
    cast once.
    """
    d, hidden, layers = check_chain_args(weights, z0, steps=steps, step_size=step_size, activation=activation,
                                         reference=reference, reference_scale=reference_scale, noise=noise)
    dtype, device = _compute_dtype(z0), z0.device
    batch = z0.shape[0]
    act = _Activation(activation, leaky_slope)
    # Weights are fixed during a chain: cast and lay out once; W^T contiguous for the forward (h @ W^T).
    mats = [w.detach().to(dtype) for w, _ in weights]
    biases = [b.detach().to(dtype) for _, b in weights]
    mats_t = [w.t().contiguous() for w in mats[:-1]]
    biases_rows = [b.expand(batch, hidden) for b in biases[:-1]]  # addmm skips its own expand per call
    w_out = mats[-1].reshape(1, hidden)
    b_out = biases[-1]
    drift = 0.5 * step_size**2

    z = z0.detach().to(dtype, copy=True)
    pre = [torch.empty(batch, hidden, device=device, dtype=dtype) for _ in range(layers)]  # a_l  (B, H)
    # gelu/silu need a_l after act(a_l) is taken: act(a_l) gets its own buffer (one, reused layer by layer).
    post = pre if act.in_place else [torch.empty(batch, hidden, device=device, dtype=dtype)] * layers
    grad_h = torch.empty(batch, hidden, device=device, dtype=dtype)  # g_l  (B, H)
    grad_spare = torch.empty_like(grad_h) if layers > 1 else None  # g_{l-1} while g_l is still read
    w_out_rows = w_out.expand(batch, hidden)
    sign_buf = torch.empty_like(z) if reference == "laplace" else None
    eps_buf = torch.empty_like(z) if noise is None else None
    # Divergence check: the sum of z after each step (non-finite once z is; views made once, not per step).
    sums = torch.empty(steps, device=device, dtype=dtype)
    sum_views = sums.unbind(0)
    noise_steps = noise.unbind(0) if noise is not None else None
    energies = torch.empty(steps, device=device, dtype=torch.float32) if return_energies else None
    score_scale = drift / reference_scale if reference == "laplace" else drift / reference_scale**2

    for k in range(steps):
        # Forward: a_1 = z W_1^T + b_1, a_l = h_{l-1} W_l^T + b_l (bias fused into addmm).
        h = z
        for layer in range(layers):
            torch.addmm(biases_rows[layer], h, mats_t[layer], out=pre[layer])
            if layer < layers - 1 or return_energies:
                h = act.forward(pre[layer], post[layer])
        if energies is not None:
            # mean_b f = mean_b(h_L) . w_out + b_out: one pass over h_L instead of a [B] matvec and a mean.
            torch.add(b_out, torch.mv(h.mean(0, keepdim=True), w_out[0]), out=energies[k:k + 1])
        # Backward: g_L = w_out * act'(a_L) (the output layer folded in), g_{l-1} = (g_l W_l) * act'(a_{l-1}).
        last_is_result = act.in_place and return_energies
        act.backward(w_out_rows, pre[-1], grad_h, last_is_result)
        for layer in range(layers - 1, 0, -1):
            torch.mm(grad_h, mats[layer], out=grad_spare)
            act.backward(grad_spare, pre[layer - 1], grad_spare, act.in_place)
            grad_h, grad_spare = grad_spare, grad_h
        # Update: z += (s^2/2) (g_1 W_1 + score(z)) + s eps; score at the old z, so it is applied first.
        if reference == "laplace":
            torch.sign(z, out=sign_buf)
            z.addmm_(grad_h, mats[0], alpha=drift)
            z.add_(sign_buf, alpha=-score_scale)
        else:
            z.addmm_(grad_h, mats[0], beta=1.0 - score_scale, alpha=drift)
        if noise is None:
            torch.randn(z.shape, generator=generator, device=device, dtype=dtype, out=eps_buf)
            z.add_(eps_buf, alpha=step_size)
        else:
            z.add_(noise_steps[k], alpha=step_size)
        torch.sum(z, dim=(0, 1), out=sum_views[k])

    diverged_at = None
    if steps and not bool(torch.isfinite(z).all()):
        # NaN/inf never leave z once in (they reach every matmul), so the first non-finite sum is the step.
        # A sum can also overflow while z is still finite (|z| ~ 1e38 / (B d), a chain already blowing up),
        # so the step reported is the first one that is non-finite or that large.
        diverged_at = int(torch.nonzero(~torch.isfinite(sums))[0, 0])
    return ChainResult(z.to(z0.dtype), energies, diverged_at)
