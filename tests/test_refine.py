"""Posterior refinement: K = 0 is plain conditional generation bit for bit, K > 0 climbs log p(x_S | z) +
log p(z), and the measurement at K = 0 reproduces the plain cross coherence."""

from __future__ import annotations

import pytest
import torch
from beyond_helpers import tiny_batch, tiny_model

from mmebm_dist.evaluate.coherence import measure_coherence
from mmebm_dist.evaluate.judges.digits import DigitJudge
from mmebm_dist.evaluate.refine import RefinedPosterior, measure_refinement, refine_posterior


@pytest.mark.parametrize("prior,aggregation,posterior", [("ebm", "moe", "laplace"),
                                                         ("laplace", "moe", "laplace"),
                                                         ("gaussian", "mopoe", "gaussian")])
def test_zero_steps_is_plain_conditional_generation_bit_for_bit(prior, aggregation, posterior):
    model = tiny_model(prior=prior, aggregation=aggregation, posterior=posterior)
    batch = tiny_batch(model, 7)
    for sources in (["v0"], ["v1", "v2"]):
        plain = model.generate_conditional(batch, sources, generator=torch.Generator().manual_seed(4))
        refined = RefinedPosterior(model, steps=0, step_size=0.1).generate_conditional(
            batch, sources, generator=torch.Generator().manual_seed(4))
        assert plain.keys() == refined.keys()
        for name in plain:
            assert torch.equal(plain[name], refined[name])
    other = RefinedPosterior(model, steps=3, step_size=0.1).generate_conditional(
        batch, ["v0"], generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other["v1"], plain["v1"])


def _log_target(model, batch, sources, z):
    experts = model.encode(batch, sources)
    total = model.log_prior_z(z)
    for i, name in enumerate(sources):
        u = torch.cat([experts.w_loc[i], z], dim=-1)
        total = total + model.likelihoods[name].log_prob(batch[name], model.decoders[name](u))
    return total


def test_refinement_climbs_the_unnormalised_posterior():
    model = tiny_model(prior="ebm")
    batch = tiny_batch(model, 64)
    sources = ["v0", "v1"]
    z0 = torch.full((64, 4), 4.0)  # a poor start, far out in the prior's tail
    z = refine_posterior(model, batch, sources, z0, steps=50, step_size=0.3,
                         generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before, after = _log_target(model, batch, sources, z0), _log_target(model, batch, sources, z)
    assert after.mean() > before.mean() + 4.0


class FirstCoordinate:
    """Labels a 6-D vector by its first coordinate cut into 10 bins (a deterministic stand-in judge)."""

    def predict(self, name, x):
        return (x[:, 0].clamp(0, 0.999) * 10).long()


def test_measure_at_zero_steps_reproduces_plain_cross_coherence_and_reports_cost():
    model = tiny_model(prior="laplace")
    chunks = [tiny_batch(model, 6, seed=i) for i in range(2)]
    plain = measure_coherence(model, DigitJudge(FirstCoordinate()), chunks, num_samples=4, batch_size=6,
                              seed=2, subset_sizes=(2,), aggregate=False)
    out = measure_refinement(model, FirstCoordinate(), chunks, steps=[0, 2], step_size=0.05, seed=2,
                             subset_sizes=(2,),
                             frechet=lambda view: {"cross": {"mean": float(view.steps)}})
    assert [e["steps"] for e in out] == [0, 2]
    assert out[0]["cross"] == plain["cross"]["coherence"]
    assert out[0]["cross_stderr"] == plain["cross"]["stderr"]
    assert out[0]["subsets"]["2"] == plain["subsets"]["2"]["coherence"]
    assert out[0]["n"] == 12 and all(e["ms_per_sample"] > 0 for e in out)
    assert out[1]["frechet_cross"] == {"mean": 2.0}
