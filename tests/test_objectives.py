"""The objectives against slow, written-out computations of their formulas, and the EBM surrogate's gradient.

The written-out versions loop over strata r and decoded modalities d with torch.distributions objects, at the
very samples the model drew (captured), re-expressed as loc + scale * eps so gradients flow the same way.
"""

import math

import pytest
import torch
from torch import distributions as D

import mmebm_dist.models.multimodal_vae as mvae
from mmebm_dist.config import LangevinConfig, ModalityConfig, ModelConfig, PriorConfig
from mmebm_dist.models import build_model

B = 4


def tiny_config(*, m=3, private=2, aggregation="moe", posterior="laplace", objective="elbo", particles=1,
                prior="laplace", beta=2.5, likelihood="laplace") -> ModelConfig:
    mods = [ModalityConfig(name=f"x{i}", shape=(i + 2,), family="mlp", likelihood=likelihood,
                           likelihood_scale=0.75) for i in range(m)]
    return ModelConfig(modalities=mods, latent_dim=3, private_dim=private, width=2, aggregation=aggregation,
                       posterior=posterior, objective=objective, particles=particles, beta=beta,
                       prior=PriorConfig(kind=prior, hidden=8, layers=1, energy_l2=0.3,
                                         langevin=LangevinConfig(steps=3, step_size=0.3, backend="autograd")))


def tiny_batch(cfg: ModelConfig, b: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m.name: torch.rand(b, *m.shape, generator=g) for m in cfg.modalities}


def _dist(family, loc, scale):
    return D.Laplace(loc, scale) if family == "laplace" else D.Normal(loc, scale)


def _capture(monkeypatch, name):
    """Wrap the model module's reference to an objective function and keep what it returned."""
    seen = {}
    original = getattr(mvae, name)

    def wrapper(*args, **kwargs):
        seen["weights"] = original(*args, **kwargs)
        return seen["weights"]

    monkeypatch.setattr(mvae, name, wrapper)
    return seen


def _log_lik(model, name, params, x):
    lik = model.likelihoods[name]
    if model.cfg.modalities[0].likelihood == "laplace":
        lp = D.Laplace(params, lik.scale).log_prob(x)
    else:
        lp = D.Bernoulli(logits=params).log_prob(x)
    return lp.flatten(start_dim=params.dim() - 1).sum(-1)


def written_out_stratified(model, batch, captured):
    """lw [M, K, B] of the stratified objective, loop by loop, at the captured samples."""
    cfg, names, fam = model.cfg, model.modalities, model.cfg.posterior
    m, dz, dw = len(names), cfg.latent_dim, cfg.private_dim
    enc = [model.encoders[n](batch[n]) for n in names]
    qz = [_dist(fam, e.z_loc, model.family.scale_from_raw(e.z_raw)) for e in enc]
    qw = [_dist(fam, e.w_loc, model.family.scale_from_raw(e.w_raw)) for e in enc]
    unit = _dist(fam, torch.zeros(()), torch.ones(()))
    prior_z = D.Laplace(torch.zeros(()), torch.ones(()))
    aux_scale = torch.softmax(model.private_prior_raw, -1) * dw
    lws = []
    for r in range(m):
        z = qz[r].loc + qz[r].scale * ((captured.z[r] - qz[r].loc) / qz[r].scale).detach()
        w_r = qw[r].loc + qw[r].scale * ((captured.w[r] - qw[r].loc) / qw[r].scale).detach()
        log_q_z = torch.logsumexp(torch.stack([q.log_prob(z).sum(-1) for q in qz]), 0) - math.log(m)
        log_p_z = prior_z.log_prob(z).sum(-1)
        if model.energy is not None:
            log_p_z = log_p_z + model.energy(z.reshape(-1, dz)).reshape(z.shape[:-1])
        log_lik = 0.0
        for d, name in enumerate(names):
            w = w_r if d == r else aux_scale[d] * (captured.w_cross[r, d] / aux_scale[d]).detach()
            params = model.decoders[name](torch.cat([w, z], -1).reshape(-1, dw + dz))
            log_lik = log_lik + _log_lik(model, name, params.reshape(*z.shape[:-1], -1), batch[name])
        lws.append(log_lik + cfg.beta * (log_p_z + unit.log_prob(w_r).sum(-1) - log_q_z - qw[r].log_prob(w_r).sum(-1)))
    return torch.stack(lws)


def _reduce(lw, objective):
    if objective == "elbo":
        return lw.mean(1).mean()
    return (torch.logsumexp(lw, 1) - math.log(lw.shape[1])).mean()


def _grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("prior,objective,particles", [("laplace", "elbo", 1), ("laplace", "iwae", 3),
                                                        ("ebm", "elbo", 1), ("ebm", "iwae", 2)])
def test_stratified_objective_matches_the_written_out_formula(monkeypatch, prior, objective, particles):
    torch.manual_seed(0)
    cfg = tiny_config(prior=prior, objective=objective, particles=particles)
    model, batch = build_model(cfg), tiny_batch(cfg)
    seen = _capture(monkeypatch, "stratified_log_weights")
    out = model(batch)
    captured = seen["weights"]
    assert captured.lw.shape == (3, particles, B)
    assert captured.w_cross.shape == (3, 3, particles, B, 2)
    lw = written_out_stratified(model, batch, captured)
    torch.testing.assert_close(captured.lw, lw, rtol=1e-5, atol=1e-4)  # float32, sums of ~50 terms
    expected = _reduce(lw, objective)
    torch.testing.assert_close(out["elbo"], expected.detach(), rtol=1e-5, atol=1e-4)
    # Encoder, decoder and private-prior gradients: the model's loss equals -objective for them (the EBM's
    # own loss touches only the energy), so they must match the written-out objective's gradients.
    params = [p for n, p in model.named_parameters() if not n.startswith("energy.")]
    out["loss"].backward()
    got = _grads(params)
    model.zero_grad()
    (-_reduce(written_out_stratified(model, batch, captured), objective)).backward()
    for g, w, p in zip(got, _grads(params), params, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5, msg=lambda s, p=p: f"{p.shape}: {s}")
    if prior == "laplace":
        torch.testing.assert_close(out["loss"], -expected.detach(), rtol=1e-5, atol=1e-4)
