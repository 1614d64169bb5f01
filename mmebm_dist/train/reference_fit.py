"""The learned reference p0 (``model.prior.reference=gmm``) fitted inside a run, when the energy starts.

At the first step of the first stage that trains the energy (or step 1 of a post-hoc fit), the reference is
fitted to aggregate-posterior draws of the frozen-so-far encoders: one z ~ q(z | x_m), m uniform, for each of
the first ``model.prior.reference_fit_tuples`` train tuples, seeded per chunk: the procedure of the post-hoc
GMM baseline of ``mmebm eval --gmm-components`` (full covariances, k-means start), run inside the training.
With ``reference_refit`` it is fitted again at every later stage boundary. Every rank reads the same tuples
and fits the same mixture (deterministic), so no collective is needed; the fit is saved in the checkpoints,
and a run resumed after it loads it instead of fitting again.
"""

from __future__ import annotations

import logging
import time

import torch

from mmebm_dist import schedule

log = logging.getLogger("mmebm_dist.train")


def fit_due(model, stage: schedule.Stage, step: int, *, refit: bool) -> bool:
    """Whether step ``step`` (1-based) starts by fitting the model's learned reference."""
    reference = getattr(model, "learned_reference", None)
    if reference is None:
        return False
    trains_energy = stage.lrs.get("energy", 0.0) > 0 or getattr(model, "posthoc", False)
    if not trains_energy:
        return False
    return not reference.fitted or (refit and stage.index > 0 and step == stage.first)


def fit_reference(model, *, data_path: str, tuples: int, batch_size: int, seed: int) -> dict[str, float]:
    """Fit ``model``'s learned reference to aggregate-posterior draws of the first ``tuples`` train tuples
    (chunks of ``batch_size``, seeded by ``seed``); returns the fit's diagnostics (logged)."""
    from mmebm_dist.evaluate.generate import read_chunks
    from mmebm_dist.evaluate.latent_samplers import aggregate_posterior_samples

    start = time.perf_counter()
    chunks = read_chunks(data_path, num=tuples, batch_size=batch_size, split="train")
    was_training = model.training
    model.eval()
    try:
        z = torch.from_numpy(aggregate_posterior_samples(model, chunks, seed=seed))
        stats = model.fit_reference(z, seed=seed)
    finally:
        model.train(was_training)
    stats["reference_fit_seconds"] = time.perf_counter() - start
    log.info("reference p0 (gmm, %d components) fitted to %d aggregate-posterior draws in %.1f s: "
             "mean log-likelihood %.3f per draw, %d EM iterations", model.learned_reference.components,
             int(stats["reference_fit_draws"]), stats["reference_fit_seconds"], stats["reference_fit_loglik"],
             int(stats["reference_fit_iters"]))
    return stats
