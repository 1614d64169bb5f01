"""prior.langevin.sample: backend choice, forced-backend errors, divergence, backends against autograd.

fp32 tolerance rtol = atol = 1e-5: backends differ from autograd only in matmul summation order (~1e-7/step).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from mmebm_dist.prior import langevin
from mmebm_dist.prior.energy import ACTIVATIONS, EnergyMLP
from mmebm_dist.prior.langevin import LangevinDivergenceError, resolve_backend, sample

FP32_TOL = dict(rtol=1e-5, atol=1e-5)
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton needs CUDA or TRITON_INTERPRET=1 (conftest)")
# Where the Triton backend's tensors live: the GPU when there is one, else the CPU under the interpreter.
TRITON_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def place(backend, *objects):
    """Move modules/tensors to the device ``backend`` runs on (the Triton device for 'triton', else CPU)."""
    device = TRITON_DEVICE if backend == "triton" else torch.device("cpu")
    moved = tuple(o.to(device) for o in objects)
    return moved if len(moved) > 1 else moved[0]
# The interpreter computes with numpy, which warns on the inf/nan these tests inject on purpose.
INTERPRETER_FP_WARNINGS = pytest.mark.filterwarnings(
    "ignore:(overflow|invalid value) encountered:RuntimeWarning")


def make_energy(latent=6, hidden=12, layers=2, activation="gelu", seed=0) -> EnergyMLP:
    torch.manual_seed(seed)
    return EnergyMLP(latent, hidden, layers, activation)


def chain_inputs(batch, latent, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, latent, generator=gen), torch.randn(steps, batch, latent, generator=gen)


def test_auto_picks_torch_on_cpu_and_autograd_for_other_callables():
    energy = make_energy()
    z0 = torch.zeros(3, 6)
    assert resolve_backend(energy, z0) == "torch"
    assert resolve_backend(lambda z: -(z**2).sum(-1), z0) == "autograd"
    assert resolve_backend(energy, z0, "autograd") == "autograd"


def test_auto_prefers_triton_only_for_small_mlps():
    assert langevin.triton_preferred(32, 200, 2)  # the paper's energy: 46k multiply-adds per row
    assert not langevin.triton_preferred(128, 512, 4)  # 852k: cuBLAS per step wins (H200, docs/bench/)
    assert langevin.triton_preferred(256, 256, 3) == (256 * 256 * 3 <= langevin.TRITON_AUTO_MAX_ROW_MACS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="auto picks triton only for CUDA tensors")
def test_auto_on_cuda_follows_the_size_rule():
    z0 = torch.zeros(4, 32, device="cuda")
    assert resolve_backend(make_energy(32, 200, 2).cuda(), z0) == "triton"
    assert resolve_backend(make_energy(32, 512, 4).cuda(), z0) == "torch"


def test_weights_not_readable_here_route_auto_to_autograd():
    """A weight left partitioned (ZeRO-3 outside a gather): no fused spec, so auto calls energy(z) (here a
    stand-in refusal, since an empty weight cannot run any chain); forced fused backends say why."""
    energy = make_energy()
    z0, noise = chain_inputs(4, 6, 2)
    partitioned = make_energy()
    partitioned.linears[0].weight.data = torch.empty(0)  # what ZeRO-3 leaves outside a gather
    assert "ZeRO-3" in partitioned.fused_refusal() and partitioned.fused_spec() is None
    with pytest.raises(ValueError, match="ZeRO-3"):
        sample(partitioned, z0, steps=2, step_size=0.3, backend="torch")
    energy.fused_refusal = lambda: "partitioned"  # the same routing on an energy whose forward still runs
    assert resolve_backend(energy, z0) == "autograd"
    out = sample(energy, z0, steps=2, step_size=0.3, noise=noise)
    ref = sample(energy, z0, steps=2, step_size=0.3, noise=noise, backend="autograd")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_a_handed_gather_lets_the_fused_chain_read_partitioned_weights():
    """``gather`` (what train/zero3.py hands the model under ZeRO-3) is entered around the fused chain: inside
    it the weights are whole, so backend='torch' runs and matches autograd on the whole energy."""
    whole = make_energy()
    z0, noise = chain_inputs(4, 6, 3)
    ref = sample(whole, z0, steps=3, step_size=0.3, noise=noise, backend="autograd")
    energy = make_energy()
    full = energy.linears[0].weight.data
    energy.linears[0].weight.data = torch.empty(0)
    entered = []

    @contextlib.contextmanager
    def gather():
        entered.append(True)
        energy.linears[0].weight.data = full
        try:
            yield
        finally:
            energy.linears[0].weight.data = torch.empty(0)

    out = sample(energy, z0, steps=3, step_size=0.3, noise=noise, backend="torch", gather=gather)
    assert entered == [True] and energy.linears[0].weight.numel() == 0  # released after the chain
    torch.testing.assert_close(out, ref, **FP32_TOL)


def test_train_hands_no_gather_without_zero3():
    """Plain parameters (no ds_id): no gather and no DeepSpeed import (train/zero3.py)."""
    from mmebm_dist.train.zero3 import energy_gather, hand_energy_gather

    assert energy_gather(make_energy()) is None
    model = torch.nn.Module()
    model.energy = make_energy()
    model.energy_gather = "unset"
    hand_energy_gather(model)
    assert model.energy_gather is None


class NormedEnergy(EnergyMLP):
    """A variant the fused backends do not compute: a LayerNorm on z before the MLP."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = torch.nn.LayerNorm(self.latent_dim)

    def forward(self, z):
        return super().forward(self.norm(z))


class ExtraLayerEnergy(EnergyMLP):
    """A variant with an extra layer: a linear skip from z added to the MLP's output."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra = torch.nn.Linear(self.latent_dim, 1)

    def forward(self, z):
        return super().forward(z) + self.extra(z).squeeze(-1)


@pytest.mark.parametrize("variant", [NormedEnergy, ExtraLayerEnergy])
def test_an_energy_the_fused_backends_do_not_reproduce_samples_through_autograd(variant):
    """fused_spec() is None for an EnergyMLP variant, so auto samples it with autograd: exactly the one
    reference on that energy, and not the plain MLP the fused backends would have computed."""
    from mmebm_dist.kernels._utils import langevin_reference

    torch.manual_seed(0)
    energy = variant(6, 12, 2, "gelu")
    z0, noise = chain_inputs(5, 6, 4)
    assert energy.fused_spec() is None and "fused backends" in energy.fused_refusal()
    assert resolve_backend(energy, z0) == "autograd"
    with pytest.raises(ValueError, match="fused backends"):
        sample(energy, z0, steps=4, step_size=0.3, noise=noise, backend="torch")
    out = sample(energy, z0, steps=4, step_size=0.3, noise=noise)
    ref = langevin_reference(energy, z0, steps=4, step_size=0.3, noise=noise).z
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    plain = make_energy()
    plain.load_state_dict({k: v for k, v in energy.state_dict().items() if k.startswith("linears.")})
    assert plain.fused_spec() is not None
    assert not torch.allclose(sample(plain, z0, steps=4, step_size=0.3, noise=noise), out, atol=1e-3)


def test_fused_spec_refuses_added_modules_and_bounds():
    """Beyond overridden methods: a module added beside the linears, a bound."""
    energy = make_energy()
    assert energy.fused_spec() is not None
    energy.extra = torch.nn.Linear(1, 1)
    assert "extra" in energy.fused_refusal()
    assert "energy_bound=0.5" in EnergyMLP(6, 12, 2, bound=0.5).fused_refusal()


def test_spectral_norm_energy_reads_normalised_weights():
    torch.manual_seed(0)
    energy = EnergyMLP(6, 12, 2, "silu", spectral_norm=True).eval()  # eval: no power iteration per call
    z0, noise = chain_inputs(8, 6, 3)
    z_ref = sample(energy, z0, steps=3, step_size=0.3, noise=noise, backend="autograd")
    torch.testing.assert_close(sample(energy, z0, steps=3, step_size=0.3, noise=noise), z_ref, **FP32_TOL)


def test_forced_fused_backend_refuses_arbitrary_callable():
    with pytest.raises(ValueError, match="needs an EnergyMLP"):
        sample(lambda z: -(z**2).sum(-1), torch.zeros(2, 3), steps=1, step_size=0.1, backend="torch")
    with pytest.raises(ValueError, match="unknown Langevin backend 'cuda'"):
        sample(make_energy(), torch.zeros(2, 6), steps=1, step_size=0.1, backend="cuda")


def test_forced_triton_on_cpu_without_interpreter_names_the_fix(monkeypatch):
    kernels = pytest.importorskip("mmebm_dist.kernels.langevin_triton")
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        sample(make_energy(), torch.zeros(2, 6), steps=1, step_size=0.1, backend="triton")


@pytest.mark.slow
def test_forced_triton_on_cpu_raises_in_a_process_without_interpreter():
    """The real condition: a fresh process without TRITON_INTERPRET; auto must still run (torch)."""
    script = textwrap.dedent("""
        import torch
        from mmebm_dist.prior.langevin import resolve_backend, sample
        from mmebm_dist.prior.energy import EnergyMLP
        energy = EnergyMLP(4, 8, 2, "gelu")
        z0 = torch.zeros(2, 4)
        assert resolve_backend(energy, z0) == "torch"
        sample(energy, z0, steps=2, step_size=0.1)
        try:
            sample(energy, z0, steps=2, step_size=0.1, backend="triton")
        except ValueError as exc:
            print("REFUSED:", exc)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "REFUSED:" in result.stdout and "TRITON_INTERPRET=1" in result.stdout


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("reference", ["laplace", "gaussian"])
@pytest.mark.parametrize("layers", [1, 4])
def test_torch_backend_matches_autograd(activation, reference, layers):
    energy = make_energy(7, 13, layers, activation)
    z0, noise = chain_inputs(37, 7, 4)
    kwargs = dict(steps=4, step_size=0.3, reference=reference, reference_scale=0.8, noise=noise,
                  return_energies=True)
    z_ref, f_ref = sample(energy, z0, backend="autograd", **kwargs)
    z, f = sample(energy, z0, backend="torch", **kwargs)
    torch.testing.assert_close(z, z_ref, **FP32_TOL)
    torch.testing.assert_close(f, f_ref, **FP32_TOL)


@needs_triton
@pytest.mark.parametrize("activation,reference", [("leaky_relu", "laplace"), ("silu", "gaussian")])
def test_triton_backend_matches_autograd(activation, reference):
    energy, z0, noise = place("triton", make_energy(7, 20, 2, activation), *chain_inputs(19, 7, 2))
    kwargs = dict(steps=2, step_size=0.3, reference=reference, noise=noise, return_energies=True)
    z_ref, f_ref = sample(energy, z0, backend="autograd", **kwargs)
    z, f = sample(energy, z0, backend="triton", **kwargs)
    torch.testing.assert_close(z, z_ref, **FP32_TOL)
    torch.testing.assert_close(f, f_ref, **FP32_TOL)


@needs_triton
def test_triton_seed_comes_from_the_generator():
    energy, z0 = place("triton", make_energy(6, 16, 1), torch.zeros(16, 6))

    def run(seed):
        return sample(energy, z0, steps=2, step_size=0.3, backend="triton",
                      generator=torch.Generator(device=TRITON_DEVICE).manual_seed(seed))

    torch.testing.assert_close(run(3), run(3), rtol=0, atol=0)
    assert not torch.equal(run(3), run(4))


def test_torch_backend_follows_the_generator_like_autograd():
    energy = make_energy()
    z0, _ = chain_inputs(9, 6, 0)

    def run(backend, seed):
        return sample(energy, z0, steps=3, step_size=0.3, backend=backend,
                      generator=torch.Generator().manual_seed(seed))

    torch.testing.assert_close(run("torch", 0), run("autograd", 0), **FP32_TOL)
    assert not torch.equal(run("torch", 0), run("torch", 1))


@needs_triton
def test_forced_triton_on_an_unsupported_config_raises_naming_it():
    # hidden 520 > 512, the kernel's tested envelope
    energy, z0, noise = place("triton", make_energy(4, 520, 1), *chain_inputs(3, 4, 2))
    reason = r"backend='triton': the Triton kernel does not support hidden width 520 \(supported: up to 512\)"
    with pytest.raises(ValueError, match=reason):
        sample(energy, z0, steps=2, step_size=0.3, noise=noise, backend="triton")
    if z0.device.type == "cuda":  # auto takes torch where triton cannot run (it never picks triton on CPU)
        assert resolve_backend(energy, z0) == "torch"


def test_forced_triton_without_triton_installed_raises_and_auto_still_chooses(monkeypatch):
    def missing():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(langevin, "_triton_module", missing)
    energy, z0 = make_energy(), torch.zeros(2, 6)
    with pytest.raises(ValueError, match="backend='triton': triton cannot be imported .*pip install triton"):
        sample(energy, z0, steps=1, step_size=0.1, backend="triton")
    assert resolve_backend(energy, z0) == "torch"
    sample(energy, z0, steps=1, step_size=0.1)  # auto runs


BACKENDS_HERE = ["autograd", "torch"] + (["triton"] if TRITON_OK else [])


@INTERPRETER_FP_WARNINGS
@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_non_finite_chain_raises_with_the_step(backend):
    energy, z0, noise = place(backend, make_energy(), *chain_inputs(18, 6, 4))
    noise[2, 17, 0] = float("inf")
    with pytest.raises(LangevinDivergenceError, match="at step 2 "):
        sample(energy, z0, steps=4, step_size=0.3, noise=noise, backend=backend)


@INTERPRETER_FP_WARNINGS
@pytest.mark.parametrize("backend", ["torch"] + (["triton"] if TRITON_OK else []))
def test_exploding_chain_reports_the_same_step_as_autograd(backend):
    """Gaussian p0 with s^2/(2 b^2) = 8: z is multiplied by -7 per step until it overflows (~step 45)."""
    energy, z0, noise = place(backend, make_energy(4, 16, 1), *chain_inputs(16, 4, 60))
    kwargs = dict(steps=60, step_size=4.0, reference="gaussian", noise=noise)
    with pytest.raises(LangevinDivergenceError) as ref:
        sample(energy, z0, backend="autograd", **kwargs)
    with pytest.raises(LangevinDivergenceError) as fused:
        sample(energy, z0, backend=backend, **kwargs)
    step = str(ref.value).split("at step ")[1].split(" ")[0]
    assert 30 < int(step) < 60
    assert f"at step {step} " in str(fused.value)


def test_torch_locates_divergence_of_generator_noise():
    """Fresh noise: the torch backend replays the chain from the saved generator state to name the step."""
    energy = make_energy(4, 16, 1)
    z0, _ = chain_inputs(16, 4, 0)
    kwargs = dict(steps=60, step_size=4.0, reference="gaussian")
    with pytest.raises(LangevinDivergenceError) as ref:
        sample(energy, z0, backend="autograd", generator=torch.Generator().manual_seed(9), **kwargs)
    with pytest.raises(LangevinDivergenceError) as fused:
        sample(energy, z0, backend="torch", generator=torch.Generator().manual_seed(9), **kwargs)
    step = str(ref.value).split("at step ")[1].split(" ")[0]
    assert f"at step {step} " in str(fused.value)
    # Global RNG (no generator): the same replay through torch's default generator.
    torch.manual_seed(9)
    with pytest.raises(LangevinDivergenceError, match=f"at step {step} "):
        sample(energy, z0, backend="torch", **kwargs)


@pytest.mark.parametrize("backend", BACKENDS_HERE)
def test_zero_steps_and_grad_inputs(backend):
    energy, z0 = place(backend, make_energy(), torch.randn(3, 6))
    torch.testing.assert_close(sample(energy, z0, steps=0, step_size=0.3, backend=backend), z0)
    with pytest.raises(ValueError, match="requires grad"):
        sample(energy, z0.requires_grad_(), steps=1, step_size=0.3, backend=backend)


def test_bench_langevin_rows(capsys):
    """`mmebm bench langevin` end to end at toy size: a JSON row per (backend, batch) plus the long-K rows."""
    import argparse
    import json

    from mmebm_dist.bench import sampler
    from mmebm_dist.commands import bench

    parser = argparse.ArgumentParser()
    bench.add_langevin_arguments(parser)
    args = parser.parse_args(["--batch", "4", "8", "--latent", "3", "--hidden", "8", "--steps", "2",
                              "--long-steps", "6", "--repeats", "1", "--threads", "1", "--device", "cpu",
                              "--no-memory", "--json"])
    assert sampler.run(bench.options_of("langevin", args)) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["backend"], r["batch"], r["steps"]) for r in rows] == [
        ("autograd", 4, 2), ("torch", 4, 2), ("autograd", 8, 2), ("torch", 8, 2), ("autograd", 8, 6),
        ("torch", 8, 6)]
    autograd_s = {(r["batch"], r["steps"]): r["seconds_per_chain"]
                  for r in rows if r["backend"] == "autograd"}
    for row in rows:
        assert row["ms_per_chain"] > 0 and row["gflops"] > 0 and row["roof_gflops"] > 0
        assert row["shape_roof_fraction"] > 0
        expected = autograd_s[(row["batch"], row["steps"])] / row["seconds_per_chain"]
        assert row["speedup_vs_autograd"] == pytest.approx(expected)
    assert rows[1]["buffer_mib"] * 2**20 == sampler.buffer_bytes("torch", 4, 3, 8, 2, "leaky_relu")
    sampler.memory_probe(json.dumps({"args": dict(latent=3, hidden=8, layers=2, activation="gelu",
                                                  reference="laplace", step_size=0.4, threads=1),
                                     "batch": 4, "steps": 2, "backend": "torch"}))
    assert json.loads(capsys.readouterr().out)["peak_kib"] >= 0


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("reference", ["laplace", "gaussian"])
def test_compiled_sample_is_one_graph_and_matches_autograd(activation, reference):
    """Under torch.compile, ``auto`` runs the traced chain (langevin_traced) with no graph break (fullgraph
    raises on one) and, for given noise, gives the autograd chain's z_K (FP32_TOL: summation order only)."""
    import torch._dynamo

    energy = make_energy(activation=activation)
    z0, noise = chain_inputs(5, 6, 4)
    kwargs = dict(steps=4, step_size=0.3, reference=reference, noise=noise, return_energies=True)
    expected = sample(energy, z0, backend="autograd", **kwargs)
    torch._dynamo.reset()
    compiled = torch.compile(lambda z: sample(energy, z, backend="auto", **kwargs), backend="eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(z0), expected, **FP32_TOL)  # z_K and the mean energies
    assert not torch.allclose(expected[0], z0, atol=1e-2)  # the chain moved


def test_compiled_chain_noise_follows_the_global_seed():
    """Fresh noise inside an inductor graph comes from seeds inductor draws from the default generator: the
    same torch.manual_seed gives the same chain bit for bit (an exact resume), another seed another chain."""
    import torch._dynamo

    energy = make_energy()
    torch._dynamo.reset()
    compiled = torch.compile(lambda z: sample(energy, z, steps=3, step_size=0.3), fullgraph=True)
    z0 = torch.zeros(4, 6)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(compiled(z0))
    assert torch.equal(runs[0], runs[1]) and not torch.allclose(runs[0], runs[2])
    assert runs[0].std() > 0.1  # noise entered the chain
