"""The fused Langevin kernels (torch path, Triton under TRITON_INTERPRET=1) against the plain-torch reference.

Tolerances: fp32 chains differ from autograd only by summation order inside the matmuls (~1e-7 relative per
step); over a few steps that stays below 1e-5, so rtol = atol = 1e-5 fails on any real error (a wrong sign,
activation slope or scale moves z by >= 1e-3 after one step at these step sizes).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from mmebm_dist.kernels._utils import FusedSpec, langevin_flops_per_step, langevin_reference, spec_energy
from mmebm_dist.kernels.langevin_torch import langevin_torch
from mmebm_dist.kernels.names import ACTIVATIONS, LEAKY_SLOPE
from mmebm_dist.kernels.names import FIXED_REFERENCES as REFERENCES

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
STEP_SIZE, SCALE = 0.3, 0.7


def make_weights(latent: int, hidden: int, layers: int, *, seed: int = 0, dtype=torch.float32, zero=False):
    """A random (or all-zero) MLP latent -> hidden x layers -> 1 as [(W, b) ...]."""
    gen = torch.Generator().manual_seed(seed)
    dims = [latent] + [hidden] * layers + [1]
    weights = []
    for n_in, n_out in zip(dims[:-1], dims[1:], strict=True):
        w = torch.randn(n_out, n_in, generator=gen) / n_in**0.5
        b = 0.1 * torch.randn(n_out, generator=gen)
        if zero:
            w, b = torch.zeros_like(w), torch.zeros_like(b)
        weights.append((w.to(dtype), b.to(dtype)))
    return weights


def reference_chain(weights, z0, *, activation: str, leaky_slope: float = LEAKY_SLOPE, **kwargs):
    """(z_K, mean f per step) of the one autograd reference on the MLP ``weights``, cast to z0's dtype."""
    energy = spec_energy(FusedSpec(weights, activation, leaky_slope), z0.dtype)
    result = langevin_reference(energy, z0, **kwargs)
    return result.z, result.energies


def chain_inputs(batch: int, latent: int, steps: int, *, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, latent, generator=gen), torch.randn(steps, batch, latent, generator=gen)


def test_flop_count_formula():
    # 32-200-200-1: forward 2B(32*200 + 200*200 + 200), backward 2B(200*200 + 200*32).
    assert langevin_flops_per_step(16, 32, 200, 2) == 2 * 16 * (6400 + 40000 + 200) + 2 * 16 * (40000 + 6400)


# ----------------------------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("reference", REFERENCES)
@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("batch,latent,hidden", [(1, 3, 5), (37, 7, 13), (300, 32, 64)])
@pytest.mark.parametrize("steps", [1, 5])
def test_torch_matches_reference(activation, reference, layers, batch, latent, hidden, steps):
    weights = make_weights(latent, hidden, layers)
    z0, noise = chain_inputs(batch, latent, steps)
    kwargs = dict(steps=steps, step_size=STEP_SIZE, activation=activation, reference=reference,
                  reference_scale=SCALE, noise=noise)
    z_ref, f_ref = reference_chain(weights, z0, **kwargs)
    out = langevin_torch(weights, z0, return_energies=True, **kwargs)
    torch.testing.assert_close(out.z, z_ref, **FP32_TOL)
    torch.testing.assert_close(out.energies, f_ref, **FP32_TOL)
    assert out.diverged_at is None
    # Without energies the last layer skips act(a_L) (leaky_relu: not applied in place); same answer.
    torch.testing.assert_close(langevin_torch(weights, z0, **kwargs).z, out.z, rtol=0, atol=0)


def test_torch_float64_and_bf16_weights():
    weights = make_weights(6, 10, 2)
    z0, noise = chain_inputs(9, 6, 4)
    kwargs = dict(steps=4, step_size=STEP_SIZE, activation="gelu", noise=noise)
    out = langevin_torch(weights, z0.double(), return_energies=True, **kwargs)
    assert out.z.dtype == torch.float64 and out.energies.dtype == torch.float32
    z64_ref, f64_ref = reference_chain(weights, z0.double(), **kwargs)
    torch.testing.assert_close(out.z, z64_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.energies, f64_ref, rtol=1e-6, atol=1e-6)  # both rounded to fp32
    # bf16 weights are upcast once: exactly the fp32 chain of the bf16-valued weights.
    w16 = [(w.bfloat16(), b.bfloat16()) for w, b in weights]
    torch.testing.assert_close(langevin_torch(w16, z0, **kwargs).z, reference_chain(w16, z0, **kwargs)[0],
                               **FP32_TOL)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_laplace_sign_at_zero(activation):
    """sign(0) = 0 (torch.sign): an exactly-zero coordinate gets no Laplace drift in any backend."""
    weights = make_weights(4, 8, 2, zero=True)
    z0 = torch.tensor([[0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 2.0, -0.5]])
    noise = torch.zeros(1, 2, 4)
    out = langevin_torch(weights, z0, steps=1, step_size=STEP_SIZE, activation=activation, noise=noise)
    drift = 0.5 * STEP_SIZE**2
    torch.testing.assert_close(out.z, z0 - drift * torch.sign(z0), rtol=0, atol=0)
    ref, _ = reference_chain(weights, z0, steps=1, step_size=STEP_SIZE, activation=activation, noise=noise)
    torch.testing.assert_close(out.z, ref, rtol=0, atol=0)


def test_torch_generator_noise_has_unit_moments_and_is_seeded():
    """f = 0, z0 = 0, Gaussian p0 of huge scale: z_2 = s (eps_0 + eps_1), variance 2 s^2 if draws are new."""
    weights = make_weights(16, 8, 1, zero=True)
    z0 = torch.zeros(512, 16)
    kwargs = dict(steps=2, step_size=0.5, activation="gelu", reference="gaussian", reference_scale=1e6)

    def run(seed):
        return langevin_torch(weights, z0, generator=torch.Generator().manual_seed(seed), **kwargs).z

    z = run(0) / 0.5
    # 8192 draws of N(0, 2): mean std 0.016, variance relative std 1.6%; 5 sigma bounds.
    assert abs(z.mean().item()) < 0.08
    assert abs(z.var().item() / 2.0 - 1.0) < 0.08
    assert torch.unique(z).numel() == z.numel()
    torch.testing.assert_close(run(0), run(0), rtol=0, atol=0)
    assert not torch.equal(run(0), run(1))
    # The same draws, in the same order, as the autograd reference with the same generator state.
    ref, _ = reference_chain(weights, z0, generator=torch.Generator().manual_seed(0), **kwargs)
    torch.testing.assert_close(run(0), ref, **FP32_TOL)


@pytest.mark.parametrize("reference,scale",
                         [("gaussian", 1.0), ("gaussian", 2.0), ("laplace", 1.0), ("laplace", 0.5)])
def test_zero_energy_samples_the_reference(reference, scale):
    """f = 0: the chain samples p0. 4000 x 2 chains from z0 = 1.5 b (far from p0's mean), 300 steps, s 0.3 b.

    Tolerances: 8000 draws give a mean std of ~0.011 b (Gaussian; 0.016 b Laplace) and a variance relative std
    of 1.6% (Gaussian; 2.5% Laplace); unadjusted Langevin at s = 0.3 b adds a bias of 2-4% (Gaussian: exactly
    1 / (1 - s^2/4b^2) = 1.023). So |mean| < 0.1 b, variance within 10% of b^2 (Gaussian) or 2 b^2 (Laplace),
    E|z| within 6% of b (Laplace). Drift s^2 instead of s^2/2 halves the variance; noise std sqrt(s) instead
    of s triples it; a missing 1/b misplaces the scale by 2x.
    """
    weights = make_weights(2, 8, 2, zero=True)
    z0 = torch.full((4000, 2), 1.5 * scale)
    out = langevin_torch(weights, z0, steps=300, step_size=0.3 * scale, activation="leaky_relu",
                         reference=reference, reference_scale=scale,
                         generator=torch.Generator().manual_seed(5))
    z = out.z
    assert abs(z.mean().item()) < 0.1 * scale
    target_var = scale**2 if reference == "gaussian" else 2 * scale**2
    assert abs(z.var().item() / target_var - 1) < 0.1
    if reference == "laplace":
        assert abs(z.abs().mean().item() / scale - 1) < 0.06


@pytest.mark.parametrize("bad_step", [0, 3])
def test_torch_reports_first_non_finite_step(bad_step):
    weights = make_weights(5, 8, 2)
    z0, noise = chain_inputs(6, 5, 6)
    noise[bad_step, 2, 1] = float("inf")
    out = langevin_torch(weights, z0, steps=6, step_size=STEP_SIZE, activation="silu", noise=noise)
    assert out.diverged_at == bad_step
    assert not torch.isfinite(out.z).all()


def test_torch_rejects_bad_inputs():
    weights = make_weights(5, 8, 2)
    z0, noise = chain_inputs(6, 5, 3)
    with pytest.raises(ValueError, match="requires grad"):
        langevin_torch(weights, z0.requires_grad_(), steps=3, step_size=0.1, activation="gelu")
    with pytest.raises(ValueError, match="latent width 4"):
        langevin_torch(weights, torch.zeros(6, 4), steps=3, step_size=0.1, activation="gelu")
    with pytest.raises(ValueError, match="noise must be"):
        langevin_torch(weights, z0.detach(), steps=2, step_size=0.1, activation="gelu", noise=noise)
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        langevin_torch(weights, z0.detach(), steps=3, step_size=0.1, activation="relu")
    with pytest.raises(ValueError, match="share one width"):
        langevin_torch([weights[0], (torch.zeros(7, 8), torch.zeros(7)), weights[2]], z0.detach(), steps=3,
                       step_size=0.1, activation="gelu")


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_torch_row_split_matches_one_chain(workers):
    """Rows are independent chains: splitting them over threads changes nothing but summation order."""
    weights = make_weights(7, 13, 2)
    z0, noise = chain_inputs(37, 7, 5)
    kwargs = dict(steps=5, step_size=STEP_SIZE, activation="gelu", return_energies=True)
    one = langevin_torch(weights, z0, noise=noise, **kwargs)
    threads = torch.get_num_threads()
    split = langevin_torch(weights, z0, noise=noise, workers=workers, **kwargs)
    assert torch.get_num_threads() == threads  # restored
    torch.testing.assert_close(split.z, one.z, **FP32_TOL)
    torch.testing.assert_close(split.energies, one.energies, **FP32_TOL)
    bad = noise.clone()
    bad[3, 30, 2] = float("nan")  # a row of the last block
    assert langevin_torch(weights, z0, noise=bad, workers=workers, **kwargs).diverged_at == 3
    # Fresh noise of a split chain is drawn for all rows at once: the same for any number of workers > 1;
    # one worker draws per step like workers=0 and the autograd reference.
    fresh = [langevin_torch(weights, z0, generator=torch.Generator().manual_seed(4), workers=w, **kwargs).z
             for w in (max(2, workers), workers, 0)]
    if workers > 1:
        torch.testing.assert_close(fresh[1], fresh[0], **FP32_TOL)
    else:
        torch.testing.assert_close(fresh[1], fresh[2], **FP32_TOL)


def test_auto_workers(monkeypatch):
    from mmebm_dist.kernels.langevin_torch import WORKERS_ENV, auto_workers

    monkeypatch.delenv(WORKERS_ENV, raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert auto_workers(4096) == 0  # one intra-op thread: nothing to split or switch off
        torch.set_num_threads(2)
        assert auto_workers(16) == 1 and auto_workers(127) == 1 and auto_workers(128) == 0
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setenv(WORKERS_ENV, "3")
    assert auto_workers(16) == 3
    monkeypatch.setenv(WORKERS_ENV, "two")
    with pytest.raises(ValueError, match="MMEBM_LANGEVIN_WORKERS='two'"):
        auto_workers(16)


# ---------------------------------------------------------------------------- Triton (interpreter on CPU)

triton_kernels = pytest.importorskip("mmebm_dist.kernels.langevin_triton")
needs_triton = pytest.mark.skipif(triton_kernels.triton_can_launch(torch.device("cpu")) is not None
                                  and not torch.cuda.is_available(),
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1 (set by conftest.py)")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def run_triton(weights, z0, **kwargs):
    weights = [(w.to(DEVICE), b.to(DEVICE)) for w, b in weights]
    noise = kwargs.pop("noise", None)
    noise = None if noise is None else noise.to(DEVICE)
    out = triton_kernels.langevin_triton(weights, z0.to(DEVICE), noise=noise, **kwargs)
    return out._replace(z=out.z.cpu(), energies=None if out.energies is None else out.energies.cpu())


# Interpreter time is ~0.1-2 s per call here, so the grid is a covering set rather than a full product:
# every activation x both references at one multi-tile shape, depths 1-4, batch 1 / odd / several programs,
# non-power-of-two widths, tiles smaller than the widths (block_sizes 16) so masks and tile loops are crossed.
TRITON_CASES = [
    # activation, reference, layers, batch, latent, hidden, steps, block_sizes
    ("gelu", "laplace", 2, 37, 20, 40, 3, None),
    ("gelu", "gaussian", 2, 37, 20, 40, 3, None),
    ("gelu_tanh", "laplace", 2, 37, 20, 40, 2, None),
    ("gelu_tanh", "gaussian", 1, 17, 7, 24, 2, None),
    ("leaky_relu", "laplace", 2, 37, 20, 40, 2, (16, 16, 16)),
    ("leaky_relu", "gaussian", 3, 17, 7, 24, 2, None),
    ("silu", "laplace", 4, 5, 33, 17, 2, (16, 16, 16)),
    ("silu", "gaussian", 2, 1, 3, 5, 1, None),
    ("gelu", "laplace", 4, 16, 5, 13, 1, None),
    ("leaky_relu", "laplace", 1, 1, 3, 5, 1, None),
]


@needs_triton
@pytest.mark.parametrize("activation,reference,layers,batch,latent,hidden,steps,block_sizes", TRITON_CASES)
def test_triton_matches_reference(activation, reference, layers, batch, latent, hidden, steps, block_sizes):
    weights = make_weights(latent, hidden, layers)
    z0, noise = chain_inputs(batch, latent, steps)
    kwargs = dict(steps=steps, step_size=STEP_SIZE, activation=activation, reference=reference,
                  reference_scale=SCALE, noise=noise)
    z_ref, f_ref = reference_chain(weights, z0, **kwargs)
    out = run_triton(weights, z0, return_energies=True, block_sizes=block_sizes, **kwargs)
    torch.testing.assert_close(out.z, z_ref, **FP32_TOL)
    torch.testing.assert_close(out.energies, f_ref, **FP32_TOL)
    assert out.diverged_at is None


@needs_triton
def test_triton_bf16_weights():
    """bf16 weights, fp32 accumulation, against the fp32 reference with the same bf16-valued weights.

    The kernel also rounds activations and g_l to bf16 before each dot (8-bit mantissa: relative error
    2^-9 per operand), so grad f is off by ~1e-2 relative and z by drift * that ~ 1e-3 per step at most;
    atol 2e-3 after 2 steps (measured ~1e-4); energies within 1e-2.
    """
    weights = make_weights(20, 40, 2, dtype=torch.bfloat16)
    z0, noise = chain_inputs(37, 20, 2)
    kwargs = dict(steps=2, step_size=STEP_SIZE, activation="gelu_tanh", noise=noise)
    z_ref, f_ref = reference_chain(weights, z0, **kwargs)
    out = run_triton(weights, z0, return_energies=True, **kwargs)
    torch.testing.assert_close(out.z, z_ref, rtol=0, atol=2e-3)
    torch.testing.assert_close(out.energies, f_ref, rtol=0, atol=1e-2)
    assert not torch.equal(out.z, z_ref)  # it did round (else this test would not be testing bf16)


@needs_triton
@pytest.mark.parametrize("layers,batch,latent,hidden,rows", [(2, 37, 20, 40, 16), (1, 17, 7, 24, None),
                                                             (2, 70, 33, 17, 32)])
def test_resident_and_streaming_kernels_agree(layers, batch, latent, hidden, rows):
    """The resident kernel (weights, z, a_l, g_l on chip) and the streaming one (tiles through scratch)
    compute the same chain: both within the fp32 tolerance of the reference; several programs and masked tails
    (37 rows in 16-row programs, widths 33 -> 64 and 17 -> 32 padded)."""
    weights = make_weights(latent, hidden, layers)
    z0, noise = chain_inputs(batch, latent, 3)
    kwargs = dict(steps=3, step_size=STEP_SIZE, activation="gelu_tanh", reference="gaussian",
                  reference_scale=SCALE, noise=noise, return_energies=True)
    z_ref, f_ref = reference_chain(weights, z0, **{k: v for k, v in kwargs.items() if k != "return_energies"})
    for kernel in ("resident", "streaming"):
        out = run_triton(weights, z0, kernel=kernel, rows=rows if kernel == "resident" else None, **kwargs)
        torch.testing.assert_close(out.z, z_ref, **FP32_TOL, msg=kernel)
        torch.testing.assert_close(out.energies, f_ref, **FP32_TOL, msg=kernel)


def test_resident_shared_memory_arithmetic_and_plan():
    """The bytes that decide resident vs streaming (kernels/langevin_triton.py:resident_shared_bytes): the
    shipped 32-200x2 energy needs 311,296 B in fp32 (what Triton reported on the H200, over its 232,448 B) and
    163,840 B with bf16 weights, so ``auto`` plans the resident kernel in bf16 on an H100/H200."""
    lt, budget = triton_kernels, triton_kernels.SHARED_MEMORY_PER_BLOCK
    assert budget == 232_448
    assert lt.resident_shared_bytes(200, 32, 2, 16, 4) == 311_296
    assert lt.resident_shared_bytes(200, 32, 2, 16, 2) == 163_840
    assert lt.resident_shared_bytes(200, 32, 2, 64, 2) == 212_992  # 64-row programs (large batches) fit too
    shape = dict(hidden=200, latent=32, layers=2, rows=16, budget=budget)
    fp32, bf16 = torch.float32, torch.bfloat16
    assert lt.plan_kernel("auto", None, fp32, **shape) == ("resident", "bf16")
    assert lt.plan_kernel("auto", "ieee", fp32, **shape) == ("streaming", "ieee")  # asked for fp32 dots
    assert lt.plan_kernel("auto", None, bf16, **shape) == ("resident", "bf16")
    assert lt.plan_kernel("auto", None, fp32, **shape, tiles_given=True) == ("streaming", "ieee")
    assert lt.plan_kernel("resident", None, fp32, **shape) == ("resident", "ieee")  # forced: as asked
    assert lt.plan_kernel("auto", None, fp32, **{**shape, "hidden": 40}) == ("resident", "ieee")  # fp32 fits
    assert lt.plan_kernel("auto", None, fp32, **{**shape, "budget": 100_000}) == ("streaming", "ieee")
    assert lt.plan_kernel("auto", None, fp32, **{**shape, "layers": 3}) == ("streaming", "ieee")


@needs_triton
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_auto_runs_the_resident_kernel_with_bf16_weights_at_the_shipped_size(activation):
    """fp32 32-200x2 weights, kernel auto: the resident kernel with its weights (and dot operands) in bf16,
    fp32 accumulation, against the fp32 reference with the fp32 weights (the error a user sees).

    Tolerance: bf16 keeps 8 mantissa bits (relative rounding 2^-9 per operand); grad f goes through three
    rounded dots, so it is off by ~1% of |grad f| (~3 here), and z by drift (0.045) times that per step:
    measured 2.8e-4 to 3.5e-4 after 3 steps (gelu, silu, gelu_tanh), so atol 2e-3; energies measured
    <= 1.3e-3, atol 1e-2. Smooth activations and the Gaussian reference only: at leaky_relu's kink or
    Laplace's sign a rounded value may take the other branch (measured 2.4e-3 and a 0.13 jump), a
    discontinuity, not an error.
    """
    weights = make_weights(32, 200, 2)
    z0, noise = chain_inputs(37, 32, 3)
    kwargs = dict(steps=3, step_size=STEP_SIZE, activation=activation, reference="gaussian",
                  reference_scale=SCALE, noise=noise)
    z_ref, f_ref = reference_chain(weights, z0, **kwargs)
    out = run_triton(weights, z0, return_energies=True, **kwargs)
    forced = run_triton(weights, z0, return_energies=True, kernel="resident", precision="bf16", **kwargs)
    torch.testing.assert_close(out.z, forced.z, rtol=0, atol=0)  # auto took the resident bf16 path
    torch.testing.assert_close(out.z, z_ref, rtol=0, atol=2e-3)
    torch.testing.assert_close(out.energies, f_ref, rtol=0, atol=1e-2)
    assert not torch.equal(out.z, z_ref)  # it did round (else this would not be testing bf16)
    exact = run_triton(weights, z0, kernel="streaming", **kwargs)  # the fp32 default of the streaming kernel
    torch.testing.assert_close(exact.z, z_ref, **FP32_TOL)


@needs_triton
def test_triton_tf32_and_bf16_precisions():
    """``precision``: TF32 and bf16 dot operands of fp32 weights, fp32 accumulation, against the exact chain.

    TF32 keeps 10 mantissa bits (operand rounding <= 2^-11 relative, 2^-10 if the hardware truncates), bf16
    keeps 7 (2^-8): grad f is off by at most ~2^-9 (TF32) and ~2^-6 (bf16) relative over the few-term dots
    here, and z by drift (0.045) times that per step: atol 1e-3 (TF32) and 5e-3 (bf16) after 3 steps; the
    energies f = O(1) within 5e-3 and 3e-2. TF32 must also be closer than bf16 (it has 3 more bits) and
    differ from the exact chain (the rounding happened). Under the interpreter both are emulated by
    rounding the operands (tl.dot there ignores input_precision and misreads bf16).
    """
    weights = make_weights(20, 40, 2)
    z0, noise = chain_inputs(37, 20, 3)
    kwargs = dict(steps=3, step_size=STEP_SIZE, activation="silu", reference="gaussian", noise=noise,
                  return_energies=True)
    exact = run_triton(weights, z0, precision="ieee", **kwargs)
    tf32 = run_triton(weights, z0, precision="tf32", **kwargs)
    bf16 = run_triton(weights, z0, precision="bf16", **kwargs)
    torch.testing.assert_close(tf32.z, exact.z, rtol=0, atol=1e-3)
    torch.testing.assert_close(tf32.energies, exact.energies, rtol=0, atol=5e-3)
    torch.testing.assert_close(bf16.z, exact.z, rtol=0, atol=5e-3)
    torch.testing.assert_close(bf16.energies, exact.energies, rtol=0, atol=3e-2)
    tf32_error, bf16_error = (tf32.z - exact.z).abs().max(), (bf16.z - exact.z).abs().max()
    assert 0 < tf32_error < bf16_error
    # bf16 weights take the same path as precision='bf16' of fp32 weights holding the same values.
    w16 = [(w.bfloat16(), b.bfloat16()) for w, b in weights]
    w16_as_fp32 = [(w.float(), b.float()) for w, b in w16]
    torch.testing.assert_close(run_triton(w16, z0, **kwargs).z,
                               run_triton(w16_as_fp32, z0, precision="bf16", **kwargs).z, rtol=0, atol=0)
    # Both kernels implement the precisions alike (different summation order: bf16-sized tolerance).
    streaming = run_triton(weights, z0, precision="tf32", kernel="streaming", **kwargs)
    torch.testing.assert_close(streaming.z, tf32.z, rtol=0, atol=1e-3)


@needs_triton
def test_resident_kernel_out_of_resources_falls_back(monkeypatch):
    """A GPU whose shared memory cannot hold the layers: auto warns and runs the streaming kernel (same
    chain); an explicit kernel='resident' raises."""
    from triton.runtime.errors import OutOfResources

    class TooBig:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(300_000, 232_448, "shared memory")
            return launch

    weights = make_weights(5, 24, 2)
    z0, noise = chain_inputs(9, 5, 2)
    kwargs = dict(steps=2, step_size=STEP_SIZE, activation="gelu", noise=noise)
    streaming = run_triton(weights, z0, kernel="streaming", **kwargs)
    monkeypatch.setattr(triton_kernels, "_langevin_resident_kernel", TooBig())
    with pytest.warns(RuntimeWarning, match="does not fit this GPU .* running the streaming kernel"):
        out = run_triton(weights, z0, **kwargs)
    torch.testing.assert_close(out.z, streaming.z, rtol=0, atol=0)
    with pytest.raises(ValueError, match="kernel='resident' does not fit this GPU .*shared memory"):
        run_triton(weights, z0, kernel="resident", **kwargs)


def test_rows_per_program_heuristic():
    """16 rows while the batch leaves SMs idle, then about one program per SM, capped at 64 rows."""
    rows = triton_kernels.rows_per_program
    assert [rows(b, 132) for b in (1, 16, 1024, 2112)] == [16, 16, 16, 16]
    assert [rows(b, 132) for b in (2113, 4096, 8448, 100_000)] == [32, 32, 64, 64]


@needs_triton
def test_triton_laplace_sign_at_zero():
    weights = make_weights(4, 8, 2, zero=True)
    z0 = torch.tensor([[0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 2.0, -0.5]])
    out = run_triton(weights, z0, steps=1, step_size=STEP_SIZE, activation="gelu", noise=torch.zeros(1, 2, 4))
    torch.testing.assert_close(out.z, z0 - 0.5 * STEP_SIZE**2 * torch.sign(z0), rtol=0, atol=0)


@needs_triton
def test_triton_philox_noise_moments_and_seeding():
    """f = 0, z0 = 0, Gaussian p0 of huge scale: z_2 = s (eps_0 + eps_1) ~ N(0, 2 s^2) if steps draw afresh.

    64 x 32 = 2048 draws: mean std 0.031, variance relative std 3.1%; 5-sigma bounds. Reusing one step's noise
    for both steps would give variance 4 s^2; reusing it across rows or columns would repeat values.
    """
    weights = make_weights(32, 16, 1, zero=True)
    kwargs = dict(steps=2, step_size=0.5, activation="gelu", reference="gaussian", reference_scale=1e6)
    z = run_triton(weights, torch.zeros(64, 32), seed=123, **kwargs).z / 0.5
    assert abs(z.mean().item()) < 0.16
    assert abs(z.var().item() / 2.0 - 1.0) < 0.16
    assert torch.unique(z).numel() == z.numel()
    z_small = run_triton(weights, torch.zeros(16, 32), seed=7, **kwargs).z
    z_again = run_triton(weights, torch.zeros(16, 32), seed=7, **kwargs).z
    torch.testing.assert_close(z_again, z_small, rtol=0, atol=0)
    assert not torch.equal(run_triton(weights, torch.zeros(16, 32), seed=8, **kwargs).z, z_small)


@needs_triton
@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")  # numpy (interp.)
def test_triton_reports_first_non_finite_step():
    weights = make_weights(5, 8, 2)
    z0, noise = chain_inputs(20, 5, 4)
    noise[2, 17, 3] = float("nan")  # a row of the second program
    out = run_triton(weights, z0, steps=4, step_size=STEP_SIZE, activation="gelu", noise=noise)
    assert out.diverged_at == 2


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="full-size shapes need a GPU (the interpreter takes minutes for them)")


@needs_cuda
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("latent,hidden,layers,batch",
                         [(256, 512, 4, 1000), (32, 200, 2, 4099), (100, 300, 3, 33)])
@pytest.mark.parametrize("reference", REFERENCES)
def test_triton_full_size_on_gpu(activation, latent, hidden, layers, batch, reference):
    """The envelope's edges on real hardware: widest MLP, many programs, odd widths, masked tails.

    fp32 with exact (IEEE, no TF32) dots: only the summation order differs from the CPU reference (up to
    512-term sums, 10 steps, and LeakyReLU's kink): atol 1e-3. bf16 weights: the stated bf16 bound of 2e-3
    per 2 steps, scaled to 10 steps (1e-2). The Laplace score -sign(z)/b jumps at 0: a z_k within rounding of
    0 may take the other sign on the other device and move by s^2/b = 0.09 (seen on an H200: 1-9 of 10^5
    elements). So under Laplace at most 0.1% of the elements may exceed the tolerance, and only by that jump.
    """
    cases = ((torch.float32, dict(rtol=1e-4, atol=1e-3)), (torch.bfloat16, dict(rtol=0, atol=1e-2)))
    for dtype, tol in cases:
        weights = make_weights(latent, hidden, layers, dtype=dtype)
        z0, noise = chain_inputs(batch, latent, 10)
        kwargs = dict(steps=10, step_size=STEP_SIZE, activation=activation, reference=reference, noise=noise)
        z_ref, f_ref = reference_chain([(w.float(), b.float()) for w, b in weights], z0, **kwargs)
        out = run_triton(weights, z0, return_energies=True, **kwargs)
        assert out.diverged_at is None
        torch.testing.assert_close(out.energies, f_ref, rtol=tol["rtol"], atol=10 * tol["atol"])
        if reference == "gaussian":
            torch.testing.assert_close(out.z, z_ref, **tol)
            continue
        off = (out.z - z_ref).abs() > tol["atol"] + tol["rtol"] * z_ref.abs()
        assert off.float().mean().item() <= 1e-3, f"{int(off.sum())} of {off.numel()} elements off"
        jumps = (out.z - z_ref).abs()[off]
        assert (jumps <= 1.5 * STEP_SIZE**2).all(), f"deviations beyond a sign flip: {jumps.max().item()}"


def test_triton_unsupported_reasons():
    z0 = torch.zeros(4, 8)
    assert "4 hidden layers" in triton_kernels.resident_unsupported_reason(200, 32, 4)
    assert "widths 32-300" in triton_kernels.resident_unsupported_reason(300, 32, 2)
    assert triton_kernels.resident_unsupported_reason(200, 32, 2) is None
    kwargs = dict(steps=1, step_size=0.1, activation="gelu")
    with pytest.raises(ValueError, match="precision must be one of ieee, tf32, bf16, got 'fp16'"):
        run_triton(make_weights(8, 16, 2), z0, precision="fp16", **kwargs)
    with pytest.raises(ValueError, match="kernel='resident' does not fit 3 hidden layers"):
        run_triton(make_weights(8, 16, 3), z0, kernel="resident", **kwargs)
    assert triton_kernels.triton_unsupported_reason(make_weights(8, 16, 2), z0, "gelu") is None
    assert "hidden width 600" in triton_kernels.triton_unsupported_reason(make_weights(8, 600, 1), z0, "gelu")
    assert "latent width 300" in triton_kernels.triton_unsupported_reason(make_weights(300, 8, 1),
                                                                          torch.zeros(4, 300), "gelu")
    w64 = [(w.double(), b.double()) for w, b in make_weights(8, 16, 2)]
    assert "float64" in triton_kernels.triton_unsupported_reason(w64, z0, "gelu")
    assert "activation 'tanh'" in triton_kernels.triton_unsupported_reason(make_weights(8, 16, 2), z0, "tanh")


@pytest.mark.slow
def test_triton_kernel_compiles_for_h100():
    """The real (non-interpreted) code path: both kernels compiled to PTX and cubin for sm_90 (no GPU needed),
    IEEE fp32, TF32 and bf16 dots.

    The interpreter checks the arithmetic but not Triton's compiler (layouts, loop-carried types, barriers).
    """
    script = textwrap.dedent("""
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from mmebm_dist.kernels import langevin_triton as lt

        assert not lt.INTERPRETED
        common = dict(b_hid_ptr="*fp32", w_out_ptr="*fp32", noise_ptr="*fp32", energy_ptr="*fp32",
                      first_bad_ptr="*i32", batch="i32", steps="i32", seed="i64", b_out="fp32", drift="fp32",
                      noise_std="fp32", score_scale="fp32")
        cases = [("fp32", 0, False, True, 0), ("fp32", 1, False, True, 2), ("bf16", 2, True, False, 3)]
        for mat, dot, noise, energies, act in cases:
            flags = dict(LATENT=20, HIDDEN=200, NUM_LAYERS=2, ACTIVATION=act, LEAKY_SLOPE=0.2, LAPLACE=True,
                         NOISE_FROM_TENSOR=noise, RETURN_ENERGIES=energies, DOT=dot)
            streaming = (lt._langevin_chain_kernel, dict(pre_ptr="*fp32", grad_ptr="*fp32"),
                         dict(BLOCK_B=16, BLOCK_H=32, BLOCK_D=32))
            # Hidden 64 for the resident kernel: its whole-layer tiles at 200 (padded to 256) take ptxas
            # minutes; launch/gpu_check.sh times that size on a GPU.
            resident = (lt._langevin_resident_kernel, {}, dict(BLOCK_B=16, H_PAD=64, D_PAD=32, HIDDEN=64))
            for fn, pointers, blocks in (streaming, resident):
                consts = {**flags, **blocks}
                sig = dict(z_ptr="*fp32", w_in_ptr="*" + mat, w_hid_ptr="*" + mat, **pointers, **common)
                sig.update({k: "constexpr" for k in consts})
                src = ASTSource(fn=fn, signature=sig, constexprs=consts)
                kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
                assert len(kernel.asm["cubin"]) > 1000
                print(fn.__name__, mat, dot, "shared memory bytes", kernel.metadata.shared)
        print("compiled")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "compiled" in result.stdout
