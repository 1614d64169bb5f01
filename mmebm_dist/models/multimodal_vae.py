"""The multimodal VAE with a fixed (Laplace/Gaussian) or energy-based prior on the shared latent z.

p(X, z, w) = p(z) prod_m p(w_m) p(x_m | z, w_m), with p(z) = exp(f(z)) p0(z) / Z for the EBM prior.
``forward`` returns one surrogate loss that trains everything with one optimizer:

    loss = -ELBO(encoders, decoders)  +  [E_p f - E_q f + energy_l2 (mean f_pos^2 + mean f_neg^2)]

The bracket trains the energy f on posterior samples (positives, detached) against short-run Langevin
samples of the prior (negatives, no gradient through the chain). Inside the ELBO, log p(z) = f(z) + log p0(z)
(log Z moves no encoder or decoder gradient) and f enters as f(z) - f(sg z) + sg f(sg z): the same value and
the same gradient in z, but its gradient in the energy's parameters cancels, so the energy's gradient is
exactly E_p[grad f] - E_q[grad f] plus the penalty's. This uses only ordinary calls of the energy module, so
it runs unchanged under DDP and DeepSpeed (ZeRO-3 gathers parameters on module calls).

Incomplete tuples: ``batch["present"]`` [B, M] bool (modality order) marks the modalities a tuple has (the
absent ones hold any placeholder of the right shape). The aggregation then uses the present experts, the
objective the present likelihoods, and the EBM's positives the present strata; a batch without the key, or
whose tuples are all complete, takes the plain path (the same loss, bit for bit).
"""

from __future__ import annotations

import contextlib
import functools
import math
import typing
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mmebm_dist.config import ModelConfig, OptimConfig, StageName, validate_model
from mmebm_dist.models.aggregation import build_aggregation, sample_mixture
from mmebm_dist.models.likelihoods import build_likelihood
from mmebm_dist.models.modality import build_modality
from mmebm_dist.models.objectives import (
    Experts,
    estimate,
    joint_log_weights,
    stratified_log_weights,
)
from mmebm_dist.prior import langevin
from mmebm_dist.prior.densities import GaussianMixtureReference, posterior_family, reference_density
from mmebm_dist.prior.energy import EnergyMLP
from mmebm_dist.schedule import GROUPS, STAGE_GROUPS, Stage

STAGES = typing.get_args(StageName)
"""What trains in a step (``train.schedule``): encoders/decoders under the reference prior p0 alone; only the
energy, on the frozen encoders' posterior; or everything, the paper's joint objective."""


class RunawayError(FloatingPointError):
    """Training left its stable region (energy gap, posterior magnitude or loss out of bounds)."""


class MultimodalVAE(nn.Module):
    """Encoders, decoders and likelihoods per modality (config order), aggregation, prior and objective."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        self.modalities: list[str] = [m.name for m in cfg.modalities]
        self.shapes = {m.name: tuple(m.shape) for m in cfg.modalities}
        self.encoders, self.decoders = nn.ModuleDict(), nn.ModuleDict()
        for mod in cfg.modalities:
            self.encoders[mod.name], self.decoders[mod.name] = build_modality(mod, cfg)
        self.likelihoods = {m.name: build_likelihood(m) for m in cfg.modalities}
        self.family = posterior_family(cfg.posterior)
        self.aggregation = build_aggregation(cfg.aggregation)
        self.prior_kind = cfg.prior.kind
        # Fixed priors use their own family at reference_scale; the EBM multiplies exp(f) into its reference.
        p0_name = cfg.prior.reference if self.prior_kind == "ebm" else self.prior_kind
        if p0_name == "gmm":  # fitted inside the run (fit_reference); Laplace(0, reference_scale) until then
            self.p0 = GaussianMixtureReference(cfg.latent_dim, cfg.prior.reference_components,
                                               base=reference_density("laplace", cfg.prior.reference_scale))
        else:
            self.p0 = reference_density(p0_name, cfg.prior.reference_scale)
        self.energy: EnergyMLP | None = None
        self.energy_gather: langevin.Gather | None = None
        """Set by training under DeepSpeed ZeRO-3 (mmebm_dist.train.zero3): the fused chains gather the
        energy's weights under it; the model itself never knows how it is sharded."""
        if self.prior_kind == "ebm":
            self.energy = EnergyMLP(cfg.latent_dim, cfg.prior.hidden, cfg.prior.layers, cfg.prior.activation,
                                    spectral_norm=cfg.prior.spectral_norm, bound=cfg.prior.energy_bound)
            if cfg.prior.langevin.persistent > 0:  # replay buffer of training negatives, saved in checkpoints
                shape = (cfg.prior.langevin.persistent, cfg.latent_dim)
                self.register_buffer("negative_chains", self.p0.sample(shape, device=torch.device("cpu")))
        # MMVAE+: cross reconstructions in training draw w_d from a private prior with a learned scale,
        # softmax(raw) * dw (starts at 1); log p(w) in the weight and generation use the unit-scale prior.
        self.private_prior_raw: nn.Parameter | None = None
        if cfg.private_dim > 0 and self.aggregation.stratified and len(self.modalities) > 1:
            self.private_prior_raw = nn.Parameter(torch.zeros(len(self.modalities), cfg.private_dim))
        self.posthoc = cfg.prior.fit == "posthoc"
        if self.posthoc:  # only the energy trains; everything else is the frozen model it was loaded from
            self.requires_grad_(False)
            self.energy.requires_grad_(True)
        self.stage = "energy" if self.posthoc else "joint"
        # Weight of f in the encoders'/decoders' log p(z) (``model.prior.coupling_ramp_steps``): a buffer, so
        # a compiled step reads its value instead of recompiling at each change (not saved: set_step sets it).
        self.register_buffer("coupling", torch.ones(()), persistent=False)
        self.reference_fitter: Callable[[MultimodalVAE], object] | None = None
        """Fits the learned reference to this model's aggregate posterior when :meth:`on_step` says it is
        due; the trainer attaches it (:func:`mmebm_dist.train.reference_fit.attach`): it reads the data."""

    @property
    def learned_reference(self) -> GaussianMixtureReference | None:
        """The learned reference p0 (``model.prior.reference=gmm``), else None."""
        return self.p0 if isinstance(self.p0, GaussianMixtureReference) else None

    def fit_reference(self, z: torch.Tensor, *, seed: int) -> dict[str, float]:
        """Fit the learned reference to aggregate-posterior draws z [N, d]; the replay buffer of persistent
        chains restarts from it. Returns the fit's diagnostics."""
        reference = self.learned_reference
        if reference is None:
            raise ValueError("fit_reference needs model.prior.reference=gmm")
        stats = reference.fit(z, seed=seed)
        if hasattr(self, "negative_chains"):
            generator = torch.Generator(device="cpu").manual_seed(seed)
            fresh = reference.sample(tuple(self.negative_chains.shape), generator=generator, device="cpu")
            self.negative_chains.copy_(fresh.to(self.negative_chains.device))
        return stats

    def set_step(self, step: int) -> None:
        """Set what depends on the optimizer step ``step`` (1-based): the energy's coupling weight."""
        ramp = self.cfg.prior.coupling_ramp_steps
        self.coupling.fill_(min(1.0, step / ramp) if ramp > 0 else 1.0)

    # ------------------------------------------------------------------------------- the training hooks
    def on_step(self, step: int, stage: Stage) -> None:
        """The training loop's hook before optimizer step ``step`` (1-based), which belongs to ``stage``
        (:mod:`mmebm_dist.schedule`): compute that stage's objective, set the step's coupling weight, and fit
        the learned reference when the step is due to (``reference_fitter``)."""
        self.set_stage(stage.name)
        self.set_step(step)
        if self._reference_fit_due(stage, step):
            if self.reference_fitter is None:
                raise RuntimeError(f"step {step} fits the learned reference (model.prior.reference=gmm), but "
                                   "no reference_fitter is attached: train through mmebm_dist.train.loop, "
                                   "which attaches one")
            self.reference_fitter(self)

    @contextlib.contextmanager
    def objective(self, stage: str) -> Iterator[None]:
        """Compute stage ``stage``'s loss inside the block (an extra update of the schedule), the current
        stage's again after it."""
        current = self.stage
        self.set_stage(stage)
        try:
            yield
        finally:
            self.stage = current

    def _reference_fit_due(self, stage: Stage, step: int) -> bool:
        """Whether step ``step`` starts by fitting the learned reference: at the first step that trains the
        energy (any step of a post-hoc fit) while it is unfitted, and with ``reference_refit`` again at the
        first step of every later stage that trains it."""
        reference = self.learned_reference
        if reference is None or not (stage.lrs.get("energy", 0.0) > 0 or self.posthoc):
            return False
        return not reference.fitted or (self.cfg.prior.reference_refit and stage.index > 0
                                        and step == stage.first)

    def set_stage(self, stage: str) -> None:
        """Train ``stage`` (one of STAGES) from the next step on; a fixed prior has only the joint stage."""
        if stage not in STAGES:
            raise ValueError(f"stage '{stage}' is unknown; choose one of {', '.join(STAGES)}")
        if stage != "joint" and self.energy is None:
            raise ValueError(f"stage '{stage}' needs model.prior.kind=ebm (the prior is {self.prior_kind})")
        self.stage = stage

    def _untrained(self, stage: str) -> list[nn.Parameter]:
        """Parameters of the groups ``stage`` does not train (:data:`mmebm_dist.schedule.STAGE_GROUPS`); they
        get zero gradients, so DDP sees every one."""
        return [p for group in GROUPS if group not in STAGE_GROUPS[stage]
                for p in self.group_parameters(group)]

    def group_parameters(self, group: str) -> list[nn.Parameter]:
        """The parameters of optimizer group ``group``: ``energy`` the energy's (none for a fixed prior),
        ``model`` every other parameter that trains."""
        energy = list(self.energy.parameters()) if self.energy is not None else []
        if group == "energy":
            return energy
        if group == "model":
            energy_ids = {id(p) for p in energy}
            return [p for p in self.parameters() if id(p) not in energy_ids and p.requires_grad]
        raise ValueError(f"parameter group '{group}' is unknown; choose one of {', '.join(GROUPS)}")

    # ------------------------------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check_batch(self, batch: dict[str, torch.Tensor], names: list[str]) -> None:
        for name in names:
            if name not in batch:
                raise KeyError(f"batch has no modality '{name}' (keys: {sorted(batch)}); the batch must "
                               f"match model.modalities {self.modalities}")
            if tuple(batch[name].shape[1:]) != self.shapes[name]:
                raise ValueError(f"modality '{name}' has shape {tuple(batch[name].shape[1:])} per sample, "
                                 f"model.modalities declares {self.shapes[name]}")

    def presence(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``batch["present"]`` [B, M] bool when some tuple lacks a modality, else None (all present)."""
        present = batch.get("present")
        if present is None:
            return None
        b = batch[self.modalities[0]].shape[0]
        if present.dtype != torch.bool or tuple(present.shape) != (b, len(self.modalities)):
            raise ValueError(f"batch['present'] must be bool [B, M] = [{b}, {len(self.modalities)}] in the "
                             f"order {self.modalities}; got {present.dtype} {tuple(present.shape)}")
        if not present.any(1).all():
            raise ValueError("batch['present'] has a tuple with no modality present; drop such tuples")
        return None if present.all() else present

    def encode(self, batch: dict[str, torch.Tensor], names: list[str] | None = None) -> Experts:
        """Posterior parameters of the modalities ``names`` (default all), stacked: [M, B, d]."""
        names = self.modalities if names is None else list(names)
        self._check_batch(batch, names)
        outs = [self.encoders[n](batch[n]) for n in names]
        # float(): under bf16 autocast the networks give bf16; every density and sample stays float32.
        z_loc = torch.stack([o.z_loc for o in outs]).float()
        z_scale = self.family.scale_from_raw(torch.stack([o.z_raw for o in outs]).float())
        if outs[0].w_loc is None:
            return Experts(z_loc, z_scale)
        w_scale = self.family.scale_from_raw(torch.stack([o.w_raw for o in outs]).float())
        return Experts(z_loc, z_scale, torch.stack([o.w_loc for o in outs]).float(), w_scale)

    def private_prior_scale(self) -> torch.Tensor | None:
        """[M, private_dim] learned scales of the cross-reconstruction private prior (None when unused)."""
        if self.private_prior_raw is None:
            return None
        return torch.softmax(self.private_prior_raw, dim=-1) * self.cfg.private_dim

    def log_prior_z(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z) up to log Z: f(z) + log p0(z) (EBM) or log p0(z) (fixed). [..., d] -> [...]."""
        lp = self.p0.log_prob(z)
        if self.energy is not None:
            lp = lp + self.energy(z.reshape(-1, z.shape[-1])).float().reshape(z.shape[:-1])
        return lp

    # ------------------------------------------------------------------------------------------ training
    def compute(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Loss, detached terms and (under ``_z_pos``/``_z_neg``) the EBM's positives and negatives."""
        if self.stage == "energy":
            return _with_zero_grads(self._compute_posthoc(batch), self._untrained("energy"))
        cfg = self.cfg
        energy = self.energy if self.stage == "joint" else None
        experts = self.encode(batch)
        present = self.presence(batch)
        x = [batch[n] for n in self.modalities]
        cache: dict[str, torch.Tensor] = {}

        def log_prior_z(z: torch.Tensor) -> torch.Tensor:
            if energy is None:
                return self.p0.log_prob(z)
            flat = z.reshape(-1, z.shape[-1])
            f, f_pos = energy(torch.cat([flat, flat.detach()])).float().split(flat.shape[0])
            cache["f_pos"], cache["z_pos"] = f_pos, flat.detach()
            # Value f(z), gradient in z through f, gradient in the energy's parameters cancelled (module doc).
            f_elbo = f - f_pos + f_pos.detach()
            if cfg.prior.coupling_ramp_steps > 0:  # the ramp scales the value and the z-gradient; alpha's: 0
                f_elbo = self.coupling * f_elbo
            return f_elbo.reshape(z.shape[:-1]) + self.p0.log_prob(z)

        decoders = [self.decoders[n] for n in self.modalities]
        if not cfg.batched_decode:  # the authors' structure: one call per stratum of B * K rows
            rows = x[0].shape[0] * cfg.particles
            decoders = [functools.partial(_decode_per_stratum, dec, rows) for dec in decoders]
        common = dict(decoders=decoders,
                      likelihoods=[self.likelihoods[n] for n in self.modalities], family=self.family,
                      log_prior_z=log_prior_z, particles=cfg.particles, beta=cfg.beta,
                      stop_q_grad=cfg.objective == "dreg")
        if present is not None:
            common["present"] = present
        if self.aggregation.stratified:
            weights = stratified_log_weights(x, experts, private_prior_scale=self.private_prior_scale(),
                                             **common)
        else:
            weights = joint_log_weights(x, experts, aggregation=self.aggregation, **common)
        surrogate, bound = estimate(weights, cfg.objective)
        loss = -surrogate

        terms: dict[str, torch.Tensor] = {"elbo": bound.detach()}
        for m, (name, ll) in enumerate(zip(self.modalities, weights.log_lik, strict=True)):
            rec = -ll.detach().mean(1)  # (S, B)
            if present is None:
                terms[f"rec/{name}"] = rec.mean()
            else:  # over the tuples that have the modality (absent ones count 0 in the weighted average)
                terms[f"rec/{name}"] = weights.average(rec) * len(present) / present[:, m].sum()
        terms["kl_z"] = weights.average((weights.log_q_z - weights.log_prior_z).detach().mean(1))
        if weights.w is not None:
            terms["kl_w"] = weights.average((weights.log_q_w - weights.log_prior_w).detach().mean(1))
        seen = (slice(None),) if present is None else (present.T,)  # the present experts only
        terms["posterior_abs"] = experts.z_loc.detach()[seen].abs().mean()
        terms["posterior_scale"] = experts.z_scale.detach()[seen].mean()

        out: dict[str, torch.Tensor] = {}
        if energy is not None:
            if present is not None and self.aggregation.stratified:  # positives of the present strata only
                rows = present.T[:, None, :].expand(weights.z.shape[:-1]).reshape(-1)
                cache["f_pos"], cache["z_pos"] = cache["f_pos"][rows], cache["z_pos"][rows]
            ebm_loss, ebm_terms, z_neg = self._energy_loss(cache["f_pos"], batch_size=x[0].shape[0])
            loss = loss + ebm_loss
            terms.update(ebm_terms)
            if cfg.prior.coupling_ramp_steps > 0:
                terms["coupling"] = self.coupling.clone()
            out["_z_pos"], out["_z_neg"] = cache["z_pos"], z_neg
        out["loss"] = loss
        out.update(terms)
        return _with_zero_grads(out, self._untrained(self.stage))

    def _compute_posthoc(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``model.prior.fit=posthoc``: the energy loss alone, its positives drawn from the frozen encoders'
        posterior (every stratum's z for the stratified objective, q(z | X) otherwise), as in joint
        training."""
        with torch.no_grad():
            experts = self.encode(batch)
            present = self.presence(batch)
            if self.aggregation.stratified:
                eps = self.family.standard_noise(tuple(experts.z_loc.shape), device=experts.z_loc.device)
                z_pos = experts.z_loc + experts.z_scale * eps  # (M, B, d)
                z_pos = z_pos.reshape(-1, z_pos.shape[-1]) if present is None else z_pos[present.T]
            elif present is None:
                loc, scale = self.aggregation.components(experts.z_loc, experts.z_scale)
                z_pos = sample_mixture(loc, scale, self.family, 1)[0]
            else:
                loc, scale, valid = self.aggregation.masked_components(experts.z_loc, experts.z_scale,
                                                                       present)
                z_pos = sample_mixture(loc, scale, self.family, 1, valid=valid)[0]
        f_pos = self.energy(z_pos).float()
        loss, terms, z_neg = self._energy_loss(f_pos, batch_size=experts.z_loc.shape[1])
        seen = (slice(None),) if present is None else (present.T,)
        terms["posterior_abs"] = experts.z_loc[seen].abs().mean()
        terms["posterior_scale"] = experts.z_scale[seen].mean()
        return {"loss": loss, **terms, "_z_pos": z_pos, "_z_neg": z_neg}

    def _energy_loss(self, f_pos: torch.Tensor, *, batch_size: int):
        """E_p f - E_q f + l2 (mean f_pos^2 + mean f_neg^2) with Langevin negatives, and its logged terms."""
        prior = self.cfg.prior
        z_neg = self._negatives(batch_size)
        f_neg = self.energy(z_neg).float()
        penalty = prior.energy_l2 * (f_pos.pow(2).mean() + f_neg.pow(2).mean())
        loss = f_neg.mean() - f_pos.mean() + penalty
        with torch.no_grad():  # the drift's size at the chain end, for the diagnostics only (analytic grad)
            grad = self.energy.grad(z_neg)
        energy_pos, energy_neg = f_pos.detach().mean(), f_neg.detach().mean()
        terms = {"energy_pos": energy_pos, "energy_neg": energy_neg, "energy_gap": energy_pos - energy_neg,
                 "energy_l2": penalty.detach(), "langevin_grad_norm": grad.norm(dim=-1).mean()}
        return loss, terms, z_neg

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{"loss": surrogate scalar to backprop, <term>: detached scalar for logging}."""
        return {k: v for k, v in self.compute(batch).items() if not k.startswith("_")}

    def param_groups(self, optim_cfg: OptimConfig) -> list[dict]:
        """Encoder/decoder/private-prior parameters at optim.lr; the energy's at prior.lr with prior.betas."""
        main = self.group_parameters("model")
        groups = []
        if main:  # empty when only the energy trains (model.prior.fit=posthoc)
            groups.append({"params": main, "lr": optim_cfg.lr, "betas": tuple(optim_cfg.betas),
                           "name": "model"})
        if self.energy is not None:
            groups.append({"params": self.group_parameters("energy"), "lr": self.cfg.prior.lr,
                           "betas": tuple(self.cfg.prior.betas), "name": "energy"})
        return groups

    def check_runaway(self, terms: dict[str, torch.Tensor | float], step: int) -> None:
        """Raise RunawayError naming the step and values if the loss is non-finite or the EBM runs away."""
        value = {k: float(v.detach() if isinstance(v, torch.Tensor) else v) for k, v in terms.items()
                 if k in ("loss", "energy_gap", "posterior_abs")}
        prior = self.cfg.prior
        fix = ("raise model.prior.energy_l2, enable model.prior.spectral_norm, lower model.prior.lr or "
               "model.prior.langevin.step_size, or resume from an earlier checkpoint")
        if "loss" in value and not math.isfinite(value["loss"]):
            raise RunawayError(f"step {step}: loss is {value['loss']} (terms {value}); lower optim.lr "
                               f"or {fix}")
        gap = value.get("energy_gap")
        if gap is not None and not abs(gap) <= prior.max_energy_gap:
            raise RunawayError(f"step {step}: energy gap E_q f - E_p f = {gap:.4g} left "
                               f"[-{prior.max_energy_gap}, {prior.max_energy_gap}] "
                               f"(model.prior.max_energy_gap); the EBM prior is running away: {fix}")
        post = value.get("posterior_abs")
        if post is not None and not post <= prior.max_posterior_abs:
            raise RunawayError(f"step {step}: mean |posterior location| = {post:.4g} exceeds "
                               f"model.prior.max_posterior_abs={prior.max_posterior_abs}: {fix}")

    # ------------------------------------------------------------------------------------------ sampling
    def sample_prior(self, n: int, *, langevin_steps: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, latent_dim] from the prior: Langevin from p0 for the EBM (no gradient), p0 otherwise."""
        z0 = self.p0.sample((n, self.cfg.latent_dim), generator=generator, device=self.device)
        if self.energy is None or self.stage == "reference":  # the reference stage trains under p0 alone
            return z0
        steps = self.cfg.prior.langevin.steps if langevin_steps is None else langevin_steps
        if steps > 0 and self.cfg.prior.langevin.init == "sir":
            z0 = self._importance_resampled(z0, generator)
        return self._langevin(z0, steps, generator)

    @torch.no_grad()
    def _importance_resampled(self, z0: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """``langevin.init=sir``: per row, R - 1 further p0 draws beside z0's row, one of the R kept with
        probability softmax(f) (sampling-importance-resampling of exp(f) p0 with p0 as the proposal)."""
        n, d = z0.shape
        r = self.cfg.prior.langevin.sir_candidates
        extra = self.p0.sample((n * (r - 1), d), generator=generator, device=z0.device, dtype=z0.dtype)
        candidates = torch.cat([z0[:, None], extra.reshape(n, r - 1, d)], dim=1)  # (n, R, d)
        with torch.autocast(device_type=z0.device.type, enabled=False):
            f = self.energy(candidates.reshape(-1, d)).float().reshape(n, r)
        pick = torch.multinomial(torch.softmax(f, dim=-1), 1, generator=generator).squeeze(1)
        return candidates[torch.arange(n, device=z0.device), pick]

    def _langevin(self, z0: torch.Tensor, steps: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """``steps`` (default ``langevin.steps``) Langevin steps on exp(f) p0 from z0 [n, d], detached."""
        lcfg = self.cfg.prior.langevin
        steps = lcfg.steps if steps is None else steps
        if steps == 0:
            return z0
        with torch.autocast(device_type=z0.device.type, enabled=False):
            return langevin.sample(self.energy, z0, steps=steps, step_size=lcfg.step_size, reference=self.p0,
                                   backend=lcfg.backend, generator=generator,
                                   gather=self.energy_gather).detach()

    def _negatives(self, n: int) -> torch.Tensor:
        """The energy's n training negatives: chains from p0, or (``langevin.persistent``) continued from the
        replay buffer, a share ``reinit`` of them restarted from p0, and written back to it."""
        if self.cfg.prior.langevin.persistent == 0:
            return self.sample_prior(n)
        chains = self.negative_chains  # (N, d)
        rows = torch.randint(0, chains.shape[0], (n,), device=chains.device)
        fresh = torch.rand(n, 1, device=chains.device) < self.cfg.prior.langevin.reinit
        z0 = torch.where(fresh, self.p0.sample((n, chains.shape[1]), device=chains.device), chains[rows])
        z = self._langevin(z0)
        chains[rows] = z
        return z

    def sample_private(self, n: int, *, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """w_m [n, private_dim] from each unit-scale private prior (empty without private latents)."""
        if self.cfg.private_dim == 0:
            return {}
        shape = (n, self.cfg.private_dim)
        return {name: self.family.standard_noise(shape, generator=generator, device=self.device)
                for name in self.modalities}

    def decode(self, z: torch.Tensor, private: dict[str, torch.Tensor] | None = None, *,
               generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Likelihood means in [0, 1] of every modality from z [n, d]; missing private latents come from the
        unit-scale prior (MMVAE+ at test time, pitfall 5)."""
        private = dict(private or {})
        drawn = self.sample_private(z.shape[0], generator=generator)
        out = {}
        for name in self.modalities:
            u = z if self.cfg.private_dim == 0 else torch.cat([private.get(name, drawn.get(name)), z], dim=-1)
            out[name] = self.likelihoods[name].mean(self.decoders[name](u).float())
        return out

    @torch.no_grad()
    def generate_joint(self, n: int, *, langevin_steps: int | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """n joint samples: z from the prior, private latents from their priors, every modality decoded."""
        return self.decode(self.sample_prior(n, langevin_steps=langevin_steps, generator=generator),
                           generator=generator)

    @torch.no_grad()
    def posterior_sample(self, batch: dict[str, torch.Tensor], sources: list[str], *,
                         generator: torch.Generator | None = None) -> torch.Tensor:
        """z [B, d] ~ q(z | x_sources): the aggregation over the source modalities' experts."""
        if not sources or any(s not in self.modalities for s in sources):
            raise ValueError(f"sources must be a non-empty subset of {self.modalities}, got {sources}")
        experts = self.encode(batch, sources)
        loc, scale = self.aggregation.components(experts.z_loc, experts.z_scale)
        return sample_mixture(loc, scale, self.family, 1, generator=generator)[0]

    @torch.no_grad()
    def generate_conditional(self, batch: dict[str, torch.Tensor], sources: list[str], *,
                             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """z ~ q(z | x_sources), each target's private latent from its prior, every modality decoded."""
        return self.decode(self.posterior_sample(batch, sources, generator=generator), generator=generator)

    @torch.no_grad()
    def aggregate_posterior_z(self, batch: dict[str, torch.Tensor], *,
                              generator: torch.Generator | None = None) -> torch.Tensor:
        """z [B, d] from the uniform mixture of all unimodal posteriors (the aggregate-posterior ceiling)."""
        experts = self.encode(batch)
        return sample_mixture(experts.z_loc, experts.z_scale, self.family, 1, generator=generator)[0]


def build_model(model_cfg: ModelConfig) -> MultimodalVAE:
    """The multimodal VAE described by ``model_cfg`` (raises ConfigError on settings it cannot run)."""
    return MultimodalVAE(model_cfg)


def _with_zero_grads(out: dict[str, torch.Tensor], params: list[nn.Parameter]) -> dict[str, torch.Tensor]:
    """Add 0 * sum(params) to the loss: under DDP every parameter must receive a gradient in every step, and
    the parameters a stage does not train get exact zeros (their optimizer group's lr is 0 in that stage)."""
    if params:
        out["loss"] = out["loss"] + 0.0 * sum(p.sum() for p in params)
    return out


def _decode_per_stratum(decoder: nn.Module, rows: int, u: torch.Tensor) -> torch.Tensor:
    """decoder(u) computed ``rows`` rows at a time (``model.batched_decode=false``)."""
    return torch.cat([decoder(chunk) for chunk in u.split(rows)])
