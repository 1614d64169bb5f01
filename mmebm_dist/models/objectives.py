"""Log importance weights of the multimodal ELBO and the estimators built on them (elbo, iwae, dreg).

Stratified (MoE; MMVAE/MMVAE+): for each modality r draw K particles (z, w_r) ~ q_r(z | x_r) q_r(w_r | x_r);
decode every modality d from z with w_r when d = r and a draw of d's private prior when d != r; then

    lw_r = sum_d log p(x_d | z, w)
           + beta * (log p(z) + log p(w_r) - log (1/M) sum_m q_m(z | x_m) - log q_r(w_r | x_r))

Joint (PoE/MoPoE): one stratum; z ~ q(z | X) (the aggregation's mixture of products), every modality keeps
its own w_d ~ q(w_d | x_d), and lw = sum_d [log p(x_d | z, w_d) + beta (log p(w_d) - log q(w_d | x_d))]
+ beta (log p(z) - log q(z | X)).

Incomplete tuples (``present`` [B, M] bool): only present modalities' likelihoods enter lw, q(z | X)
aggregates the present experts, and the strata of absent modalities get no weight (``stratum_weight``).

Estimators over the K particles of lw [S, K, B], averaged over strata S and batch B:
``elbo`` mean_k lw; ``iwae`` log mean_k exp lw; ``dreg`` the doubly-reparameterised IWAE gradient (Tucker et
al. 2019): the posterior parameters are cut from the log q terms, the surrogate is sum_k w~_k lw_k with
w~ = softmax_k(lw) held constant, and the gradient reaching the samples is scaled once more by w~_k (so the
encoder sees w~^2). With K = 1 ``dreg`` is the "sticking the landing" ELBO gradient.
Note: like MMVAE/MMVAE+, stratified dreg with K > 1 is not exactly unbiased for the stratified IWAE gradient
(its proposal is q_r while the weight uses the mixture); it is for M = 1 and for the joint (PoE/MoPoE) form.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mmebm_dist.models.aggregation import Aggregation, mixture_log_prob, sample_mixture
from mmebm_dist.models.likelihoods import Likelihood
from mmebm_dist.prior.densities import LocScaleFamily

OBJECTIVES = ("elbo", "iwae", "dreg")


@dataclass
class Experts:
    """Posterior parameters of every modality, stacked in modality order."""

    z_loc: torch.Tensor
    """[M, B, latent_dim]"""
    z_scale: torch.Tensor
    """[M, B, latent_dim]"""
    w_loc: torch.Tensor | None = None
    """[M, B, private_dim], or None without private latents."""
    w_scale: torch.Tensor | None = None
    """[M, B, private_dim], or None without private latents."""

    def detached(self) -> Experts:
        """The same parameters cut from the graph (DReG's stop-gradient in the log q terms)."""
        cut = (lambda t: None if t is None else t.detach())
        return Experts(cut(self.z_loc), cut(self.z_scale), cut(self.w_loc), cut(self.w_scale))


@dataclass
class LogWeights:
    """lw and its parts, plus the reparameterised samples they were computed at."""

    lw: torch.Tensor
    """[S, K, B] log importance weights (S strata, K particles)."""
    log_lik: torch.Tensor
    """[M, S, K, B] log p(x_d | z, w) per decoded modality d."""
    log_prior_z: torch.Tensor
    """[S, K, B] log p(z) (for the EBM prior: f(z) + log p0(z), without log Z)."""
    log_q_z: torch.Tensor
    """[S, K, B] log q(z | X) (the mixture density)."""
    log_prior_w: torch.Tensor
    """[S, K, B] log p(w) of the private latents in the weight (0 without them)."""
    log_q_w: torch.Tensor
    """[S, K, B] log q(w | x) of the private latents in the weight (0 without them)."""
    z: torch.Tensor
    """[S, K, B, latent_dim] samples of z."""
    w: torch.Tensor | None
    """Posterior samples of the private latents: [M, K, B, private_dim] (stratified: w_r of stratum r)."""
    w_cross: torch.Tensor | None = None
    """Stratified only: [M(r), M(d), K, B, private_dim] private-prior draws decoding d != r."""
    stratum_weight: torch.Tensor | None = None
    """[S, B] weight of each stratum in its tuple's average (incomplete tuples: 1 / #present on the present
    strata, 0 on the absent); None: every stratum counts alike."""

    def average(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of a per-stratum, per-tuple figure t [S, B] over strata (weighted) and tuples."""
        if self.stratum_weight is None:
            return t.mean()
        return (t * self.stratum_weight).sum(0).mean()


def _decode_log_lik(x: torch.Tensor, u: torch.Tensor, decoder: Callable,
                    likelihood: Likelihood) -> torch.Tensor:
    """log p(x | decoder(u)) for u [..., B, D] and x [B, *shape] -> [..., B] (one decoder call)."""
    lead = u.shape[:-1]
    params = decoder(u.reshape(-1, u.shape[-1])).float()  # float32 log-density under bf16 autocast
    params = params.reshape(*lead, *params.shape[1:])
    return likelihood.log_prob(x, params)


def stratified_log_weights(x: list[torch.Tensor], experts: Experts, *, decoders: list[Callable],
                           likelihoods: list[Likelihood], family: LocScaleFamily,
                           log_prior_z: Callable[[torch.Tensor], torch.Tensor],
                           private_prior_scale: torch.Tensor | None, particles: int, beta: float,
                           stop_q_grad: bool = False, generator: torch.Generator | None = None,
                           present: torch.Tensor | None = None) -> LogWeights:
    """The MMVAE+ stratified log weights, one stratum per modality r: lw [M, K, B] (formula: module doc).

    ``private_prior_scale`` [M, private_dim] is the scale of each modality's private prior used for the
    cross-reconstruction draws (MMVAE+'s learned-scale Laplace); log p(w_r) uses the unit-scale prior.
    """
    m, k = len(x), particles
    q = experts.detached() if stop_q_grad else experts
    eps = family.standard_noise((m, k, *experts.z_loc.shape[1:]), generator=generator,
                                device=experts.z_loc.device, dtype=experts.z_loc.dtype)
    z = experts.z_loc.unsqueeze(1) + experts.z_scale.unsqueeze(1) * eps  # (M, K, B, dz)
    # log q(z | X) of stratum r's particles under each expert m, mixed: (M(r), M(m), K, B) -> (M, K, B)
    lq_each = family.log_prob(z.unsqueeze(1), q.z_loc[None, :, None], q.z_scale[None, :, None])
    if present is None:
        log_q_z = torch.logsumexp(lq_each, dim=1) - math.log(m)
    else:  # the mixture of the present experts only
        lq_each = lq_each.masked_fill(~present.T[None, :, None, :], -math.inf)
        log_q_z = torch.logsumexp(lq_each, dim=1) - present.sum(1).to(lq_each.dtype).log()
    log_prior = log_prior_z(z)

    w = w_cross = None
    zero = torch.zeros_like(log_q_z)
    log_prior_w, log_q_w = zero, zero
    if experts.w_loc is not None:
        eps_w = family.standard_noise((m, k, *experts.w_loc.shape[1:]), generator=generator,
                                      device=z.device, dtype=z.dtype)
        w = experts.w_loc.unsqueeze(1) + experts.w_scale.unsqueeze(1) * eps_w  # (M, K, B, dw)
        log_q_w = family.log_prob(w, q.w_loc.unsqueeze(1), q.w_scale.unsqueeze(1))
        log_prior_w = family.log_prob(w, 0.0, 1.0)
        if m > 1:
            cross_eps = family.standard_noise((m, *w.shape), generator=generator, device=z.device,
                                              dtype=z.dtype)
            w_cross = private_prior_scale[None, :, None, None, :] * cross_eps  # (M(r), M(d), K, B, dw)

    log_lik = []
    for d in range(m):
        if w is None:
            u = z
        else:
            w_for_d = torch.stack([w[r] if r == d else w_cross[r, d] for r in range(m)])  # (M(r), K, B, dw)
            u = torch.cat([w_for_d, z], dim=-1)
        log_lik.append(_decode_log_lik(x[d], u, decoders[d], likelihoods[d]))
    log_lik = torch.stack(log_lik)  # (M(d), M(r), K, B)
    stratum_weight = None
    if present is not None:
        log_lik = torch.where(present.T[:, None, None, :], log_lik, 0.0)
        dtype = log_lik.dtype
        stratum_weight = present.T.to(dtype) / present.sum(1).to(dtype)
    lw = log_lik.sum(0) + beta * (log_prior + log_prior_w - log_q_z - log_q_w)
    return LogWeights(lw, log_lik, log_prior, log_q_z, log_prior_w, log_q_w, z, w, w_cross, stratum_weight)


def joint_log_weights(x: list[torch.Tensor], experts: Experts, *, aggregation: Aggregation,
                      decoders: list[Callable], likelihoods: list[Likelihood], family: LocScaleFamily,
                      log_prior_z: Callable[[torch.Tensor], torch.Tensor], particles: int, beta: float,
                      stop_q_grad: bool = False, generator: torch.Generator | None = None,
                      present: torch.Tensor | None = None) -> LogWeights:
    """The standard (non-stratified) log weights with q(z | X) of the aggregation: lw [1, K, B]."""
    valid = None
    if present is None:
        loc, scale = aggregation.components(experts.z_loc, experts.z_scale)  # (C, B, dz)
    else:
        loc, scale, valid = aggregation.masked_components(experts.z_loc, experts.z_scale, present)
    z = sample_mixture(loc, scale, family, particles, generator=generator, valid=valid).unsqueeze(0)
    if stop_q_grad:
        loc, scale = loc.detach(), scale.detach()
    log_q_z = mixture_log_prob(z, loc, scale, family, valid=valid)  # (1, K, B)
    log_prior = log_prior_z(z)

    w = None
    zero = torch.zeros_like(log_q_z)
    log_prior_w, log_q_w = zero, zero
    if experts.w_loc is not None:
        q = experts.detached() if stop_q_grad else experts
        w = family.rsample(experts.w_loc, experts.w_scale, (particles,), generator=generator).transpose(0, 1)
        log_q_w = family.log_prob(w, q.w_loc.unsqueeze(1), q.w_scale.unsqueeze(1))  # (M, K, B)
        log_prior_w = family.log_prob(w, 0.0, 1.0)
        if present is not None:  # absent modalities' private latents are not part of the model of x_present
            log_q_w = torch.where(present.T[:, None, :], log_q_w, 0.0)
            log_prior_w = torch.where(present.T[:, None, :], log_prior_w, 0.0)
        log_q_w, log_prior_w = log_q_w.sum(0, keepdim=True), log_prior_w.sum(0, keepdim=True)  # (1, K, B)

    log_lik = []
    for d in range(len(x)):
        u = z if w is None else torch.cat([w[d].unsqueeze(0), z], dim=-1)
        log_lik.append(_decode_log_lik(x[d], u, decoders[d], likelihoods[d]))
    log_lik = torch.stack(log_lik)  # (M, 1, K, B)
    if present is not None:
        log_lik = torch.where(present.T[:, None, None, :], log_lik, 0.0)
    lw = log_lik.sum(0) + beta * (log_prior + log_prior_w - log_q_z - log_q_w)
    return LogWeights(lw, log_lik, log_prior, log_q_z, log_prior_w, log_q_w, z, w)


def log_mean_exp(t: torch.Tensor, dim: int) -> torch.Tensor:
    """log mean exp over ``dim``, stable."""
    return torch.logsumexp(t, dim=dim) - math.log(t.shape[dim])


def estimate(weights: LogWeights, objective: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(surrogate to maximise, bound value), both scalars averaged over strata and batch.

    For ``dreg`` this registers the w~ gradient hooks on the samples, so call it once per forward.
    """
    lw = weights.lw
    if objective == "elbo":
        value = weights.average(lw.mean(1))
        return value, value
    value = weights.average(log_mean_exp(lw, 1))
    if objective == "iwae":
        return value, value
    if objective == "dreg":
        wt = torch.softmax(lw.detach(), dim=1)  # (S, K, B), normalised over particles
        for sample in (weights.z, weights.w):
            if sample is not None and sample.requires_grad:
                sample.register_hook(lambda grad: grad * wt.unsqueeze(-1))
        return weights.average((wt * lw).sum(1)), value.detach()
    raise ValueError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")
