"""The paper's open questions answered as tables generated from evaluated runs (``mmebm questions``).

(a) Which reference density p0: every EBM prior fitted to one frozen model (``model.prior.fit=posthoc`` with
    ``train.init_from``, so the encoders and decoders are the same on every row), its figure at its own chain
    length and its reference's on the same seeded draws (the sweep at K = 0), beside the model's fixed prior,
    the post-hoc Gaussian mixtures fitted to the same model and the aggregate-posterior ceiling.
(b) Langevin length: the chain length and step size used in training (rows) against the length used at
    sampling (columns: the eval's sweep), with the milliseconds per sample of each.
(c) Posterior refinement (``mmebm eval --refine-steps``): cross coherence and its cost per step size, and the
    importance-weighted test log p(X) of the EBM prior, its reference alone and the reference's base.
Every figure is read from the runs' ``eval*/eval.json`` (a run evaluated several times contributes every
eval directory); nothing is typed in. Hand-written notes (``--notes``) follow the generated header.
"""

from __future__ import annotations

import glob
import json
from pathlib import Path

from mmebm_dist.reporting.tables import fmt, md_table
from mmebm_dist.rundir import CONFIG_FILE


class QuestionsError(ValueError):
    """The runs given to ``mmebm questions`` hold nothing to tabulate; the message says what to run."""


def _read_run(run_dir: Path) -> dict | None:
    """The run's resolved config and every eval directory's eval.json, merged (None: not evaluated)."""
    config_path = run_dir / CONFIG_FILE
    evals = sorted(run_dir.glob("eval*/eval.json"))
    if not config_path.is_file() or not evals:
        return None
    config = json.loads(config_path.read_text())
    prior = config["model"]["prior"]
    langevin = prior["langevin"]
    run = {"name": run_dir.name, "prior": prior["kind"], "reference": prior["reference"],
           "components": prior.get("reference_components"), "train_steps": langevin["steps"],
           "step_size": langevin["step_size"], "init": langevin.get("init", "p0"),
           "energy_steps": config["train"]["steps"] if prior["fit"] == "posthoc" else None,
           "source": Path(config["train"]["init_from"]).name if prior["fit"] == "posthoc" else None,
           "joint_stage": any(stage["stage"] == "joint" for stage in config["train"]["schedule"]),
           "samplers": {}, "refinement": [], "likelihood": None}
    for path in evals:
        ev = json.loads(path.read_text())
        coh = ev["coherence"]
        if path.parent.name == "eval" or "joint" not in run:
            run.update(joint=coh["joint"], cross=coh["cross"], ceiling=coh.get("prior_ceiling"),
                       sweep=coh.get("langevin_sweep") or [])
        run["samplers"].update(ev.get("latent_samplers") or {})
        for entry in ev.get("refinement") or []:
            run["refinement"].append(entry)
        if ev.get("likelihood"):
            run["likelihood"] = ev["likelihood"]
    return run


def _label(run: dict) -> str:
    if run["prior"] != "ebm":
        return f"{run['prior']} prior (the model's own)"
    ref = f"gmm-{run['components']}" if run["reference"] == "gmm" else run["reference"]
    init = ", SIR start" if run["init"] == "sir" else ""
    steps = f", {run['energy_steps']:,} energy steps" if run["energy_steps"] else ""
    return f"EBM on {ref}, trained K {run['train_steps']} x s {run['step_size']:g}{init}{steps}"


def _fig(entry: dict | None, key: str = "coherence") -> str:
    return "" if not entry else f"{fmt(entry[key])} ± {fmt(entry['stderr'])}"


def reference_table(model: str, runs: list[dict]) -> list[str]:
    """(a): every prior and post-hoc sampler on the frozen model ``model``."""
    source = next((r for r in runs if r["name"] == model), None)
    ebms = [r for r in runs if r["source"] == model and r["prior"] == "ebm"]
    rows = []
    if source is not None:
        rows.append([model, _label(source), _fig(source["joint"]), "", "", _fig(source["cross"])])
        for name, s in sorted(source["samplers"].items(), key=lambda kv: kv[1].get("components", 0)):
            rows.append([model, f"{name} fitted after training", _fig(s, "joint"), "", "", ""])
    for r in ebms:
        base = next((e for e in r["sweep"] if e["steps"] == 0), None)
        gain = "" if base is None else f"{r['joint']['coherence'] - base['coherence']:+.3f}"
        rows.append([r["name"], _label(r), f"{_fig(r['joint'])} (K {r['joint'].get('langevin_steps', '')})",
                     _fig(base), gain, _fig(r["cross"])])
    ceiling = (source or (ebms[0] if ebms else {})).get("ceiling")
    if ceiling:
        rows.append([model, "aggregate-posterior ceiling (draws of q(z | x_m))", _fig(ceiling), "", "", ""])
    return md_table(["run", "prior / sampler", "joint coherence", "its reference (K = 0, same draws)", "gain",
                     "cross coherence"], rows)


def joint_table(runs: list[dict]) -> list[str]:
    """Runs whose schedule has a joint stage (the encoders and decoders trained under the EBM prior): the
    prior's figure, its reference on the same draws, a GMM-50 fitted to the same model and the ceiling."""
    rows = []
    for r in (r for r in runs if r["joint_stage"]):
        base = next((e for e in r["sweep"] if e["steps"] == 0), None)
        gmm = r["samplers"].get("gmm_50")
        rows.append([r["name"], _label(r), f"{_fig(r['joint'])} (K {r['joint'].get('langevin_steps', '')})",
                     _fig(base), _fig(gmm, "joint"), _fig(r.get("ceiling")), _fig(r["cross"])])
    return md_table(["run", "prior", "joint coherence", "its reference (K = 0)", "GMM-50 on the same model",
                     "ceiling", "cross coherence"], rows)


def langevin_table(runs: list[dict]) -> list[str]:
    """(b): training chain (rows) x sampling chain length (columns), coherence and ms per sample."""
    ebms = [r for r in runs if r["prior"] == "ebm" and r["sweep"]]
    lengths = sorted({e["steps"] for r in ebms for e in r["sweep"]})
    rows = []
    for r in ebms:
        by_k = {e["steps"]: e for e in r["sweep"]}
        rows.append([r["name"], _label(r)] + [f"{_fig(by_k[k])} ({by_k[k]['ms_per_sample']:.2f} ms)"
                                              if k in by_k else "" for k in lengths])
    return md_table(["run", "training chain", *[f"K = {k} at sampling" for k in lengths]], rows)


def refinement_table(runs: list[dict]) -> list[str]:
    """(c): cross coherence after K refinement steps per step size, with the cost; log p(X) per prior."""
    rows, ll_rows = [], []
    for r in runs:
        for e in r["refinement"]:
            rows.append([r["name"], f"{e['step_size']:g}", str(e["steps"]), f"{fmt(e['cross'])} ± "
                         f"{fmt(e['cross_stderr'])}", f"{e.get('ms_per_sample', float('nan')):.2f}"])
        ll = r["likelihood"]
        if ll:
            joint = ll["joint"]
            priors = ll.get("priors") or {}
            alone = [next((e for k, e in priors.items() if k.startswith(prefix)), None)
                     for prefix in ("reference", "base")]
            ll_rows.append([r["name"], f"{fmt(joint['mean'], 2)} ± {fmt(joint['stderr_total'], 2)}",
                            *[f"{fmt(e['mean'], 2)} ± {fmt(e['stderr'], 2)}" if e else "" for e in alone]])
    lines = md_table(["run", "step size", "refinement steps", "cross coherence", "ms / sample"], rows)
    if ll_rows:
        lines += ["", "Importance-weighted test log p(X) (nats per tuple; the same tuples and particles in a "
                  "row: the EBM prior with log Z subtracted, its reference alone, the reference's base "
                  "alone):", ""]
        lines += md_table(["run", "EBM prior", "reference alone", "base alone"], ll_rows)
    return lines


def build(runs: list[dict], command: str, notes: str | None) -> tuple[str, dict]:
    models = sorted({r["source"] for r in runs if r["source"]})
    lines = ["# The paper's open questions, measured", "",
             f"Generated by `{command}` from the runs' eval.json files; every figure is a joint or cross "
             "coherence ± its standard error over samples unless named otherwise.", ""]
    if notes:
        lines += ["<!-- hand-written notes (--notes) start -->", notes.rstrip(), "<!-- notes end -->", ""]
    for model in models:
        lines += ["", f"## (a) Which reference density? Priors on the frozen model `{model}`", ""]
        lines += reference_table(model, runs)
    if any(r["joint_stage"] for r in runs):
        lines += ["", "## Joint training: the encoders and decoders trained under the EBM prior", ""]
        lines += joint_table(runs)
    lines += ["", "## (b) Langevin length in training x at sampling (joint coherence, ms per sample)", ""]
    lines += langevin_table(runs)
    if any(r["refinement"] or r["likelihood"] for r in runs):
        lines += ["", "## (c) Posterior refinement and test log-likelihood", ""]
        lines += refinement_table(runs)
    return "\n".join(lines) + "\n", {"command": command, "runs": runs}


def read_runs(patterns: list[str]) -> list[dict]:
    """The evaluated runs among the directories ``patterns`` name (globs expanded); QuestionsError if none."""
    dirs = sorted({Path(p) for pattern in patterns for p in (glob.glob(pattern) or [pattern])
                   if Path(p).is_dir()})
    runs = [r for r in (_read_run(d) for d in dirs) if r is not None]
    if not runs:
        raise QuestionsError(f"none of --runs {' '.join(patterns)} holds an evaluated run (config.json and "
                             "eval*/eval.json); train and `mmebm eval` them first")
    return runs
