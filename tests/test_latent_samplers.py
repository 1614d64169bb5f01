"""Post-hoc latent samplers: the Gaussian mixture and flow fits, the model views drawing z from them, the
joint figure on the prior's seeded draws, the flags' errors and the report table."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from beyond_helpers import tiny_batch, tiny_model

from mmebm_dist.commands import eval as eval_command
from mmebm_dist.evaluate import latent_samplers as ls
from mmebm_dist.evaluate.coherence import measure_coherence, measure_joint
from mmebm_dist.evaluate.judges.digits import DigitJudge
from mmebm_dist.evaluate.report import fmt

WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-4.0, 0.0, 1.0, 0.0], [4.0, 1.0, -1.0, 2.0]])
COVS = np.stack([np.diag([1.0, 0.5, 0.3, 2.0]),
                 np.array([[1.0, 0.6, 0, 0], [0.6, 1.0, 0, 0], [0, 0, 0.4, 0], [0, 0, 0, 0.8]])])


# Small flows fit in seconds on one thread; the figures they must reach are stated in each test.
SMALL_FLOW = ls.FlowOptions(transforms=3, hidden=32, steps=300, lr=3e-3, batch_size=256, eval_every=50)


def two_component_samples(n: int, seed: int = 0) -> np.ndarray:
    """n draws of the known 2-component mixture (WEIGHTS, MEANS, COVS) in 4-D (the tiny model's latent)."""
    rng = np.random.default_rng(seed)
    k = rng.choice(2, size=n, p=WEIGHTS)
    return np.stack([rng.multivariate_normal(MEANS[i], COVS[i]) for i in k])


class CompareClassifiers:
    """Class 1 when a vector modality's first coordinate exceeds its second, else 0 (the tiny model with
    seed 1 makes its modalities agree on about half of its joint samples: a figure that can move)."""

    def predict(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 0] > x[:, 1]).long()


def test_gmm_recovers_a_known_two_component_mixture():
    gmm = ls.fit_gmm(two_component_samples(6000), 2, seed=0)
    order = np.argsort(gmm.means_[:, 0])
    # Tolerances: ~6,000 draws give standard errors near 0.006 (weights), 0.02-0.03 (means), 0.02-0.05
    # (covariances); 4-5 of them each.
    np.testing.assert_allclose(gmm.weights_[order], WEIGHTS, atol=0.03)
    np.testing.assert_allclose(gmm.means_[order], MEANS, atol=0.1)
    np.testing.assert_allclose(gmm.covariances_[order], COVS, atol=0.15)
    again = ls.fit_gmm(two_component_samples(6000), 2, seed=0)
    np.testing.assert_array_equal(again.means_, gmm.means_)  # seeded
    with pytest.raises(ValueError, match="--gmm-components 5: .*3 fit tuples"):
        ls.fit_gmm(two_component_samples(3), 5, seed=0)


def test_view_draws_z_from_the_mixture_and_decodes_it():
    model = tiny_model(prior="ebm")
    gmm = ls.fit_gmm(two_component_samples(4000), 2, seed=0)
    view = ls.MixturePrior(model, gmm)
    z = view.sample_prior(20_000, generator=torch.Generator().manual_seed(1)).double().numpy()
    # Components 8 standard deviations apart along the first axis: each draw's side names its component.
    first = z[:, 0] < 0
    low = int(np.argmin(gmm.means_[:, 0]))
    assert first.mean() == pytest.approx(gmm.weights_[low], abs=0.015)  # SE ~0.003
    for side, comp in ((first, low), (~first, 1 - low)):
        np.testing.assert_allclose(z[side].mean(0), gmm.means_[comp], atol=0.06)
        np.testing.assert_allclose(np.cov(z[side].T), gmm.covariances_[comp], atol=0.1)
    # generate_joint decodes exactly those draws: same generator, z first, then the private latents.
    out = view.generate_joint(8, langevin_steps=5, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    expected = model.decode(view.sample_prior(8, generator=gen), generator=gen)
    for name in model.modalities:
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0)
    prior = model.generate_joint(8, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(out["v0"], prior["v0"])  # not the model's own prior


def test_joint_figure_uses_the_prior_figure_draws():
    """measure_joint on the model itself reproduces measure_coherence's joint figure (same seeded chunks)."""
    model = tiny_model(prior="laplace", seed=1)
    judge = DigitJudge(CompareClassifiers())
    full = measure_coherence(model, judge, [tiny_batch(model, 6)], num_samples=50, batch_size=16, seed=4)
    joint = measure_joint(model, judge, num_samples=50, batch_size=16, seed=4)
    assert (joint["coherence"], joint["stderr"], joint["n"]) == \
        (full["joint"]["coherence"], full["joint"]["stderr"], full["joint"]["n"])
    assert 0.0 < joint["coherence"] < 1.0 and joint["n"] == 50


def test_sweep_starts_from_the_joint_draws_so_its_zero_entry_is_the_laplace_prior_on_the_same_model():
    """The Langevin sweep reuses the joint figure's seeded draws: its entry at the joint's own step count is
    the joint figure, and its entry at 0 steps is what a Laplace-prior model with the same encoders and
    decoders scores (the fitted schedule's control, judged on the same samples)."""
    ebm = tiny_model(prior="ebm", seed=1)
    laplace = tiny_model(prior="laplace", seed=5)
    missing, unexpected = laplace.load_state_dict(ebm.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("energy.") for k in unexpected)
    judge = DigitJudge(CompareClassifiers())
    chunks = [tiny_batch(ebm, 6)]
    out = measure_coherence(ebm, judge, chunks, num_samples=60, batch_size=16, seed=4, joint_langevin_steps=2,
                            langevin_sweep=(0, 2))
    sweep = {e["steps"]: (e["coherence"], e["n"]) for e in out["langevin_sweep"]}
    assert sweep[2] == (out["joint"]["coherence"], out["joint"]["n"])
    reference = measure_joint(laplace, judge, num_samples=60, batch_size=16, seed=4)
    assert sweep[0] == (reference["coherence"], reference["n"])
    assert 0.0 < reference["coherence"] < 1.0


def test_measure_fits_on_the_aggregate_posterior_and_reports():
    model = tiny_model(prior="laplace", m=3, seed=1)
    chunks = [tiny_batch(model, 16, seed=s) for s in range(3)]
    z = ls.aggregate_posterior_samples(model, chunks, seed=0)
    assert z.shape == (48, 4)
    np.testing.assert_array_equal(z, ls.aggregate_posterior_samples(model, chunks, seed=0))
    judge = DigitJudge(CompareClassifiers())
    out = ls.measure(model, judge, chunks, components=[1, 3], num_samples=40, batch_size=16, seed=0)
    assert list(out) == ["gmm_1", "gmm_3"]
    for k, entry in ((1, out["gmm_1"]), (3, out["gmm_3"])):
        assert entry["components"] == k and entry["fit_tuples"] == 48 and entry["n"] == 40
        assert 0.0 < entry["joint"] < 1.0 and entry["stderr"] > 0
    one = ls.fit_gmm(z, 1, seed=0)  # one component: the sample mean
    np.testing.assert_allclose(one.means_[0], z.mean(0), atol=1e-9)
    results = {"coherence": {"joint": {"coherence": 0.5, "stderr": 0.05, "n": 40}}, "latent_samplers": out}
    md = "\n".join(ls.report_lines(results))
    assert "## Post-hoc latent samplers" in md and "| gmm_3 |" in md and "| the run's prior | 0.5000" in md


def test_flow_recovers_a_known_gaussian():
    """A correlated 2-D Gaussian with an offset: the fitted flow's draws have its mean and covariance, and its
    held-out NLL is the Gaussian's entropy per dimension."""
    mean, cov = np.array([3.0, -1.0]), np.array([[2.0, 1.2], [1.2, 1.0]])
    z = np.random.default_rng(0).multivariate_normal(mean, cov, size=3000)
    fitted = ls.fit_flow(z, ls.FlowOptions(transforms=2, hidden=16, steps=200, lr=3e-3, eval_every=50),
                         seed=0)
    assert (fitted.fit_tuples, fitted.held_out_tuples) == (2700, 300) and 0 < fitted.best_step <= 200
    draws = fitted.sample(20_000, generator=torch.Generator().manual_seed(1)).detach().double().numpy()
    # Tolerances: fit error of 2,700 draws (SE ~0.03 on the mean, ~0.05 on the variances) plus the draws'
    # own (~0.01), with room for an imperfect 200-step fit; a flow left at its random start misses by > 0.5.
    np.testing.assert_allclose(draws.mean(0), mean, atol=0.12)
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.2)
    entropy_per_dim = 0.5 * (np.log(np.linalg.det(2 * np.pi * np.e * cov))) / 2
    assert fitted.held_out_nll == pytest.approx(entropy_per_dim, abs=0.05)  # 300 held-out draws: SE ~0.04
    assert fitted.train_nll == pytest.approx(entropy_per_dim, abs=0.05)


def test_flow_beats_a_single_gaussian_on_a_mixture():
    """On the known 2-component mixture, the flow's NLL on fresh draws is near the true mixture's and far
    below that of the best single Gaussian (which spreads mass between the modes)."""
    fitted = ls.fit_flow(two_component_samples(3000), SMALL_FLOW, seed=0)
    test = two_component_samples(3000, seed=1)
    with torch.no_grad():
        flow_nll = -fitted.log_prob(torch.as_tensor(test, dtype=torch.float32)).mean().item() / 4
    gaussian_nll = -ls.fit_gmm(two_component_samples(3000), 1, seed=0).score(test) / 4
    true_nll = -np.mean(np.log(sum(w * _gauss_pdf(test, m, c) for w, m, c in zip(WEIGHTS, MEANS, COVS,
                                                                                strict=True)))) / 4
    # Measured (300 steps): flow 1.41, truth 1.38, single Gaussian 1.63 nats per dimension.
    assert flow_nll < gaussian_nll - 0.15
    assert flow_nll == pytest.approx(true_nll, abs=0.07)
    assert fitted.held_out_nll < gaussian_nll - 0.15


def _gauss_pdf(x: np.ndarray, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    d = x - mean
    quad = np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
    return np.exp(-0.5 * quad) / np.sqrt(np.linalg.det(2 * np.pi * cov))


def test_flow_fit_is_seeded():
    z = two_component_samples(400)
    options = ls.FlowOptions(transforms=2, hidden=8, steps=20, eval_every=10)
    a, b, c = (ls.fit_flow(z, options, seed=s) for s in (3, 3, 4))
    for key, value in a.flow.state_dict().items():
        torch.testing.assert_close(b.flow.state_dict()[key], value, rtol=0, atol=0)
    assert a.held_out_nll == b.held_out_nll and a.held_out_nll != c.held_out_nll
    draw = lambda f: f.sample(5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(draw(a), draw(b), rtol=0, atol=0)
    assert not torch.allclose(draw(a), draw(c))
    with pytest.raises(ValueError, match="--flow: 19 fit tuples .* --sampler-fit"):
        ls.fit_flow(z[:19], options, seed=0)


def test_flow_view_decodes_the_flow_draws():
    model = tiny_model(prior="ebm")
    fitted = ls.fit_flow(two_component_samples(400), ls.FlowOptions(transforms=2, hidden=8, steps=10), seed=0)
    view = ls.FlowPrior(model, fitted)
    out = view.generate_joint(8, langevin_steps=5, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    expected = model.decode(fitted.sample(8, generator=gen), generator=gen)
    for name in model.modalities:
        torch.testing.assert_close(out[name], expected[name], rtol=0, atol=0)


def test_measure_reports_the_flow_beside_the_mixtures():
    model = tiny_model(prior="laplace", m=3, seed=1)
    chunks = [tiny_batch(model, 16, seed=s) for s in range(3)]
    judge = DigitJudge(CompareClassifiers())
    options = ls.FlowOptions(transforms=2, hidden=8, steps=20, eval_every=10)
    out = ls.measure(model, judge, chunks, components=[2], flow=options, num_samples=40, batch_size=16,
                     seed=0)
    assert list(out) == ["gmm_2", "flow_maf"]
    flow = out["flow_maf"]
    assert (flow["fit_tuples"], flow["held_out_tuples"], flow["n"]) == (44, 4, 40)
    assert 0.0 < flow["joint"] < 1.0 and flow["stderr"] > 0 and flow["fit_seconds"] > 0
    assert np.isfinite(flow["train_nll_per_dim"]) and np.isfinite(flow["held_out_nll_per_dim"])
    z = ls.aggregate_posterior_samples(model, chunks, seed=0)
    again = ls.fit_flow(z, options, seed=0)  # the same draws, split and seed as measure's fit
    assert flow["held_out_nll_per_dim"] == again.held_out_nll
    view = ls.FlowPrior(model, again)
    assert measure_joint(view, judge, num_samples=40, batch_size=16, seed=0)["coherence"] == flow["joint"]
    md = "\n".join(ls.report_lines({"coherence": {"joint": {"coherence": 0.5, "stderr": 0.05, "n": 40}},
                                     "latent_samplers": out}))
    assert f"| flow_maf | {fmt(flow['joint'])} |" in md and "best step" in md and "converged: " in md


def _flags(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    eval_command.add_sampler_arguments(parser)
    return parser.parse_args(list(argv))


def test_sampler_flags():
    assert eval_command.check_sampler_arguments(_flags("--gmm-components", "10")) is None
    flags = _flags("--flow", "--flow-steps", "50", "--flow-lr", "0.01")
    options = eval_command.check_sampler_arguments(flags)
    assert options == ls.FlowOptions(steps=50, lr=0.01)
    assert _flags("--gmm-fit", "30").sampler_fit == 30  # the older name still works
    for argv, message in ((["--flow-steps", "50"], "--flow-steps given without --flow"),
                          (["--flow", "--flow-lr", "0"], "--flow-lr 0.0: must be > 0"),
                          (["--flow", "--flow-transforms", "-1"], "--flow-transforms -1: must be > 0"),
                          (["--gmm-components", "0"], "--gmm-components \\[0\\]"),
                          (["--flow", "--sampler-fit", "0"], "--sampler-fit 0: must be >= 1")):
        with pytest.raises(SystemExit, match=message):
            eval_command.check_sampler_arguments(_flags(*argv))
