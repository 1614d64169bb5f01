"""Typed experiment configuration: dataclasses filled strictly from YAML plus dotted ``key=value`` overrides.

Unknown or mistyped keys are errors that name the key and suggest the nearest valid one. The resolved config
is saved as JSON in every run directory and checkpoint (:func:`config_to_dict` / :func:`config_from_dict`).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key and the fix."""


@dataclass(kw_only=True)
class ModalityConfig:
    """One modality, declared once; encoders, decoders, likelihoods and classifiers iterate over these."""

    name: str
    """Key of the modality in every batch dict (e.g. ``m0``)."""
    shape: tuple[int, ...] = (3, 28, 28)
    """Shape of one sample: (C, H, W) for images, (D,) for vectors."""
    family: str = "conv"
    """Encoder/decoder family in ``mmebm_dist.models.modality.FAMILIES``: ``conv``, ``mlp``, ``mmvaeplus``."""
    likelihood: str = "laplace"
    """Likelihood of the decoder output: ``laplace``, ``gaussian`` or ``bernoulli``."""
    likelihood_scale: float = 0.75
    """Fixed scale of Laplace/Gaussian likelihoods (MMVAE+ uses 0.75)."""
    vocab_size: int = 0
    """Number of words of a ``text`` modality (the data set's ``vocab.json``); 0 for non-text modalities."""


def _polymnist_modalities() -> list[ModalityConfig]:
    return [ModalityConfig(name=f"m{k}") for k in range(5)]


@dataclass(kw_only=True)
class DataConfig:
    """Where the webdataset shards are and how they are streamed."""

    path: str = "data/polymnist"
    """Directory holding ``manifest.json`` and the shards written by ``mmebm data``."""
    batch_size: int = 128
    """Per-process micro-batch size."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 2000
    """Samples held in the webdataset shuffle buffer (0 disables shuffling)."""
    on_error: str = "raise"
    """``raise`` on a corrupt shard or sample; ``skip`` logs each skip and reports the count."""


@dataclass(kw_only=True)
class LangevinConfig:
    """Short-run Langevin on the prior: z <- z + (s^2/2) grad[f(z) + log p0(z)] + s * eps, K steps."""

    steps: int = 60
    """K, the number of Langevin steps per chain."""
    step_size: float = 0.4
    """s: the drift is (s^2 / 2) * grad and the noise std is s (LEBM convention)."""
    backend: str = "auto"
    """``auto`` (triton on CUDA, torch otherwise), ``triton``, ``torch`` or ``autograd`` (the reference)."""


@dataclass(kw_only=True)
class PriorConfig:
    """Prior on the shared latent z: a fixed reference, or the EBM exp(f(z)) p0(z) / Z."""

    kind: str = "ebm"
    """``laplace``, ``gaussian`` (fixed baselines) or ``ebm``."""
    reference: str = "laplace"
    """p0 of the EBM prior: ``laplace`` or ``gaussian``."""
    reference_scale: float = 1.0
    """Scale b of Laplace(0, b) or sigma of N(0, sigma^2): of p0, and of the fixed laplace/gaussian priors."""
    hidden: int = 200
    """Width of the energy MLP's hidden layers."""
    layers: int = 2
    """Number of hidden layers of the energy MLP (1-4)."""
    activation: str = "gelu"
    """Energy MLP activation: ``gelu``, ``gelu_tanh``, ``leaky_relu`` or ``silu``."""
    spectral_norm: bool = False
    """Apply spectral normalisation to the energy MLP's linear layers."""
    energy_l2: float = 0.1
    """Weight of the L2 penalty on f of positive and negative samples (keeps the energy bounded)."""
    lr: float = 5e-5
    """Learning rate of the energy MLP (its own parameter group)."""
    betas: tuple[float, float] = (0.5, 0.999)
    """Adam betas of the energy MLP."""
    langevin: LangevinConfig = field(default_factory=LangevinConfig)
    """Short-run Langevin settings used for negatives in training and for joint sampling."""
    max_energy_gap: float = 100.0
    """Runaway guard: stop when |E_q f - E_p f| exceeds this."""
    max_posterior_abs: float = 1e3
    """Runaway guard: stop when the mean |posterior location| exceeds this."""
    fit: str = "joint"
    """``joint``: the energy trains with encoders and decoders (the paper); ``posthoc``: only the energy
    trains, on the aggregate posterior of a frozen model loaded with ``train.init_from`` (its fixed prior
    becomes the reference p0), and the decoders never run in training."""


@dataclass(kw_only=True)
class ModelConfig:
    """The multimodal VAE: modalities, latents, aggregation, objective and prior."""

    modalities: list[ModalityConfig] = field(default_factory=_polymnist_modalities)
    """The modalities, in order."""
    latent_dim: int = 32
    """Dimension of the shared latent z."""
    private_dim: int = 0
    """Dimension of each private latent w_m (0: no private latents, i.e. MMVAE)."""
    width: int = 32
    """Base channel width of conv families (MMVAE+'s reference network uses 64)."""
    aggregation: str = "moe"
    """How unimodal experts combine into q(z|X): ``moe``, ``poe`` or ``mopoe``."""
    posterior: str = "laplace"
    """q(z|x_m), q(w_m|x_m): ``laplace`` (scale softmax(raw) * d, MMVAE+) or ``gaussian`` (poe/mopoe)."""
    objective: str = "elbo"
    """``elbo`` (K = 1), ``iwae`` or ``dreg`` (importance-weighted, K particles); stratified for ``moe``."""
    particles: int = 1
    """K importance particles for ``iwae`` / ``dreg``."""
    beta: float = 1.0
    """Weight of the prior/posterior terms (MMVAE+ uses 2.5 in its newer release)."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """Prior on z."""
    channels_last: bool = True
    """Run the ``mmvaeplus`` convs on channels_last (NHWC) activations: the same function and parameters;
    oneDNN's CPU convs skip a layout reorder per call that way (faster on CPU, measured)."""
    batched_decode: bool = False
    """Decode all strata (source modalities x particles) of one target in a single decoder call; false calls
    the decoder once per stratum (B x K rows), as the authors' code does. The same function and parameters;
    one large call was 1.6x slower per step on the reference network on 2-core CPUs (its activations leave
    the caches; docs/bench/amd_levers.log, cpu_levers.jsonl), so per-stratum calls are the default."""
    subpixel_upsample: bool = True
    """Run the ``mmvaeplus`` decoder blocks that follow a 2x nearest upsampling in sub-pixel form (four 2x2
    convs on the low-resolution map: 4/9 of the first conv's multiply-adds): the same function up to float32
    rounding, the same parameters."""


@dataclass(kw_only=True)
class OptimConfig:
    """Optimiser and schedule; the energy MLP has its own learning rate and betas in ``model.prior``."""

    lr: float = 1e-3
    """Learning rate of encoders and decoders."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas of encoders and decoders."""
    amsgrad: bool = True
    """AMSGrad, as MMVAE+."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW); 0 gives Adam."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this (0 disables)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step."""
    lr_decay: float = 1.0
    """Exponential learning-rate decay per ``lr_decay_every`` steps (1.0: constant)."""
    lr_decay_every: int = 1000
    """Steps between two applications of ``lr_decay``."""


@dataclass(kw_only=True)
class TrainConfig:
    """The training run: length, logging, checkpoints, precision."""

    steps: int = 2000
    """Optimiser steps."""
    seed: int = 0
    """Seed of parameters, Langevin noise and data order."""
    out_dir: str = "runs/default"
    """Run directory (config, metrics.jsonl, checkpoints, TensorBoard events)."""
    log_every: int = 10
    """Steps between metric records."""
    checkpoint_every: int = 200
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """Checkpoints kept (older ones are removed)."""
    eval_every: int = 0
    """Steps between periodic coherence evaluations (0: never)."""
    image_every: int = 500
    """Steps between sample grids written to TensorBoard (0: never)."""
    mixed_precision: str = "no"
    """``no`` or ``bf16`` (autocast; fp32 master weights)."""
    threads: int = 0
    """torch intra-op threads per process (0: leave torch's default)."""
    compile: bool = False
    """torch.compile the model's forward."""
    init_from: str = ""
    """A run directory (its newest checkpoint) or checkpoint directory whose weights start a fresh run; only
    the energy MLP's may be missing (it keeps its fresh initialisation). Empty: random initialisation."""
    dist_timeout_s: float = 1800.0
    """Seconds a collective waits for the other ranks before the run fails naming the rank that stopped
    answering (torch's process-group timeout; a watchdog logs the laggard after half of it)."""


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation settings used by ``mmebm eval`` and periodic evaluation."""

    classifiers: str = ""
    """Directory of trained classifiers (``mmebm classifiers train``); empty: ``<data.path>/classifiers``."""
    num_samples: int = 1000
    """Joint samples and test tuples used per coherence figure."""
    langevin_sweep: tuple[int, ...] = (0, 10, 30, 60, 100)
    """Langevin steps at which joint coherence is re-measured (the sweep)."""


@dataclass(kw_only=True)
class Config:
    """A whole experiment."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------------------------- loading


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} Valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` to type ``tp`` (after YAML/CLI parsing) or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{where}' must be a mapping, got {value!r}")
        return _from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else value.split(",")
        variable_length = origin is list or (len(args) == 2 and args[1] is Ellipsis)
        if variable_length and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # a lone number (YAML parses `shape=6` as 6) is a one-element list
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{where}' must be a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"config key '{where}' needs {len(args)} values, got {value!r}")
            pairs = enumerate(zip(value, args, strict=True))
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in pairs)
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key '{where}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{where}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{where}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{where}' must be a string, got {value!r}")
    return value


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{where}'{_suggest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], where)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field without default, e.g. a modality without a name
        raise ConfigError(f"config section '{prefix or cls.__name__}': {exc}") from exc


def config_from_dict(data: dict) -> Config:
    """Build a :class:`Config` strictly from a nested dict (unknown keys raise :class:`ConfigError`)."""
    return _from_dict(Config, data)


def config_to_dict(cfg: Any) -> dict:
    """Nested plain dict of a config (tuples become lists), JSON-serialisable."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(cfg: Config) -> str:
    """Short stable hash of the resolved config (excluding ``train.out_dir``), for results tables."""
    d = config_to_dict(cfg)
    d["train"].pop("out_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _set_dotted(data: dict, dotted: str, raw: str, cls: type = Config) -> None:
    parts = dotted.split(".")
    node, node_cls, path = data, cls, []
    for i, key in enumerate(parts):
        path.append(key)
        if isinstance(node, list):
            try:
                idx = int(key)
                node = node[idx]
            except (ValueError, IndexError) as exc:
                raise ConfigError(f"override '{dotted}': '{key}' is not a valid index") from exc
            node_cls = typing.get_args(node_cls)[0]
            continue
        hints = typing.get_type_hints(node_cls)
        if key not in hints:
            raise ConfigError(f"unknown config key '{'.'.join(path)}'{_suggest(key, list(hints))}")
        if i == len(parts) - 1:
            node[key] = yaml.safe_load(raw) if raw != "" else ""
            return
        node_cls = hints[key]
        if typing.get_origin(node_cls) is list:
            node = node.setdefault(key, [])
        else:
            node = node.setdefault(key, {})


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file '{path}' does not exist; see configs/ for the shipped ones")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file '{path}' is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections, "
                              f"got {type(data).__name__}")
    # Materialise defaults so that overrides into lists (model.modalities.0.family=...) have a node to edit.
    base = config_to_dict(config_from_dict(data)) if path is not None else config_to_dict(Config())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like section.key=value")
        key, raw = item.split("=", 1)
        _set_dotted(base, key.strip(), raw.strip())
    try:
        return config_from_dict(base)
    except ConfigError as exc:
        where = f" (from '{path}')" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from exc


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as JSON."""
    Path(path).write_text(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True) + "\n")
