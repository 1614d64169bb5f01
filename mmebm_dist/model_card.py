"""The model card (README.md) of an export: Hugging Face YAML front matter and a body a person reads.

The front matter carries ``library_name: mmebm_dist``, tags, the data set and, when the run was evaluated at
the exported checkpoint, its coherence figures as ``model-index`` metrics; the license is left to the owner.
The body says what the model is, how to load and sample it, the figures with the judge that measured them,
the evaluation's pictures and the commands that trained it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from mmebm_dist.config import Config

LICENSE_NOTE = ("# license: left for the model's owner to choose (e.g. mit, apache-2.0, cc-by-4.0; "
                "https://huggingface.co/docs/hub/repositories-licenses)")
PAPER = "https://arxiv.org/abs/2409.19862"


def fmt(value: Any) -> str:
    """A figure as the card prints it: three decimals, or n/a."""
    return f"{value:.3f}" if isinstance(value, (int, float)) and value == value else "n/a"


def dataset_name(cfg: Config) -> str:
    """The data set's name: its manifest's ``source.name`` when the data is at hand, else the folder name."""
    manifest = Path(cfg.data.path) / "manifest.json"
    if manifest.is_file():
        source = json.loads(manifest.read_text()).get("source", {}).get("name")
        builder = json.loads(manifest.read_text()).get("builder", {}).get("command")
        if source or builder:
            return str(builder or source)
    return Path(cfg.data.path.rstrip("/")).name or "unknown"


def prior_description(cfg: Config) -> str:
    prior = cfg.model.prior
    if prior.kind != "ebm":
        return f"a fixed {prior.kind} prior"
    return (f"a learned energy-based prior p(z) ∝ exp(f(z)) p0(z) (MLP energy, hidden {prior.hidden}, over a "
            f"{prior.reference} reference p0), sampled by {prior.langevin.steps} Langevin steps of size "
            f"{prior.langevin.step_size}")


def metrics(evaluation: dict | None) -> list[dict[str, Any]]:
    """model-index metrics of an eval.json: joint and cross coherence (and the prior's ceiling)."""
    if evaluation is None:
        return []
    coherence = evaluation.get("coherence", {})
    joint = coherence.get("joint", {})
    found = []
    if "coherence" in joint:
        steps = joint.get("langevin_steps")
        detail = f" ({steps} Langevin steps)" if steps else ""
        found.append({"type": "joint_coherence", "name": f"Joint coherence{detail}",
                      "value": round(float(joint["coherence"]), 4)})
    if "coherence" in coherence.get("cross", {}):
        found.append({"type": "cross_coherence", "name": "Cross coherence",
                      "value": round(float(coherence["cross"]["coherence"]), 4)})
    return found


def front_matter(cfg: Config, *, name: str, evaluation: dict | None) -> str:
    dataset = dataset_name(cfg)
    prior = cfg.model.prior.kind
    meta: dict[str, Any] = {
        "library_name": "mmebm_dist",
        "tags": ["mmebm_dist", "multimodal", "variational-autoencoder", "generative-model",
                 "energy-based-prior" if prior == "ebm" else f"{prior}-prior", cfg.model.aggregation],
        "datasets": [dataset],
    }
    found = metrics(evaluation)
    if found:
        meta["metrics"] = [m["type"] for m in found]
        meta["model-index"] = [{"name": name, "results": [{
            "task": {"type": "multimodal-generation", "name": "Multimodal generation"},
            "dataset": {"type": dataset, "name": dataset},
            "metrics": found,
        }]}]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + LICENSE_NOTE + "\n---\n"


def figures_section(evaluation: dict | None, images: dict[str, str], eval_note: str) -> list[str]:
    """The evaluation's figures with the judge that measured them, and its pictures."""
    lines = ["## Evaluation", ""]
    if evaluation is None:
        return [*lines, eval_note, ""]
    coherence = evaluation.get("coherence", {})
    rows = [("joint coherence", coherence.get("joint", {})), ("cross coherence", coherence.get("cross", {})),
            ("aggregate-posterior ceiling", coherence.get("prior_ceiling", {}))]
    lines += ["| figure | value | stderr | n |", "|---|---|---|---|"]
    lines += [f"| {label} | {fmt(e.get('coherence'))} | {fmt(e.get('stderr'))} | {e.get('n', 'n/a')} |"
              for label, e in rows if "coherence" in e]
    sweep = coherence.get("langevin_sweep") or []
    if sweep:
        lines += ["", "Joint coherence by Langevin steps (0: the reference prior p0 on the same model): "
                  + ", ".join(f"K={e['steps']}: {fmt(e.get('coherence'))}" for e in sweep) + "."]
    test_elbo = ((evaluation.get("elbo") or {}).get("terms") or {}).get("elbo")
    if test_elbo is not None:
        lines += ["", f"Test ELBO per tuple: {fmt(test_elbo)}."]
    judge = evaluation.get("classifiers", {})
    accuracy = judge.get("test_accuracy", {})
    lines += ["", "**Judge.** Coherence is the share of generations a classifier trained on real data reads "
              "as the intended class (one classifier per modality), so the classifiers' own test accuracy "
              "bounds every figure: " + ", ".join(f"{k} {fmt(v)}" for k, v in _flat(accuracy)) + "."]
    if judge.get("note"):
        lines += ["", str(judge["note"])]
    lines += ["", f"Measured on {coherence.get('num_samples', 'n/a')} joint samples and "
              f"{coherence.get('num_test', 'n/a')} test tuples (seed {evaluation.get('seed', 'n/a')}) at "
              f"step {evaluation.get('run', {}).get('step', 'n/a')} by `mmebm eval`."]
    for title, path in images.items():
        lines += ["", f"![{title}]({path})"]
    return [*lines, ""]


def _flat(values: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, value) of a nested dict of figures (a judge's accuracy per modality and attribute)."""
    out = []
    for key, value in values.items():
        name = f"{prefix}{key}"
        out += _flat(value, f"{name}.") if isinstance(value, dict) else [(name, value)]
    return out


def render(*, cfg: Config, step: int, name: str, evaluation: dict | None, images: dict[str, str],
           commands: list[str], eval_note: str = "") -> str:
    """The whole card as markdown text."""
    modalities = ", ".join(f"`{m.name}` {list(m.shape)} ({m.family}, {m.likelihood})"
                           for m in cfg.model.modalities)
    body = [
        f"# {name}",
        "",
        f"A multimodal latent generative model trained with mmebm_dist after "
        f"\"Learning Multimodal Latent Generative Models with Energy-Based Prior\" ({PAPER}): the modalities "
        f"{modalities} share a latent z of dimension {cfg.model.latent_dim}"
        + (f" (plus a private latent of dimension {cfg.model.private_dim} each)"
           if cfg.model.private_dim else "")
        + f", aggregated by {cfg.model.aggregation}, with {prior_description(cfg)}. Trained for {step} steps "
        f"on `{dataset_name(cfg)}` (data.path `{cfg.data.path}` at training time).",
        "",
        "## Load and sample",
        "",
        "```python",
        "from mmebm_dist import api",
        "",
        f'model = api.load_trained("{name}")  # this folder, or "hf://USER/REPO" once pushed',
        "samples = api.sample(model, 16)  # {modality: decoded means [16, *shape]}",
        "```",
        "",
        "```bash",
        f"mmebm sample --run {name} --joint 64   # PNG grid under {name}/samples/",
        "```",
        "",
        "The weights are `model.safetensors` (no pickle); `config.json` is the resolved experiment config.",
        "",
        *figures_section(evaluation, images, eval_note),
        "## Training",
        "",
    ]
    if commands:
        body += ["The commands that trained it (the run's commands.log):", "", "```bash", *commands, "```"]
    else:
        body += ["The run kept no commands.log; `config.json` holds every setting."]
    body += ["", "## License", "", "Not chosen yet: the model's owner sets `license` in the front matter.",
             ""]
    return front_matter(cfg, name=name, evaluation=evaluation) + "\n" + "\n".join(body)
