"""Levers for joint EBM training from a cold start: a soft-clipped energy (model.prior.energy_bound),
persistent negative chains (langevin.persistent / reinit), a ramp of the energy's coupling into the
encoders' objective (coupling_ramp_steps) and extra energy updates per model step (energy_updates).
Each is off by default."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmebm_dist.config import ConfigError, LangevinConfig, load_config
from mmebm_dist.models import build_model
from mmebm_dist.prior.energy import EnergyMLP
from mmebm_dist.prior.langevin import resolve_backend, sample
from mmebm_dist.rundir import latest_checkpoint, read_jsonl
from tests.test_models import batch_for, tiny
from tests.train_helpers import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _with_prior(cfg, **prior):
    langevin = prior.pop("langevin", {})
    new_langevin = dataclasses.replace(cfg.prior.langevin, **langevin)
    return dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, langevin=new_langevin, **prior))


# ------------------------------------------------------------------------------------------- bounded energy
def test_bounded_energy_is_b_tanh_of_the_plain_mlp_and_stays_below_b():
    torch.manual_seed(0)
    plain = EnergyMLP(4, hidden=8, layers=2)
    bounded = EnergyMLP(4, hidden=8, layers=2, bound=3.0)
    bounded.load_state_dict(plain.state_dict())
    z = 50 * torch.randn(64, 4)  # far out: the plain MLP is large there
    f = plain(z)
    assert f.abs().max() > 3.0
    torch.testing.assert_close(bounded(z), 3.0 * torch.tanh(f / 3.0), rtol=0, atol=1e-6)  # same ops, fp32
    assert bounded(z).abs().max() < 3.0
    with pytest.raises(ValueError, match="bound must be >= 0"):
        EnergyMLP(4, bound=-1.0)


def test_bound_zero_is_the_plain_mlp_bit_for_bit():
    torch.manual_seed(0)
    a = EnergyMLP(4, hidden=8)
    torch.manual_seed(0)
    b = EnergyMLP(4, hidden=8, bound=0.0)
    z = torch.randn(16, 4)
    assert torch.equal(a(z), b(z))


def test_fused_backends_refuse_a_bounded_energy_and_auto_runs_autograd():
    torch.manual_seed(0)
    energy = EnergyMLP(4, hidden=8, bound=2.0)
    z0 = torch.randn(8, 4)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="energy_bound=2"):
            sample(energy, z0, steps=2, step_size=0.1, backend=backend)
    assert resolve_backend(energy, z0, "auto") == "autograd"
    noise = torch.randn(3, 8, 4)
    auto = sample(energy, z0, steps=3, step_size=0.3, noise=noise)
    reference = sample(energy, z0, steps=3, step_size=0.3, noise=noise, backend="autograd")
    assert torch.equal(auto, reference)


# ------------------------------------------------------------------------------------- persistent chains
def test_persistent_chains_continue_from_the_buffer_and_are_written_back():
    cfg = _with_prior(tiny(), langevin={"persistent": 20, "reinit": 0.0, "steps": 0})
    model = build_model(cfg)
    assert model.negative_chains.shape == (20, 4)
    model.negative_chains.copy_(torch.arange(20.0)[:, None].expand(20, 4))
    z = model._negatives(50)  # K = 0, no restarts: rows of the buffer exactly
    assert torch.equal(z, z[:, :1].expand(50, 4)) and set(z[:, 0].tolist()) <= set(range(20))
    model = build_model(_with_prior(cfg, langevin={"steps": 3}))
    before = model.negative_chains.clone()
    z = model._negatives(5)
    changed = (model.negative_chains != before).any(1)
    assert 1 <= int(changed.sum()) <= 5  # the drawn rows moved, the others did not
    assert all(any(torch.equal(row, zi) for zi in z) for row in model.negative_chains[changed])


def test_reinit_one_restarts_every_chain_from_p0():
    cfg = _with_prior(tiny(), langevin={"persistent": 10, "reinit": 1.0, "steps": 0})
    model = build_model(cfg)
    model.negative_chains.fill_(1e3)  # a buffer far from p0: no negative may come from it
    assert model._negatives(200).abs().max() < 50


def test_persistent_buffer_is_in_the_state_dict_only_when_asked():
    assert not any("negative_chains" in k for k in build_model(tiny()).state_dict())
    model = build_model(_with_prior(tiny(), langevin={"persistent": 7}))
    assert model.state_dict()["negative_chains"].shape == (7, 4)


# -------------------------------------------------------------------------------------------- coupling ramp
def _terms_and_energy_grads(model, batch, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)
    out = model(batch)
    out["loss"].backward()
    return out, [p.grad.clone() for p in model.energy.parameters()]


def test_coupling_ramp_scales_f_in_the_elbo_and_leaves_the_energy_gradient():
    torch.manual_seed(0)
    cfg = _with_prior(tiny(private=0), coupling_ramp_steps=4)
    model = build_model(cfg)
    with torch.no_grad():  # an energy far from 0, so its share of the ELBO shows
        model.energy.linears[-1].bias.fill_(5.0)
    batch = batch_for(cfg)
    elbo, grads = {}, {}
    for step in (0, 2, 4, 9):
        model.set_step(step)
        out, grads[step] = _terms_and_energy_grads(model, batch)
        elbo[step] = out["elbo"]
        assert float(out["coupling"]) == min(1.0, step / 4)
    assert not torch.isclose(elbo[0], elbo[4])
    torch.testing.assert_close(elbo[2], (elbo[0] + elbo[4]) / 2)  # linear in the weight
    assert elbo[9] == elbo[4]
    for step in (0, 2, 9):
        for a, b in zip(grads[step], grads[4], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # the energy trains at full rate


def test_no_ramp_means_weight_one_and_no_new_term():
    model = build_model(tiny())
    model.set_step(1)
    assert model.coupling == 1.0 and "coupling" not in model(batch_for(tiny()))


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize("override,key", [
    ("model.prior.energy_bound=-1", "model.prior.energy_bound"),
    ("model.prior.coupling_ramp_steps=-5", "model.prior.coupling_ramp_steps"),
    ("model.prior.energy_updates=0", "model.prior.energy_updates"),
    ("model.prior.langevin.persistent=-1", "model.prior.langevin.persistent"),
    ("model.prior.langevin.reinit=1.5", "model.prior.langevin.reinit"),
])
def test_lever_values_out_of_range_are_config_errors(tmp_path, override, key):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 2}\n")
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(path, [override])


def test_energy_updates_with_grad_accum_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 2}\n")
    with pytest.raises(ConfigError, match="energy_updates=2.*grad_accum=2"):
        load_config(path, ["model.prior.energy_updates=2", "optim.grad_accum=2"])


def test_lever_defaults_are_off():
    lcfg, prior = LangevinConfig(), tiny().prior
    assert (prior.energy_bound, prior.coupling_ramp_steps, prior.energy_updates) == (0.0, 0, 1)
    assert (lcfg.persistent, lcfg.reinit) == (0, 0.05)


# ---------------------------------------------------------------------------------- in the training loop
def _weights(run):
    return torch.load(latest_checkpoint(run) / "model.pt", weights_only=True)


def test_energy_updates_move_only_the_energy_in_the_extra_steps(data2, tmp_path, in_process):
    """One step with energy_updates 3 against 1: the same encoders/decoders, a different energy."""
    from mmebm_dist.train.loop import train

    path = tiny_config(tmp_path / "c.yaml", data2)
    runs = {}
    for n in (1, 3):
        runs[n] = tmp_path / f"n{n}"
        in_process()
        train(load_config(path, [f"train.out_dir={runs[n]}", "train.steps=1",
                                 f"model.prior.energy_updates={n}"]))
    one, three = _weights(runs[1]), _weights(runs[3])
    energy_keys = [k for k in one if k.startswith("energy.")]
    assert energy_keys and all(torch.equal(one[k], three[k]) for k in one if k not in energy_keys)
    assert any(not torch.equal(one[k], three[k]) for k in energy_keys)


def test_resume_with_every_lever_on_is_exact(data2, tmp_path, in_process):
    """Persistent chains (saved in the checkpoint), the ramp, the bound and two energy updates: stopped at
    step 3 and resumed, the same losses and final weights (buffer included) as the uninterrupted run."""
    from mmebm_dist.train.loop import train

    levers = ["model.prior.energy_bound=2", "model.prior.langevin.persistent=32",
              "model.prior.langevin.reinit=0.25", "model.prior.coupling_ramp_steps=4",
              "model.prior.energy_updates=2", "model.prior.energy_l2=0", "train.steps=6"]
    path = tiny_config(tmp_path / "c.yaml", data2)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(load_config(path, [*levers, f"train.out_dir={whole}"]))
    in_process()
    train(load_config(path, [*levers, f"train.out_dir={parts}", "train.steps=3", "train.checkpoint_every=3"]))
    in_process()
    train(load_config(parts / "config.json", ["train.steps=6"]), resume=True)
    keys = ("step", "loss", "energy_gap", "elbo", "coupling")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs if "loss" in r]  # noqa: E731
    records = strip(read_jsonl(whole / "metrics.jsonl"))
    assert records == strip(read_jsonl(parts / "metrics.jsonl"))
    assert [r["coupling"] for r in records] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    a, b = _weights(whole), _weights(parts)
    assert "negative_chains" in a and all(torch.equal(a[k], b[k]) for k in a)
