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

Threads (CPU, ``workers``): single-threaded row-split chains instead of an OpenMP fork/join per op; see
``langevin_torch``. Tried and dropped (1 thread, CPU time, batch 16 / 256): torch.compile of one step
(default: 2.3x / 1.6x autograd, max-autotune-no-cudagraphs: 2.4x / 1.5x, against 4.1-4.8x / 1.9-2.1x for
this loop), torch.compile of the whole 60-step loop (285 s to compile, no faster than this loop), a
feature-major layout (z^T, W @ h^T: within noise), and running the batch as row chunks for cache locality
(within noise at 1024-2048 rows).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
import torch.nn.functional as F

from ._utils import (
    LEAKY_SLOPE,
    ChainResult,
    Score,
    Weights,
    chain_score,
    check_chain_args,
    langevin_reference,
    mlp_energy_grad,
)

__all__ = ["langevin_reference", "langevin_torch", "langevin_traced"]

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


WORKERS_ENV = "MMEBM_LANGEVIN_WORKERS"
MIN_ROWS_PER_WORKER = 64
NOISE_CHUNK = 16  # steps of fresh noise drawn at once for row-split chains (memory flat in K)


def auto_workers(batch: int) -> int:
    """``workers`` for a CPU chain of ``batch`` rows: $MMEBM_LANGEVIN_WORKERS if set; else 0 (torch's
    intra-op threads per op) with one thread or with >= 64 rows per thread, else 1 (one single-threaded chain:
    at small batch the fork/join of every op costs more than the op).

    Measured on the 2-core machine, quiet, 32-200x2, K 60 (`mmebm bench langevin --workers N`): batch 16,
    1 worker 6.3 ms vs 0 workers 10.8 ms; batch 256, 0 workers 38-42 ms vs 2 row-split workers 45-68 ms;
    batch 1024, 107-132 ms vs 116-165 ms. Row-split workers (N >= 2) stay available through the variable.
    """
    if torch.compiler.is_compiling():
        return 0  # langevin_traced runs there (no thread split); get_num_threads would break the graph
    value = os.environ.get(WORKERS_ENV)
    if value is not None:
        if not value.isdigit():
            raise ValueError(f"{WORKERS_ENV}={value!r}: expected an integer >= 0 (0: torch's intra-op "
                             "threads per op, 1: one single-threaded chain, N: N row-split chains)")
        return int(value)
    threads = torch.get_num_threads()
    if threads == 1:
        return 0
    return 0 if batch >= MIN_ROWS_PER_WORKER * threads else 1


class _RowChain:
    """A chain over some rows: its state, buffers and one step as aten calls bound to them (made once)."""

    def __init__(self, weights: Weights, z0: torch.Tensor, *, steps: int, step_size: float, activation: str,
                 reference: str, reference_scale: float, return_energies: bool, leaky_slope: float,
                 reference_score: Score | None = None):
        batch, d = z0.shape
        hidden, layers = weights[0][0].shape[0], len(weights) - 1
        dtype, device = _compute_dtype(z0), z0.device
        drift = 0.5 * step_size**2
        score_scale = drift / reference_scale if reference == "laplace" else drift / reference_scale**2
        self.step_size = step_size

        def buffer(*shape: int) -> torch.Tensor:
            return torch.empty(*shape, device=device, dtype=dtype)

        # Weights are fixed during a chain: cast and lay out once; W^T contiguous for the forward (h @ W^T).
        mats = [w.detach().to(dtype) for w, _ in weights]
        biases = [b.detach().to(dtype) for _, b in weights]
        self.w_out, self.b_out = mats[-1].reshape(hidden), biases[-1]
        self.z = z = z0.detach().to(dtype, copy=True)
        pre = [buffer(batch, hidden) for _ in range(layers)]  # a_l  (B, H)
        post = buffer(batch, hidden) if activation != "leaky_relu" else None  # act(a_l), gelu/silu only
        grads = [buffer(batch, hidden) for _ in range(min(layers, 2))]  # g_l ping-pong  (B, H)

        # Forward: a_1 = z W_1^T + b_1, a_l = act(a_{l-1}) W_l^T + b_l, as bound calls in order.
        self.forward: list[Op] = []
        h = z
        for layer in range(layers):
            bias_rows = biases[layer].expand(batch, hidden)  # addmm then skips its own expand
            weight_t = mats[layer].t().contiguous()
            self.forward.append(partial(torch.addmm, bias_rows, h, weight_t, out=pre[layer]))
            if layer < layers - 1 or return_energies:
                op, h = _activation_forward(activation, leaky_slope, pre[layer], post)
                self.forward.append(op)
        self.energies = buffer(steps) if return_energies else None
        self.energy_steps = self.energies.unbind(0) if return_energies else None
        self.h_mean = buffer(hidden)
        if return_energies:  # mean_b f = mean_b(h_L) . w_out + b_out
            self.forward.append(partial(torch.mean, h, 0, out=self.h_mean))
        # Backward: g_L = w_out * act'(a_L) (output layer folded in), g_{l-1} = (g_l W_l) * act'(a_{l-1}).
        self.update: list[Op] = []
        last_is_result = activation == "leaky_relu" and return_energies  # a_L was activated in place for f
        w_out_rows = self.w_out.expand(batch, hidden)
        self.update.append(_activation_backward(activation, leaky_slope, w_out_rows, pre[-1], grads[0],
                                                last_is_result))
        for step_back, layer in enumerate(range(layers - 1, 0, -1)):
            g_in, g_out = grads[step_back % 2], grads[(step_back + 1) % 2]
            self.update.append(partial(torch.mm, g_in, mats[layer], out=g_out))
            self.update.append(_activation_backward(activation, leaky_slope, g_out, pre[layer - 1], g_out,
                                                    activation == "leaky_relu"))
        g_first = grads[(layers - 1) % 2]
        # Update: z += (s^2/2) (g_1 W_1 + score(z)) (+ s eps in run); the score is taken at the old z: first.
        if reference_score is not None:  # a learned reference: its score at the old z, then the MLP's drift
            score = buffer(batch, d)
            self.update.append(lambda: score.copy_(reference_score(z)))
            self.update.append(partial(z.addmm_, g_first, mats[0], alpha=drift))
            self.update.append(partial(z.add_, score, alpha=drift))
        elif reference == "laplace":
            sign = buffer(batch, d)
            self.update.append(partial(torch.sign, z, out=sign))
            self.update.append(partial(z.addmm_, g_first, mats[0], alpha=drift))
            self.update.append(partial(z.add_, sign, alpha=-score_scale))
        else:
            self.update.append(partial(z.addmm_, g_first, mats[0], beta=1.0 - score_scale, alpha=drift))
        self.eps = buffer(batch, d)

    def run(self, ks: range, noise_steps: list[torch.Tensor] | None, generator: torch.Generator | None,
            check: bool) -> int | None:
        """Steps ``ks``; eps from ``noise_steps`` (one [rows, d] per step) or drawn per step with
        ``generator`` (the draws torch.randn(z.shape) makes). With ``check``: stop at, and return, the first
        step that leaves z non-finite."""
        z, eps, s = self.z, self.eps, self.step_size
        for i, k in enumerate(ks):
            for op in self.forward:
                op()
            if self.energy_steps is not None:
                torch.dot(self.h_mean, self.w_out, out=self.energy_steps[k])
            for op in self.update:
                op()
            if noise_steps is None:
                eps.normal_(generator=generator)
                z.add_(eps, alpha=s)
            else:
                z.add_(noise_steps[i], alpha=s)
            if check and not bool(torch.isfinite(z).all()):
                return k
        return None


_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def _row_worker_pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool of ``workers - 1`` threads with one intra-op thread each (the caller is the last)."""
    global _pool, _pool_workers
    if _pool is None or _pool_workers != workers:
        if _pool is not None:
            _pool.shutdown(wait=True)
        _pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="langevin-rows",
                                   initializer=torch.set_num_threads, initargs=(1,))
        _pool_workers = workers
    return _pool


def _run_split(chains: list[_RowChain], blocks: list[slice], steps: int, noise: list[torch.Tensor] | None,
               generator: torch.Generator | None, check: bool) -> int | None:
    """All steps of row-block chains on parallel threads, NOISE_CHUNK steps at a time; first bad step."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # each worker runs its ops on one thread (restored below)
    pool = _row_worker_pool(len(chains))
    bad: list[int] = []
    try:
        for first in range(0, steps, NOISE_CHUNK):
            ks = range(first, min(first + NOISE_CHUNK, steps))
            z = chains[0].z
            if noise is None:  # one draw for all rows: the same values for any number of workers
                drawn = torch.randn((len(ks), sum(c.z.shape[0] for c in chains), z.shape[1]),
                                    generator=generator, device=z.device, dtype=z.dtype)
                per_chain = [list(drawn[:, rows].unbind(0)) for rows in blocks]
            else:
                per_chain = [[noise[k][rows] for k in ks] for rows in blocks]
            futures = [pool.submit(chain.run, ks, chain_noise, None, check)
                       for chain, chain_noise in zip(chains[1:], per_chain[1:], strict=True)]
            results = [chains[0].run(ks, per_chain[0], None, check)] + [f.result() for f in futures]
            bad += [k for k in results if k is not None]
            if bad:
                return min(bad)
    finally:
        torch.set_num_threads(threads)
    return None


def langevin_torch(weights: Weights, z0: torch.Tensor, *, steps: int, step_size: float, activation: str,
                   reference: str = "laplace", reference_scale: float = 1.0,
                   noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                   return_energies: bool = False, leaky_slope: float = LEAKY_SLOPE,
                   workers: int = 0, reference_score: Score | None = None) -> ChainResult:
    """Run K = ``steps`` Langevin steps from z0 [B, d] on exp(f) p0 with the MLP ``weights`` (no autograd).

    ``weights``: [(W [out, in], b [out]) ...], hidden layers then the output layer (out = 1). ``noise``
    [K, B, d] replaces fresh draws; otherwise each step draws N(0, I) [B, d] with ``generator`` (the same
    draws, in the same order, as the autograd reference). Computes in fp32 (fp64 if z0 is fp64); weights are
    cast once.

    ``workers`` (CPU): 0 runs one chain whose ops use torch's intra-op threads (an OpenMP fork/join per op);
    N >= 1 sets one intra-op thread while the chain runs (torch.set_num_threads(1), restored after) and splits
    the rows into N independent chains on N threads (N = 1: the calling thread only). Measured on the shared
    2-core machine, per-op fork/join stalls whenever another process holds a core (5-17x slower chains);
    single-threaded workers do not. Rows are independent, so z_K is the same per row up to summation order.
    With N > 1, fresh noise is drawn 16 steps at a time for all rows ([16, B, d], one call): reproducible
    with ``generator`` and the same for any N > 1, but not the per-step draws of the autograd reference.

    ``reference_score`` (grad log p0 as a function of z [rows, d]) replaces the named reference: a learned
    reference (a Gaussian mixture) whose score is computed in torch ops between the MLP's fused steps.
    """
    check_chain_args(weights, z0, steps=steps, step_size=step_size, activation=activation,
                     reference=reference, reference_scale=reference_scale, noise=noise,
                     reference_score=reference_score)
    if torch.compiler.is_compiling():
        return langevin_traced(weights, z0, steps=steps, step_size=step_size, activation=activation,
                               reference=reference, reference_scale=reference_scale, noise=noise,
                               generator=generator, return_energies=return_energies, leaky_slope=leaky_slope,
                               reference_score=reference_score)
    batch = z0.shape[0]
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    single_threaded = workers >= 1 and z0.device.type == "cpu"
    workers = min(workers, batch) if single_threaded else 1
    bounds = [batch * i // workers for i in range(workers + 1)]
    blocks = [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    chains = [_RowChain(weights, z0[rows], steps=steps, step_size=step_size, activation=activation,
                        reference=reference, reference_scale=reference_scale, return_energies=return_energies,
                        leaky_slope=leaky_slope, reference_score=reference_score) for rows in blocks]
    noise_steps = noise.to(chains[0].z.dtype).unbind(0) if noise is not None else None  # views, made once
    if noise is None:
        generator = generator if generator is not None else _default_generator(z0.device)
        rng_start = generator.get_state()  # to replay the same draws if a divergent chain must be located

    def run(check: bool) -> int | None:
        if workers > 1:
            return _run_split(chains, blocks, steps, noise_steps, generator, check)
        if not single_threaded:
            return chains[0].run(range(steps), noise_steps, generator, check)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return chains[0].run(range(steps), noise_steps, generator, check)
        finally:
            torch.set_num_threads(threads)

    run(check=False)
    diverged_at = None
    if not all(bool(torch.isfinite(chain.z).all()) for chain in chains):
        # NaN/inf never leave z once in (z + anything stays non-finite), so a finite z_K proves a finite
        # chain at no per-step cost; a non-finite one is replayed from z0 with the same noise (same generator
        # state) and checked every step to name the step. The replay is bit-identical: same ops and order.
        if noise is None:
            rng_end = generator.get_state()
            generator.set_state(rng_start)
        for chain, rows in zip(chains, blocks, strict=True):
            chain.z.copy_(z0[rows])
        diverged_at = run(check=True)
        if noise is None:
            generator.set_state(rng_end)
    z = chains[0].z if workers == 1 else torch.cat([chain.z for chain in chains])
    energies = None
    if return_energies:  # block means weighted by block rows, then + b_out
        energies = sum(c.energies * c.z.shape[0] for c in chains) / batch + chains[0].b_out
        energies = energies.float()
    return ChainResult(z.to(z0.dtype), energies, diverged_at)


def langevin_traced(weights: Weights, z0: torch.Tensor, *, steps: int, step_size: float, activation: str,
                    reference: str = "laplace", reference_scale: float = 1.0,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    return_energies: bool = False, leaky_slope: float = LEAKY_SLOPE,
                    reference_score: Score | None = None) -> ChainResult:
    """The chain as plain functional ops (analytic grad f, one torch.randn per step): what ``langevin_torch``
    runs under torch.compile, which traces it whole and fuses each step's elementwise work.

    The K steps unroll into the graph. No host sync and no branch on values: ``diverged_at`` is always None
    and a divergent chain returns a non-finite z_K (training's runaway guard then reports the non-finite
    negatives). Fresh noise: torch.randn(z.shape) per step with ``generator``; under inductor (None: the
    default generator) the draws come from seeds inductor takes from that generator, so they are
    reproducible from its state (an exact resume) though not equal to the eager draws.
    """
    dtype = _compute_dtype(z0)
    weights = [(w.detach().to(dtype), b.detach().to(dtype)) for w, b in weights]
    drift = 0.5 * step_size**2
    score = chain_score(reference, reference_scale, reference_score)
    z = z0.detach().to(dtype)
    energies = []
    for k in range(steps):
        f, grad = mlp_energy_grad(weights, z, activation, leaky_slope)
        eps = noise[k].to(dtype) if noise is not None else torch.randn(
            z.shape, generator=generator, device=z.device, dtype=dtype)
        z = z + drift * (grad + score(z)) + step_size * eps
        if return_energies:
            energies.append(f.float().mean())
    stacked = (torch.stack(energies) if energies else z.new_zeros(0, dtype=torch.float32)) \
        if return_energies else None
    return ChainResult(z.to(z0.dtype), stacked, None)
