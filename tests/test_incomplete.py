"""Incomplete tuples (batch["present"]): all present changes nothing bit for bit; an absent modality's
content changes nothing; the masked aggregations use exactly the present experts; the EBM's positives come
from the present strata."""

from __future__ import annotations

import pytest
import torch
from beyond_helpers import tiny_batch, tiny_model

from mmebm_dist.models.aggregation import build_aggregation, mixture_log_prob, sample_mixture
from mmebm_dist.prior.densities import posterior_family

CASES = [("ebm", "moe", "laplace"), ("laplace", "moe", "laplace"), ("ebm", "poe", "gaussian"),
         ("gaussian", "mopoe", "gaussian")]


def _terms(model, batch, seed=0):
    torch.manual_seed(seed)
    out = model.compute(batch)
    out["loss"].backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("prior,aggregation,posterior", CASES)
def test_all_present_gives_the_same_loss_and_gradients_bit_for_bit(prior, aggregation, posterior):
    model = tiny_model(prior=prior, aggregation=aggregation, posterior=posterior).train()
    batch = tiny_batch(model, 6)
    plain, plain_grads = _terms(model, batch)
    masked, masked_grads = _terms(model, batch | {"present": torch.ones(6, 3, dtype=torch.bool)})
    for key, value in plain.items():
        assert torch.equal(value, masked[key]), key
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, masked_grads, strict=True))


PRESENT = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [1, 1, 0], [0, 1, 0], [1, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("prior,aggregation,posterior", CASES)
@pytest.mark.parametrize("objective,particles", [("elbo", 1), ("dreg", 3)])
def test_an_absent_modalitys_content_changes_nothing(prior, aggregation, posterior, objective, particles):
    model = tiny_model(prior=prior, aggregation=aggregation, posterior=posterior).train()
    model.cfg.objective, model.cfg.particles = objective, particles
    batch = tiny_batch(model, 6) | {"present": PRESENT}
    other = dict(batch)
    for m, name in enumerate(model.modalities):  # new content wherever the modality is absent
        other[name] = torch.where(PRESENT[:, m, None], batch[name], torch.rand_like(batch[name]) * 7)
    a, grads_a = _terms(model, batch)
    b, grads_b = _terms(model, other)
    assert torch.isfinite(a["loss"])
    for key in a:
        if key not in ("_z_neg",):
            assert torch.equal(a[key], b[key]), key
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b, strict=True))
    if prior == "ebm" and aggregation == "moe":  # one positive per present (stratum, tuple)
        assert a["_z_pos"].shape[0] == int(PRESENT.sum()) * particles


@pytest.mark.parametrize("name", ["moe", "poe", "mopoe"])
def test_masked_components_are_those_of_the_present_experts(name):
    agg, family = build_aggregation(name), posterior_family("gaussian")
    g = torch.Generator().manual_seed(0)
    loc, scale = torch.randn(3, 6, 2, generator=g), torch.rand(3, 6, 2, generator=g) + 0.5
    m_loc, m_scale, valid = agg.masked_components(loc, scale, PRESENT)
    z = torch.randn(4, 6, 2, generator=g)
    masked = mixture_log_prob(z, m_loc, m_scale, family, valid=valid)
    for b in range(6):
        idx = PRESENT[b].nonzero().flatten()
        sub_loc, sub_scale = agg.components(loc[idx, b:b + 1], scale[idx, b:b + 1])
        torch.testing.assert_close(masked[:, b:b + 1], mixture_log_prob(z[:, b:b + 1], sub_loc, sub_scale,
                                                                      family))
    if name == "moe":  # with narrow experts each draw sits on the expert it came from: always a present one
        draws = sample_mixture(loc, torch.full_like(scale, 1e-4), family, 500, generator=g, valid=valid)
        chosen = (draws[:, :, None] - loc.permute(1, 0, 2)[None]).abs().sum(-1).argmin(-1)  # (K, B)
        assert PRESENT[torch.arange(6).expand(500, 6), chosen].all()
        assert all(len(chosen[:, b].unique()) == int(PRESENT[b].sum()) for b in range(6))  # and all of them


def test_presence_mask_errors_name_the_problem():
    model = tiny_model()
    batch = tiny_batch(model, 4)
    with pytest.raises(ValueError, match=r"bool \[B, M\]"):
        model.compute(batch | {"present": torch.ones(4, 2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no modality present"):
        model.compute(batch | {"present": torch.zeros(4, 3, dtype=torch.bool)})
