"""The figures of ``mmebm eval`` beyond coherence, in one place: their options, their measurement, their
report.md section and their columns in results.md (the flags: ``mmebm_dist.commands.eval``).

- Frechet distance of joint and cross generations in the classifiers' penultimate features (frechet.py), and
  the standard FID when ``--inception-weights`` names a local weights file;
- test log-likelihood log p(X), log p(x_m) by importance weighting, with the EBM's log Z (likelihood.py);
- posterior refinement by short-run Langevin before cross generation, K steps each (refine.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mmebm_dist.config import OptionError
from mmebm_dist.reporting.tables import fmt, md_table


@dataclass(kw_only=True)
class BeyondOptions:
    """What ``mmebm eval`` measures beyond coherence (its ``--no-frechet``, ``--likelihood-*``, ``--ais-*``,
    ``--refine-*`` flags; the defaults are the command's)."""

    batch_size: int
    """Generation / test batch size."""
    seed: int
    """Seed of every sample drawn."""
    no_frechet: bool = False
    """Skip the Frechet distance in the classifiers' penultimate features."""
    inception_weights: str | None = None
    """Local InceptionV3 weights file (torch-fidelity's): also the standard FID of image modalities."""
    likelihood_particles: int = 0
    """Importance-weighted test log p(X) and log p(x_m) with this many particles (0: skip)."""
    likelihood_tuples: int = 100
    """Test tuples the log-likelihood is averaged over."""
    log_z_samples: int = 100_000
    """Reference draws of the Monte Carlo log Z of an EBM prior."""
    log_z_max_stderr: float = 0.05
    """Above this Monte Carlo standard error, log Z comes from AIS."""
    ais_chains: int = 1000
    """AIS chains."""
    ais_temperatures: int = 300
    """AIS temperatures, one MALA step each."""
    ais_step_size: float = 0.2
    """AIS MALA step."""
    refine_steps: Sequence[int] | None = None
    """Posterior-refinement Langevin steps to measure (None or empty: skip)."""
    refine_step_size: float = 0.02
    """Posterior-refinement Langevin step size s (drift s^2/2)."""


def _first_tuples(chunks: Sequence, num: int, batch_size: int) -> list:
    """The chunks holding the first ``num`` test tuples (chunks hold ``batch_size`` tuples but the last; other
    ranks' stay None), the last one cut to size."""
    count = min(len(chunks), -(-num // batch_size))
    out = list(chunks[:count])
    if out[-1] is not None:
        out[-1] = {k: v[:num - (count - 1) * batch_size] for k, v in out[-1].items()}
    return out


def _reference_densities(model) -> dict:
    """The normalised densities an EBM prior builds on, by name: its reference p0 (``reference: gmm`` for a
    learned one) and, under a learned reference, the fixed base it replaced."""
    p0 = model.p0
    out = {f"reference ({p0.name})": p0}
    base = getattr(p0, "base", None)
    if base is not None:
        out[f"base ({base.name})"] = base
    return out


def measure(options: BeyondOptions, *, model, classifiers, chunks: Sequence, num_samples: int,
            joint_langevin_steps: int | None, subset_sizes: Sequence[int], device: torch.device, rank: int,
            world_size: int) -> dict:
    """Every figure the flags ask for, as eval.json entries (absent when skipped); ``classifiers`` is the
    digit classifier bundle, None for data judged otherwise (Frechet and refinement then skip)."""
    from mmebm_dist.evaluate import frechet, likelihood, refine

    if options.likelihood_particles < 0 or options.likelihood_tuples < 1:
        raise OptionError(f"--likelihood-particles must be >= 0 and --likelihood-tuples >= 1; got "
                         f"{options.likelihood_particles}, {options.likelihood_tuples}")
    if options.refine_steps and classifiers is None:
        raise OptionError("--refine-steps is measured with digit classifiers; this data set is judged by "
                         "attributes, which refinement does not support yet: drop the flag")
    out: dict = {}
    common = {"num_samples": num_samples, "batch_size": options.batch_size, "seed": options.seed,
              "joint_langevin_steps": joint_langevin_steps, "rank": rank, "world_size": world_size}
    judge = None
    if classifiers is not None and not options.no_frechet:
        judge = frechet.classifier_features(classifiers)
        out["frechet"] = {"judge": {"features": "penultimate layer of the per-modality classifiers",
                                    "sha256": frechet.module_sha256(classifiers)},
                          **frechet.measure_frechet(model, judge, chunks, **common)}
    if options.inception_weights:
        images = [n for n in model.modalities if len(model.shapes[n]) == 3]
        if not images:
            raise OptionError(f"--inception-weights: the run has no image modality ({model.modalities})")
        fid = frechet.inception_features(options.inception_weights, device)
        out["inception_fid"] = {"judge": {"features": "InceptionV3 pool3 (2048-D)",
                                          "weights": str(options.inception_weights),
                                          "sha256": frechet.file_sha256(options.inception_weights)},
                                **frechet.measure_frechet(model, fid, chunks, names=images, **common)}
    if options.likelihood_particles > 0:
        log_z = None
        if model.energy is not None:
            log_z = likelihood.log_normalizer(model, num_samples=options.log_z_samples,
                                              max_stderr=options.log_z_max_stderr,
                                              ais_chains=options.ais_chains,
                                              ais_temperatures=options.ais_temperatures,
                                              ais_step_size=options.ais_step_size, seed=options.seed)
        tuples = _first_tuples(chunks, options.likelihood_tuples, options.batch_size)
        common_ll = dict(particles=options.likelihood_particles, seed=options.seed, rank=rank,
                         world_size=world_size)
        # an EBM's reference alone (and the base it replaced) on the same tuples and draws, paired
        priors = ({name: d.log_prob for name, d in _reference_densities(model).items()}
                  if model.energy is not None else None)
        out["likelihood"] = likelihood.measure_likelihood(model, tuples, log_z=log_z, priors=priors,
                                                          **common_ll)
    if options.refine_steps:
        fd = None
        if judge is not None:
            fd = lambda view: frechet.measure_frechet(view, judge, chunks, joint=False, **common)
        out["refinement"] = refine.measure_refinement(
            model, classifiers, chunks, steps=options.refine_steps, step_size=options.refine_step_size,
            seed=options.seed, subset_sizes=subset_sizes, frechet=fd, rank=rank, world_size=world_size)
    return out


# ------------------------------------------------------------------------------------------------ report.md


def _fd_rows(label: str, entry: dict, names: Sequence[str]) -> list[str]:
    return [label, fmt(entry["mean"], 3), *[fmt(entry[n], 3) for n in names], str(entry["n"])]


def _frechet_lines(title: str, fd: dict) -> list[str]:
    names = fd["modalities"]
    lines = ["", f"## {title}", "",
             f"Judge: {fd['judge']['features']}, sha256 `{fd['judge']['sha256'][:16]}` (distances compare "
             "only within one judge). Against the test tuples (n = " + str(fd["n_test"]) + "); "
             "`test halves`: even vs odd test tuples, the figure sampling noise alone gives.", ""]
    rows = [_fd_rows(label, fd[key], names) for key, label in
            (("joint", "joint samples"), ("cross", "cross (each target from every other source)"),
             ("test_halves", "test halves")) if key in fd]
    return lines + md_table(["set", "mean", *names, "n"], rows)


def report_lines(results: dict) -> list[str]:
    """The report.md sections of the figures beyond coherence present in ``results`` (eval.json's dict)."""
    lines: list[str] = []
    if results.get("frechet"):
        lines += _frechet_lines("Frechet distance in classifier features (lower is closer to the test data)",
                                results["frechet"])
    if results.get("inception_fid"):
        lines += _frechet_lines("Standard FID (InceptionV3)", results["inception_fid"])
    if results.get("likelihood"):
        ll = results["likelihood"]
        lines += ["", f"## Test log-likelihood ({ll['particles']} importance particles, {ll['n']} test "
                  f"tuples, {ll['units']})", ""]
        if ll.get("log_z"):
            lz = ll["log_z"]
            lines += [f"EBM prior: log Z = {fmt(lz['log_z'])} ± {fmt(lz['stderr'])} ({lz['method']}, "
                      f"n = {lz['n']}, ESS {fmt(lz['ess'], 1)}); subtracted, its error in the total.", ""]
        rows = [["log p(X)", fmt(ll["joint"]["mean"], 2), fmt(ll["joint"]["stderr"], 2),
                 fmt(ll["joint"]["stderr_total"], 2)]]
        rows += [[f"log p({m})", fmt(e["mean"], 2), fmt(e["stderr"], 2), fmt(e["stderr_total"], 2)]
                 for m, e in (ll.get("unimodal") or {}).items()]
        for name, e in (ll.get("priors") or {}).items():
            rows.append([f"log p(X), prior = {name} alone", fmt(e["mean"], 2), fmt(e["stderr"], 2),
                         fmt(e["stderr"], 2)])
            if e.get("minus_prior"):  # paired over the same tuples and draws
                d = e["minus_prior"]
                rows.append([f"{name} alone minus the prior (paired)", fmt(d["mean"], 2), fmt(d["stderr"], 2),
                             fmt(d["stderr_total"], 2)])
        lines += md_table(["figure", "mean", "std. error (tuples)", "std. error (with log Z)"], rows)
    if results.get("refinement"):
        entries = results["refinement"]
        sizes = list(entries[0]["subsets"])
        lines += ["", "## Posterior refinement before cross generation (Langevin on log p(x_S|z) + log p(z), "
                  f"step size {entries[0]['step_size']})", ""]
        header = ["K", "cross coherence", "std. error", *[f"{k} of M" for k in sizes if k != "1"],
                  "cross FD (mean)", "ms / sample"]
        rows = [[str(e["steps"]), fmt(e["cross"]), fmt(e["cross_stderr"]),
                 *[fmt(e["subsets"][k]) for k in sizes if k != "1"],
                 fmt((e.get("frechet_cross") or {}).get("mean"), 3), fmt(e["ms_per_sample"], 3)]
                for e in entries]
        lines += md_table(header, rows)
    return lines


# ------------------------------------------------------------------------------------------------ results.md


def run_figures(ev: dict) -> dict:
    """The per-run figures results.md shows from one eval.json (nan where the eval did not measure them)."""
    fd = ev.get("frechet") or {}
    ll = ev.get("likelihood") or {}
    out = {"frechet_joint": _get(fd, "joint", "mean"), "frechet_cross": _get(fd, "cross", "mean"),
           "frechet_judge": (fd.get("judge") or {}).get("sha256", "")[:12],
           "log_px": _get(ll, "joint", "mean"), "log_px_stderr": _get(ll, "joint", "stderr_total"),
           "log_z_method": (ll.get("log_z") or {}).get("method", ""),
           "log_px_priors": {name: {"mean": _num(e.get("mean")), "stderr": _num(e.get("stderr")),
                                    "minus_prior": _get(e, "minus_prior", "mean"),
                                    "minus_prior_stderr": _get(e, "minus_prior", "stderr_total")}
                             for name, e in (ll.get("priors") or {}).items()},
           "refinement": {str(e["steps"]): _num(e["cross"]) for e in ev.get("refinement") or []}}
    return out


def _get(d: dict, *keys: str) -> float:
    for key in keys:
        d = (d or {}).get(key)
    return _num(d)


def _num(x) -> float:
    return math.nan if x is None else float(x)


def results_lines(runs: Sequence[dict]) -> list[str]:
    """The results.md table of the figures beyond coherence, one row per run that has any."""
    rows = []
    for r in runs:
        b = r.get("beyond") or {}
        if not b or (all(math.isnan(b[k]) for k in ("frechet_joint", "frechet_cross", "log_px"))
                     and not b["refinement"]):
            continue
        refined = ", ".join(f"K={k}: {fmt(v)}" for k, v in b["refinement"].items())
        log_px = "n/a" if math.isnan(b["log_px"]) else f"{fmt(b['log_px'], 2)} ± {fmt(b['log_px_stderr'], 2)}"
        alone = "; ".join(f"{name}: {fmt(e['minus_prior'], 2)} ± {fmt(e['minus_prior_stderr'], 2)}"
                          for name, e in (b.get("log_px_priors") or {}).items()
                          if not math.isnan(e["minus_prior"]))
        rows.append([r["name"], r["prior"], fmt(b["frechet_joint"], 3), fmt(b["frechet_cross"], 3),
                     f"`{b['frechet_judge']}`" if b["frechet_judge"] else "", log_px, b["log_z_method"],
                     alone, refined])
    if not rows:
        return []
    lines = ["", "## Beyond coherence", "",
             "FD: Frechet distance to the test tuples in the classifiers' penultimate features, mean over "
             "modalities (comparable only between runs with the same judge hash). log p(X): "
             "importance-weighted test log-likelihood in nats per tuple (EBM: log Z subtracted, its error "
             "included). Density alone minus prior: log p(X) with the EBM's reference (or the base it "
             "replaced) as the whole prior minus the EBM prior's, paired over the same tuples and draws "
             "(negative: the energy adds likelihood). Refined cross: cross coherence after K posterior "
             "Langevin steps.", ""]
    return lines + md_table(["run", "prior", "FD joint", "FD cross", "judge", "log p(X)", "log Z by",
                             "density alone minus prior", "refined cross"], rows)
