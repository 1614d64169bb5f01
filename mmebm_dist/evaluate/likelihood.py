"""Test log-likelihood by importance weighting, and the EBM prior's log normaliser log Z with its error.

log p(x_S) ~= log (1/K) sum_k p(x_S | z_k, w_k) p(z_k) p(w_k) / (q(z_k | x_S) q(w_k | x_S)), (z_k, w_k) ~ q:
the IWAE bound with K particles (Burda et al. 2016), proposal q(z | x_S) of the model's aggregation. For the
EBM prior p(z) = exp(f(z)) p0(z) / Z, so log Z is subtracted once per tuple. It is estimated by Monte Carlo
from the reference, log Z = log E_p0[exp f], with the delta-method standard error sd(w) / (sqrt(n) mean(w)),
and by annealed importance sampling (Neal 2001; MALA transitions, exact for every intermediate density) when
that error is too large. Both are slightly biased low in log (Jensen); log p(X) then errs high by as much.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from mmebm_dist.evaluate.coherence import (
    AllReduce,
    Batch,
    chunk_seed,
    chunk_sizes,
    distributed_sum,
    mean_stderr,
    my_chunks,
    seeded,
)
from mmebm_dist.models.objectives import joint_log_weights
from mmebm_dist.prior.densities import ReferenceDensity

Energy = Callable[[torch.Tensor], torch.Tensor]
"""f: [N, d] -> [N], the log-density correction of the prior (larger is more probable)."""


def log_mean_exp_with_stderr(log_w: torch.Tensor) -> tuple[float, float, float]:
    """(log mean w, its delta-method standard error sd(w) / (sqrt(n) mean(w)), effective sample size) of the
    log weights ``log_w`` [n], computed stably."""
    lw = log_w.detach().double().flatten()
    n = lw.numel()
    if n < 2:
        raise ValueError(f"a log-mean-exp with an error needs at least 2 weights, got {n}")
    w = torch.exp(lw - lw.max())
    estimate = (torch.log(w.mean()) + lw.max()).item()
    stderr = (w.std() / (math.sqrt(n) * w.mean())).item()
    ess = (w.sum() ** 2 / (w**2).sum()).item()
    return estimate, stderr, ess


@torch.no_grad()
def log_normalizer_mc(energy: Energy, reference: ReferenceDensity, latent_dim: int, *, num_samples: int,
                      batch_size: int = 10_000, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> dict:
    """log Z = log E_p0[exp f(z)] from ``num_samples`` draws of the reference p0 (with its error and ESS)."""
    log_w = torch.cat([energy(reference.sample((n, latent_dim), generator=generator, device=device)).double()
                       for n in chunk_sizes(num_samples, batch_size)])
    estimate, stderr, ess = log_mean_exp_with_stderr(log_w)
    return {"method": "mc", "log_z": estimate, "stderr": stderr, "n": num_samples, "ess": ess}


def _log_target_and_grad(energy: Energy, reference: ReferenceDensity, z: torch.Tensor,
                         beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """beta f(z) + log p0(z) [N] and its gradient in z [N, d] (p0's score is its subgradient at 0)."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        f = energy(leaf).double()
        (grad,) = torch.autograd.grad(f.sum(), leaf)
    return (beta * f.detach() + reference.log_prob(z).double(),
            beta * grad.double() + reference.score(z).double())


def sigmoid_schedule(temperatures: int, spread: float = 4.0) -> list[float]:
    """0 = beta_0 < ... < beta_T = 1 spaced as a rescaled sigmoid (Grosse et al. 2015): fine steps at both
    ends, where the weights' increments (beta_t - beta_t-1) f(z) vary most."""
    s = torch.sigmoid(torch.linspace(-spread, spread, temperatures + 1, dtype=torch.float64))
    return ((s - s[0]) / (s[-1] - s[0])).tolist()


def log_normalizer_ais(energy: Energy, reference: ReferenceDensity, latent_dim: int, *, chains: int,
                       temperatures: int, step_size: float, generator: torch.Generator | None = None,
                       device: torch.device | str = "cpu") -> dict:
    """log Z by annealed importance sampling from p0 to exp(f) p0 over ``temperatures`` steps of beta
    (:func:`sigmoid_schedule`), one MALA step (Metropolis-adjusted Langevin, float64) per temperature;
    the error is over the chains."""
    if chains < 2 or temperatures < 1 or not step_size > 0:
        raise ValueError(f"AIS needs chains >= 2, temperatures >= 1 and step_size > 0; got {chains}, "
                         f"{temperatures}, {step_size}")
    z = reference.sample((chains, latent_dim), generator=generator, device=device).double()
    betas = sigmoid_schedule(temperatures)
    log_w = torch.zeros(chains, dtype=torch.float64, device=device)
    accepted = 0.0
    half = 0.5 * step_size**2
    for prev, beta in zip(betas[:-1], betas[1:], strict=True):
        with torch.no_grad():
            log_w += (beta - prev) * energy(z.float()).double()
        lp, grad = _log_target_and_grad(energy, reference, z.float(), beta)
        noise = torch.randn(z.shape, generator=generator, device=device, dtype=torch.float64)
        proposal = z + half * grad + step_size * noise
        lp_new, grad_new = _log_target_and_grad(energy, reference, proposal.float(), beta)
        forward = -((proposal - z - half * grad) ** 2).sum(-1) / (2 * step_size**2)
        backward = -((z - proposal - half * grad_new) ** 2).sum(-1) / (2 * step_size**2)
        log_accept = lp_new + backward - lp - forward
        u = torch.rand(chains, generator=generator, device=device, dtype=torch.float64)
        accept = torch.log(u) < log_accept
        z = torch.where(accept[:, None], proposal, z)
        accepted += accept.double().mean().item()
    estimate, stderr, ess = log_mean_exp_with_stderr(log_w)
    return {"method": "ais", "log_z": estimate, "stderr": stderr, "n": chains, "ess": ess,
            "temperatures": temperatures, "step_size": step_size, "acceptance": accepted / temperatures}


def log_normalizer(model, *, num_samples: int, max_stderr: float, ais_chains: int, ais_temperatures: int,
                   ais_step_size: float, seed: int = 0) -> dict:
    """log Z of the model's EBM prior: Monte Carlo from p0, and AIS as well when the Monte Carlo standard
    error exceeds ``max_stderr`` ("log_z"/"stderr" then come from AIS). Seeded, so every rank agrees."""
    device = next(model.parameters()).device
    d = model.cfg.latent_dim
    with seeded(chunk_seed(seed, "log_z/mc", 0), device) as gen:
        mc = log_normalizer_mc(model.energy, model.p0, d, num_samples=num_samples, generator=gen,
                               device=device)
    out = {**mc, "mc": mc}
    if mc["stderr"] > max_stderr:
        with seeded(chunk_seed(seed, "log_z/ais", 0), device) as gen:
            ais = log_normalizer_ais(model.energy, model.p0, d, chains=ais_chains,
                                     temperatures=ais_temperatures, step_size=ais_step_size, generator=gen,
                                     device=device)
        out = {**ais, "mc": mc, "ais": ais}
    return out


@torch.no_grad()
def importance_log_likelihood(model, batch: Batch, names: Sequence[str], *, particles: int,
                              particle_batch: int = 100, generator: torch.Generator | None = None,
                              log_prior_z: Callable[[torch.Tensor], torch.Tensor] | None = None,
                              ) -> torch.Tensor:
    """log p(x_names) [B] up to log Z (EBM): the IWAE estimate with ``particles`` draws of q(z | x_names),
    ``particle_batch`` at a time (the model's own importance weights with beta = 1). ``log_prior_z``
    replaces the model's log p(z) (a normalised density: the EBM's reference alone, for instance)."""
    names = list(names)
    experts = model.encode(batch, names)
    log_w = []
    for k in chunk_sizes(particles, particle_batch):
        weights = joint_log_weights([batch[n] for n in names], experts, aggregation=model.aggregation,
                                    decoders=[model.decoders[n] for n in names],
                                    likelihoods=[model.likelihoods[n] for n in names], family=model.family,
                                    log_prior_z=log_prior_z or model.log_prior_z, particles=k, beta=1.0,
                                    generator=generator)
        log_w.append(weights.lw[0].double())  # (k, B)
    return torch.logsumexp(torch.cat(log_w), dim=0) - math.log(particles)


def measure_likelihood(model, chunks: Sequence[Batch | None], *, particles: int, seed: int,
                       particle_batch: int = 100, log_z: dict | None = None, unimodal: bool = True,
                       rank: int = 0, world_size: int = 1, all_reduce: AllReduce = distributed_sum,
                       log_prior_z: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       priors: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
                       ) -> dict:
    """Mean test log p(X) and (``unimodal``) log p(x_m) per modality in nats per tuple, with standard errors
    over tuples; ``log_z`` (EBM) is subtracted and its error added in quadrature ("stderr_total").
    ``log_prior_z`` replaces the model's prior. ``priors`` (name -> a normalised log density of z) score the
    joint log p(X) under each in place of the model's prior on the same tuples and draws ("priors"), each
    with its paired difference to the prior's figure ("minus_prior": the mean over tuples of the per-tuple
    difference and its standard error, log Z's error added): far tighter than the two figures' own errors,
    which the spread of log p(X) between tuples dominates."""
    device = next(model.parameters()).device
    sets = [("joint", list(model.modalities))]
    sets += [(m, [m]) for m in model.modalities] if unimodal else []
    priors = dict(priors or {})
    # rows: each set's log p, then per replacing prior its log p and its difference to the model's joint log p
    sums = torch.zeros(len(sets) + 2 * len(priors), 2, dtype=torch.float64)
    count = 0
    for i in my_chunks(len(chunks), rank, world_size):
        batch = {k: v.to(device) for k, v in chunks[i].items()}
        for j, (key, names) in enumerate(sets):
            lls = []
            for prior in [log_prior_z, *priors.values()] if j == 0 else [log_prior_z]:
                with seeded(chunk_seed(seed, f"likelihood/{key}", i), device) as gen:  # the same draws
                    lls.append(importance_log_likelihood(model, batch, names, particles=particles,
                                                         particle_batch=particle_batch, generator=gen,
                                                         log_prior_z=prior).cpu())
            sums[j] += _moments(lls[0])
            for a, ll in enumerate(lls[1:]):
                sums[len(sets) + 2 * a] += _moments(ll)
                sums[len(sets) + 2 * a + 1] += _moments(ll - lls[0])
        count += int(batch["label"].numel())
    flat = all_reduce(torch.cat([torch.tensor([float(count)], dtype=torch.float64), sums.flatten()]))
    n, sums = flat[0].item(), flat[1:].reshape(-1, 2)
    if n == 0:
        raise ValueError("no test tuples to estimate the log-likelihood on; is the test split empty?")
    offset, offset_se = (log_z["log_z"], log_z["stderr"]) if log_z else (0.0, 0.0)

    def entry(r: int, shift: float, shift_se: float) -> dict:
        se = mean_stderr(sums[r, 0].item(), sums[r, 1].item(), n)
        return {"mean": sums[r, 0].item() / n + shift, "stderr": se,
                "stderr_total": math.sqrt(se**2 + shift_se**2)}

    out = {"particles": particles, "n": int(n), "units": "nats per tuple",
           "joint": entry(0, -offset, offset_se), "log_z": log_z}
    if unimodal:
        out["unimodal"] = {key: entry(j, -offset, offset_se) for j, (key, _) in enumerate(sets) if j > 0}
    if priors:  # the model's figure is unnormalised minus log Z: the difference gains + log Z
        out["priors"] = {
            name: {**entry(len(sets) + 2 * a, 0.0, 0.0),
                   "minus_prior": entry(len(sets) + 2 * a + 1, offset, offset_se)}
            for a, name in enumerate(priors)}
    return out


def _moments(x: torch.Tensor) -> torch.Tensor:
    """[sum, sum of squares] of x (float64): what a mean and its standard error need, summable over ranks."""
    return torch.stack([x.sum(), (x**2).sum()])
