"""Post-hoc latent samplers (``mmebm eval --gmm-components K ...``): a Gaussian mixture fitted, after
training, to the frozen model's aggregate posterior (MultiVae's baseline), whose draws decoded give a joint
coherence to set beside the prior's.

The mixture (scikit-learn's ``GaussianMixture``, full covariances, seeded) is fitted to one z ~ q(z | x_m) per
train tuple, m drawn uniformly (``model.aggregate_posterior_z``: the mixture-of-experts aggregate posterior).
Its joint coherence uses the judge, sample count, batch size and seeded chunks of the run's own joint figure.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from mmebm_dist.evaluate.coherence import Batch, chunk_seed, measure_joint, seeded
from mmebm_dist.evaluate.report import fmt, md_table

DEFAULT_FIT_TUPLES = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("post-hoc latent samplers (baselines for the EBM prior)")
    group.add_argument("--gmm-components", type=int, nargs="+", default=None, metavar="K",
                       help="fit a K-component Gaussian mixture (full covariances) to the aggregate "
                            "posterior of the train split and measure the joint coherence of its decoded "
                            "draws, per K (e.g. 10 50; default: skip)")
    group.add_argument("--gmm-fit", type=int, default=DEFAULT_FIT_TUPLES, metavar="N",
                       help="train tuples the mixture is fitted to (default: %(default)s, or the whole "
                            "split when smaller)")


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
                         f"lower K or raise --gmm-fit")
    return GaussianMixture(n_components=components, covariance_type="full", max_iter=500,
                           random_state=seed).fit(z)


class MixturePrior:
    """The model seen by joint coherence, its prior replaced by a fitted Gaussian mixture: z is drawn from the
    mixture with the caller's generator (no Langevin chain), then decoded by the model."""

    def __init__(self, model, gmm):
        device = _device_of(model)
        self.model = model
        self.modalities = list(model.modalities)
        self.weights = torch.as_tensor(gmm.weights_, dtype=torch.float64, device=device)
        self.means = torch.as_tensor(gmm.means_, dtype=torch.float32, device=device)  # (K, d)
        self.chol = torch.as_tensor(np.linalg.cholesky(gmm.covariances_), dtype=torch.float32,
                                    device=device)  # (K, d, d), covariance = L L^T

    def parameters(self):
        return self.model.parameters()

    def sample_prior(self, n: int, *, langevin_steps: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """z [n, d]: a component k ~ weights, then mean_k + L_k eps with eps ~ N(0, I)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.means.shape[1], generator=generator, device=self.means.device)
        return self.means[k] + torch.einsum("nij,nj->ni", self.chol[k], eps)

    @torch.no_grad()
    def generate_joint(self, n: int, *, langevin_steps: int | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """n joint samples: z from the mixture, private latents from their priors, every modality decoded."""
        return self.model.decode(self.sample_prior(n, generator=generator), generator=generator)


def measure(model, judge, fit_chunks: Sequence[Batch], *, components: Sequence[int], num_samples: int,
            batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> dict:
    """eval.json's "latent_samplers": per K, {"gmm_K": joint coherence of decoded mixture draws with its
    standard error and n, the fit tuples, the mean train log-likelihood per tuple, convergence}. Every rank
    fits the same mixture (same tuples, same seed); the joint samples are split over ranks."""
    z = aggregate_posterior_samples(model, fit_chunks, seed=seed)
    out = {}
    for k in components:
        start = time.perf_counter()
        gmm = fit_gmm(z, k, seed=seed)
        fit_seconds = time.perf_counter() - start
        figure = measure_joint(MixturePrior(model, gmm), judge, num_samples=num_samples,
                               batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        out[f"gmm_{k}"] = {"joint": figure["coherence"], "stderr": figure["stderr"], "n": figure["n"],
                           "fit_tuples": len(z), "fit_split": "train", "components": k, "covariance": "full",
                           "converged": bool(gmm.converged_), "train_log_likelihood": float(gmm.score(z)),
                           "fit_seconds": fit_seconds, "ms_per_sample": figure["ms_per_sample"]}
    return out


def report_lines(results: dict) -> list[str]:
    """report.md's section: each sampler's joint coherence beside the prior's."""
    samplers = results.get("latent_samplers")
    if not samplers:
        return []
    joint = results["coherence"]["joint"]
    lines = ["", "## Post-hoc latent samplers (joint coherence of decoded draws)", "",
             "Each sampler is fitted after training to the aggregate posterior of the train split (one "
             "z ~ q(z|x_m) per tuple, m at random) and judged on the same number of seeded joint samples "
             "as the prior.", ""]
    rows = [["the run's prior", fmt(joint["coherence"]), fmt(joint["stderr"]), str(joint["n"]), "", "", ""]]
    rows += [[name, fmt(e["joint"]), fmt(e["stderr"]), str(e["n"]), str(e["fit_tuples"]),
              fmt(e["train_log_likelihood"], 2), "yes" if e["converged"] else "no"]
             for name, e in samplers.items()]
    return lines + md_table(["sampler", "joint coherence", "std. error", "n", "fit tuples",
                             "train log-lik. / tuple", "converged"], rows)


def results_lines(runs: Sequence[dict]) -> list[str]:
    """results.md's table: per run with samplers, the prior's joint coherence and each sampler's."""
    names = sorted({n for r in runs for n in r.get("latent_samplers") or {}},
                   key=lambda n: (n.split("_")[0], int(n.split("_")[-1])))
    if not names:
        return []
    rows = []
    for r in runs:
        samplers = r.get("latent_samplers") or {}
        if not samplers:
            continue
        cells = [f"{fmt(samplers[n]['joint'])} ± {fmt(samplers[n]['stderr'])}" if n in samplers else "n/a"
                 for n in names]
        rows.append([r["name"], r["prior"], f"{fmt(r['joint_coherence'])} ± {fmt(r['joint_stderr'])}",
                     *cells])
    lines = ["", "## Post-hoc latent samplers", "",
             "Joint coherence of the run's prior beside that of samplers fitted to its frozen model's "
             "aggregate posterior (`mmebm eval --gmm-components K`: gmm_K, a K-component full-covariance "
             "Gaussian mixture), same judge and sample count.", ""]
    return lines + md_table(["run", "prior", "prior joint", *names], rows)


def run_entries(ev: dict) -> dict[str, dict]:
    """The samplers of one eval.json as results.json keeps them (joint, stderr, n, fit_tuples)."""
    samplers = ev.get("latent_samplers") or {}
    return {name: {"joint": _num(e.get("joint")), "stderr": _num(e.get("stderr")), "n": int(e["n"]),
                   "fit_tuples": int(e["fit_tuples"])} for name, e in samplers.items()}


def _num(x) -> float:
    return math.nan if x is None else float(x)
