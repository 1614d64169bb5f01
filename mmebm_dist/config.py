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
from typing import Any, Literal

from mmebm_dist.kernels.names import Activation, Reference
from mmebm_dist.kernels.names import Backend as LangevinBackend
from mmebm_dist.userfiles import UserFileError, clip, load_yaml, read_text


class ConfigError(ValueError):
    """A config file or override that cannot be applied; the message names the key and the fix."""


class OptionError(ValueError):
    """A command option that cannot be applied (the message names the flag and the fix). Library code raises
    it; ``mmebm_dist.commands`` prints the message alone and exits 1, as a refused option always did."""


# Choice fields. Each name set equals the registry of the code that implements it (tests/test_config.py).
FAMILY_NAMES: set[str] = {"conv", "mlp", "mmvaeplus", "text"}
"""Encoder/decoder families a modality may name: the built-in ones plus any added by
``mmebm_dist.models.modality.register_family`` (the registry keeps this set in step with itself)."""
Likelihood = Literal["laplace", "gaussian", "bernoulli", "categorical"]
OnError = Literal["raise", "skip"]
PriorKind = Literal["laplace", "gaussian", "ebm"]
LangevinInit = Literal["p0", "sir"]
PriorFit = Literal["joint", "posthoc"]
Aggregation = Literal["moe", "poe", "mopoe"]
Posterior = Literal["laplace", "gaussian"]
Objective = Literal["elbo", "iwae", "dreg"]
MixedPrecision = Literal["auto", "no", "bf16"]
CompileMode = Literal["off", "default", "reduce-overhead", "true", "false"]
Tracker = Literal["tensorboard", "mlflow", "wandb"]
StageName = Literal["reference", "energy", "joint"]
PRODUCT_AGGREGATIONS = ("poe", "mopoe")
"""Aggregations that multiply experts: a closed form only for Gaussian posteriors."""
IMAGE_FAMILIES = ("conv", "mmvaeplus")
"""Families that halve H and W twice."""
TEXT_DOWNSAMPLE = 8
"""A ``text`` modality's length shrinks by this factor (three stride-2 convolutions) in its encoder."""


@dataclass(kw_only=True)
class ModalityConfig:
    """One modality, declared once; encoders, decoders, likelihoods and classifiers iterate over these."""

    name: str
    """Key of the modality in every batch dict (e.g. ``m0``)."""
    shape: tuple[int, ...] = (3, 28, 28)
    """Shape of one sample: (C, H, W) for images, (D,) for vectors."""
    family: str = "conv"
    """Encoder/decoder family in ``mmebm_dist.models.modality.FAMILIES``: ``conv``, ``mlp``, ``mmvaeplus``,
    ``text``."""
    likelihood: Likelihood = "laplace"
    """Likelihood of the decoder output: ``laplace``, ``gaussian``, ``bernoulli`` or ``categorical`` (token
    ids of a ``text`` modality)."""
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
    """Directory holding ``manifest.json`` and the shards written by ``mmebm data``, or the http(s) URL of
    one; shard URLs given explicitly (brace pattern, ``pipe:`` commands) are streamed as given."""
    batch_size: int = 128
    """Per-process micro-batch size."""
    num_workers: int = 1
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 2000
    """Samples held in the webdataset shuffle buffer (0 disables shuffling)."""
    on_error: OnError = "raise"
    """``raise`` on a corrupt shard or sample; ``skip`` logs each skip and reports the count."""
    shard_url: str = ""
    """Where to read each shard of the manifest instead: a URL with ``{name}`` for the shard's name, e.g.
    ``pipe:aws s3 cp s3://bucket/polymnist/{name} -``; any scheme (you wrote it, not the manifest)."""
    check_sha256: bool = False
    """Check each shard's sha256 against the manifest as it is streamed (sizes are always checked)."""


@dataclass(kw_only=True)
class LangevinConfig:
    """Short-run Langevin on the prior: z <- z + (s^2/2) grad[f(z) + log p0(z)] + s * eps, K steps."""

    steps: int = 60
    """K, the number of Langevin steps per chain."""
    step_size: float = 0.4
    """s: the drift is (s^2 / 2) * grad and the noise std is s (LEBM convention)."""
    backend: LangevinBackend = "auto"
    """``auto`` (triton on CUDA, torch otherwise), ``triton``, ``torch`` or ``autograd`` (the reference)."""
    persistent: int = 0
    """Training negatives from a replay buffer of this many chains kept in the model (0: every chain starts
    from p0). Each update continues ``batch`` chains drawn from it (a share ``reinit`` restarted from p0) and
    writes them back, so a short K follows a sharp energy (JEM / IGEBM). Joint samples still start from p0."""
    reinit: float = 0.05
    """With ``persistent``: the share of each update's chains restarted from p0."""
    init: LangevinInit = "p0"
    """Where chains start: ``p0`` (draws of the reference) or ``sir`` (importance resampling of the EBM prior
    with p0 as the proposal: ``sir_candidates`` p0 draws per chain, one kept with probability ∝ exp f). A
    sweep entry of 0 steps is always p0's draws (the reference on the same model)."""
    sir_candidates: int = 16
    """With ``init: sir``: p0 draws per chain among which one is resampled."""


@dataclass(kw_only=True)
class PriorConfig:
    """Prior on the shared latent z: a fixed reference, or the EBM exp(f(z)) p0(z) / Z."""

    kind: PriorKind = "ebm"
    """``laplace``, ``gaussian`` (fixed baselines) or ``ebm``."""
    reference: Reference = "laplace"
    """p0 of the EBM prior: ``laplace``, ``gaussian`` or ``gmm``: a full-covariance Gaussian mixture fitted to
    the encoders' aggregate posterior inside the run, at the first step of the first stage that trains the
    energy (Laplace(0, reference_scale) until then), saved in checkpoints; the energy learns a correction to
    it."""
    reference_components: int = 50
    """``reference: gmm``: mixture components."""
    reference_fit_tuples: int = 10000
    """``reference: gmm``: train tuples (one aggregate-posterior draw each) the mixture is fitted to."""
    reference_refit: bool = False
    """``reference: gmm``: fit again at every later stage boundary (the encoders moved in between)."""
    reference_scale: float = 1.0
    """Scale b of Laplace(0, b) or sigma of N(0, sigma^2): of p0, and of the fixed laplace/gaussian priors."""
    hidden: int = 200
    """Width of the energy MLP's hidden layers."""
    layers: int = 2
    """Number of hidden layers of the energy MLP (1-4)."""
    activation: Activation = "gelu"
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
    energy_bound: float = 0.0
    """B > 0: the energy is soft-clipped, f = B tanh(f_mlp / B): |f| < B keeps exp(f) p0 proper and the
    drift is the MLP's slope times tanh' <= 1 (0: no bound). The fused Langevin backends refuse a bounded
    energy (``auto`` then runs the autograd chain)."""
    coupling_ramp_steps: int = 0
    """R > 0: the energy's term in the encoders'/decoders' objective (f in log p(z) = f + log p0) is weighted
    min(1, step / R); the energy itself trains at full rate from step 1 (0: weight 1 throughout)."""
    energy_updates: int = 1
    """Energy optimizer steps per model step: the joint step plus ``energy_updates - 1`` energy-only steps on
    the same batch, each with fresh posterior samples and fresh negatives (two time scales)."""
    max_energy_gap: float = 100.0
    """Runaway guard: stop when |E_q f - E_p f| exceeds this."""
    max_posterior_abs: float = 1e3
    """Runaway guard: stop when the mean |posterior location| exceeds this."""
    fit: PriorFit = "joint"
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
    aggregation: Aggregation = "moe"
    """How unimodal experts combine into q(z|X): ``moe``, ``poe`` or ``mopoe``."""
    posterior: Posterior = "laplace"
    """q(z|x_m), q(w_m|x_m): ``laplace`` (scale softmax(raw) * d, MMVAE+) or ``gaussian`` (poe/mopoe)."""
    objective: Objective = "elbo"
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
class StageConfig:
    """One stage of ``train.schedule``: what trains for ``steps`` steps, and at which learning rates."""

    stage: StageName
    """``reference``: encoders/decoders under the reference prior p0 alone (the energy waits);
    ``energy``: only the energy, on the frozen encoders' posterior (the post-hoc fit inside the run);
    ``joint``: everything, the paper's objective."""
    steps: int
    """Optimiser steps of this stage."""
    lr: float | None = None
    """Encoder/decoder lr in this stage (default ``optim.lr``); stages that do not train them use 0."""
    prior_lr: float | None = None
    """Energy lr in this stage (default ``model.prior.lr``); stages that do not train it use 0."""


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
    """Steps between sample grids written to the trackers (0: never)."""
    trackers: list[Tracker] = field(default_factory=lambda: ["tensorboard"])
    """Where rank 0 mirrors metrics.jsonl through accelerate's trackers (scalars, the resolved config as
    parameters, sample grids): ``tensorboard`` (RUN/tb), ``mlflow`` (``MLFLOW_TRACKING_URI``; the ``mlflow``
    extra), ``wandb`` (``WANDB_MODE=offline`` needs no network; the ``wandb`` extra). A resumed run continues
    the same tracker runs (their ids in RUN/trackers.json). Empty: metrics.jsonl only."""
    mixed_precision: MixedPrecision = "auto"
    """``auto`` (bf16 where native: Ampere+ GPUs, AMX/AVX512-BF16 CPUs; else fp32), ``no`` or ``bf16``
    (autocast; fp32 master weights)."""
    threads: int = 0
    """torch intra-op threads per process (0: leave torch's default)."""
    compile: CompileMode = "off"
    """``off``, ``default`` or ``reduce-overhead`` (CUDA graphs; CUDA only): torch.compile mode of the forward
    and optimizer step (mmebm_dist/train/capture.py); ``true``/``false`` mean default/off."""
    schedule: list[StageConfig] = field(default_factory=list)
    """Stages run in order (``{stage, steps, lr, prior_lr}``), e.g. a reference-prior warm-up, an energy fit
    on the frozen model, then the joint phase; their steps add up to at least ``train.steps``. Empty: the
    whole run is one joint stage."""
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
            try:
                value = load_yaml(value, f"config key '{where}'") if value.strip().startswith("[") \
                    else value.split(",")
            except UserFileError as exc:
                raise ConfigError(str(exc)) from None
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
    if origin is Literal:  # membership is checked by validate(), with the valid names and a suggestion
        if isinstance(value, bool):  # YAML reads true/false/yes/no as booleans: keep the word
            return str(value).lower()
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{where}' must be one of {', '.join(args)}, got {value!r}")
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
        if isinstance(value, bool):  # YAML reads true/false/yes/no as booleans: keep the word
            return str(value).lower()
        if isinstance(value, (str, int, float)):
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
    """Build a :class:`Config` strictly from a nested dict (unknown keys raise :class:`ConfigError`) and
    :func:`validate` it."""
    cfg = _from_dict(Config, data)
    validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict:
    """Nested plain dict of a config (tuples become lists), JSON-serialisable."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def flatten_dotted(tree: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys -> values of a nested dict (lists such as model.modalities stay whole)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
            try:
                node[key] = load_yaml(raw, f"override '{dotted}'") if raw != "" else ""
            except UserFileError as exc:
                raise ConfigError(str(exc)) from None
            return
        node_cls = hints[key]
        if typing.get_origin(node_cls) is list:
            node = node.setdefault(key, [])
        else:
            node = node.setdefault(key, {})


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The mapping of a YAML config with its ``base:`` chain resolved (deep merge, lists replaced)."""
    if not path.is_file():
        where = f" (the base of '{chain[-1]}')" if chain else ""
        raise ConfigError(f"config file '{path}'{where} does not exist; see configs/ for the shipped ones")
    if path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve()))
        raise ConfigError(f"config file '{path}': its base: chain is a cycle ({cycle}); remove one base:")
    try:
        data = load_yaml(read_text(path, "config file"), f"config file '{path}'") or {}
    except UserFileError as exc:
        raise ConfigError(str(exc)) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base or Path(base).suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file '{path}': base: must name one YAML file (.yaml/.yml/.json, "
                          f"relative to {path.parent}), got {clip(repr(base))}")
    return deep_merge(_read_yaml(path.parent / base, (*chain, path.resolve())), data)


def deep_merge(base: dict, override: dict) -> dict:
    """``base`` with ``override`` merged in: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None), apply ``key=value`` overrides, validate.

    A YAML may start from another: ``base: polymnist_ebm.yaml`` (relative to the YAML's folder) plus the keys
    that differ, deep-merged (lists replaced); a chain of bases is followed, a cycle refused.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        data = _read_yaml(path)
    try:
        # Defaults materialised so that overrides into lists (model.modalities.0.family=...) have a node.
        resolved = config_to_dict(_from_dict(Config, data))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override '{item}' must look like section.key=value")
            key, raw = item.split("=", 1)
            _set_dotted(resolved, key.strip(), raw.strip())
        return config_from_dict(resolved)
    except ConfigError as exc:
        where = f" (from '{path}')" if path is not None else ""
        raise ConfigError(f"{exc}{where}") from exc


# -------------------------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (of each element, for a tuple or list of numbers)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    """True: ``low`` itself is excluded (``> low``)."""
    high_open: bool = False

    def holds(self, x: float) -> bool:
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below  # false for nan

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"in {left}{_number(self.low)}, {_number(self.high)}{right}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {_number(self.low)}"
        return f"{'<' if self.high_open else '<='} {_number(self.high)}"


def _number(x: float) -> str:
    """A bound as written in an error: integers in full (1048576, not 1.04858e+06)."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else f"{x:g}"


POSITIVE, NON_NEGATIVE, AT_LEAST_ONE = Range(0, low_open=True), Range(0), Range(1)
ADAM_BETA = Range(0, 1, high_open=True)
# Upper bounds on everything that sizes memory, processes, threads, time or loops: far above any sensible
# run, low enough that a typo (threads=100000, dist_timeout_s=inf) fails at load instead of hanging the
# machine. Finite bounds also refuse inf.
COUNT, SIZE, LOOP = Range(1, 2**20), Range(1, 2**16), Range(0, 10**6)
FINITE_POSITIVE, FINITE_NON_NEGATIVE = Range(0, 1e30, low_open=True), Range(0, 1e30)

RANGES: dict[type, dict[str, Range]] = {
    ModalityConfig: {"shape": SIZE, "likelihood_scale": FINITE_POSITIVE, "vocab_size": Range(0, 2**24)},
    DataConfig: {"batch_size": COUNT, "num_workers": Range(0, 256), "shuffle_buffer": Range(0, 10**7)},
    LangevinConfig: {"steps": LOOP, "step_size": FINITE_POSITIVE, "persistent": Range(0, 10**7),
                     "reinit": Range(0, 1), "sir_candidates": Range(1, 4096)},
    PriorConfig: {
        "reference_scale": FINITE_POSITIVE, "hidden": SIZE, "layers": Range(1, 4),
        "energy_l2": FINITE_NON_NEGATIVE, "lr": FINITE_POSITIVE, "betas": ADAM_BETA,
        "max_energy_gap": POSITIVE, "max_posterior_abs": POSITIVE, "energy_bound": FINITE_NON_NEGATIVE,
        "coupling_ramp_steps": Range(0, 10**9), "energy_updates": Range(1, 1000),
        "reference_components": Range(1, 1024), "reference_fit_tuples": Range(1, 1_000_000),
    },
    ModelConfig: {
        "latent_dim": SIZE, "private_dim": Range(0, 2**16), "width": SIZE, "particles": Range(1, 10**4),
        "beta": FINITE_NON_NEGATIVE,
    },
    OptimConfig: {
        "lr": FINITE_POSITIVE, "betas": ADAM_BETA, "weight_decay": FINITE_NON_NEGATIVE,
        "grad_clip": FINITE_NON_NEGATIVE, "grad_accum": Range(1, 10**4), "lr_decay": FINITE_POSITIVE,
        "lr_decay_every": Range(1, 10**9),
    },
    TrainConfig: {
        "steps": Range(1, 10**9), "seed": Range(0, 2**32 - 1), "log_every": Range(1, 10**9),
        "checkpoint_every": Range(0, 10**9), "keep_checkpoints": Range(1, 10**4),
        "eval_every": Range(0, 10**9), "image_every": Range(0, 10**9), "threads": Range(0, 1024),
        "dist_timeout_s": Range(0, 7 * 86400, low_open=True),
    },
    StageConfig: {"steps": Range(1, 10**9), "lr": FINITE_POSITIVE, "prior_lr": FINITE_POSITIVE},
    EvalConfig: {"num_samples": Range(1, 10**7), "langevin_sweep": LOOP},
}
"""Allowed range of every numeric field, checked at load time (a test checks that none is missing)."""


def _check_fields(node: Any, prefix: str) -> None:
    """Choice fields hold one of their names and numeric fields lie in their :data:`RANGES`, recursively."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, where = getattr(node, f.name), f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if typing.get_origin(tp) is Literal and value not in typing.get_args(tp):
            choices = typing.get_args(tp)
            close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"config key '{where}' must be one of {', '.join(choices)}, got {value!r}{hint}")
        if dataclasses.is_dataclass(value):
            _check_fields(value, where)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, item in enumerate(value):
                _check_fields(item, f"{where}[{i}]")
        allowed = RANGES.get(type(node), {}).get(f.name)
        if allowed is not None:
            for x in value if isinstance(value, (tuple, list)) else [value]:
                if x is not None and not allowed.holds(x):
                    raise ConfigError(f"config key '{where}' must be {allowed}, got {value!r}")


def _check_model_rules(cfg: ModelConfig) -> None:
    """The rules that tie model fields together."""
    if not cfg.modalities:
        raise ConfigError("model.modalities is empty; declare at least one modality")
    names = [m.name for m in cfg.modalities]
    if len(set(names)) != len(names) or any(not n or "." in n or n == "label" for n in names):
        raise ConfigError(f"model.modalities names must be unique, non-empty, without '.', not 'label': "
                          f"{names}")
    for i, mod in enumerate(cfg.modalities):
        if mod.family not in FAMILY_NAMES:
            close = difflib.get_close_matches(mod.family, sorted(FAMILY_NAMES), n=1, cutoff=0.5)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key 'model.modalities[{i}].family' must be one of "
                              f"{', '.join(sorted(FAMILY_NAMES))} (or a family registered with "
                              f"register_family), got {mod.family!r}{hint}")
        if mod.family in IMAGE_FAMILIES and (len(mod.shape) != 3 or mod.shape[1] % 4 or mod.shape[2] % 4):
            raise ConfigError(
                f"model.modalities '{mod.name}': family '{mod.family}' needs shape (C, H, W) with H and W "
                f"divisible by 4, got {tuple(mod.shape)}; use 'mlp' for other shapes")
        if mod.family == "text":
            if len(mod.shape) != 1 or mod.shape[0] % TEXT_DOWNSAMPLE:
                raise ConfigError(
                    f"model.modalities '{mod.name}': family 'text' needs shape (L,) with L a multiple of "
                    f"{TEXT_DOWNSAMPLE}, got {tuple(mod.shape)} (captions use L = 32)")
            if mod.vocab_size < 3:
                raise ConfigError(
                    f"model.modalities '{mod.name}': family 'text' needs vocab_size >= 3 (the number of "
                    f"words in the data set's vocab.json, manifest key 'vocab_size'), got {mod.vocab_size}")
    if cfg.aggregation in PRODUCT_AGGREGATIONS and cfg.posterior != "gaussian":
        raise ConfigError(f"model.aggregation '{cfg.aggregation}' multiplies experts, which has a closed "
                          f"form only for Gaussians; set model.posterior=gaussian (got '{cfg.posterior}')")
    if cfg.objective == "elbo" and cfg.particles != 1:
        raise ConfigError(f"model.objective 'elbo' averages particles; use iwae or dreg for "
                          f"model.particles={cfg.particles} (or set particles=1)")
    if cfg.prior.fit == "posthoc" and cfg.prior.kind != "ebm":
        raise ConfigError(f"model.prior.fit=posthoc fits an energy, but model.prior.kind is "
                          f"'{cfg.prior.kind}'; set model.prior.kind=ebm (and train.init_from=<the trained "
                          "run>)")


def validate_model(cfg: ModelConfig) -> None:
    """:func:`validate` for the ``model`` section alone (a model built from a config made in code)."""
    _check_fields(cfg, "model")
    _check_model_rules(cfg)


def validate(cfg: Config) -> None:
    """Every rule a config must satisfy, run at load time: choices, numeric ranges, and the rules that tie
    fields together. Raises a :class:`ConfigError` naming the key, the allowed values and the fix."""
    _check_fields(cfg, "")
    _check_model_rules(cfg.model)
    if cfg.model.prior.energy_updates > 1 and cfg.optim.grad_accum > 1:
        raise ConfigError(f"model.prior.energy_updates={cfg.model.prior.energy_updates} runs extra energy "
                          f"steps after each optimizer step, which optim.grad_accum={cfg.optim.grad_accum} "
                          "spreads over micro-batches; set one of them to 1")
    if cfg.model.prior.fit == "posthoc" and not cfg.train.init_from:
        raise ConfigError("model.prior.fit=posthoc trains only the energy of a trained model: set "
                          "train.init_from=<its run directory> (a fixed-prior run)")
    _check_schedule(cfg)
    trackers = cfg.train.trackers
    for i, name in enumerate(trackers):
        if name not in typing.get_args(Tracker):
            close = difflib.get_close_matches(str(name), typing.get_args(Tracker), n=1, cutoff=0.5)
            raise ConfigError(f"config key 'train.trackers[{i}]' must be one of "
                              f"{', '.join(typing.get_args(Tracker))}, got {name!r}"
                              + (f"; did you mean '{close[0]}'?" if close else ""))
    if len(set(trackers)) != len(trackers):
        raise ConfigError(f"config key 'train.trackers' names a tracker twice: {trackers}")
    _check_learned_reference(cfg)


def _check_learned_reference(cfg: Config) -> None:
    """A ``gmm`` reference is fitted to the encoders' aggregate posterior when the energy starts training,
    so the encoders must have trained before (a reference stage, or a post-hoc fit of a trained run)."""
    prior = cfg.model.prior
    if prior.reference != "gmm":
        return
    if prior.kind != "ebm":
        raise ConfigError(f"model.prior.reference=gmm is the EBM prior's learned reference; set "
                          f"model.prior.kind=ebm (got '{prior.kind}') or reference=laplace")
    first = cfg.train.schedule[0].stage if cfg.train.schedule else "joint"
    if prior.fit != "posthoc" and first != "reference" and not cfg.train.init_from:
        raise ConfigError("model.prior.reference=gmm is fitted to the trained encoders' aggregate posterior: "
                          "start train.schedule with a {stage: reference} stage, or start from trained "
                          "weights (train.init_from=<a trained run>, with model.prior.fit=posthoc to fit "
                          "the energy alone)")
    if prior.reference_components > prior.reference_fit_tuples:
        raise ConfigError(f"model.prior.reference_components={prior.reference_components} exceeds "
                          f"model.prior.reference_fit_tuples={prior.reference_fit_tuples}; raise the tuples")


def _check_schedule(cfg: Config) -> None:
    """A schedule covers the run, and its stages other than ``joint`` need an EBM prior trained jointly."""
    schedule = cfg.train.schedule
    if not schedule:
        return
    covered = sum(s.steps for s in schedule)
    if covered < cfg.train.steps:
        raise ConfigError(f"config key 'train.schedule' covers {covered} steps but train.steps is "
                          f"{cfg.train.steps}; lengthen a stage or lower train.steps")
    for i, s in enumerate(schedule):
        if s.stage != "joint" and cfg.model.prior.kind != "ebm":
            raise ConfigError(f"config key 'train.schedule[{i}].stage' is '{s.stage}', which needs "
                              f"model.prior.kind=ebm (got '{cfg.model.prior.kind}')")
    if cfg.model.prior.fit == "posthoc":
        raise ConfigError("config key 'train.schedule' stages the fit itself; leave model.prior.fit=joint "
                          "(a post-hoc run trains only the energy for all of train.steps)")


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as JSON."""
    Path(path).write_text(json.dumps(config_to_dict(cfg), indent=2, sort_keys=True) + "\n")
