"""The learned reference p0 (``model.prior.reference=gmm``) fitted inside a run, when the energy starts.

At the first step of the first stage that trains the energy (or step 1 of a post-hoc fit; the model's
``on_step`` hook decides, and calls the fitter :func:`attach` gave it), the reference is fitted to
aggregate-posterior draws of the frozen-so-far encoders: one z ~ q(z | x_m), m uniform, for each of the
first ``model.prior.reference_fit_tuples`` train tuples, seeded per chunk: the procedure of the post-hoc GMM
baseline of ``mmebm eval --gmm-components`` (full covariances, k-means start), run inside the training. With
``reference_refit`` it is fitted again at every later stage boundary. Every rank reads the same tuples and
fits the same mixture (deterministic), so no collective is needed; the fit is saved in the checkpoints, and a
run resumed after it loads it instead of fitting again.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("mmebm_dist.train")


def attach(model, cfg) -> None:
    """Give ``model`` (a model with a learned reference) the ``reference_fitter`` its ``on_step`` hook calls
    when a fit is due: :func:`fit_reference` over the first ``model.prior.reference_fit_tuples`` train tuples
    of ``data.path`` in chunks of ``data.batch_size``, seeded by ``train.seed``."""
    if getattr(model, "learned_reference", None) is None:
        return
    options = dict(data_path=cfg.data.path, tuples=cfg.model.prior.reference_fit_tuples,
                   batch_size=cfg.data.batch_size, seed=cfg.train.seed)
    model.reference_fitter = lambda m: fit_reference(m, **options)  # looked up per call (tests count calls)


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
