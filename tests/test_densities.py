"""Reference densities p0 and the location-scale posterior families against torch.distributions."""

import math

import pytest
import torch
from torch import distributions as D

from mmebm_dist.prior.densities import ETA, posterior_family, reference_density


def _torch_dist(name, loc, scale):
    return D.Laplace(loc, scale) if name == "laplace" else D.Normal(loc, scale)


@pytest.mark.parametrize("name", ["laplace", "gaussian"])
@pytest.mark.parametrize("scale", [0.5, 1.0, 2.0])
def test_reference_log_prob_and_score_match_torch(name, scale):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 7, generator=g, dtype=torch.float64) * 2
    p0 = reference_density(name, scale)
    ref = _torch_dist(name, torch.zeros(()), torch.tensor(scale, dtype=torch.float64))
    torch.testing.assert_close(p0.log_prob(z), ref.log_prob(z).sum(-1))  # float64: default tight tolerances
    zz = z.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(ref.log_prob(zz).sum(), zz)
    torch.testing.assert_close(p0.score(z), score)


@pytest.mark.parametrize("name", ["laplace", "gaussian"])
def test_reference_samples_have_the_right_moments(name):
    scale = 1.7
    z = reference_density(name, scale).sample((200_000,), generator=torch.Generator().manual_seed(1))
    # Laplace(0, b): E|z| = b; N(0, s^2): E|z| = s sqrt(2/pi). 200k draws: std error ~0.3%, tolerance 1.5%.
    expected = scale if name == "laplace" else scale * math.sqrt(2 / math.pi)
    assert abs(z.abs().mean().item() / expected - 1) < 0.015
    assert abs(z.mean().item()) < 0.02


def test_reference_rejects_unknown_names_and_bad_scales():
    with pytest.raises(ValueError, match="unknown reference density 'cauchy'"):
        reference_density("cauchy")
    with pytest.raises(ValueError, match="positive"):
        reference_density("laplace", 0.0)


@pytest.mark.parametrize("name", ["laplace", "gaussian"])
def test_posterior_family_log_prob_matches_torch(name):
    g = torch.Generator().manual_seed(2)
    fam = posterior_family(name)
    loc = torch.randn(3, 5, 6, generator=g, dtype=torch.float64)
    scale = torch.rand(3, 5, 6, generator=g, dtype=torch.float64) + 0.1
    x = torch.randn(4, 1, 5, 6, generator=g, dtype=torch.float64)  # broadcasts against [3, 5, 6]
    torch.testing.assert_close(fam.log_prob(x, loc, scale), _torch_dist(name, loc, scale).log_prob(x).sum(-1))
    # Scalar location/scale (the unit-scale private prior).
    torch.testing.assert_close(fam.log_prob(x, 0.0, 1.0),
                               _torch_dist(name, torch.zeros(()), torch.ones((), dtype=torch.float64))
                               .log_prob(x).sum(-1))


@pytest.mark.parametrize("name", ["laplace", "gaussian"])
def test_posterior_family_rsample_is_reparameterised(name):
    fam = posterior_family(name)
    loc = torch.tensor([[1.0, -2.0]], requires_grad=True)
    scale = torch.tensor([[0.5, 3.0]], requires_grad=True)
    z = fam.rsample(loc, scale, (100_000,), generator=torch.Generator().manual_seed(3))
    assert z.shape == (100_000, 1, 2)
    z.sum().backward()
    assert torch.equal(loc.grad, torch.full_like(loc, 100_000.0))  # dz/dloc = 1 for every draw
    eps = (z.detach() - loc.detach()) / scale.detach()
    expected = 1.0 if name == "laplace" else math.sqrt(2 / math.pi)  # E|eps| of the unit member
    assert torch.allclose(eps.abs().mean(0), torch.full((1, 2), expected), rtol=0.02)
    torch.testing.assert_close(scale.grad, eps.sum(0), rtol=1e-4, atol=1e-2)  # dz/dscale = eps


def test_laplace_scale_is_mmvaeplus_softmax_and_gaussian_is_softplus():
    raw = torch.randn(4, 32, generator=torch.Generator().manual_seed(4))
    lap = posterior_family("laplace").scale_from_raw(raw)
    torch.testing.assert_close(lap.sum(-1), torch.full((4,), 32 + 32 * ETA))  # scales of a sample sum to d
    torch.testing.assert_close(lap, torch.softmax(raw, -1) * 32 + ETA)
    torch.testing.assert_close(posterior_family("gaussian").scale_from_raw(raw),
                               torch.nn.functional.softplus(raw) + ETA)
    with pytest.raises(ValueError, match="unknown posterior family"):
        posterior_family("student")
