"""Posterior refinement at generation time: z ~ q(z | x_S), then K short-run Langevin steps on
log p(x_S | z, w_S) + log p(z) before the other modalities are decoded (the MCMC-inference idea of the
same authors, arXiv 2408.10467, applied to the amortised posterior).

The chain is the project's autograd Langevin reference (``langevin.sample``, ``backend='autograd'``) with
the reference density p0 of the prior and "energy" log p(x_S | z, w_S) + f(z) (f = 0 for fixed priors, whose
p0 is the prior itself). The source modalities' private latents w_S are held at their posterior locations.
With K = 0 it draws exactly what ``generate_conditional`` draws.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from mmebm_dist.evaluate.coherence import (
    CROSS_TUPLE,
    CROSS_TUPLE_SQ,
    AllReduce,
    Batch,
    conditioning_subsets,
    count_conditional,
    cross_coherence,
    distributed_sum,
    mean_stderr,
    subset_coherence,
)
from mmebm_dist.evaluate.judges.digits import DigitJudge, Predictor
from mmebm_dist.prior import langevin


def refine_posterior(model, batch: Batch, sources: Sequence[str], z0: torch.Tensor, *, steps: int,
                     step_size: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_K [B, d]: ``steps`` Langevin steps of size ``step_size`` from z0 on log p(x_S|z, w_S) + log p(z)."""
    if steps == 0:
        return z0
    sources = list(sources)
    with torch.no_grad():
        experts = model.encode(batch, sources)

    def log_likelihood_plus_f(z: torch.Tensor) -> torch.Tensor:
        total = model.energy(z).float() if model.energy is not None else z.new_zeros(z.shape[0])
        for i, name in enumerate(sources):
            u = z if experts.w_loc is None else torch.cat([experts.w_loc[i], z], dim=-1)
            total = total + model.likelihoods[name].log_prob(batch[name], model.decoders[name](u).float())
        return total

    with torch.autocast(device_type=z0.device.type, enabled=False):
        return langevin.sample(log_likelihood_plus_f, z0, steps=steps, step_size=step_size,
                               reference=model.p0, generator=generator, backend="autograd")


class RefinedPosterior:
    """The model seen by coherence and Frechet measurement, with refined conditional generation; it counts
    the seconds and tuples of its conditional generations (the cost per sample)."""

    def __init__(self, model, *, steps: int, step_size: float):
        if steps < 0 or not step_size > 0:
            raise ValueError(f"refinement needs steps >= 0 and step_size > 0; got {steps}, {step_size}")
        self.model, self.steps, self.step_size = model, steps, step_size
        self.modalities = list(model.modalities)
        self.seconds, self.tuples = 0.0, 0

    def parameters(self):
        return self.model.parameters()

    def generate_conditional(self, batch: Batch, sources: Sequence[str], *,
                             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Like the model's: z ~ q(z | x_sources), refined, then every modality decoded (private latents of
        the targets from their priors)."""
        start = time.perf_counter()
        z0 = self.model.posterior_sample(batch, list(sources), generator=generator)
        z = refine_posterior(self.model, batch, sources, z0, steps=self.steps, step_size=self.step_size,
                             generator=generator)
        with torch.no_grad():
            out = self.model.decode(z, generator=generator)
        if z.device.type == "cuda":
            torch.cuda.synchronize(z.device)
        self.seconds += time.perf_counter() - start
        self.tuples += z.shape[0]
        return out


def measure_refinement(model, classifiers: Predictor, chunks: Sequence[Batch | None], *,
                       steps: Sequence[int], step_size: float, seed: int, subset_sizes: Sequence[int] = (),
                       frechet=None, rank: int = 0, world_size: int = 1,
                       all_reduce: AllReduce = distributed_sum) -> list[dict]:
    """Per K in ``steps``: cross and k-of-M coherence of refined conditional generation, the cost per
    generated tuple (ms, one source set), and the cross FD when ``frechet(view)`` is given (it measures a
    model view and returns measure_frechet's dict). The draws of q are those of plain generation."""
    names = list(model.modalities)
    if len(names) < 2:
        raise ValueError("posterior refinement is measured by cross generation: it needs two modalities")
    subsets = [(n,) for n in names]
    subsets += [s for k in sorted(set(subset_sizes)) for s in conditioning_subsets(names, k)]
    out = []
    for k in steps:
        view = RefinedPosterior(model, steps=k, step_size=step_size)
        counts = count_conditional(view, DigitJudge(classifiers), chunks, subsets, seed=seed, rank=rank,
                                   world_size=world_size)
        cost = torch.tensor([view.seconds, float(view.tuples)], dtype=torch.float64)
        keys = [("cell", s, t) for s in subsets for t in names] + [CROSS_TUPLE, CROSS_TUPLE_SQ]
        total = counts.reduce(keys, all_reduce)
        seconds, tuples = all_reduce(cost).tolist()
        cell = {(s, t): total[("cell", (s,), t)].rate for s in names for t in names}
        rates = {key[1:]: total[key].rate for key in keys if key[0] == "cell"}
        tup, sq = total[CROSS_TUPLE], total[CROSS_TUPLE_SQ]
        entry = {"steps": k, "step_size": step_size, "cross": cross_coherence(cell, names),
                 "cross_stderr": mean_stderr(tup.correct, sq.correct, tup.total), "n": int(tup.total),
                 "subsets": {str(s): subset_coherence(rates, names, s)
                             for s in [1, *sorted(set(subset_sizes))]},
                 "ms_per_sample": 1e3 * seconds / tuples if tuples else math.nan}
        if frechet is not None:
            entry["frechet_cross"] = frechet(RefinedPosterior(model, steps=k, step_size=step_size))["cross"]
        out.append(entry)
    return out
