"""The learned reference p0 (model.prior.reference=gmm): its density, exact score and draws; the Langevin
backends on it; the fit inside a staged run (saved, resumed exactly); importance-resampled chain starts."""

from __future__ import annotations

import pytest
import torch

from mmebm_dist.config import ConfigError, load_config
from mmebm_dist.prior import langevin
from mmebm_dist.prior.densities import GaussianMixtureReference, reference_density
from mmebm_dist.prior.energy import EnergyMLP
from mmebm_dist.rundir import latest_checkpoint, read_jsonl
from tests.train_helpers import tiny_config


def _two_clusters(n: int = 400, d: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(n, d, generator=g) * 0.3 + 2.0, torch.randn(n, d, generator=g) * 0.5 - 1.0])


@pytest.fixture(scope="module")
def gmm() -> GaussianMixtureReference:
    reference = GaussianMixtureReference(3, 2)
    reference.fit(_two_clusters(), seed=0)
    return reference


def test_an_unfitted_mixture_is_its_base_density():
    reference, base = GaussianMixtureReference(3, 4), reference_density("laplace", 1.0)
    z = torch.randn(5, 3)
    assert not reference.fitted
    assert torch.equal(reference.log_prob(z), base.log_prob(z))
    assert torch.equal(reference.score(z), base.score(z))


def test_the_fitted_mixture_finds_the_clusters_and_its_score_is_the_gradient_of_its_log_density(gmm):
    means = sorted(gmm.means[:, 0].tolist())
    assert means == pytest.approx([-1.0, 2.0], abs=0.1)  # the two clusters' centres
    z = torch.randn(16, 3, dtype=torch.float64).requires_grad_(True)
    (grad,) = torch.autograd.grad(gmm.log_prob(z).sum(), z)
    # float32 buffers: the analytic score and autograd agree to float32 rounding of O(10) values
    torch.testing.assert_close(gmm.score(z.detach()), grad, atol=1e-4, rtol=1e-4)


def test_draws_follow_the_mixture(gmm):
    z = gmm.sample((20000, 3), generator=torch.Generator().manual_seed(1))
    fitted_mean = (gmm.log_weights.exp()[:, None] * gmm.means).sum(0)
    # 20,000 draws of a mixture with per-axis sd <= 1.6: the mean's standard error is about 0.011
    torch.testing.assert_close(z.mean(0), fitted_mean, atol=0.05, rtol=0)
    # the draws score as well as the data the mixture was fitted to (mean log density, nats)
    fitted_to = gmm.log_prob(_two_clusters()).mean().item()
    assert gmm.log_prob(z).mean().item() == pytest.approx(fitted_to, abs=0.1)


def test_the_fit_is_saved_and_loaded_with_the_state_dict(gmm):
    loaded = GaussianMixtureReference(3, 2)
    loaded.load_state_dict(gmm.state_dict())
    z = torch.randn(4, 3)
    assert loaded.fitted and torch.equal(loaded.log_prob(z), gmm.log_prob(z))


def test_every_cpu_backend_runs_the_same_chain_on_a_learned_reference(gmm):
    energy = EnergyMLP(3, 16, 2)
    z0 = gmm.sample((8, 3), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(12, 8, 3, generator=torch.Generator().manual_seed(3))
    ref = langevin.sample(energy, z0, steps=12, step_size=0.2, reference=gmm, noise=noise, backend="autograd")
    fused = langevin.sample(energy, z0, steps=12, step_size=0.2, reference=gmm, noise=noise, backend="torch")
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)  # fp32 summation order only
    # f = 0: the chain ascends log p0 only, so it differs from the same chain on the Laplace base
    flat = langevin.sample(energy, z0, steps=12, step_size=0.2, reference="laplace", noise=noise,
                           backend="torch")
    assert not torch.allclose(fused, flat, atol=1e-3)


def test_triton_refuses_a_learned_reference_by_name_and_auto_takes_torch(gmm):
    energy = EnergyMLP(3, 16, 2)
    z0 = torch.zeros(4, 3)
    assert langevin.resolve_backend(energy, z0, "auto", reference=gmm) == "torch"
    with pytest.raises(ValueError, match="triton"):
        langevin.sample(energy, z0, steps=2, step_size=0.1, reference=gmm, backend="triton")


def test_a_gmm_reference_needs_trained_encoders(data2, tmp_path):
    path = tiny_config(tmp_path / "c.yaml", data2)
    with pytest.raises(ConfigError, match="model.prior.reference=gmm"):
        load_config(path, ["model.prior.reference=gmm"])
    with pytest.raises(ConfigError, match="reference_components"):
        load_config(path, [*GMM_STAGED, "model.prior.reference_fit_tuples=2"])


GMM_STAGED = [
    "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=5",
    "train.schedule=[{stage: reference, steps: 2}, {stage: energy, steps: 4, prior_lr: 0.01}]",
    "model.prior.reference=gmm", "model.prior.reference_components=3", "model.prior.reference_fit_tuples=48",
    "model.prior.langevin.steps=4", "model.prior.langevin.step_size=0.1",
]


def test_a_staged_run_fits_the_mixture_when_the_energy_starts_and_resumes_exactly(data2, tmp_path,
                                                                                 in_process):
    from mmebm_dist.train.loop import train

    path = tiny_config(tmp_path / "c.yaml", data2)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(load_config(path, [*GMM_STAGED, f"train.out_dir={whole}"]))
    first = torch.load(whole / "checkpoints" / "step-0000002" / "model.pt", weights_only=True)
    last = torch.load(latest_checkpoint(whole) / "model.pt", weights_only=True)
    assert not bool(first["p0.fitted_flag"]) and bool(last["p0.fitted_flag"])  # fitted at step 3
    assert not torch.equal(last["p0.means"], torch.zeros_like(last["p0.means"]))
    # stopped one step after the fit and resumed: the fit is loaded, not redone, and the run is the same
    train(load_config(path, [*GMM_STAGED, f"train.out_dir={parts}", "train.steps=3",
                             "train.checkpoint_every=1"]))
    train(load_config(parts / "config.json", ["train.steps=6"]), resume=True)
    keys = ("step", "stage", "loss", "energy_gap")
    strip = lambda rs: [{k: r.get(k) for k in keys} for r in rs if "loss" in r]  # noqa: E731
    assert strip(read_jsonl(parts / "metrics.jsonl")) == strip(read_jsonl(whole / "metrics.jsonl"))
    b = torch.load(latest_checkpoint(parts) / "model.pt", weights_only=True)
    assert all(torch.equal(last[k], b[k]) for k in last)


def test_importance_resampled_starts_keep_the_candidate_of_highest_energy_when_it_dominates(data2, tmp_path):
    from mmebm_dist.models import build_model

    cfg = load_config(tiny_config(tmp_path / "c.yaml", data2),
                      ["model.prior.langevin.init=sir", "model.prior.langevin.sir_candidates=64"])
    model = build_model(cfg.model)

    class Linear(torch.nn.Module):  # f(z) = 50 z_0: exp f all but picks the largest first coordinate
        def forward(self, z):
            return 50.0 * z[:, 0]

    model.energy = Linear()
    z0 = model.p0.sample((200, cfg.model.latent_dim), generator=torch.Generator().manual_seed(0))
    picked = model._importance_resampled(z0, torch.Generator().manual_seed(1))
    # the max of 64 Laplace(0, 1) draws has median ~ log(64 / 2 / log 2) ~ 3.8; a p0 draw's is 0
    assert picked[:, 0].median() > 3.0 and z0[:, 0].median().abs() < 0.3


def test_reference_refit_fits_again_when_a_later_stage_starts(data2, tmp_path, in_process, monkeypatch):
    """With reference_refit the mixture is fitted when the energy stage starts and again when the joint
    stage starts (the encoders move from there on); without it, once."""
    import mmebm_dist.train.loop as loop
    from mmebm_dist.train import reference_fit

    calls = []
    original = reference_fit.fit_reference

    def counting(model, **kwargs):
        calls.append(model.learned_reference.fitted)
        return original(model, **kwargs)

    monkeypatch.setattr(reference_fit, "fit_reference", counting)
    path = tiny_config(tmp_path / "c.yaml", data2)
    staged = [*GMM_STAGED[:3], *GMM_STAGED[4:], "train.steps=8",
              "train.schedule=[{stage: reference, steps: 2}, {stage: energy, steps: 3, prior_lr: 0.01}, "
              "{stage: joint, steps: 3}]"]
    refit = ["model.prior.reference_refit=true", f"train.out_dir={tmp_path / 'a'}"]
    loop.train(load_config(path, [*staged, *refit]))
    assert calls == [False, True]  # fitted at step 3, fitted again at step 6
    calls.clear()
    in_process()
    loop.train(load_config(path, [*staged, f"train.out_dir={tmp_path / 'b'}"]))
    assert calls == [False]


def test_the_traced_chain_of_a_compiled_step_adds_the_learned_score(gmm):
    """langevin_traced (what a compiled training step runs) with the mixture's score equals the reference."""
    from mmebm_dist.kernels._utils import langevin_reference
    from mmebm_dist.kernels.langevin_torch import langevin_traced

    energy = EnergyMLP(3, 16, 2)
    weights = [(w.detach(), b.detach()) for w, b in energy.weights()]
    z0 = gmm.sample((8, 3), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(6, 8, 3, generator=torch.Generator().manual_seed(3))
    common = dict(steps=6, step_size=0.2, activation=energy.activation, noise=noise)
    traced = langevin_traced(weights, z0, reference_score=gmm.score, **common).z
    ref = langevin_reference(energy, z0, reference_score=gmm.score,
                             **{k: v for k, v in common.items() if k != "activation"}).z
    torch.testing.assert_close(traced, ref, atol=1e-5, rtol=1e-5)  # fp32 summation order only
    plain = langevin_traced(weights, z0, **common).z  # the Laplace score instead: another chain
    assert not torch.allclose(traced, plain, atol=1e-3)
