"""Short-run Langevin sampling of the EBM prior p(z) ∝ exp(f(z)) p0(z): one entry point, several backends.

    z_{k+1} = z_k + (s^2 / 2) * grad_z [f(z_k) + log p0(z_k)] + s * eps_k,   eps_k ~ N(0, I),  k < K

``s`` is ``step_size`` (drift s^2/2, noise std s: the LEBM convention). The chain carries no gradient:
it produces negatives for the prior's update and joint samples, never a path for backpropagation.

Backends: ``autograd`` (the plain reference every other backend is tested against), ``torch`` (fused
analytic gradient, no autograd graph) and ``triton`` (one kernel launch per chain, CUDA tensors).
``auto`` picks the fastest that applies:
- ``energy`` not an :class:`EnergyMLP` (any callable), a soft-clipped EnergyMLP (``bound > 0``: the
  fused backends compute the plain MLP), or an EnergyMLP with a weight not readable here
  (``numel() == 0``): autograd (calling ``energy(z)`` gathers them). Under DeepSpeed ZeRO-3 (parameters with
  ``ds_id``) ``sample`` first gathers the energy's weights for the chain (a collective; the MLP is small),
  so the fused backends run there too;
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
from torch import nn

from mmebm_dist.kernels.langevin_torch import auto_workers, langevin_torch
from mmebm_dist.prior.densities import FIXED_REFERENCES, reference_density
from mmebm_dist.prior.energy import LEAKY_SLOPE, EnergyMLP

BACKENDS = ("auto", "autograd", "torch", "triton")

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


def _reference_of(reference, scale: float):
    """The density p0 named ``reference`` (with ``scale``), or ``reference`` itself when it is a density
    object (a learned reference such as ``GaussianMixtureReference``, with ``score`` and ``log_prob``)."""
    return reference_density(reference, scale) if isinstance(reference, str) else reference


def _learned(reference) -> bool:
    """A reference the fused kernels cannot compute by name: its score is passed to them as a function."""
    return not isinstance(reference, str) and getattr(reference, "name", None) not in FIXED_REFERENCES


def sample_autograd(energy: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, *, steps: int,
                    step_size: float, reference="laplace", reference_scale: float = 1.0,
                    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                    return_energies: bool = False):
    """Reference backend: grad f from autograd at every step. Returns z_K (and per-step mean f if asked).

    ``reference``: a name in FIXED_REFERENCES (with ``reference_scale``) or a density object (``score``)."""
    p0 = _reference_of(reference, reference_scale)
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


def _partitioned(energy: EnergyMLP) -> bool:
    """True when some weight of the energy is not readable here (DeepSpeed ZeRO-3 left it partitioned)."""
    return any(p.numel() == 0 for p in energy.parameters())


def _gathered(energy) -> contextlib.AbstractContextManager:
    """Under DeepSpeed ZeRO-3 (parameters carrying ``ds_id``), gather the energy's weights for the chain.

    The energy MLP is small (tens of thousands of parameters), so one all-gather per chain costs far less
    than the autograd chain the partitioned weights would otherwise force. Collective: every rank must call
    ``sample`` together, as training does (every rank draws its negatives each step).
    """
    params = [p for p in energy.parameters() if hasattr(p, "ds_id")] if isinstance(energy, nn.Module) else []
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # only reached under ZeRO-3, where DeepSpeed is running

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def _fused_refusal(energy, backend: str) -> str | None:
    """Why a fused backend cannot take ``energy`` (None when it can)."""
    if not isinstance(energy, EnergyMLP):
        return (f"backend='{backend}' needs an EnergyMLP (it reads the weights), got "
                f"{type(energy).__name__}; use backend='autograd' or 'auto' for an arbitrary energy callable")
    if energy.bound > 0:
        return (f"backend='{backend}' computes the plain MLP, but this energy is soft-clipped "
                f"(model.prior.energy_bound={energy.bound:g}); use backend='auto' or 'autograd', or set "
                "model.prior.energy_bound=0")
    if _partitioned(energy):
        return (f"backend='{backend}' cannot read the energy's weights: DeepSpeed ZeRO-3 partitions them "
                "(param.numel() == 0); use backend='auto' or 'autograd', which call energy(z) and "
                "so gather them, or gather them first (deepspeed.zero.GatheredParameters)")
    return None


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


def _resolve(energy, z0: torch.Tensor, backend: str, reference="laplace") -> tuple[str, list | None]:
    """(backend to run, the energy's weights read once for a fused backend, else None)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown Langevin backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend == "autograd":
        return backend, None
    refusal = _fused_refusal(energy, backend)
    chosen = backend
    if backend == "auto":
        if refusal is not None:
            return "autograd", None
        small = triton_preferred(energy.latent_dim, energy.hidden, energy.num_layers)
        # Under torch.compile the chain is traced (langevin_torch -> langevin_traced), in the step's graph.
        compiling = torch.compiler.is_compiling()
        chosen = "triton" if z0.device.type == "cuda" and small and not compiling else "torch"
    elif refusal is not None:
        raise ValueError(refusal)
    # Read once: a spectral-normalised weight is recomputed (power iteration in train mode) on every read.
    with torch.no_grad():
        weights = energy.weights()
    if chosen == "triton":
        refusal = _triton_refusal(weights, z0, energy.activation)
        if refusal is None and _learned(reference):
            refusal = ("the Triton kernel computes the laplace and gaussian references only; a learned "
                       "reference (model.prior.reference=gmm) runs on backend='torch' (its score in torch)")
        if refusal is not None:
            if backend == "triton":
                raise ValueError(f"backend='triton': {refusal}")
            chosen = "torch"  # auto: triton cannot run this chain here
    return chosen, weights


def resolve_backend(energy, z0: torch.Tensor, backend: str = "auto", reference="laplace") -> str:
    """The backend ``sample`` runs: ``autograd``, ``torch`` or ``triton``; raises when a forced one cannot."""
    return _resolve(energy, z0, backend, reference)[0]


def sample(energy, z0: torch.Tensor, *, steps: int, step_size: float, reference="laplace",
           reference_scale: float = 1.0, noise: torch.Tensor | None = None,
           generator: torch.Generator | None = None, backend: str = "auto", return_energies: bool = False):
    """Run K = ``steps`` Langevin steps from ``z0`` [B, d] on exp(f) p0; returns z_K [B, d] (detached).

    ``noise`` [steps, B, d], when given, replaces the fresh N(0, I) draws (makes backends comparable).
    ``return_energies`` also returns the mean f(z_k) before each step k, shape [steps] (chain diagnostics).
    A non-finite chain raises :class:`LangevinDivergenceError` naming the step.
    ``reference``: a name in FIXED_REFERENCES (with ``reference_scale``) or a learned density object
    (``score``, ``log_prob``): the autograd and torch backends add its score; triton refuses it (``auto``
    takes torch).
    """
    _check_inputs(z0, steps, step_size, noise)
    # ZeRO-3: full weights for the fused backends for the chain's duration (no-op otherwise).
    with _gathered(energy) if backend != "autograd" else contextlib.nullcontext():
        chosen, weights = _resolve(energy, z0, backend, reference)
        if chosen == "autograd":
            return sample_autograd(energy, z0, steps=steps, step_size=step_size, reference=reference,
                                   reference_scale=reference_scale, noise=noise, generator=generator,
                                   return_energies=return_energies)
        p0 = _reference_of(reference, reference_scale)  # the same name/scale errors as the autograd backend
        kwargs = dict(steps=steps, step_size=step_size, activation=energy.activation, reference=p0.name,
                      reference_scale=getattr(p0, "scale", 1.0), noise=noise, return_energies=return_energies,
                      leaky_slope=LEAKY_SLOPE)
        with torch.no_grad():
            if chosen == "triton":
                seed = _triton_seed(generator, z0.device) if noise is None else 0
                result = _triton_module().langevin_triton(weights, z0, seed=seed, **kwargs)
            else:
                workers = auto_workers(z0.shape[0]) if z0.device.type == "cpu" else 0
                score = p0.score if _learned(p0) else None
                result = langevin_torch(weights, z0, generator=generator, workers=workers,
                                        reference_score=score, **kwargs)
        if result.diverged_at is not None:
            raise _divergence(result.diverged_at, step_size, f" (backend '{chosen}')")
        return (result.z, result.energies) if return_energies else result.z
