"""A trained model in the Hugging Face convention: export a run, read an export, push and pull via the Hub.

DIR/model.safetensors   the checkpoint's consolidated weights (tensors only, no pickle; metadata: step,
                        checkpoint name, manifest hash of the training data)
DIR/config.json         the resolved experiment config of that checkpoint (as in a run directory)
DIR/README.md           the model card (``mmebm_dist.model_card``): YAML front matter and a body to read
DIR/images/*.png        the pictures of the run's evaluation, when it has one
DIR/vocab/<name>.json   the vocabulary of each token (text) modality, so captions decode without the data

``api.load_trained``, ``mmebm sample --run`` and ``mmebm eval --run`` take such a folder, or ``hf://user/repo``
(downloaded by ``huggingface_hub``, the ``hub`` extra), wherever they take a run directory.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from mmebm_dist.config import Config, config_from_dict
from mmebm_dist.rundir import (
    CHECKPOINTS,
    COMMANDS_LOG,
    CONFIG_FILE,
    EVAL_JSON,
    MODEL_FILE,
    atomic_write_text,
    latest_checkpoint,
    read_commands,
    read_train_state,
)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
IMAGES_DIR = "images"
VOCAB_DIR = "vocab"
HF_PREFIX = "hf://"
HUB_EXTRA = "pip install 'mmebm_dist[hub]'"


class ExportError(ValueError):
    """A run that cannot be exported, an export that cannot be read, or a Hub transfer that failed."""


@dataclass(kw_only=True)
class Export:
    """What an export folder holds, read back (weights on the CPU)."""

    directory: Path
    cfg: Config
    state_dict: dict[str, torch.Tensor]
    step: int
    """Optimizer step of the exported checkpoint."""
    checkpoint: str
    """Name of the exported checkpoint in its run (``step-NNNNNNN``)."""
    manifest_hash: str | None
    """Manifest hash of the data the run was trained on."""


def is_export(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :func:`export_run` (weights and config side by side)."""
    path = Path(path)
    return (path / WEIGHTS_FILE).is_file() and (path / CONFIG_FILE).is_file()


def find_checkpoint(run_dir: str | Path, checkpoint: str | Path | None = None) -> Path:
    """A complete checkpoint of ``run_dir``: ``checkpoint`` (a directory, or a name under RUN/checkpoints),
    by default the newest complete one; raises naming what is missing."""
    run_dir = Path(run_dir)
    if checkpoint is None:
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            raise FileNotFoundError(f"run '{run_dir}' has no complete checkpoint under "
                                    f"{run_dir / CHECKPOINTS}; train longer or set train.checkpoint_every")
        return ckpt
    ckpt = Path(checkpoint)
    if not ckpt.is_dir():
        ckpt = run_dir / CHECKPOINTS / str(checkpoint)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint '{checkpoint}' not found (neither a directory nor a name "
                                f"under {run_dir / CHECKPOINTS})")
    return ckpt


def export_run(run_dir: str | Path, out: str | Path, *, checkpoint: str | None = None,
               eval_name: str = "eval", data: str | Path | None = None) -> Path:
    """Write the export of ``run_dir``'s checkpoint (default: the newest) into the new folder ``out``; the
    card takes its figures from RUN/``eval_name``/eval.json when that eval measured this checkpoint. Token
    modalities' vocabularies are read from ``data`` (default: the run's data.path)."""
    from safetensors.torch import save_file

    from mmebm_dist import model_card

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ExportError(f"'{run_dir}' is not a run directory (no {CONFIG_FILE}); pass the train.out_dir "
                          "of a `mmebm train` run")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"--out {out} exists and is not empty; choose a new folder")
    ckpt = find_checkpoint(run_dir, checkpoint)
    state = read_train_state(ckpt)
    weights = torch.load(ckpt / MODEL_FILE, map_location="cpu", weights_only=True)
    evaluation = _evaluation(run_dir / eval_name, state.step)
    cfg = config_from_dict(state.config)
    vocabularies = _vocabularies(cfg, Path(data or cfg.data.path))
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / IMAGES_DIR).mkdir(parents=True)
    for name, vocabulary in vocabularies.items():
        (staging / VOCAB_DIR).mkdir(exist_ok=True)
        vocabulary.save(staging / VOCAB_DIR / f"{name}.json")
    metadata = {"format": "pt", "library": "mmebm_dist", "step": str(state.step), "checkpoint": ckpt.name,
                "manifest_hash": str(state.data_order.get("manifest_hash") or "")}
    save_file({k: v.detach().contiguous() for k, v in weights.items()}, staging / WEIGHTS_FILE,
              metadata=metadata)
    atomic_write_text(staging / CONFIG_FILE, json.dumps(state.config, indent=2, sort_keys=True) + "\n")
    images = {}
    if evaluation is not None:
        for title, name in evaluation.get("images", {}).items():
            if (run_dir / eval_name / name).is_file():
                shutil.copyfile(run_dir / eval_name / name, staging / IMAGES_DIR / name)
                images[title] = f"{IMAGES_DIR}/{name}"
    card = model_card.render(
        cfg=cfg, step=state.step, name=out.name, evaluation=evaluation,
        images=images, commands=[c["argv"] for c in read_commands(run_dir / COMMANDS_LOG)],
        eval_note=_eval_note(run_dir / eval_name, state.step, evaluation),
    )
    atomic_write_text(staging / CARD_FILE, card)
    if out.exists():
        out.rmdir()
    os.replace(staging, out)
    return out


def _vocabularies(cfg: Config, data: Path) -> dict:
    """The vocabulary of every token modality of ``cfg``, read beside ``data``'s manifest."""
    from mmebm_dist.data.text import vocabularies

    names = [m.name for m in cfg.model.modalities if m.likelihood == "categorical"]
    if not names:
        return {}
    found = vocabularies(data) if (data / "manifest.json").is_file() else {}
    missing = [n for n in names if n not in found]
    if missing:
        raise ExportError(f"the token modalities {missing} need their vocabulary, read beside the training "
                          f"data's manifest.json, which '{data}' lacks; pass --data DIR (the run's data set)")
    return {n: found[n] for n in names}


def exported_vocabularies(directory: str | Path) -> dict:
    """{modality: Vocabulary} that an export folder holds ({} for a run directory or an image-only export)."""
    from mmebm_dist.data.text import Vocabulary

    folder = Path(directory) / VOCAB_DIR
    if not is_export(directory) or not folder.is_dir():
        return {}
    return {path.stem: Vocabulary.load(path) for path in sorted(folder.glob("*.json"))}


def _evaluation(eval_dir: Path, step: int) -> dict | None:
    """The eval.json of ``eval_dir`` when it measured checkpoint ``step``, else None."""
    path = eval_dir / EVAL_JSON
    if not path.is_file():
        return None
    evaluation = json.loads(path.read_text())
    return evaluation if int(evaluation.get("run", {}).get("step", -1)) == step else None


def _eval_note(eval_dir: Path, step: int, evaluation: dict | None) -> str:
    if evaluation is not None:
        return ""
    path = eval_dir / EVAL_JSON
    if not path.is_file():
        return (f"The run has no evaluation ({path.parent.name}/{EVAL_JSON}); `mmebm eval --run RUN` "
                "measures one, then export again.")
    measured = json.loads(path.read_text()).get("run", {}).get("step")
    return (f"The run's evaluation measured step {measured}, not the exported step {step}, so its figures "
            "are left out; evaluate this checkpoint and export again.")


def read_export(directory: str | Path) -> Export:
    """The config, weights and provenance of an export folder (safetensors: no code runs on load)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    directory = Path(directory)
    if not is_export(directory):
        raise ExportError(f"'{directory}' is not an export (needs {WEIGHTS_FILE} and {CONFIG_FILE}); write "
                          "one with `mmebm export RUN --out DIR`")
    try:
        with safe_open(directory / WEIGHTS_FILE, framework="pt") as f:
            metadata = f.metadata() or {}
        state_dict = load_file(directory / WEIGHTS_FILE, device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ExportError(f"{directory / WEIGHTS_FILE} cannot be read ({exc}); export the run again") from exc
    cfg = config_from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    return Export(directory=directory, cfg=cfg, state_dict=state_dict, step=int(metadata.get("step", 0)),
                  checkpoint=metadata.get("checkpoint", ""),
                  manifest_hash=metadata.get("manifest_hash") or None)


def output_dir(source: str | Path, out: str | Path | None, name: str) -> Path:
    """Where a command writes for ``source``: ``out`` when given, else ``SOURCE/name``; a Hub model (its
    folder is the Hugging Face cache) needs ``out``."""
    if out:
        return Path(out)
    if str(source).startswith(HF_PREFIX):
        raise ExportError(f"{source} lives in the Hugging Face cache; pass --out DIR for what this writes")
    return Path(source) / name


def resolve_source(source: str | Path) -> Path:
    """A local folder for ``source``: ``hf://user/repo[@revision]`` is downloaded (or read from the local
    Hugging Face cache, e.g. under ``HF_HUB_OFFLINE=1``); anything else is returned as a path."""
    if not str(source).startswith(HF_PREFIX):
        return Path(source)
    repo_id, _, revision = str(source)[len(HF_PREFIX):].partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"'{source}' is not hf://USER/REPO[@REVISION]")
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ExportError(f"loading {source} needs huggingface_hub: {HUB_EXTRA}") from exc
    try:
        folder = Path(huggingface_hub.snapshot_download(repo_id, revision=revision or None))
    except (OSError, ValueError) as exc:  # the hub's HTTP, offline and not-in-cache errors are OSErrors
        raise ExportError(f"cannot download {repo_id} from the Hugging Face Hub ({type(exc).__name__}: "
                          f"{_first_line(exc)}); check the network and the repo id, or pass a local export "
                          "folder") from exc
    if not is_export(folder):
        raise ExportError(f"{repo_id} on the Hugging Face Hub is not an mmebm_dist export (no {WEIGHTS_FILE} "
                          f"and {CONFIG_FILE} at its root)")
    return folder


def push_export(directory: str | Path, repo_id: str, *, private: bool = False) -> str:
    """Upload an export folder to the Hub model repo ``repo_id`` (created if missing); returns its URL."""
    directory = Path(directory)
    read_export(directory)  # refuse to publish a folder that does not load
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ExportError(f"--push {repo_id} needs huggingface_hub: {HUB_EXTRA}") from exc
    api = huggingface_hub.HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(folder_path=str(directory), repo_id=repo_id, repo_type="model",
                          commit_message=f"mmebm export of {directory.name}")
    except (OSError, ValueError) as exc:  # the hub's HTTP and offline errors are OSErrors
        raise ExportError(f"cannot push to {repo_id} on the Hugging Face Hub ({type(exc).__name__}: "
                          f"{_first_line(exc)}); check the network and `huggingface-cli login`; the export "
                          f"stays in {directory}") from exc
    return str(url)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]
