"""``train.mixed_precision=auto``: bf16 only where the CPU flags or the GPU's compute capability say so."""

from __future__ import annotations

import logging

import pytest
import torch

from mmebm_dist import hardware

CPU = torch.device("cpu")


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the detection at a fake /proc/cpuinfo whose flags line the test writes."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(hardware, "CPUINFO", path)

    def write(flags: str) -> None:
        path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: {flags}\n\nprocessor\t: 1\n")

    return write


@pytest.mark.parametrize("flags,expected", [
    ("fpu sse2 avx2 fma", "no"),  # AVX2 only (an AMD EPYC of these machines): bf16 is emulated
    ("avx2 avx512f avx512bw", "no"),  # AVX-512 without its BF16 extension
    ("avx2 avx512f avx512_bf16", "bf16"),
    ("avx2 avx512f amx_tile amx_bf16", "bf16"),  # Sapphire Rapids and later
])
def test_auto_on_cpu_follows_the_flags(cpuinfo, flags, expected):
    cpuinfo(flags)
    assert hardware.resolve_mixed_precision("auto", CPU) == expected


def test_auto_without_cpuinfo_is_fp32(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")
    assert hardware.cpu_flags() == set()
    assert hardware.resolve_mixed_precision("auto", CPU) == "no"


@pytest.mark.parametrize("capability,expected", [((7, 0), "no"), ((7, 5), "no"), ((8, 0), "bf16"),
                                                 ((9, 0), "bf16")])
def test_auto_on_cuda_follows_compute_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test GPU")
    assert hardware.resolve_mixed_precision("auto", torch.device("cuda", 0)) == expected


def test_explicit_values_pass_and_bad_ones_raise(cpuinfo, caplog):
    cpuinfo("avx2 amx_bf16")
    assert hardware.resolve_mixed_precision("no", CPU) == "no"
    assert hardware.resolve_mixed_precision("false", CPU) == "no"  # YAML's bare `no`
    assert hardware.resolve_mixed_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="train.mixed_precision must be one of auto, no, bf16, got 'fp16'"):
        hardware.resolve_mixed_precision("fp16", CPU)
    with caplog.at_level(logging.INFO, logger="mmebm_dist.hardware"):
        hardware.resolve_mixed_precision("auto", CPU)
        hardware.resolve_mixed_precision("auto", CPU, announce=False)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["train.mixed_precision=auto -> bf16 autocast: CPU flags amx_bf16 "
                     f"(torch CPU capability {torch.backends.cpu.get_cpu_capability()})"]


def test_make_accelerator_resolves_auto(cpuinfo, monkeypatch):
    """Where the Accelerator is built, auto becomes the precision accelerate runs (fp32 without the flags).
    The CPU's flags decide only where the process trains on the CPU: on a GPU machine the device is pinned to
    the CPU here (the H200 check of 2026-12-04 read bf16 from the GPU's compute capability)."""
    from accelerate.state import AcceleratorState

    from mmebm_dist.config import Config
    from mmebm_dist.train import distributed
    from mmebm_dist.train.distributed import make_accelerator

    monkeypatch.setattr(distributed, "_local_device", lambda: torch.device("cpu"))
    for flags, expected in (("avx2", "no"), ("avx2 avx512_bf16", "bf16")):
        cpuinfo(flags)
        AcceleratorState._reset_state(True)
        try:
            assert make_accelerator(Config()).mixed_precision == expected
        finally:
            AcceleratorState._reset_state(True)


@pytest.mark.parametrize("backend", ["autograd", "torch"])
def test_bf16_autocast_does_not_reach_the_langevin_chain(backend):
    """Under bf16 autocast the training forward's prior samples are the fp32 chain's, bit for bit.

    With the autograd backend the same chain run with autocast reaching it (langevin.sample called directly)
    differs: bf16 matmuls round grad f to 8 bits, so the check can fail. (The fused torch backend's ops are
    not on autocast's CPU list: it stays fp32 either way.)
    """
    from test_models import tiny

    from mmebm_dist.models import build_model
    from mmebm_dist.prior import langevin

    torch.manual_seed(0)
    cfg = tiny(prior="ebm")
    cfg.prior.hidden, cfg.prior.langevin.steps, cfg.prior.langevin.backend = 32, 5, backend
    model = build_model(cfg)
    draws = {}
    for name, autocast in (("fp32", False), ("bf16", True)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            draws[name] = model.sample_prior(64, generator=torch.Generator().manual_seed(3))
    assert draws["fp32"].dtype == draws["bf16"].dtype == torch.float32
    torch.testing.assert_close(draws["bf16"], draws["fp32"], rtol=0, atol=0)
    if backend != "autograd":
        return
    z0 = torch.randn(64, cfg.latent_dim, generator=torch.Generator().manual_seed(4))
    kwargs = dict(steps=5, step_size=cfg.prior.langevin.step_size, backend=backend,
                  noise=torch.zeros(5, 64, cfg.latent_dim))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        leaked = langevin.sample(model.energy, z0, **kwargs)
    assert not torch.equal(leaked.float(), langevin.sample(model.energy, z0, **kwargs))
