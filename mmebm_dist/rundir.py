"""The run directory of ``mmebm train``: its file names, atomic writes, JSONL logs and checkpoint lookup.

Training writes a run directory and evaluation reads it; both import this module, neither imports the other.

RUN_DIR/config.json             the resolved config (``mmebm_dist.config.save_config``)
RUN_DIR/commands.log            one line per invocation: UTC time, world size, argv
RUN_DIR/metrics.jsonl           a JSON record per logged step (and per periodic evaluation)
RUN_DIR/tb/                     TensorBoard events
RUN_DIR/trackers.json           the MLflow / wandb run ids a resumed run continues (train.trackers)
RUN_DIR/trace/rank-<i>.jsonl    ``mmebm train --trace-samples``: the samples each rank read
RUN_DIR/checkpoints/step-NNNNNNN/  train_state.json, model.pt and accelerate's state (train/checkpoint.py)
RUN_DIR/checkpoints/latest      the name of the newest checkpoint (a hint; the directory scan decides)
RUN_DIR/<eval name>/eval.json   ``mmebm eval`` figures, beside joint_samples.png and report.md
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
COMMANDS_LOG = "commands.log"
METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
TRACKERS_FILE = "trackers.json"
TRACE_DIR = "trace"
CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE_FILE = "train_state.json"
MODEL_FILE = "model.pt"
EVAL_JSON = "eval.json"
JOINT_PNG = "joint_samples.png"
_STEP_NAME = re.compile(r"^step-(\d{7,})$")


# ------------------------------------------------------------------------------------------ files and logs


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a hidden temp file beside ``path`` and rename it over ``path``: readers see the old
    file or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def parse_jsonl(path: Path) -> list[tuple[str, dict]]:
    """(line, record) for every record of a JSONL file a killed writer may have left behind.

    A run killed while writing leaves at most one partial last line: it is dropped. A corrupt line elsewhere
    means the file was edited or damaged, and raises ValueError naming the line.
    """
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((line, json.loads(line)))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # the line being written when the process was killed
                break
            raise ValueError(f"{path}:{number} is not valid JSON ({exc}); fix or remove that line") from exc
    return records


def truncate_jsonl(path: Path, max_step: int) -> int:
    """Keep the records of ``path`` whose ``step`` is at most ``max_step`` (see :func:`parse_jsonl` for a
    partial last line); returns how many were kept."""
    if not path.exists():
        return 0
    kept = [line for line, record in parse_jsonl(path) if record.get("step", -1) <= max_step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
    return len(kept)


def read_jsonl(path: str | Path) -> list[dict]:
    """All records of a JSONL file (metrics or trace)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class JsonlAppender:
    """Appends one JSON record per line to ``path`` and flushes each, so a kill loses at most a partial line
    (which :func:`parse_jsonl` drops). Records after ``start_step`` left by a killed run are dropped first."""

    def __init__(self, path: Path, *, start_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_jsonl(self.path, start_step)
        self._file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


_MAIN_MODULE = re.compile(r"(?:^|/)mmebm_dist/(\w+)/__main__\.py$")
_PROGRAM = re.compile(r"(?<![\w.-])(?:[^\s`'\"|()]*/)?\.?venv/bin/(mmebm|python3?(?:\.\d+)?)\b")
"""A program named by its path inside a virtual environment (``/home/me/repo/.venv/bin/mmebm``)."""


def portable_argv(argv: list[str], *, root: str | Path | None = None) -> list[str]:
    """``argv`` as a reader can rerun it from the repository: the program by its name (``mmebm``; ``python -m
    mmebm_dist.train`` for that module's file), and each absolute path under ``root`` (default: the working
    directory), alone or as the value of ``key=value``, relative to it. Paths outside ``root`` are kept."""
    if not argv:
        return []
    root = Path(root or os.getcwd()).resolve()
    program = argv[0]
    if (module := _MAIN_MODULE.search(program)) is not None:
        head = ["python", "-m", f"mmebm_dist.{module.group(1)}"]
    else:
        head = [Path(program).name if Path(program).name in ("mmebm", "accelerate") else
                _relative(program, root)]

    def word(text: str) -> str:
        key, eq, value = text.partition("=")
        return f"{key}={_relative(value, root)}" if eq and not key.startswith("/") else _relative(text, root)

    return head + [word(w) for w in argv[1:]]


def _relative(text: str, root: Path) -> str:
    path = Path(text)
    if not path.is_absolute():
        return text
    try:
        return path.relative_to(root).as_posix() or "."
    except ValueError:
        return text


def portable_command(text: str) -> str:
    """A logged command line with its program written by name: ``/abs/.venv/bin/mmebm train ...`` ->
    ``mmebm train ...`` (the published documents of runs logged before :func:`portable_argv`)."""
    return _PROGRAM.sub(lambda m: "python" if m.group(1).startswith("python") else m.group(1), text)


def append_command(run_dir: Path, world_size: int) -> None:
    """Append this invocation (UTC time, world size, argv without machine paths: :func:`portable_argv`) to
    RUN_DIR/commands.log: how the run was made."""
    with open(Path(run_dir) / COMMANDS_LOG, "a") as f:
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\tworld_size={world_size}\t"
                f"{shlex.join(portable_argv(sys.argv))}\n")


def read_commands(path: Path) -> list[dict[str, str]]:
    """commands.log lines ``TIME<TAB>[key=value<TAB>...]ARGV`` as dicts (argv through
    :func:`portable_command`); [] when the file does not exist."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        fields = line.split("\t")
        entry = {"time": fields[0], "argv": portable_command(fields[-1]) if len(fields) > 1 else ""}
        for extra in fields[1:-1]:
            key, _, value = extra.partition("=")
            entry[key] = value
        out.append(entry)
    return out


# ------------------------------------------------------------------------------------------------ checkpoints


@dataclasses.dataclass(kw_only=True)
class TrainState:
    """Where training stands after optimizer step ``step``; with the accelerate state, all a resume needs."""

    step: int
    """Optimizer steps completed."""
    epoch: int
    """Epoch of the next micro-batch to read."""
    epoch_batch: int
    """Micro-batches of ``epoch`` already consumed by each rank (``make_loader(skip_batches=...)``)."""
    data_order: dict
    """What fixes the per-rank batch order (manifest hash, batch size, workers, shuffle, seed, world size)."""
    config: dict
    """The resolved experiment config."""
    samples_seen: int = 0
    """Samples consumed over all ranks."""
    wall_time: float = 0.0
    """Seconds of training before this checkpoint (summed over resumed segments)."""
    data_skipped: int = 0
    """Samples and shards skipped under ``data.on_error=skip`` by all ranks (summed over resumed segments)."""
    epoch_segments: list = dataclasses.field(default_factory=list)
    """Parts of ``epoch`` read under another world size, worker count or batch size, oldest first (an elastic
    resume; :mod:`mmebm_dist.data.replan`); empty when the epoch so far ran under ``data_order``."""


def step_dir_name(step: int) -> str:
    """``step-NNNNNNN``: the directory name of the checkpoint of ``step`` (7 digits at least)."""
    return f"step-{step:07d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temp directories are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint (decided by a directory scan, not by ``latest``)."""
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if pointer.exists() and pointer.read_text().strip() != found[-1].name:
        # Killed between the rename and the pointer update: the renamed directory is complete.
        log.warning(
            "%s names %s but the newest complete checkpoint is %s; using the latter",
            pointer,
            pointer.read_text().strip(),
            found[-1].name,
        )
    return found[-1]


def read_train_state(ckpt_dir: str | Path) -> TrainState:
    """The ``train_state.json`` of a checkpoint directory."""
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: '{ckpt_dir}' is not a complete checkpoint")
    return TrainState(**json.loads(path.read_text()))


def load_model_weights(model: Any, ckpt_dir: str | Path) -> Any:
    """Load a checkpoint's consolidated ``model.pt`` into a plain single-process model."""
    import torch

    path = Path(ckpt_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; is '{ckpt_dir}' a complete checkpoint directory?")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model
