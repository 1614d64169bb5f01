"""Post-hoc latent samplers: the Gaussian mixture fit, the model view drawing z from it, the joint figure on
the prior's seeded draws, and the report / results tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from beyond_helpers import tiny_batch, tiny_model

from mmebm_dist.evaluate import latent_samplers as ls
from mmebm_dist.evaluate.coherence import measure_coherence, measure_joint
from mmebm_dist.evaluate.judges.digits import DigitJudge

WEIGHTS = np.array([0.3, 0.7])
MEANS = np.array([[-4.0, 0.0, 1.0, 0.0], [4.0, 1.0, -1.0, 2.0]])
COVS = np.stack([np.diag([1.0, 0.5, 0.3, 2.0]),
                 np.array([[1.0, 0.6, 0, 0], [0.6, 1.0, 0, 0], [0, 0, 0.4, 0], [0, 0, 0, 0.8]])])


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
    runs = [{"name": "r0", "prior": "laplace", "joint_coherence": 0.5, "joint_stderr": 0.05,
             "latent_samplers": ls.run_entries(results)},
            {"name": "r1", "prior": "laplace", "joint_coherence": 0.4, "joint_stderr": 0.05}]
    lines = ls.results_lines(runs)
    assert lines[-1].startswith("| r0 | laplace | 0.5000 ± 0.0500 |") and "r1" not in "\n".join(lines)
    assert ls.results_lines(runs[1:]) == []
