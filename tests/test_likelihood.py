"""log Z of the EBM prior (Monte Carlo and AIS against the exact value of a quadratic f over a Gaussian
reference) and the importance-weighted test log-likelihood."""

from __future__ import annotations

import math

import pytest
import torch
from beyond_helpers import tiny_batch, tiny_model

from mmebm_dist.evaluate.likelihood import (
    importance_log_likelihood,
    log_mean_exp_with_stderr,
    log_normalizer,
    log_normalizer_ais,
    log_normalizer_mc,
    measure_likelihood,
)
from mmebm_dist.prior.densities import reference_density


def quadratic(a: float):
    """f(z) = -a |z|^2 / 2; over p0 = N(0, s^2 I_d): log Z = -d/2 log(1 + a s^2)."""
    return lambda z: -0.5 * a * (z**2).sum(-1)


def exact_log_z(a: float, s: float, d: int) -> float:
    return -0.5 * d * math.log1p(a * s * s)


def test_log_mean_exp_error_is_zero_for_equal_weights_and_ess_counts_them():
    est, se, ess = log_mean_exp_with_stderr(torch.full((10,), 3.0))
    assert est == pytest.approx(3.0) and se == 0.0 and ess == pytest.approx(10.0)


@pytest.mark.parametrize("a,s,d", [(0.5, 1.0, 4), (-0.3, 1.2, 3)])
def test_monte_carlo_log_z_matches_the_exact_value(a, s, d):
    p0 = reference_density("gaussian", s)
    out = log_normalizer_mc(quadratic(a), p0, d, num_samples=40_000,
                            generator=torch.Generator().manual_seed(0))
    exact = exact_log_z(a, s, d)
    assert 0 < out["stderr"] < 0.02
    assert abs(out["log_z"] - exact) < 4 * out["stderr"]


def test_ais_matches_the_exact_value_where_plain_monte_carlo_is_poor():
    a, s, d = 20.0, 1.0, 6  # exp(f) concentrates far inside p0: plain MC has an ESS of a few percent
    p0 = reference_density("gaussian", s)
    exact = exact_log_z(a, s, d)
    mc = log_normalizer_mc(quadratic(a), p0, d, num_samples=2000, generator=torch.Generator().manual_seed(0))
    ais = log_normalizer_ais(quadratic(a), p0, d, chains=400, temperatures=300, step_size=0.3,
                             generator=torch.Generator().manual_seed(1))
    assert mc["ess"] < 0.05 * mc["n"] and ais["ess"] > 0.3 * ais["n"]
    assert ais["stderr"] < mc["stderr"]
    assert abs(ais["log_z"] - exact) < 4 * ais["stderr"] + 0.01
    assert 0.2 < ais["acceptance"] <= 1.0


def test_log_normalizer_of_a_constant_energy_is_that_constant_with_no_error():
    model = tiny_model(prior="ebm")
    last = model.energy.linears[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(1.7)
    out = log_normalizer(model, num_samples=500, max_stderr=0.05, ais_chains=10, ais_temperatures=2,
                         ais_step_size=0.1)
    assert out["method"] == "mc" and out["log_z"] == pytest.approx(1.7, abs=1e-6) and out["stderr"] < 1e-6


def test_more_particles_tighten_the_bound():
    model = tiny_model(prior="laplace")
    batch = tiny_batch(model, 16)
    few = importance_log_likelihood(model, batch, model.modalities, particles=1,
                                    generator=torch.Generator().manual_seed(0))
    many = importance_log_likelihood(model, batch, model.modalities, particles=500, particle_batch=64,
                                     generator=torch.Generator().manual_seed(0))
    assert few.shape == many.shape == (16,)
    assert many.mean() > few.mean() + 0.1  # an untrained posterior: a wide IWAE gap


def test_an_ebm_with_constant_energy_has_the_fixed_priors_likelihood_once_log_z_is_subtracted():
    ebm, laplace = tiny_model(prior="ebm"), tiny_model(prior="laplace")
    laplace.load_state_dict({k: v for k, v in ebm.state_dict().items() if not k.startswith("energy.")})
    with torch.no_grad():
        ebm.energy.linears[-1].weight.zero_()
        ebm.energy.linears[-1].bias.fill_(-2.5)
    chunks = [tiny_batch(ebm, 4, seed=i) for i in range(2)]
    log_z = log_normalizer(ebm, num_samples=200, max_stderr=0.1, ais_chains=10, ais_temperatures=2,
                           ais_step_size=0.1)
    got = measure_likelihood(ebm, chunks, particles=20, seed=0, log_z=log_z)
    want = measure_likelihood(laplace, chunks, particles=20, seed=0)
    assert got["n"] == 8 and set(got["unimodal"]) == {"v0", "v1", "v2"}
    assert got["joint"]["mean"] == pytest.approx(want["joint"]["mean"], abs=1e-5)
    for m in ebm.modalities:
        assert got["unimodal"][m]["mean"] == pytest.approx(want["unimodal"][m]["mean"], abs=1e-5)
    assert want["joint"]["mean"] < min(want["unimodal"][m]["mean"] for m in ebm.modalities)


def test_a_replaced_prior_scores_the_same_tuples_and_particles_under_that_density():
    """log_prior_z = p0 alone: for f = -2.5 everywhere the EBM's unnormalised log p(X) is p0's minus 2.5 on
    every tuple (same draws), so the replacement is what is scored, paired with the prior's own figure."""
    ebm = tiny_model(prior="ebm")
    with torch.no_grad():
        ebm.energy.linears[-1].weight.zero_()
        ebm.energy.linears[-1].bias.fill_(-2.5)
    chunks = [tiny_batch(ebm, 4, seed=i) for i in range(2)]
    unnormalised = measure_likelihood(ebm, chunks, particles=20, seed=0)
    reference = measure_likelihood(ebm, chunks, particles=20, seed=0, log_prior_z=ebm.p0.log_prob)
    assert reference["joint"]["mean"] - unnormalised["joint"]["mean"] == pytest.approx(2.5, abs=1e-5)


def test_replacing_priors_are_scored_on_the_same_draws_with_their_paired_difference():
    """priors=: each density scores the joint log p(X) exactly as a separate log_prior_z run would (same
    tuples and draws), and its paired difference to the model's figure is the difference of the two means
    with log Z added back; scoring the model's own fixed prior as a replacement gives 0 +- 0."""
    ebm = tiny_model(prior="ebm")
    with torch.no_grad():
        ebm.energy.linears[-1].weight.normal_(0, 0.3)
    chunks = [tiny_batch(ebm, 4, seed=i) for i in range(3)]
    log_z = {"log_z": 0.7, "stderr": 0.2}
    got = measure_likelihood(ebm, chunks, particles=20, seed=0, log_z=log_z, priors={"p0": ebm.p0.log_prob})
    alone = measure_likelihood(ebm, chunks, particles=20, seed=0, log_prior_z=ebm.p0.log_prob, unimodal=False)
    p0 = got["priors"]["p0"]
    assert p0["mean"] == pytest.approx(alone["joint"]["mean"], abs=1e-9)
    assert p0["minus_prior"]["mean"] == pytest.approx(p0["mean"] - got["joint"]["mean"], abs=1e-6)
    # the per-tuple difference varies less than either figure (the tuples' spread cancels), log Z's error adds
    assert 0 < p0["minus_prior"]["stderr"] < min(p0["stderr"], got["joint"]["stderr"])
    assert p0["minus_prior"]["stderr_total"] == pytest.approx(math.hypot(p0["minus_prior"]["stderr"], 0.2))
    laplace = tiny_model(prior="laplace")
    same = measure_likelihood(laplace, chunks, particles=20, seed=0, priors={"own": laplace.p0.log_prob})
    assert same["priors"]["own"]["minus_prior"]["mean"] == pytest.approx(0.0, abs=1e-9)
    assert same["priors"]["own"]["minus_prior"]["stderr"] == pytest.approx(0.0, abs=1e-6)
