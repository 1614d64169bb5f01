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
folded into the first backward pass, so f itself is computed only when energies are asked for. Each step's
aten calls are bound to their buffers once per chain (functools.partial), so the loop pays no per-op Python
dispatch beyond the call itself (that saved ~12 us of ~55 us per step at batch 1).
Divergence check at no per-step cost: non-finite values never leave z once in, so z_K finite proves the chain
finite; otherwise the chain is replayed from z0 with the same noise (generator state saved at the start) and
checked every step to name the first bad one.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

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
Op = Callable[[], object]


def _activation_forward(name: str, slope: float, a: torch.Tensor,
                        out: torch.Tensor) -> tuple[Op, torch.Tensor]:
    """The bound call computing act(a) and the tensor it writes (``a`` itself for leaky_relu: in place)."""
    if name == "leaky_relu":
        return partial(F.leaky_relu_, a, slope), a
    if name == "silu":
        return partial(_aten.silu.out, a, out=out), out
    approximate = "tanh" if name == "gelu_tanh" else "none"
    return partial(_aten.gelu.out, a, approximate=approximate, out=out), out


def _activation_backward(name: str, slope: float, grad: torch.Tensor, a: torch.Tensor, out: torch.Tensor,
                         a_is_result: bool) -> Op:
    """The bound call computing out = grad * act'(a); ``a`` holds act(a) when ``a_is_result`` (leaky_relu)."""
    if name == "leaky_relu":
        # act(a) keeps a's sign (slope > 0), so act' can be read back from the activated buffer.
        return partial(_aten.leaky_relu_backward.grad_input, grad, a, slope, a_is_result, grad_input=out)
    if name == "silu":
        return partial(_aten.silu_backward.grad_input, grad, a, grad_input=out)
    approximate = "tanh" if name == "gelu_tanh" else "none"
    return partial(_aten.gelu_backward.grad_input, grad, a, approximate=approximate, grad_input=out)


def _compute_dtype(z0: torch.Tensor) -> torch.dtype:
    return z0.dtype if z0.dtype in (torch.float32, torch.float64) else torch.float32


def _default_generator(device: torch.device) -> torch.Generator:
    """The generator torch.randn uses on ``device`` when given none."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return torch.cuda.default_generators[index]
    if device.type == "cpu":
        return torch.default_generator
    raise ValueError(f"fresh Langevin noise on {device.type} needs an explicit generator (or pass noise=...)")


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
    drift = 0.5 * step_size**2
    score_scale = drift / reference_scale if reference == "laplace" else drift / reference_scale**2

    def buffer(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=device, dtype=dtype)

    # Weights are fixed during a chain: cast and lay out once; W^T contiguous for the forward (h @ W^T).
    mats = [w.detach().to(dtype) for w, _ in weights]
    biases = [b.detach().to(dtype) for _, b in weights]
    w_out = mats[-1].reshape(hidden)
    z = z0.detach().to(dtype, copy=True)
    pre = [buffer(batch, hidden) for _ in range(layers)]  # a_l  (B, H)
    post = buffer(batch, hidden) if activation != "leaky_relu" else None  # act(a_l) (B, H), gelu/silu only
    grads = [buffer(batch, hidden) for _ in range(min(layers, 2))]  # g_l ping-pong  (B, H)

    # One step as bound aten calls, in order. Forward: a_1 = z W_1^T + b_1, a_l = act(a_{l-1}) W_l^T + b_l.
    forward: list[Op] = []
    h = z
    for layer in range(layers):
        bias_rows = biases[layer].expand(batch, hidden)  # addmm then skips its own expand
        forward.append(partial(torch.addmm, bias_rows, h, mats[layer].t().contiguous(), out=pre[layer]))
        if layer < layers - 1 or return_energies:
            op, h = _activation_forward(activation, leaky_slope, pre[layer], post)
            forward.append(op)
    energies = buffer(steps).float() if return_energies else None
    h_mean = buffer(hidden)
    if return_energies:
        forward.append(partial(torch.mean, h, 0, out=h_mean))  # mean_b f = mean_b(h_L) . w_out + b_out
    # Backward: g_L = w_out * act'(a_L) (the output layer folded in), g_{l-1} = (g_l W_l) * act'(a_{l-1}).
    update: list[Op] = []
    last_is_result = activation == "leaky_relu" and return_energies  # a_L was activated in place for f
    w_out_rows = w_out.expand(batch, hidden)
    update.append(_activation_backward(activation, leaky_slope, w_out_rows, pre[-1], grads[0],
                                       last_is_result))
    for step_back, layer in enumerate(range(layers - 1, 0, -1)):
        g_in, g_out = grads[step_back % 2], grads[(step_back + 1) % 2]
        update.append(partial(torch.mm, g_in, mats[layer], out=g_out))
        update.append(_activation_backward(activation, leaky_slope, g_out, pre[layer - 1], g_out,
                                           activation == "leaky_relu"))
    g_first = grads[(layers - 1) % 2]
    # Update: z += (s^2/2) (g_1 W_1 + score(z)) + s eps; the score is taken at the old z, so first.
    if reference == "laplace":
        sign = buffer(batch, d)
        update.append(partial(torch.sign, z, out=sign))
        update.append(partial(z.addmm_, g_first, mats[0], alpha=drift))
        update.append(partial(z.add_, sign, alpha=-score_scale))
    else:
        update.append(partial(z.addmm_, g_first, mats[0], beta=1.0 - score_scale, alpha=drift))
    noise_steps = noise.unbind(0) if noise is not None else None  # views made once, not per step
    if noise is None:
        generator = generator if generator is not None else _default_generator(device)
        rng_start = generator.get_state()  # to replay the same draws if a divergent chain must be located
        eps = buffer(batch, d)
        update.append(partial(eps.normal_, generator=generator))  # the draws torch.randn(z.shape) makes
        update.append(partial(z.add_, eps, alpha=step_size))
    energy_steps = energies.unbind(0) if energies is not None else None

    def run(check: bool) -> int | None:
        """All K steps on z; with ``check``, stop at and return the first step leaving z non-finite."""
        for k in range(steps):
            for op in forward:
                op()
            if energy_steps is not None:
                torch.dot(h_mean, w_out, out=energy_steps[k])
            for op in update:
                op()
            if noise_steps is not None:
                z.add_(noise_steps[k], alpha=step_size)
            if check and not bool(torch.isfinite(z).all()):
                return k
        return None

    run(check=False)
    if energies is not None:
        energies.add_(biases[-1].float())
    diverged_at = None
    if not bool(torch.isfinite(z).all()):
        # NaN/inf never leave z once in (z + anything stays non-finite), so a finite z_K proves a finite
        # chain at no per-step cost; a non-finite one is replayed from z0 with the same noise (same generator
        # state) and checked every step to name the step. The replay is bit-identical: same ops and order.
        if noise is None:
            rng_end = generator.get_state()
            generator.set_state(rng_start)
        z.copy_(z0)
        diverged_at = run(check=True)
        if noise is None:
            generator.set_state(rng_end)
    return ChainResult(z.to(z0.dtype), energies, diverged_at)
