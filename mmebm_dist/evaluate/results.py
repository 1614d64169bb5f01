"""Aggregate evaluated runs into docs/results.{md,json} and PNGs (``mmebm results``: ``commands/results.py``).

Runs are grouped into settings by (dataset, config hash), the hash being taken over config.json without
``train.seed`` and ``train.out_dir``, so the seeds of one setting share a row. Every figure is read from the
runs' files (config.json, metrics.jsonl, commands.log, EVAL/eval.json, EVAL/joint_samples.png); the only typed
numbers are the paper's reported coherences (:data:`PAPER`), shown as such.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from mmebm_dist import schedule
from mmebm_dist.config import config_from_dict, config_to_dict, flatten_dotted
from mmebm_dist.evaluate import beyond_coherence, latent_samplers
from mmebm_dist.evaluate.report import save_figure
from mmebm_dist.reporting.tables import fmt, md_table
from mmebm_dist.rundir import (
    COMMANDS_LOG,
    CONFIG_FILE,
    EVAL_JSON,
    JOINT_PNG,
    METRICS_FILE,
    MODEL_FILE,
    atomic_write_text,
    latest_checkpoint,
    parse_jsonl,
    read_commands,
)
from mmebm_dist.userfiles import clip

# The paper's reported PolyMNIST coherences (arXiv 2409.19862, as summarised in the project brief and
# docs/reference-hparams.md; larger model and budget than our runs). Shown labelled as the paper's numbers.
PAPER = {"polymnist": {"joint_coherence": 0.746, "cross_coherence": 0.853}}

# manifest source.name -> (dataset key, label in results.md)
DATASETS = {
    "mnist": ("polymnist", "PolyMNIST"),
    "fashion": ("polyfashion", "Fashion-MNIST polymodal"),
    "idx": ("polymnist-idx", "PolyMNIST (from IDX files)"),
}
# Config keys that choose how a step is executed, not what it computes (the same function and parameters; the
# speed levers of tests/test_speed_levers.py): runs differing only in them belong to one setting.
EXECUTION_KEYS = ("model.batched_decode", "model.channels_last", "model.subpixel_upsample", "train.threads",
                  "train.compile")

# Config keys whose change alone makes a setting an ablation of the main EBM setting.
ABLATION_KEYS = frozenset({"model.prior.reference", "model.prior.reference_scale",
                           "model.prior.langevin.steps", "model.prior.langevin.step_size"})
FIXED_PRIORS = ("laplace", "gaussian")


class ResultsError(ValueError):
    """The runs given to ``mmebm results`` cannot be aggregated; the message says why and the fix."""


# -------------------------------------------------------------------------------------------- reading runs


@dataclass(kw_only=True)
class Run:
    """Every figure of one evaluated run, read from its files (becomes one object of results.json "runs")."""

    name: str
    """Run directory name."""
    run_dir: str
    """Run directory as given on the command line."""
    dataset: str
    """Dataset key (``polymnist``, ...): from DATA/manifest.json source.name, else the path's basename."""
    dataset_label: str
    """Human-readable dataset name for results.md."""
    data_path: str
    prior: str
    """``laplace``, ``gaussian`` or ``ebm/<reference>``."""
    seed: int
    config_hash: str
    """sha256 of the canonical config.json without train.seed and train.out_dir (first 12 hex digits)."""
    init_from: str | None
    """train.init_from: the run this one started from (a post-hoc prior's fixed-prior run, or the run a
    fine-tuning continues); None for a run trained from scratch."""
    langevin_steps: int | None
    """Langevin steps of the EBM prior during training and joint sampling (None for fixed priors)."""
    langevin_step_size: float | None
    steps: int
    """Last step in metrics.jsonl."""
    eval_step: int
    """Checkpoint step the eval measured."""
    own_model_steps: int
    """Encoder/decoder optimizer steps of this run up to the evaluated step: its reference and joint stages
    (all steps of a plain jointly fitted run; 0 for model.prior.fit=posthoc)."""
    own_energy_steps: int
    """Energy optimizer steps of this run up to the evaluated step: its energy and joint stages (0 for a
    fixed prior)."""
    model_steps: int = -1
    """own_model_steps plus those of the train.init_from chain that are among the runs loaded."""
    energy_steps: int = -1
    """own_energy_steps plus those of the train.init_from chain that are among the runs loaded."""
    source_missing: str | None = None
    """The train.init_from source (at some depth of the chain) that is not among the runs loaded, so its steps
    are not counted; None when every source was found or the run starts from scratch."""
    wall_seconds: float
    """Cumulative training wall time at the last logged step."""
    samples_per_s: float
    """Mean of the logged samples_per_s over the last half of training."""
    commands: list[dict[str, str]]
    """Lines of commands.log: {"time", "argv", ...extra key=value fields}; empty when the run predates it."""
    joint_coherence: float
    joint_stderr: float
    joint_n: int
    cross_coherence: float
    cross_stderr: float
    cross_n: int
    ceiling_coherence: float
    ceiling_stderr: float
    ceiling_n: int | None
    langevin_sweep: list[dict[str, float]]
    """Eval's joint coherence per Langevin step count: {"steps", "coherence", "stderr", "n"}."""
    train_elbo: float
    """ELBO of the last logged training step."""
    test_elbo: float
    """Eval's test-set ELBO (nan when the eval skipped it)."""
    classifier_accuracy: dict[str, float]
    """Test accuracy of each modality's classifier: it bounds every coherence figure."""
    linear_probe_accuracy: float
    eval_dir: str
    joint_samples_png: str | None
    """The eval's joint sample grid, None when the eval dir lacks it."""
    cross_directions: dict[str, float] = field(default_factory=dict)
    """Cross coherence per direction, ``"source -> target"``: the off-diagonal of the eval's cross matrix (for
    birds: attributes stated by the image vs by the caption generated from it, and the other way)."""
    latent_samplers: dict[str, dict] = field(default_factory=dict)
    """Post-hoc latent samplers of the eval (``mmebm eval --gmm-components K --flow``): {"gmm_K" or
    "flow_maf": {"joint", "stderr", "n", "fit_tuples"}}."""
    beyond: dict[str, Any] = field(default_factory=dict)
    """Figures beyond coherence (Frechet distance, log-likelihood, refinement): see beyond_coherence."""
    curves: dict[str, list[float]] = field(default_factory=dict, repr=False)
    """step / loss / energy_gap per logged record, for the training-curve picture (not in results.json)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("curves")
        return out


def find_run_dirs(patterns: Sequence[str]) -> list[Path]:
    """Run directories named by ``patterns`` (paths or globs), sorted and deduplicated; a pattern matching
    nothing raises naming it; plain files (e.g. the ``*.log`` beside runs) are skipped."""
    found: dict[str, Path] = {}
    for pattern in patterns:
        matches = [pattern] if os.path.exists(pattern) else sorted(glob.glob(pattern))
        if not matches:
            raise ResultsError(f"--runs {pattern!r} matches nothing: give run directories written by "
                               f"`mmebm train` (e.g. runs/results/*)")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found.setdefault(str(path.resolve()), path)
    return sorted(found.values(), key=str)


def load_run_checked(run_dir: Path, eval_name: str = "eval", likelihood_eval: str | None = None
                     ) -> tuple[Run | None, str]:
    """:func:`load_run`, turning a file of the wrong shape (a list where a mapping belongs, text where a
    number does) into a ResultsError naming the run's files, not a traceback from deep inside."""
    try:
        return load_run(run_dir, eval_name, likelihood_eval)
    except (KeyError, TypeError, AttributeError, IndexError, ValueError) as exc:
        if isinstance(exc, ResultsError):
            raise
        raise ResultsError(f"{run_dir}: {CONFIG_FILE}, {METRICS_FILE} or {eval_name}/{EVAL_JSON} is not of "
                           f"the shape `mmebm train` / `mmebm eval` write ({type(exc).__name__}: "
                           f"{clip(exc, 120)}); rewrite it or leave the run out of --runs") from exc


def load_run(run_dir: Path, eval_name: str = "eval", likelihood_eval: str | None = None
             ) -> tuple[Run | None, str]:
    """The :class:`Run` of ``run_dir``, or (None, what is missing) when the run has no complete eval; the
    test log-likelihood comes from ``likelihood_eval``'s eval.json where ``eval_name``'s has none."""
    config_path, metrics_path = run_dir / CONFIG_FILE, run_dir / METRICS_FILE
    eval_dir = run_dir / eval_name
    eval_path = eval_dir / EVAL_JSON
    for path in (config_path, metrics_path, eval_path):
        if not path.exists():
            hint = f" (run `mmebm eval --run {run_dir} --out {eval_dir}`)" if path == eval_path else ""
            return None, f"missing {path}{hint}"
    config = read_json(config_path)
    records = read_metrics(metrics_path)
    if not any("wall_time_s" in r for r in records):
        return None, f"{metrics_path} holds no training record (no logged step yet)"
    ev = read_json(eval_path)
    ll_path = run_dir / likelihood_eval / EVAL_JSON if likelihood_eval else None
    if ll_path is not None and "likelihood" not in ev and ll_path.exists():
        ev = {**ev, "likelihood": read_json(ll_path).get("likelihood")}
    coherence = ev.get("coherence", {})
    for part in ("joint", "cross"):
        lacking = [k for k in ("coherence", "stderr", "n") if k not in coherence.get(part, {})]
        if lacking:
            return None, f"{eval_path} lacks coherence.{part}.{{{','.join(lacking)}}} (an unfinished eval?)"

    dataset, label = dataset_of(config["data"]["path"])
    prior_cfg = config["model"]["prior"]
    is_ebm = prior_cfg["kind"] == "ebm"
    train = [r for r in records if "wall_time_s" in r]
    last = train[-1]
    half = last["step"] / 2
    late = [r["samples_per_s"] for r in train if r["step"] > half and "samples_per_s" in r]
    ceiling = coherence.get("prior_ceiling", {})
    joint_png = eval_dir / JOINT_PNG
    eval_step = int(ev.get("run", {}).get("step", -1))
    own_model, own_energy = trained_steps(config, eval_step if eval_step >= 0 else int(last["step"]))
    run = Run(
        name=run_dir.name,
        run_dir=str(run_dir),
        dataset=dataset,
        dataset_label=label,
        data_path=config["data"]["path"],
        prior=prior_label(prior_cfg),
        seed=int(config["train"]["seed"]),
        config_hash=setting_hash(config),
        init_from=config["train"].get("init_from") or None,
        langevin_steps=int(prior_cfg["langevin"]["steps"]) if is_ebm else None,
        langevin_step_size=float(prior_cfg["langevin"]["step_size"]) if is_ebm else None,
        steps=int(last["step"]),
        eval_step=eval_step,
        own_model_steps=own_model,
        own_energy_steps=own_energy,
        wall_seconds=float(last["wall_time_s"]),
        samples_per_s=statistics.fmean(late) if late else math.nan,
        commands=read_commands(run_dir / COMMANDS_LOG),
        joint_coherence=_num(coherence["joint"]["coherence"]),
        joint_stderr=_num(coherence["joint"]["stderr"]),
        joint_n=int(coherence["joint"]["n"]),
        cross_coherence=_num(coherence["cross"]["coherence"]),
        cross_stderr=_num(coherence["cross"]["stderr"]),
        cross_n=int(coherence["cross"]["n"]),
        ceiling_coherence=_num(ceiling.get("coherence")),
        ceiling_stderr=_num(ceiling.get("stderr")),
        ceiling_n=ceiling.get("n"),
        langevin_sweep=[{"steps": int(e["steps"]), "coherence": _num(e["coherence"]),
                         "stderr": _num(e["stderr"]), "n": int(e["n"])}
                        for e in coherence.get("langevin_sweep") or []],
        train_elbo=_num(last.get("elbo")),
        test_elbo=_num(((ev.get("elbo") or {}).get("terms") or {}).get("elbo")),
        classifier_accuracy={k: _num(v)
                             for k, v in ev.get("classifiers", {}).get("test_accuracy", {}).items()},
        linear_probe_accuracy=_num((ev.get("linear_probe") or {}).get("accuracy")),
        eval_dir=str(eval_dir),
        joint_samples_png=str(joint_png) if joint_png.exists() else None,
        cross_directions=cross_directions(coherence),
        latent_samplers=latent_samplers.run_entries(ev),
        beyond=beyond_coherence.run_figures(ev),
        curves={"step": [r["step"] for r in train], "loss": [_num(r.get("loss")) for r in train],
                "energy_gap": [_num(r.get("energy_gap")) for r in train]},
    )
    return run, ""


def cross_directions(coherence: dict[str, Any]) -> dict[str, float]:
    """``{"a -> b": coherence}`` from the eval's cross matrix (row: the given modality, column: the generated
    one); empty when the eval has no matrix."""
    names, matrix = coherence.get("modalities"), coherence.get("cross", {}).get("matrix")
    if not names or not matrix:
        return {}
    return {f"{src} -> {dst}": _num(matrix[i][j]) for i, src in enumerate(names)
            for j, dst in enumerate(names) if i != j}


def trained_steps(config: dict[str, Any], step: int) -> tuple[int, int]:
    """(encoder/decoder, energy) optimizer steps that trained a run of ``config`` up to ``step``: per stage of
    train.schedule (steps past the last stage belong to it), the groups its lrs train; a post-hoc fit trains
    no encoder/decoder, a fixed prior no energy."""
    cfg = config_from_dict(config)
    stages = schedule.of_config(cfg)
    counts = {"model": 0, "energy": 0}
    for stage in stages:
        last = step if stage is stages[-1] else min(step, stage.last)
        for group, lr in stage.lrs.items():
            if lr > 0:
                counts[group] += max(0, last - stage.first + 1)
    model = 0 if cfg.model.prior.fit == "posthoc" else counts["model"]
    energy = counts["energy"] if cfg.model.prior.kind == "ebm" else 0
    return model, energy


def init_source(init_from: str) -> tuple[Path, int | None]:
    """(run directory, checkpoint step) that train.init_from loaded: a checkpoint directory names its step, a
    run directory its newest complete checkpoint (step None when it has none on disk any more)."""
    src = Path(init_from)
    ckpt = src if (src / MODEL_FILE).is_file() else latest_checkpoint(src)
    step = int(ckpt.name.removeprefix("step-")) if ckpt is not None else None  # rundir.step_dir_name
    return (src.parent.parent if ckpt == src else src), step


def add_source_steps(runs: Sequence[Run]) -> None:
    """Set each run's model_steps / energy_steps: its own plus, through the train.init_from chain, those of
    every source run among ``runs`` at the checkpoint step it was loaded from (the source's evaluated step
    when its checkpoints are gone); source_missing names the first source that is not among ``runs``."""
    by_dir = {Path(r.run_dir).resolve(): r for r in runs}
    for r in runs:
        r.model_steps, r.energy_steps, r.source_missing = r.own_model_steps, r.own_energy_steps, None
        seen, current = {Path(r.run_dir).resolve()}, r
        while current.init_from:
            src_dir, step = init_source(current.init_from)
            base = by_dir.get(src_dir.resolve())
            if base is None or src_dir.resolve() in seen:
                r.source_missing = None if base is not None else current.init_from
                break
            seen.add(src_dir.resolve())
            model, energy = trained_steps(read_json(src_dir / CONFIG_FILE),
                                          step if step is not None else base.eval_step)
            r.model_steps += model
            r.energy_steps += energy
            current = base


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a run; a corrupt one raises naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not valid JSON ({exc}); rewrite it (`mmebm eval` / `mmebm train`) "
                           f"or leave its run out of --runs") from exc


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of metrics.jsonl sorted by step (the last record wins per step). A partial last line -- a live
    run caught mid-write -- is ignored; a corrupt line elsewhere raises naming it."""
    by_step: dict[int, dict[str, Any]] = {}
    try:
        records = parse_jsonl(path)
    except ValueError as exc:
        raise ResultsError(str(exc)) from exc
    for _, record in records:
        if "step" in record:
            by_step[int(record["step"])] = {**by_step.get(int(record["step"]), {}), **record}
    return [by_step[s] for s in sorted(by_step)]


def config_file(commands: Sequence[dict[str, str]]) -> str | None:
    """The file name after ``--config`` in a run's first command (None: no commands.log, or a resume only)."""
    for command in commands:
        words = command["argv"].split()
        for i, word in enumerate(words):
            flag, eq, value = word.partition("=")
            if flag == "--config" and (eq or i + 1 < len(words)):
                return Path(value if eq else words[i + 1]).name
    return None


def dataset_of(data_path: str) -> tuple[str, str]:
    """(key, label) of the dataset at ``data_path``: its manifest's source.name (with the drop rate of an
    incomplete set), else the path's basename."""
    manifest = Path(data_path) / "manifest.json"
    if not manifest.exists():
        print(f"warning: {manifest} not found; naming the dataset after the path", file=sys.stderr)
        name = Path(data_path).name
        return name, name
    content = json.loads(manifest.read_text())
    source = content.get("source", {}).get("name")
    if not source:
        raise ResultsError(f"{manifest} has no source.name; rebuild the data set with `mmebm data`")
    key, label = DATASETS.get(source, (source, source))
    if content.get("incomplete"):  # tuples lacking modalities: a data set of its own, named by its drop rate
        rate = content.get("presence", {}).get("drop_rate")
        return ((f"{key}-drop{rate:g}", f"{label}, modalities dropped at rate {rate:g}") if rate is not None
                else (f"{key}-incomplete", f"{label}, incomplete tuples"))
    return key, label


def prior_label(prior_cfg: dict[str, Any]) -> str:
    """``laplace``, ``gaussian`` or ``ebm/<reference>`` from config model.prior, `` post-hoc`` appended for an
    energy fitted to a frozen model (model.prior.fit=posthoc)."""
    kind = prior_cfg["kind"]
    if kind != "ebm":
        return kind
    return f"ebm/{prior_cfg['reference']}" + (" post-hoc" if prior_cfg.get("fit") == "posthoc" else "")


def setting_config(config: dict[str, Any]) -> dict[str, Any]:
    """config.json without the keys that differ between the seeds of a setting (train.seed, .out_dir, and
    .init_from: the run of that seed a post-hoc prior was fitted to) and the execution switches that keep the
    function (:data:`EXECUTION_KEYS`: how decoders are batched, memory layout, threads, compilation).

    Read through the typed config first, so a key added to the code after a run started counts with its
    default (the behaviour that run had) instead of splitting one setting into two hashes.
    """
    out = config_to_dict(config_from_dict(config))
    out["train"].pop("seed", None)
    out["train"].pop("out_dir", None)
    out["train"].pop("init_from", None)
    for dotted in EXECUTION_KEYS:
        section, key = dotted.split(".")
        out[section].pop(key, None)
    return out


def setting_hash(config: dict[str, Any]) -> str:
    """First 12 hex digits of sha256 of the canonical (sorted, compact) JSON of :func:`setting_config`."""
    canonical = json.dumps(setting_config(config), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def _num(x: Any) -> float:
    """A figure from JSON as float; null (a nan written strictly) and missing become nan."""
    return math.nan if x is None else float(x)


# ------------------------------------------------------------------------------------------------ aggregation


def seed_mean(values: Sequence[float], stderrs: Sequence[float]) -> dict[str, float | int]:
    """Mean over k seeds with two standard errors: binomial (sqrt(sum se_i^2) / k, the eval's sampling noise)
    and across-seed (sample std / sqrt(k), training noise included; nan with one seed)."""
    k = len(values)
    return {
        "mean": math.fsum(values) / k,
        "binomial_stderr": math.sqrt(math.fsum(s * s for s in stderrs)) / k,
        "seed_stderr": statistics.stdev(values) / math.sqrt(k) if k > 1 else math.nan,
        "k": k,
    }


def best_stderr(figure: dict[str, float]) -> float:
    """The across-seed SE when there are seeds (k > 1), else the binomial one."""
    return figure["seed_stderr"] if figure["k"] > 1 else figure["binomial_stderr"]


def _sweep_mean(runs: Sequence[Run]) -> list[dict[str, float | int]]:
    steps = sorted({e["steps"] for r in runs for e in r.langevin_sweep})
    out = []
    for k in steps:
        entries = [e for r in runs for e in r.langevin_sweep if e["steps"] == k]
        figure = seed_mean([e["coherence"] for e in entries], [e["stderr"] for e in entries])
        out.append({"steps": k, **figure})
    return out


def build_settings(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One aggregate per (dataset, config hash), sorted by dataset, prior and hash."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for r in sorted(runs, key=_run_order):
        groups.setdefault((r.dataset, r.config_hash), []).append(r)
    settings = []
    order = lambda kv: (kv[0][0], kv[1][0].prior, kv[0][1])  # dataset, prior, hash
    for (dataset, chash), members in sorted(groups.items(), key=order):
        first = members[0]
        settings.append({
            "dataset": dataset,
            "dataset_label": first.dataset_label,
            "config_hash": chash,
            "prior": first.prior,
            "langevin_steps": first.langevin_steps,
            "langevin_step_size": first.langevin_step_size,
            "runs": [r.name for r in members],
            "config_files": sorted({f for r in members if (f := config_file(r.commands))}),
            "seeds": [r.seed for r in members],
            "steps": [r.steps for r in members],
            "model_steps": [r.model_steps for r in members],
            "energy_steps": [r.energy_steps for r in members],
            "source_missing": sorted({r.source_missing for r in members if r.source_missing}),
            "wall_seconds_mean": statistics.fmean(r.wall_seconds for r in members),
            "samples_per_s_mean": statistics.fmean(r.samples_per_s for r in members),
            "joint": seed_mean([r.joint_coherence for r in members], [r.joint_stderr for r in members]),
            "cross": seed_mean([r.cross_coherence for r in members], [r.cross_stderr for r in members]),
            "ceiling": seed_mean([r.ceiling_coherence for r in members], [r.ceiling_stderr for r in members]),
            "langevin_sweep": _sweep_mean(members),
            "latent_samplers": _sampler_means(members),
        })
    return settings


def _sampler_means(runs: Sequence[Run]) -> dict[str, dict[str, float | int]]:
    """Per post-hoc latent sampler, its joint coherence's mean over the seeds that measured it."""
    names = sorted({n for r in runs for n in r.latent_samplers}, key=latent_samplers.sampler_order)
    out = {}
    for name in names:
        entries = [r.latent_samplers[name] for r in runs if name in r.latent_samplers]
        out[name] = seed_mean([e["joint"] for e in entries], [e["stderr"] for e in entries])
    return out


def _run_order(r: Run) -> tuple:
    return (r.dataset, r.prior, r.config_hash, r.seed, r.name)


def main_pair(settings: Sequence[dict], configs: dict[str, dict]) -> tuple[dict | None, dict | None]:
    """(Laplace setting, EBM setting) of one dataset compared in the headline: the pair whose configs differ
    in the fewest keys besides model.prior.kind, a jointly trained EBM before a post-hoc one; ties go to more
    seeds, more steps, a Laplace reference."""
    laplace = [s for s in settings if s["prior"] == "laplace"]
    ebm = [s for s in settings if s["prior"].startswith("ebm/")]

    def rank_one(s: dict) -> tuple:  # a jointly trained EBM first: the paper's method
        return ("post-hoc" in s["prior"], -len(s["runs"]), -max(s["steps"]), s["prior"] != "ebm/laplace",
                s["config_hash"])

    if not laplace or not ebm:
        return (min(laplace, key=rank_one) if laplace else None, min(ebm, key=rank_one) if ebm else None)

    def rank_pair(pair: tuple[dict, dict]) -> tuple:
        lap, e = pair
        diff = differing_keys(configs[lap["config_hash"]], configs[e["config_hash"]]) - {"model.prior.kind"}
        return ("post-hoc" in e["prior"], len(diff), -(len(lap["runs"]) + len(e["runs"])),
                -(max(lap["steps"]) + max(e["steps"])),
                e["prior"] != "ebm/laplace", lap["config_hash"], e["config_hash"])

    return min(product(laplace, ebm), key=rank_pair)


def differing_keys(a: dict, b: dict) -> set[str]:
    fa, fb = flatten_dotted(a), flatten_dotted(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


def difference(ebm: dict, laplace: dict, figure: str) -> dict[str, Any]:
    """EBM - Laplace of one figure with its SE: sqrt of the summed squared across-seed SEs when both settings
    have several seeds, else of the binomial ones."""
    a, b = ebm[figure], laplace[figure]
    seeds = a["k"] > 1 and b["k"] > 1
    key = "seed_stderr" if seeds else "binomial_stderr"
    return {"difference": a["mean"] - b["mean"], "stderr": math.hypot(a[key], b[key]),
            "stderr_kind": "across-seed" if seeds else "binomial"}


def build_results(runs: Sequence[Run], *, command: str) -> dict[str, Any]:
    """The results.json dict: runs, settings, per-dataset comparison and ablations, the paper's numbers."""
    runs = sorted(runs, key=_run_order)
    add_source_steps(runs)
    configs: dict[str, dict] = {}
    for r in runs:
        config = read_json(Path(r.run_dir) / CONFIG_FILE)
        configs.setdefault(r.config_hash, setting_config(config))
    settings = build_settings(runs)
    datasets = []
    for dataset in sorted({s["dataset"] for s in settings}):
        mine = [s for s in settings if s["dataset"] == dataset]
        my_runs = [r for r in runs if r.dataset == dataset]
        lap, ebm = main_pair(mine, configs)
        comparison = None
        if lap is not None and ebm is not None:
            comparison = {"ebm": ebm["config_hash"], "laplace": lap["config_hash"],
                          "joint": difference(ebm, lap, "joint"), "cross": difference(ebm, lap, "cross")}
        datasets.append({"dataset": dataset, "dataset_label": mine[0]["dataset_label"],
                         "main_laplace": lap["config_hash"] if lap else None,
                         "main_ebm": ebm["config_hash"] if ebm else None,
                         "ebm_minus_laplace": comparison,
                         "other_ebm_minus_laplace": step_matched_others(mine, lap, ebm),
                         "minus_source_run": source_pairs(mine, my_runs),
                         "minus_own_reference": reference_gains(mine, my_runs),
                         "ablations": ablations(mine, lap, ebm, configs)})
    return {"generated_by": "mmebm results", "command": command, "runs": [r.to_json() for r in runs],
            "settings": settings, "datasets": datasets, "paper": PAPER}


def step_matched_others(settings: Sequence[dict], lap: dict | None, ebm: dict | None) -> list[dict[str, Any]]:
    """Every other EBM setting of the dataset minus the main Laplace setting, where each Laplace run took at
    least as many encoder/decoder steps (``model_steps``, a source run's included) as each of its runs; a
    setting with a source run not loaded (steps unknown) is left out."""
    if lap is None:
        return []
    out = []
    for s in settings:
        if (not s["prior"].startswith("ebm/") or s is ebm or s["source_missing"]
                or max(s["model_steps"]) > min(lap["model_steps"])):
            continue
        out.append({"ebm": s["config_hash"], "laplace": lap["config_hash"],
                    "joint": difference(s, lap, "joint"), "cross": difference(s, lap, "cross")})
    return out


def source_pairs(settings: Sequence[dict], runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per setting whose runs start from another run (train.init_from, matched by directory: a post-hoc prior
    or a fine-tuning), each run minus the run it started from: the same seed, so the difference is paired.
    Mean with its across-pair SE (std / sqrt(k)), or with the two binomial SEs of a single pair. Runs whose
    source is not among ``runs`` are left out; a setting with none is not listed."""
    by_dir = {Path(r.run_dir).resolve(): r for r in runs}
    out = []
    for s in settings:
        pairs = []
        for r in runs:
            if r.config_hash != s["config_hash"] or r.init_from is None:
                continue
            base = by_dir.get(Path(r.init_from).resolve())
            if base is not None:
                pairs.append((r, base))
        if not pairs:
            continue
        entry: dict[str, Any] = {"config_hash": s["config_hash"],
                                 "base_config_hashes": sorted({b.config_hash for _, b in pairs}),
                                 "pairs": [{"run": r.name, "base": b.name} for r, b in pairs]}
        for figure in ("joint", "cross"):
            coherence, se = f"{figure}_coherence", f"{figure}_stderr"
            entry[figure] = paired_difference([(getattr(r, coherence), getattr(r, se)) for r, _ in pairs],
                                              [(getattr(b, coherence), getattr(b, se)) for _, b in pairs])
        out.append(entry)
    return out


def paired_difference(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> dict[str, Any]:
    """Mean of the paired differences a_i - b_i of (figure, binomial SE) pairs, with the across-pair SE
    (std / sqrt(k)) or, for a single pair, the two binomial SEs combined."""
    diffs = [x - y for (x, _), (y, _) in zip(a, b, strict=True)]
    if len(diffs) > 1:
        stderr, kind = statistics.stdev(diffs) / math.sqrt(len(diffs)), "across-pair"
    else:
        stderr, kind = math.hypot(a[0][1], b[0][1]), "binomial"
    return {"difference": math.fsum(diffs) / len(diffs), "stderr": stderr, "stderr_kind": kind,
            "per_pair": diffs}


def reference_gains(settings: Sequence[dict], runs: Sequence[Run]) -> list[dict[str, Any]]:
    """Per EBM setting whose evals swept 0 Langevin steps: each run's joint coherence minus that of its own
    reference prior on the same model (the sweep's entry at 0 steps: the draws of the joint figure decoded
    before any Langevin step, i.e. what a Laplace-prior model with these encoders and decoders scores on the
    same samples). Paired per run; what the energy adds at sampling, on that model."""
    out = []
    for s in settings:
        if not s["prior"].startswith("ebm/"):
            continue
        pairs = [(r, zero) for r in runs if r.config_hash == s["config_hash"]
                 for zero in r.langevin_sweep if zero["steps"] == 0]
        if not pairs:
            continue
        joint = paired_difference([(r.joint_coherence, r.joint_stderr) for r, _ in pairs],
                                  [(z["coherence"], z["stderr"]) for _, z in pairs])
        out.append({"config_hash": s["config_hash"], "runs": [r.name for r, _ in pairs],
                    "reference_joint": [z["coherence"] for _, z in pairs], "joint": joint})
    return out


def ablations(settings: Sequence[dict], lap: dict | None, ebm: dict | None,
              configs: dict[str, dict]) -> list[dict[str, Any]]:
    """Every setting outside the main pair, with the config keys it changes from the main setting of its kind
    (EBM settings against the main EBM, fixed priors against the main Laplace); ``ablation`` is True when
    only the reference distribution or the Langevin steps / step size change."""
    main = {s["config_hash"] for s in (lap, ebm) if s is not None}
    out = []
    for s in settings:
        if s["config_hash"] in main:
            continue
        base = ebm if s["prior"].startswith("ebm/") and ebm is not None else (lap or ebm)
        if base is None:
            continue
        mine = flatten_dotted(configs[s["config_hash"]])
        theirs = flatten_dotted(configs[base["config_hash"]])
        keys = sorted(differing_keys(configs[s["config_hash"]], configs[base["config_hash"]]))
        allowed = ABLATION_KEYS | ({"model.prior.kind"} if s["prior"] in FIXED_PRIORS else set())
        out.append({"config_hash": s["config_hash"], "against": base["config_hash"],
                    "changes": {k: {"value": mine.get(k), "main": theirs.get(k)} for k in keys},
                    "ablation": set(keys) <= allowed})
    return out


# ------------------------------------------------------------------------------------------------ pictures


def write_images(results: dict, runs: Sequence[Run], img_dir: Path) -> dict[str, dict[str, Path]]:
    """Per dataset: joint-sample grids side by side, coherence vs Langevin steps, training curves.
    Returns {dataset: {caption: path}} for the pictures written."""
    import matplotlib

    matplotlib.use("Agg")
    img_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, dict[str, Path]] = {}
    for ds in results["datasets"]:
        dataset = ds["dataset"]
        settings = [s for s in results["settings"] if s["dataset"] == dataset]
        mine = [r for r in runs if r.dataset == dataset]
        pictures: dict[str, Path] = {}
        path = img_dir / f"{dataset}_joint_samples.png"
        if save_joint_montage(path, settings, mine):
            pictures["joint samples, one seed of each setting"] = path
        path = img_dir / f"{dataset}_coherence_vs_langevin.png"
        if save_sweep(path, settings):
            pictures["joint coherence vs Langevin steps at sampling"] = path
        path = img_dir / f"{dataset}_training_curves.png"
        save_curves(path, sorted(mine, key=_run_order))
        pictures["training curves"] = path
        out[dataset] = pictures
    return out


def _setting_name(s: dict, settings: Iterable[dict]) -> str:
    """The prior label, with the config hash when two settings share the label."""
    twins = sum(1 for o in settings if o["prior"] == s["prior"])
    return s["prior"] if twins == 1 else f"{s['prior']} [{s['config_hash'][:6]}]"


def save_joint_montage(path: Path, settings: Sequence[dict], runs: Sequence[Run]) -> bool:
    """Side by side, the eval joint_samples.png of the lowest seed of each setting that has one."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    panels = []
    for s in settings:
        members = sorted((r for r in runs if r.config_hash == s["config_hash"] and r.joint_samples_png),
                         key=lambda r: r.seed)
        if members:
            first = members[0]
            with Image.open(first.joint_samples_png) as img:
                panels.append((f"{_setting_name(s, settings)} (seed {first.seed}, step {first.eval_step})",
                               np.asarray(img.convert("RGB"))))
    if not panels:
        return False
    width = max(sum(p.shape[1] for _, p in panels) / 100, 3.0 * len(panels))
    height = max(max(p.shape[0] for _, p in panels) / 100, 2.0)
    scale = min(1.0, 24.0 / width)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * scale, height * scale + 0.4), squeeze=False,
                             gridspec_kw={"width_ratios": [p.shape[1] for _, p in panels]})
    for ax, (title, picture) in zip(axes[0], panels, strict=True):
        ax.imshow(picture, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    save_figure(fig, path)
    return True


def save_sweep(path: Path, settings: Sequence[dict]) -> bool:
    """Mean joint coherence vs Langevin steps per EBM setting (error bars: across-seed SE with several seeds,
    else binomial), fixed-prior settings and the main ceilings as horizontal lines."""
    import matplotlib.pyplot as plt

    swept = [s for s in settings if s["langevin_sweep"]]
    if not swept:
        return False
    fig, ax = plt.subplots(figsize=(6.0, 3.8))
    for s in swept:
        sweep = s["langevin_sweep"]
        ax.errorbar([e["steps"] for e in sweep], [e["mean"] for e in sweep],
                    yerr=[best_stderr(e) for e in sweep], marker="o", capsize=3,
                    label=f"{_setting_name(s, settings)} (k={s['joint']['k']})")
    for i, s in enumerate(x for x in settings if not x["langevin_sweep"]):
        ax.axhline(s["joint"]["mean"], color=f"C{len(swept) + i}", linestyle="--",
                   label=f"{_setting_name(s, settings)} joint (no Langevin)")
    ceiling = [s["ceiling"]["mean"] for s in swept if not math.isnan(s["ceiling"]["mean"])]
    if ceiling:
        ax.axhline(max(ceiling), color="grey", linestyle=":", label="aggregate-posterior ceiling (best EBM)")
    ax.set_xlabel("Langevin steps K at sampling")
    ax.set_ylabel("joint coherence")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("joint coherence vs Langevin steps (mean over seeds ± SE)", fontsize=9)
    save_figure(fig, path)
    return True


def save_curves(path: Path, runs: Sequence[Run]) -> None:
    """Training loss (and, for EBM runs, the energy gap E_q f - E_p f) against step, one line per run."""
    import matplotlib.pyplot as plt

    ebm = [r for r in runs if r.prior.startswith("ebm/")]
    fig, axes = plt.subplots(1, 2 if ebm else 1, figsize=(11.0 if ebm else 6.0, 3.8), squeeze=False)
    for r in runs:
        axes[0][0].plot(r.curves["step"], r.curves["loss"], label=_run_label(r))
    axes[0][0].set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend(fontsize=7)
    if ebm:
        for r in ebm:
            axes[0][1].plot(r.curves["step"], r.curves["energy_gap"], label=_run_label(r))
        axes[0][1].axhline(0.0, color="grey", linewidth=0.8)
        axes[0][1].set_xlabel("step")
        axes[0][1].set_ylabel("energy gap E_q f - E_p f")
        axes[0][1].legend(fontsize=7)
    save_figure(fig, path)


def _run_label(r: Run) -> str:
    return f"{r.prior} seed {r.seed} [{r.config_hash[:6]}]"


# ------------------------------------------------------------------------------------------------ markdown


def fmt_figure(figure: dict[str, float]) -> str:
    """``mean ± binomial SE ± across-seed SE``."""
    return f"{fmt(figure['mean'])} ± {fmt(figure['binomial_stderr'])} ± {fmt(figure['seed_stderr'])}"


def fmt_wall(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _steps(steps: Sequence[int]) -> str:
    return str(steps[0]) if min(steps) == max(steps) else f"{min(steps)}-{max(steps)}"


def _optimizer_steps(model: Sequence[int], energy: Sequence[int], missing: Sequence[str]) -> str:
    """``model / energy`` optimizer steps (ranges over seeds), with the init_from sources not counted."""
    text = f"{_steps(model)} / {_steps(energy)}"
    return text + (f" (+ steps of {', '.join(f'`{m}`' for m in missing)}: not loaded)" if missing else "")


def _commands(run: dict) -> str:
    if not run["commands"]:
        return "n/a"
    lines = []
    for c in run["commands"]:
        extra = [f"{k}={v}" for k, v in c.items() if k not in ("time", "argv")]
        lines.append(f"`{c['argv']}`" + (f" ({', '.join(extra)})" if extra else ""))
    return "<br>".join(lines)


def render_markdown(results: dict, images: dict[str, dict[str, Path]], md_dir: Path, *,
                    notes: str | None = None, notes_path: str | None = None) -> str:
    """results.md from the results.json dict; picture links are relative to ``md_dir``; ``notes``
    (hand-written markdown) goes after the header, marked as such."""
    settings, runs = results["settings"], results["runs"]
    lines = [
        "# Results: Laplace prior vs EBM prior",
        "",
        "Written by `mmebm results` from the run directories' own files; do not edit by hand. Command:",
        "",
        f"    {results['command']}",
        "",
        "Coherence is measured with one digit classifier per modality (generated birds: the image attribute "
        "classifier and the exact caption reader, a tuple agreeing when every attribute both sides state "
        "agrees; accuracy in the per-run table bounds every figure). Joint: share of prior samples on which "
        "all classifiers agree; cross: mean over targets of the mean over other sources of the classifier's "
        "accuracy; ceiling: joint coherence of "
        "decodes of the aggregate posterior. A setting groups the seeds of one config (config hash: "
        "config.json without train.seed / train.out_dir). Figures read "
        "`mean ± binomial SE ± across-seed SE`: "
        "the binomial SE of the mean, sqrt(sum se_i^2)/k, is the eval's sampling noise; the across-seed SE, "
        "std/sqrt(k), includes training noise (n/a with one seed). Model / energy steps: the encoder/decoder "
        "and energy optimizer steps behind the evaluated checkpoint, those of the run it started from "
        "(train.init_from) included when that run is among the runs given.",
    ]
    if notes:
        lines += ["", f"## Notes (hand-written, from `{notes_path}`; every figure below it is generated)", "",
                  notes.strip()]
    for ds in results["datasets"]:
        mine = [s for s in settings if s["dataset"] == ds["dataset"]]
        lines += ["", f"## {ds['dataset_label']} (`{ds['dataset']}`, data {_data_paths(runs, ds)})",
                  ""]
        rows = [[s["prior"], _config_cell(s), ", ".join(map(str, s["seeds"])), _steps(s["steps"]),
                 _optimizer_steps(s["model_steps"], s["energy_steps"], s["source_missing"]),
                 fmt_figure(s["joint"]), fmt_figure(s["cross"]), fmt_figure(s["ceiling"]),
                 fmt_wall(s["wall_seconds_mean"]), fmt(s["samples_per_s_mean"], 1)] for s in mine]
        paper = results["paper"].get(ds["dataset"])
        if paper:
            rows.append(["paper's reported numbers (larger model and budget, not our run)", "", "", "", "",
                         fmt(paper["joint_coherence"], 3), fmt(paper["cross_coherence"], 3), "", "", ""])
        lines += md_table(["prior", "config", "seeds", "steps", "model / energy steps", "joint coherence",
                           "cross coherence", "ceiling", "wall time / run", "samples/s"], rows)
        lines += ["", _comparison_line(ds, mine)]
        lines += [_comparison_line(ds, mine, comp) for comp in ds["other_ebm_minus_laplace"]]
        lines += [_source_line(p) for p in ds["minus_source_run"]]
        lines += [_reference_line(g) for g in ds.get("minus_own_reference", [])]
        for caption, path in images.get(ds["dataset"], {}).items():
            lines += ["", f"![{caption}]({Path(os.path.relpath(path, md_dir)).as_posix()})"]
    lines += ["", "## Ablations", "",
              "Settings beyond each dataset's main EBM/Laplace pair, with the config keys they change. "
              "`ablation` marks a change of the reference distribution or of the training Langevin steps / "
              "step size only; the Langevin sweep in the pictures covers the steps at sampling.", ""]
    rows = []
    for ds in results["datasets"]:
        for a in ds["ablations"]:
            s = next(x for x in settings if x["config_hash"] == a["config_hash"])
            changes = "; ".join(f"{k}: {json.dumps(v['value'])} (main {json.dumps(v['main'])})"
                                for k, v in a["changes"].items())
            rows.append([ds["dataset"], s["prior"], f"`{a['config_hash']}`", f"`{a['against']}`",
                         "ablation" if a["ablation"] else "other", changes or "none",
                         _optimizer_steps(s["model_steps"], s["energy_steps"], s["source_missing"]),
                         fmt_figure(s["joint"]), fmt_figure(s["cross"])])
    lines += md_table(["dataset", "prior", "config", "against", "kind", "changes", "model / energy steps",
                       "joint", "cross"], rows) if rows else ["None: every dataset has only its main pair."]
    lines += ["", "## Runs", ""]
    rows = []
    for r in runs:
        steps = str(r["steps"])
        if r["eval_step"] != r["steps"]:
            steps += f" (eval at {r['eval_step']})"
        acc = min(r["classifier_accuracy"].values()) if r["classifier_accuracy"] else math.nan
        rows.append([r["name"], r["dataset"], r["prior"], str(r["seed"]), f"`{r['config_hash']}`", steps,
                     _optimizer_steps([r["model_steps"]], [r["energy_steps"]],
                                      [r["source_missing"]] if r["source_missing"] else []),
                     fmt_wall(r["wall_seconds"]), fmt(r["samples_per_s"], 1),
                     f"{fmt(r['joint_coherence'])} ± {fmt(r['joint_stderr'])} (n={r['joint_n']})",
                     f"{fmt(r['cross_coherence'])} ± {fmt(r['cross_stderr'])} (n={r['cross_n']})",
                     f"{fmt(r['ceiling_coherence'])} ± {fmt(r['ceiling_stderr'])}", fmt(acc), _commands(r)])
    lines += md_table(["run", "dataset", "prior", "seed", "config", "steps", "model / energy steps", "wall",
                       "samples/s", "joint", "cross", "ceiling", "min classifier acc.", "command"], rows)
    lines += _direction_lines(runs)
    lines += beyond_coherence.results_lines(runs)
    lines += _sampler_lines(results)
    return "\n".join(lines) + "\n"


MAX_DIRECTIONS = 6
"""Runs with more cross directions than this (PolyMNIST's 5 modalities: 20) keep them in results.json only."""


def _direction_lines(runs: Sequence[dict]) -> list[str]:
    """Cross coherence both ways for each run with at most MAX_DIRECTIONS directions (2 or 3 modalities)."""
    shown = [r for r in runs if 0 < len(r["cross_directions"]) <= MAX_DIRECTIONS]
    if not shown:
        return []
    lines = ["", "## Cross coherence by direction", "",
             "Each run's conditional generation per direction (source -> generated modality), as the eval "
             "measured it over its test tuples; the cross figure above is their mean.", ""]
    for i, directions in enumerate(dict.fromkeys(tuple(r["cross_directions"]) for r in shown)):
        rows = [[r["name"], r["prior"], str(r["seed"]), *(fmt(r["cross_directions"][d]) for d in directions)]
                for r in shown if tuple(r["cross_directions"]) == directions]
        lines += [""] * (i > 0) + md_table(["run", "prior", "seed", *directions], rows)
    return lines


def _sampler_lines(results: dict) -> list[str]:
    """The post-hoc latent samplers' table: for each dataset where any setting has one, every setting (the
    EBM's own joint figure among them) with its optimizer steps, its prior's joint coherence and each
    sampler's, as means over seeds."""
    settings = results["settings"]
    names = sorted({n for s in settings for n in s["latent_samplers"]}, key=latent_samplers.sampler_order)
    rows = []
    for ds in results["datasets"]:
        mine = [s for s in settings if s["dataset"] == ds["dataset"]]
        if not any(s["latent_samplers"] for s in mine):
            continue
        for s in mine:
            cells = [_sampler_cell(s["latent_samplers"].get(n), len(s["runs"])) for n in names]
            rows.append([ds["dataset"], s["prior"], f"`{s['config_hash']}`", ", ".join(map(str, s["seeds"])),
                         _optimizer_steps(s["model_steps"], s["energy_steps"], s["source_missing"]),
                         fmt_figure(s["joint"]), *cells])
    if not rows:
        return []
    lines = ["", "## Post-hoc latent samplers", "",
             "Joint coherence of each setting's prior beside that of samplers fitted after training to its "
             "frozen model's aggregate posterior (`mmebm eval --gmm-components K --flow`: gmm_K, a "
             "K-component full-covariance Gaussian mixture; flow_maf, a masked autoregressive flow), same "
             "judge, sample count and seeds; mean ± binomial SE ± across-seed SE, k noted when fewer seeds "
             "measured a sampler than the setting has.", ""]
    return lines + md_table(["dataset", "prior", "config", "seeds", "model / energy steps", "prior joint",
                             *names], rows)


def _sampler_cell(figure: dict | None, seeds: int) -> str:
    if figure is None:
        return "n/a"
    return fmt_figure(figure) + (f" (k={figure['k']})" if figure["k"] != seeds else "")


def _data_paths(runs: Sequence[dict], ds: dict) -> str:
    paths = sorted({r["data_path"] for r in runs if r["dataset"] == ds["dataset"]})
    return ", ".join(f"`{p}`" for p in paths)


def _config_cell(s: dict) -> str:
    """The config hash, with the config files its runs were started from (commands.log)."""
    files = ", ".join(s["config_files"])
    return f"`{s['config_hash']}`" + (f" ({files})" if files else "")


def _comparison_line(ds: dict, settings: Sequence[dict], other: dict | None = None) -> str:
    """The main pair's EBM − Laplace line, or with ``other`` that of another step-matched EBM setting."""
    comp = other or ds["ebm_minus_laplace"]
    if comp is None:
        return "**EBM − Laplace**: n/a (this dataset needs both an EBM and a Laplace setting)."
    parts = [f"{name} {comp[name]['difference']:+.4f} ± {fmt(comp[name]['stderr'])} "
             f"({comp[name]['stderr_kind']} SE)" for name in ("joint", "cross")]
    by_hash = {s["config_hash"]: s for s in settings}
    steps = "; ".join(f"{kind} {_optimizer_steps(s['model_steps'], s['energy_steps'], s['source_missing'])}"
                      for kind, s in (("EBM", by_hash[comp["ebm"]]), ("Laplace", by_hash[comp["laplace"]])))
    which = ("another EBM setting against the main Laplace one, with at least as many model steps" if other
             else "the pair whose configs differ least")
    return (f"**EBM − Laplace** (`{comp['ebm']}` minus `{comp['laplace']}`, {which}; model / energy steps: "
            f"{steps}): " + "; ".join(parts) + ".")


def _source_line(p: dict) -> str:
    parts = []
    for name in ("joint", "cross"):
        figure = p[name]
        per_pair = ", ".join(f"{d:+.4f}" for d in figure["per_pair"])
        parts.append(f"{name} {figure['difference']:+.4f} ± {fmt(figure['stderr'])} "
                     f"({figure['stderr_kind']} SE; per pair {per_pair})")
    runs = ", ".join(f"{q['run']} − {q['base']}" for q in p["pairs"])
    return (f"\n**Minus the run it started from** (`{p['config_hash']}`, train.init_from, paired: {runs}): "
            + "; ".join(parts) + ".")


def _reference_line(g: dict) -> str:
    joint = g["joint"]
    per_run = ", ".join(f"{name} {d:+.4f}" for name, d in zip(g["runs"], joint["per_pair"], strict=True))
    return (f"\n**EBM prior − its Laplace reference on the same model** (`{g['config_hash']}`: each run's "
            f"joint coherence minus its Langevin sweep at 0 steps, the same draws decoded before any "
            f"Langevin step; paired per run): joint {joint['difference']:+.4f} ± {fmt(joint['stderr'])} "
            f"({joint['stderr_kind']} SE; {per_run}).")


# ------------------------------------------------------------------------------------------------ writing


def write_text_atomic(path: Path, text: str) -> None:
    """Create ``path``'s directory if needed, then write it atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
