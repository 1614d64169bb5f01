"""Post-hoc latent samplers (``mmebm eval --gmm-components K ... --flow``): densities fitted, after
training, to the frozen model's aggregate posterior (MultiVae's baselines), whose draws decoded give a joint
coherence to set beside the prior's.

- ``gmm_K``: scikit-learn's ``GaussianMixture`` (K components, full covariances, seeded);
- ``flow_maf``: a masked autoregressive flow (zuko's ``MAF``) fitted by maximum likelihood with Adam on
  minibatches of the standardized draws, a seeded tenth held out to keep the parameters of the best held-out
  likelihood.

Both are fitted to the same draws: one z ~ q(z | x_m) per train tuple, m drawn uniformly
(``model.aggregate_posterior_z``: the mixture-of-experts aggregate posterior). Their joint coherence uses the
judge, sample count, batch size and seeded chunks of the run's own joint figure.
"""

from __future__ import annotations

import abc
import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mmebm_dist.evaluate.coherence import Batch, chunk_seed, measure_joint, seeded
from mmebm_dist.reporting.tables import fmt, md_table

DEFAULT_FIT_TUPLES = 10_000
FLOW_NAME = "flow_maf"


@dataclass(kw_only=True)
class FlowOptions:
    """How the masked autoregressive flow is built and fitted (``--flow-*``)."""

    transforms: int = 5
    """Autoregressive transforms (feature order reversed between consecutive ones)."""
    hidden: int = 128
    """Width of the two hidden layers of each transform's masked MLP."""
    steps: int = 2000
    """Adam steps; the parameters kept are those of the best held-out likelihood, checked every eval_every."""
    lr: float = 1e-3
    batch_size: int = 256
    eval_every: int = 100
    """Steps between two held-out evaluations."""


@dataclass(kw_only=True)
class SamplerOptions:
    """Which post-hoc latent samplers ``mmebm eval`` fits and measures (``--gmm-components``, ``--flow``)."""

    batch_size: int
    """Generation / fit batch size."""
    seed: int
    """Seed of the fits and of every sample drawn."""
    gmm_components: Sequence[int] | None = None
    """Component counts K of the Gaussian mixtures to fit (None or empty: none)."""
    flow: FlowOptions | None = None
    """The masked autoregressive flow to fit (None: none)."""
    sampler_fit: int = DEFAULT_FIT_TUPLES
    """Train tuples the samplers are fitted to (the whole split when smaller)."""


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def aggregate_posterior_samples(model, chunks: Sequence[Batch], *, seed: int) -> np.ndarray:
    """z [N, d] (float64): one draw per tuple of ``chunks`` from the mixture of its unimodal posteriors,
    chunk i seeded by (seed, "gmm-fit", i)."""
    device = _device_of(model)
    out = []
    for i, batch in enumerate(chunks):
        batch = {k: v.to(device) for k, v in batch.items()}
        with seeded(chunk_seed(seed, "gmm-fit", i), device) as gen:
            out.append(model.aggregate_posterior_z(batch, generator=gen).double().cpu())
    return torch.cat(out).numpy()


def fit_gmm(z: np.ndarray, components: int, *, seed: int):
    """A ``components``-component full-covariance GaussianMixture fitted to z [N, d] (k-means start,
    seeded)."""
    from sklearn.mixture import GaussianMixture

    if components < 1 or components > len(z):
        raise ValueError(f"--gmm-components {components}: a mixture needs 1 <= K <= the {len(z)} fit tuples; "
                         f"lower K or raise --sampler-fit")
    return GaussianMixture(n_components=components, covariance_type="full", max_iter=500,
                           random_state=seed).fit(z)


@dataclass(kw_only=True)
class FittedFlow:
    """A MAF on standardized latents: z = loc + scale * u, u distributed as the flow. NLLs are in nats per
    dimension of z (the standardization's log-Jacobian included)."""

    flow: torch.nn.Module
    loc: torch.Tensor
    scale: torch.Tensor
    best_step: int
    """The step whose parameters were kept (best held-out likelihood)."""
    train_nll: float
    held_out_nll: float
    fit_tuples: int
    held_out_tuples: int
    fit_seconds: float

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log density of z [N, d] (float32): log p_u((z - loc) / scale) - sum log scale."""
        return self.flow().log_prob((z - self.loc) / self.scale) - self.scale.log().sum()

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, d]: eps ~ N(0, I) from ``generator``, pushed through the inverse of the flow's transform (the
        flow's own ``sample`` would draw from the global RNG)."""
        eps = torch.randn(n, self.loc.shape[0], generator=generator, device=self.loc.device)
        return self.loc + self.scale * self.flow().transform.inv(eps)


def fit_flow(z: np.ndarray, options: FlowOptions, *, seed: int, device: torch.device | str = "cpu",
             progress: bool = False) -> FittedFlow:
    """A masked autoregressive flow fitted to z [N, d] by maximum likelihood: Adam on seeded minibatches of a
    seeded nine tenths, standardized by their mean and std; the parameters of the best likelihood on the
    held-out tenth (checked every ``options.eval_every`` steps) are kept."""
    import zuko
    from tqdm import tqdm

    start = time.perf_counter()
    device = torch.device(device)
    x = torch.as_tensor(z, dtype=torch.float32, device=device)
    n, d = x.shape
    held = n // 10
    if held < 2:
        raise ValueError(f"--flow: {n} fit tuples leave fewer than 2 to hold out (a tenth); raise "
                         f"--sampler-fit to at least 20")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).to(device)
    train, valid = x[order[held:]], x[order[:held]]
    loc, scale = train.mean(0), train.std(0).clamp_min(1e-6)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # zuko initialises its layers from the global RNG
        flow = zuko.flows.MAF(d, transforms=options.transforms,
                              hidden_features=[options.hidden] * 2).to(device)
    fitted = FittedFlow(flow=flow, loc=loc, scale=scale, best_step=0, train_nll=math.nan,
                        held_out_nll=math.nan, fit_tuples=len(train), held_out_tuples=held,
                        fit_seconds=math.nan)
    optimizer = torch.optim.Adam(flow.parameters(), lr=options.lr)
    best, best_state = math.inf, None
    bar = tqdm(range(1, options.steps + 1), desc="flow fit", unit="step", disable=not progress)
    for step in bar:
        idx = torch.randint(len(train), (min(options.batch_size, len(train)),), generator=gen).to(device)
        loss = -fitted.log_prob(train[idx]).mean() / d
        if not torch.isfinite(loss):
            raise FloatingPointError(f"--flow: the training NLL is {loss.item()} at step {step}; lower "
                                     f"--flow-lr (now {options.lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % options.eval_every == 0 or step == options.steps:
            with torch.no_grad():
                held_out = -fitted.log_prob(valid).mean().item() / d
            if held_out < best:
                best, best_state, fitted.best_step = held_out, copy.deepcopy(flow.state_dict()), step
            bar.set_postfix(held_out_nll_per_dim=f"{held_out:.3f}", best_step=fitted.best_step)
    bar.close()
    if best_state is None:
        raise FloatingPointError(f"--flow: the held-out NLL was never finite in {options.steps} steps; lower "
                                 f"--flow-lr (now {options.lr})")
    flow.load_state_dict(best_state)
    with torch.no_grad():
        fitted.train_nll = -fitted.log_prob(train).mean().item() / d
    fitted.held_out_nll, fitted.fit_seconds = best, time.perf_counter() - start
    return fitted


class LatentSamplerPrior(abc.ABC):
    """The model seen by joint coherence, its prior replaced by a fitted latent sampler: z is drawn by
    :meth:`sample_prior` (each sampler's own) with the caller's generator (no Langevin chain), then decoded by
    the model."""

    def __init__(self, model):
        self.model = model
        self.modalities = list(model.modalities)

    def parameters(self):
        return self.model.parameters()

    @abc.abstractmethod
    def sample_prior(self, n: int, *, langevin_steps: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, d] drawn from the fitted sampler (``langevin_steps`` is accepted and ignored)."""

    @torch.no_grad()
    def generate_joint(self, n: int, *, langevin_steps: int | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """n joint samples: z from the sampler, private latents from their priors, every modality decoded."""
        return self.model.decode(self.sample_prior(n, generator=generator), generator=generator)


class MixturePrior(LatentSamplerPrior):
    """The model with z drawn from a fitted Gaussian mixture."""

    def __init__(self, model, gmm):
        super().__init__(model)
        device = _device_of(model)
        self.weights = torch.as_tensor(gmm.weights_, dtype=torch.float64, device=device)
        self.means = torch.as_tensor(gmm.means_, dtype=torch.float32, device=device)  # (K, d)
        self.chol = torch.as_tensor(np.linalg.cholesky(gmm.covariances_), dtype=torch.float32,
                                    device=device)  # (K, d, d), covariance = L L^T

    def sample_prior(self, n: int, *, langevin_steps: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, d]: a component k ~ weights, then mean_k + L_k eps with eps ~ N(0, I)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, device=self.means.device)
        return self.means[k] + torch.einsum("nij,nj->ni", self.chol[k], eps)


class FlowPrior(LatentSamplerPrior):
    """The model with z drawn from a fitted flow."""

    def __init__(self, model, fitted: FittedFlow):
        super().__init__(model)
        self.fitted = fitted

    @torch.no_grad()
    def sample_prior(self, n: int, *, langevin_steps: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        return self.fitted.sample(n, generator=generator)


def measure(model, judge, fit_chunks: Sequence[Batch], *, components: Sequence[int], num_samples: int,
            batch_size: int, seed: int, flow: FlowOptions | None = None, rank: int = 0, world_size: int = 1,
            show_progress: bool = False) -> dict:
    """eval.json's "latent_samplers": {"gmm_K": ..., "flow_maf": ...}, each with the joint coherence of its
    decoded draws (standard error, n, ms per sample) and its fit's figures. Every rank fits the same samplers
    (same tuples, same seed); the joint samples are split over ranks."""
    z = aggregate_posterior_samples(model, fit_chunks, seed=seed)
    def joint(view) -> dict:
        """The joint-coherence fields of a sampler's entry (its decoded draws judged like the prior's)."""
        figure = measure_joint(view, judge, num_samples=num_samples, batch_size=batch_size, seed=seed,
                               rank=rank, world_size=world_size)
        return {"joint": figure["coherence"], "stderr": figure["stderr"], "n": figure["n"],
                "ms_per_sample": figure["ms_per_sample"], "fit_split": "train"}

    out = {}
    for k in components:
        start = time.perf_counter()
        gmm = fit_gmm(z, k, seed=seed)
        fit_seconds = time.perf_counter() - start
        log_likelihood = float(gmm.score(z))  # mean per tuple
        out[f"gmm_{k}"] = {**joint(MixturePrior(model, gmm)), "fit_tuples": len(z), "components": k,
                           "covariance": "full", "converged": bool(gmm.converged_),
                           "train_log_likelihood": log_likelihood,
                           "train_nll_per_dim": -log_likelihood / z.shape[1], "fit_seconds": fit_seconds}
    if flow is not None:
        fitted = fit_flow(z, flow, seed=seed, device=_device_of(model), progress=show_progress)
        out[FLOW_NAME] = {**joint(FlowPrior(model, fitted)), "fit_tuples": fitted.fit_tuples,
                          "held_out_tuples": fitted.held_out_tuples, "transforms": flow.transforms,
                          "hidden": flow.hidden, "steps": flow.steps, "lr": flow.lr,
                          "batch_size": flow.batch_size, "best_step": fitted.best_step,
                          "train_nll_per_dim": fitted.train_nll, "held_out_nll_per_dim": fitted.held_out_nll,
                          "fit_seconds": fitted.fit_seconds}
    return out


def measure_requested(options: SamplerOptions, model, judge, data_path, *,
                      num_samples: int, rank: int, world_size: int) -> dict | None:
    """:func:`measure` of the samplers ``options`` asks for, on ``options.sampler_fit`` train tuples (None:
    none asked)."""
    from mmebm_dist.evaluate import generate

    flow = options.flow
    if not options.gmm_components and flow is None:
        return None
    fit_chunks = generate.read_chunks(data_path, num=options.sampler_fit, batch_size=options.batch_size,
                                      split="train")
    return measure(model, judge, fit_chunks, components=options.gmm_components or (), flow=flow,
                   num_samples=num_samples, batch_size=options.batch_size, seed=options.seed, rank=rank,
                   world_size=world_size, show_progress=rank == 0)


def report_lines(results: dict) -> list[str]:
    """report.md's section: each sampler's joint coherence and fit beside the prior's joint coherence."""
    samplers = results.get("latent_samplers")
    if not samplers:
        return []
    joint = results["coherence"]["joint"]
    lines = ["", "## Post-hoc latent samplers (joint coherence of decoded draws)", "",
             "Each sampler is fitted after training to the aggregate posterior of the train split (one "
             "z ~ q(z|x_m) per tuple, m at random) and judged on the same number of seeded joint samples "
             "as the prior. NLL: nats per latent dimension; the flow keeps the parameters of its best NLL on "
             "a held-out tenth of the tuples (best step), so that figure is slightly optimistic.", ""]
    rows = [["the run's prior", fmt(joint["coherence"]), fmt(joint["stderr"]), str(joint["n"]), *[""] * 5]]
    for name, e in samplers.items():
        held_out = e.get("held_out_nll_per_dim")
        fit = f"converged: {'yes' if e['converged'] else 'no'}" if "converged" in e else \
            f"best step {e['best_step']} of {e['steps']}"
        rows.append([name, fmt(e["joint"]), fmt(e["stderr"]), str(e["n"]), str(e["fit_tuples"]),
                     fmt(e.get("train_nll_per_dim", math.nan), 3),
                     "n/a" if held_out is None else f"{fmt(held_out, 3)} ({e['held_out_tuples']} tuples)",
                     fmt_seconds(e.get("fit_seconds")), fit])
    return lines + md_table(["sampler", "joint coherence", "std. error", "n", "fit tuples", "train NLL / dim",
                             "held-out NLL / dim", "fit time", "fit"], rows)


def fmt_seconds(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.1f} s"


def sampler_order(name: str) -> tuple:
    """gmm_K by K, then the flow."""
    kind, _, size = name.partition("_")
    return (kind != "gmm", int(size) if size.isdigit() else 0, name)


def run_entries(ev: dict) -> dict[str, dict]:
    """The samplers of one eval.json as results.json keeps them (joint, stderr, n, fit_tuples)."""
    samplers = ev.get("latent_samplers") or {}
    return {name: {"joint": _num(e.get("joint")), "stderr": _num(e.get("stderr")), "n": int(e["n"]),
                   "fit_tuples": int(e["fit_tuples"])} for name, e in samplers.items()}


def _num(x) -> float:
    return math.nan if x is None else float(x)
