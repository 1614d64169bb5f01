"""Short-run Langevin sampling of the EBM prior p(z) ∝ exp(f(z)) p0(z): one entry point, several backends.

    z_{k+1} = z_k + (s^2 / 2) * grad_z [f(z_k) + log p0(z_k)] + s * eps_k,   eps_k ~ N(0, I),  k < K

``s`` is ``step_size`` (drift s^2/2, noise std s: the LEBM convention). The chain carries no gradient:
it produces negatives for the prior's update and joint samples, never a path for backpropagation.

Backends: ``autograd`` (``mmebm_dist.kernels._utils.langevin_reference``: the one autograd chain, for any
energy callable, that every other backend is tested against), ``torch`` (fused analytic gradient, no autograd
graph) and ``triton`` (one kernel launch per chain, CUDA tensors). ``auto`` picks the fastest that applies:
- an energy whose ``fused_spec()`` is None (any callable without one; an EnergyMLP subclass or variant the
  fused backends do not reproduce, a soft-clipped one, one whose weights ZeRO-3 left partitioned here):
  autograd, which calls ``energy(z)``, so the energy sampled is the one trained by construction. Under
  DeepSpeed ZeRO-3, training hands ``sample`` a ``gather`` context (``mmebm_dist.train.zero3``) entered
  around the fused chain, so the fused backends run there too;
- CUDA tensors, a configuration the kernel supports, and an MLP small enough that one kernel walking it
  row-block by row-block beats a few cuBLAS calls per step (:func:`triton_preferred`): triton;
- otherwise torch. ``auto`` never picks triton for CPU tensors (the interpreter is for tests only).
A forced fused backend that cannot run raises, naming why (arbitrary callable, partitioned weights; triton:
not installed, CPU tensors without TRITON_INTERPRET=1, or a configuration the kernel does not support);
``auto`` takes torch wherever triton cannot run.

Divergence: every backend raises :class:`LangevinDivergenceError` naming the first step whose update left a
non-finite value in z. autograd checks each step. torch checks z_K only (a non-finite value never leaves z,
so a finite z_K proves a finite chain) and, when it is not finite, replays the chain from z0 with the same
noise (saved generator state), checking every step. triton tracks the first bad step per program in the
kernel. The fused backends finish the chain first (no per-step host sync) and then raise. Under
torch.compile (``train.compile``) ``auto`` runs the torch backend as one traced graph (no triton launch, no
host sync): a divergent chain there returns non-finite negatives, which training's runaway guard reports.

Weights: the fused backends read ``energy.weights()`` once per chain (a spectral-normalised MLP in train mode
thus keeps one normalised weight for the whole chain; autograd re-normalises at every call of energy(z)).

CPU threads (torch backend, mmebm_dist.kernels.langevin_torch.auto_workers): with more than one intra-op
thread and fewer than 64 rows per thread, the chain runs single-threaded (an OpenMP fork/join per op costs
more than the op); otherwise torch's intra-op threads split each op. $MMEBM_LANGEVIN_WORKERS overrides:
0 = torch's intra-op threads per op, 1 = one single-threaded chain, N = N single-threaded row-split workers.

Noise: ``noise`` [K, B, d] makes all backends comparable. Fresh noise: autograd and torch draw N(0, I) [B, d]
per step from ``generator`` (the same draws in the same order, so they agree for the same generator state),
except that a row-split torch chain draws all [K, B, d] up front with it (reproducible, but other values);
triton draws in-kernel Philox normals keyed by a seed taken from ``generator`` (torch.randint with it), so it
is reproducible but not equal to the other two.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from mmebm_dist.kernels._utils import FusedSpec, check_chain_inputs, langevin_reference, mlp_shape
from mmebm_dist.kernels.langevin_torch import auto_workers, langevin_torch
from mmebm_dist.kernels.names import BACKENDS
from mmebm_dist.prior.densities import FIXED_REFERENCES, reference_density

Gather = Callable[[], contextlib.AbstractContextManager]
"""A context under which the energy's weights are readable in full (ZeRO-3: handed in by ``train/``)."""

# The Triton kernel gives each program 16 rows and walks the whole MLP serially, so its time per step grows
# with the per-row work d H + (L-1) H^2 (multiply-adds) and hardly with the batch, while the torch path is a
# few cuBLAS launches per step. Measured on an H200 (docs/bench/, 60-step chains): 32-200x2 (46k MACs/row)
# triton 5.9-6.7 ms vs torch 6.9-9.3 ms for batch 16-2048; 128-512x4 (852k) triton 82 ms vs torch 16-21 ms.
TRITON_AUTO_MAX_ROW_MACS = 200_000


def triton_preferred(latent: int, hidden: int, layers: int) -> bool:
    """Whether ``auto`` runs a supported MLP of this shape with the Triton kernel on CUDA (else torch)."""
    return latent * hidden + (layers - 1) * hidden * hidden <= TRITON_AUTO_MAX_ROW_MACS


class LangevinDivergenceError(FloatingPointError):
    """A Langevin chain produced non-finite values."""


def _divergence(step: int, step_size: float, detail: str = "") -> LangevinDivergenceError:
    return LangevinDivergenceError(
        f"Langevin chain became non-finite at step {step} (step_size={step_size}){detail}. "
        "Lower model.prior.langevin.step_size, raise model.prior.energy_l2, enable model.prior.spectral_norm "
        "or lower model.prior.lr."
    )


def _reference_of(reference, scale: float):
    """The density p0 named ``reference`` (with ``scale``), or ``reference`` itself when it is a density
    object (a learned reference such as ``GaussianMixtureReference``, with ``score`` and ``log_prob``)."""
    return reference_density(reference, scale) if isinstance(reference, str) else reference


def _learned(reference) -> bool:
    """A reference the fused kernels cannot compute by name: its score is passed to them as a function."""
    return not isinstance(reference, str) and getattr(reference, "name", None) not in FIXED_REFERENCES


def _fused_refusal(energy, backend: str) -> str | None:
    """Why a fused backend cannot take ``energy`` (None when its ``fused_spec()`` describes it)."""
    refusal = getattr(energy, "fused_refusal", None)
    if refusal is None:
        return (f"backend='{backend}' needs an EnergyMLP (an energy with fused_spec()), got "
                f"{type(energy).__name__}; use backend='autograd' or 'auto' for an arbitrary energy callable")
    reason = refusal()
    return None if reason is None else f"backend='{backend}': {reason}; or use backend='auto' or 'autograd'"


def _triton_module():
    # Imported on first use: TRITON_INTERPRET is read at import, and CPU-only runs never need triton.
    from mmebm_dist.kernels import langevin_triton

    return langevin_triton


def _triton_refusal(weights: list, z0: torch.Tensor, activation: str) -> str | None:
    """Why the Triton kernel cannot run this chain here (None when it can)."""
    try:
        kernels = _triton_module()
    except ImportError as exc:
        return f"triton cannot be imported ({exc}); install it (pip install triton) or use backend='torch'"
    cannot = kernels.triton_can_launch(z0.device)
    if cannot is not None:
        return cannot
    unsupported = kernels.triton_unsupported_reason(weights, z0, activation)
    if unsupported is not None:
        return f"the Triton kernel does not support {unsupported}; use backend='torch' or 'auto'"
    return None


def _triton_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """A Philox seed drawn from ``generator`` (or the default generator of ``device``): reproducible runs."""
    gen_device = generator.device if generator is not None else device
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=gen_device).item())


def _resolve(energy, z0: torch.Tensor, backend: str, reference="laplace") -> tuple[str, FusedSpec | None]:
    """(backend to run, the energy's fused spec, read once, for a fused backend, else None)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown Langevin backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "autograd":
        return backend, None
    refusal = _fused_refusal(energy, backend)
    if refusal is not None:
        if backend == "auto":
            return "autograd", None
        raise ValueError(refusal)
    spec = energy.fused_spec()
    chosen = backend
    if backend == "auto":
        d, hidden, layers = mlp_shape(spec.weights)
        # Under torch.compile the chain is traced (langevin_torch -> langevin_traced), in the step's graph.
        compiling = torch.compiler.is_compiling()
        small = triton_preferred(d, hidden, layers)
        chosen = "triton" if z0.device.type == "cuda" and small and not compiling else "torch"
    if chosen == "triton":
        refusal = _triton_refusal(spec.weights, z0, spec.activation)
        if refusal is None and _learned(reference):
            refusal = ("the Triton kernel computes the laplace and gaussian references only; a learned "
                       "reference (model.prior.reference=gmm) runs on backend='torch' (its score in torch)")
        if refusal is not None:
            if backend == "triton":
                raise ValueError(f"backend='triton': {refusal}")
            chosen = "torch"  # auto: triton cannot run this chain here
    return chosen, spec


def resolve_backend(energy, z0: torch.Tensor, backend: str = "auto", reference="laplace") -> str:
    """The backend ``sample`` runs: ``autograd``, ``torch`` or ``triton``; raises when a forced one cannot."""
    return _resolve(energy, z0, backend, reference)[0]


def sample(energy, z0: torch.Tensor, *, steps: int, step_size: float, reference="laplace",
           reference_scale: float = 1.0, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, backend: str = "auto", return_energies: bool = False,
           gather: Gather | None = None):
    """Run K = ``steps`` Langevin steps from ``z0`` [B, d] on exp(f) p0; returns z_K [B, d] (detached).

    ``noise`` [steps, B, d], when given, replaces the fresh N(0, I) draws (makes backends comparable).
    ``return_energies`` also returns the mean f(z_k) before each step k, shape [steps] (chain diagnostics).
    A non-finite chain raises :class:`LangevinDivergenceError` naming the step.
    ``reference``: a name in FIXED_REFERENCES (with ``reference_scale``) or a learned density object
    (``score``, ``log_prob``): the autograd and torch backends add its score; triton refuses it (``auto``
    takes torch). ``gather``: a context entered around a fused chain that makes the energy's weights readable
    (DeepSpeed ZeRO-3, handed in by training; a collective, so every rank samples together).
    """
    check_chain_inputs(z0, steps=steps, step_size=step_size, noise=noise)
    p0 = _reference_of(reference, reference_scale)  # the name/scale errors of reference_density
    with gather() if gather is not None and backend != "autograd" else contextlib.nullcontext():
        chosen, spec = _resolve(energy, z0, backend, reference)
        if chosen == "autograd":
            result = langevin_reference(energy, z0, steps=steps, step_size=step_size,
                                        reference_score=p0.score, noise=noise, generator=generator)
            if result.diverged_at is not None:
                raise _divergence(result.diverged_at, step_size)
            return (result.z, result.energies) if return_energies else result.z
        kwargs = dict(steps=steps, step_size=step_size, activation=spec.activation, reference=p0.name,
                      reference_scale=getattr(p0, "scale", 1.0), noise=noise, return_energies=return_energies,
                      leaky_slope=spec.leaky_slope)
        with torch.no_grad():
            if chosen == "triton":
                seed = _triton_seed(generator, z0.device) if noise is None else 0
                result = _triton_module().langevin_triton(spec.weights, z0, seed=seed, **kwargs)
            else:
                workers = auto_workers(z0.shape[0]) if z0.device.type == "cpu" else 0
                score = p0.score if _learned(p0) else None
                result = langevin_torch(spec.weights, z0, generator=generator, workers=workers,
                                        reference_score=score, **kwargs)
        if result.diverged_at is not None:
            raise _divergence(result.diverged_at, step_size, f" (backend '{chosen}')")
        return (result.z, result.energies) if return_energies else result.z
