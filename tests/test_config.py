"""Typed config: strict keys with suggestions, dotted overrides (list indices too), JSON round trip, base:
inheritance, choices and ranges checked at load time."""

import json
import typing
from pathlib import Path

import pytest
import yaml

from mmebm_dist.config import (
    FAMILY_NAMES,
    RANGES,
    Activation,
    Aggregation,
    Config,
    ConfigError,
    LangevinBackend,
    LangevinConfig,
    Likelihood,
    ModalityConfig,
    Objective,
    Posterior,
    PriorConfig,
    Reference,
    config_from_dict,
    config_hash,
    config_to_dict,
    load_config,
    save_config,
)

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def _write(tmp_path, text: str) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_defaults_load_without_a_file():
    cfg = load_config()
    assert cfg == Config()
    assert [m.name for m in cfg.model.modalities] == ["m0", "m1", "m2", "m3", "m4"]
    assert cfg.model.modalities[0].shape == (3, 28, 28)


def test_unknown_key_names_the_key_and_suggests_the_nearest(tmp_path):
    path = _write(tmp_path, "model:\n  latnet_dim: 16\n")
    with pytest.raises(ConfigError, match=r"key 'model.latnet_dim'; did you mean 'latent_dim'\?"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"'optimiser'.*did you mean 'optim'"):
        load_config(_write(tmp_path, "optimiser: {lr: 0.1}\n"))
    with pytest.raises(ConfigError, match=r"model.prior.langevin.stpes.*did you mean 'steps'"):
        load_config(None, ["model.prior.langevin.stpes=3"])


def test_wrong_types_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.steps' must be an integer, got 'many'"):
        load_config(_write(tmp_path, "train: {steps: many}\n"))
    with pytest.raises(ConfigError, match=r"'model.prior.betas' needs 2 values"):
        load_config(None, ["model.prior.betas=[0.5]"])
    with pytest.raises(ConfigError, match=r"'model.prior.spectral_norm' must be true or false"):
        load_config(None, ["model.prior.spectral_norm=maybe"])
    with pytest.raises(ConfigError, match=r"config section 'model.modalities\[0\]'"):
        load_config(_write(tmp_path, "model:\n  modalities:\n    - {shape: [4]}\n"))


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(_write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "model: {latent_dim: [\n"))


def test_overrides_reach_nested_sections_tuples_and_list_items(tmp_path):
    path = _write(tmp_path, "model:\n  latent_dim: 16\n  modalities:\n"
                            "    - {name: a, shape: [4], family: mlp}\n    - {name: b, shape: [1, 8, 8]}\n")
    cfg = load_config(path, ["model.prior.langevin.steps=7", "model.prior.betas=[0.0, 0.9]",
                             "model.modalities.1.family=mlp", "model.modalities.0.shape=6",
                             "eval.langevin_sweep=0",
                             "optim.lr=1e-4", "train.compile=true", "data.path=/x/y"])
    assert cfg.model.latent_dim == 16  # the file's value survives unrelated overrides
    assert cfg.model.prior.langevin.steps == 7
    assert cfg.model.prior.betas == (0.0, 0.9)
    assert [m.family for m in cfg.model.modalities] == ["mlp", "mlp"]  # b's default conv overridden
    assert cfg.model.modalities[0].shape == (6,) and cfg.eval.langevin_sweep == (0,)
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)  # "1e-4" is a YAML string: coerced
    assert cfg.train.compile == "true" and cfg.data.path == "/x/y"
    # Overrides into the default modalities list work without a file too.
    assert load_config(None, ["model.modalities.4.likelihood=bernoulli"]).model.modalities[4].likelihood == \
        "bernoulli"
    with pytest.raises(ConfigError, match="'7' is not a valid index"):
        load_config(path, ["model.modalities.7.family=mlp"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(path, ["model.latent_dim"])


def test_round_trip_through_json(tmp_path):
    cfg = load_config(None, ["model.prior.kind=laplace", "model.modalities.2.shape=[1,8,8]",
                             "eval.langevin_sweep=[0,3]"])
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    assert config_from_dict(data) == cfg
    save_config(cfg, tmp_path / "config.json")
    assert config_from_dict(json.loads((tmp_path / "config.json").read_text())) == cfg
    assert config_hash(cfg) == config_hash(config_from_dict(data))
    assert config_hash(cfg) != config_hash(load_config(None, ["model.prior.kind=gaussian"]))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_round_trip(path):
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_paper_and_baseline_configs_differ_only_in_the_prior_and_match_encoder_decoder_steps():
    """The cold joint run and the Laplace control differ in the prior (and the control's longer run); the
    staged EBM run trains its encoders/decoders for exactly as many steps as the control (step-matched)."""
    joint = config_to_dict(load_config(CONFIGS[0].parent / "polymnist_ebm_joint.yaml"))
    lap = config_to_dict(load_config(CONFIGS[0].parent / "polymnist_laplace.yaml"))
    staged = load_config(CONFIGS[0].parent / "polymnist_ebm.yaml")
    assert joint["model"]["prior"]["kind"] == "ebm" and lap["model"]["prior"]["kind"] == "laplace"
    joint["model"]["prior"]["kind"] = "laplace"
    for key in ("out_dir", "steps"):
        joint["train"][key] = lap["train"][key]
    assert joint == lap
    model_steps = sum(s.steps for s in staged.train.schedule if s.stage in ("reference", "joint"))
    assert model_steps == lap["train"]["steps"] == 2000 and staged.train.steps == 5000
    staged_dict = config_to_dict(staged)
    for section in ("data", "optim"):
        assert staged_dict[section] == lap[section], section
    assert {k: v for k, v in staged_dict["model"].items() if k != "prior"} == {
        k: v for k, v in lap["model"].items() if k != "prior"}


@pytest.mark.parametrize("fitted_name, control_name", [
    ("polymnist_ebm_fitted", "polymnist_laplace"), ("polyfashion_ebm_fitted", "polyfashion_laplace"),
    ("mnist_svhn_ebm_fitted", "mnist_svhn_laplace_control")])
def test_fitted_ebm_config_trains_the_controls_model_then_only_the_energy(fitted_name, control_name):
    """A fitted config's reference stage is its Laplace control's whole run (same data, optimiser, network,
    steps); the rest of the run moves only the energy."""
    lap = config_to_dict(load_config(CONFIGS[0].parent / f"{control_name}.yaml"))
    fitted = load_config(CONFIGS[0].parent / f"{fitted_name}.yaml")
    stages = [(s.stage, s.steps) for s in fitted.train.schedule]
    assert stages == [("reference", lap["train"]["steps"]), ("energy", 3000)]
    assert fitted.train.steps == lap["train"]["steps"] + 3000
    fitted_dict = config_to_dict(fitted)
    for section in ("data", "optim"):
        assert fitted_dict[section] == lap[section], section
    assert {k: v for k, v in fitted_dict["model"].items() if k != "prior"} == {
        k: v for k, v in lap["model"].items() if k != "prior"}


RESOLVED = Path(__file__).resolve().parent / "fixtures" / "resolved_configs.json"
"""Every shipped config resolved, pinned: written from main's configs/ when the variants started to inherit
with base:, rewritten since only where a config changed on purpose (the staged polymnist_ebm.yaml and its
controls, new fields with their defaults)."""


def test_every_shipped_config_resolves_as_before_and_its_saved_json_loads(tmp_path):
    expected = json.loads(RESOLVED.read_text())
    assert sorted(expected) == [p.name for p in CONFIGS]
    for path in CONFIGS:
        cfg = load_config(path)
        assert config_to_dict(cfg) == expected[path.name], path.name
        save_config(cfg, tmp_path / "config.json")  # what a run directory holds; --resume loads it so
        assert load_config(tmp_path / "config.json") == cfg


def test_variants_inherit_and_hold_only_what_differs():
    for name in ("polymnist_laplace", "polyfashion_ebm", "polyfashion_laplace", "polymnist_small",
                 "mnist_svhn_laplace", "birds_laplace", "polymnist_ebm_joint", "polyfashion_ebm_joint",
                 "polymnist_ebm_fitted", "polyfashion_ebm_fitted", "mnist_svhn_laplace_control"):
        data = yaml.safe_load((CONFIGS[0].parent / f"{name}.yaml").read_text())
        assert data["base"].endswith(".yaml") and "modalities" not in data.get("model", {}), name
        assert len(yaml.safe_dump(data).splitlines()) <= 15, name


def test_base_deep_merges_replaces_lists_and_refuses_cycles(tmp_path):
    (tmp_path / "sub").mkdir()
    _write(tmp_path, "model:\n  latent_dim: 16\n  prior: {kind: ebm, hidden: 8}\n"
                     "eval: {langevin_sweep: [0, 5, 9]}\ntrain: {steps: 30}\n")
    (tmp_path / "sub" / "mid.yaml").write_text("base: ../c.yaml\nmodel:\n  prior: {kind: laplace}\n")
    (tmp_path / "sub" / "leaf.yaml").write_text("base: mid.yaml\neval: {langevin_sweep: [0]}\n")
    cfg = load_config(tmp_path / "sub" / "leaf.yaml", ["train.steps=40"])
    assert cfg.model.latent_dim == 16 and cfg.model.prior.hidden == 8  # inherited two levels up
    assert cfg.model.prior.kind == "laplace"  # the nearer file wins, key by key
    assert cfg.eval.langevin_sweep == (0,)  # lists are replaced, not merged
    assert cfg.train.steps == 40  # overrides apply last
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"base: chain is a cycle \(.*a.yaml -> .*b.yaml -> .*a.yaml\)"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "lost.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere.yaml' \(the base of '.*lost.yaml'\) does not exist"):
        load_config(tmp_path / "lost.yaml")
    (tmp_path / "bad.yaml").write_text("base: [a.yaml]\n")
    with pytest.raises(ConfigError, match="base: must name one YAML file"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=0", r"'data.batch_size' must be in \[1, 1048576\], got 0"),
    ("train.log_every=0", r"'train.log_every' must be in \[1, 1000000000\], got 0"),
    ("train.steps=-5", r"'train.steps' must be in \[1, 1000000000\], got -5"),
    ("model.prior.lr=-1e-4", r"'model.prior.lr' must be in \(0, 1e\+30\], got -0.0001"),
    ("optim.lr=0", r"'optim.lr' must be in \(0, 1e\+30\], got 0.0"),
    ("optim.betas=[0.9,1.0]", r"'optim.betas' must be in \[0, 1\), got \(0.9, 1.0\)"),
    ("model.prior.langevin.step_size=nan", r"'model.prior.langevin.step_size' must be in \(0, .*got nan"),
    ("model.prior.layers=5", r"'model.prior.layers' must be in \[1, 4\], got 5"),
    ("train.keep_checkpoints=0", "'train.keep_checkpoints' must be in"),
    ("optim.lr_decay_every=0", "'optim.lr_decay_every' must be in"),
    ("model.modalities.0.likelihood_scale=0", r"'model.modalities\[0\].likelihood_scale' must be in \(0, "),
    ("model.modalities.1.shape=[3,0,28]", r"'model.modalities\[1\].shape' must be in \[1, 65536\]"),
    ("eval.langevin_sweep=[0,-1]", r"'eval.langevin_sweep' must be in \[0, 1000000\]"),
    # Resource bounds (issue 33): a typo must not spawn 100,000 threads or wait forever.
    ("train.threads=100000", r"'train.threads' must be in \[0, 1024\], got 100000"),
    ("train.dist_timeout_s=inf", r"'train.dist_timeout_s' must be in \(0, 604800\], got inf"),
    ("data.num_workers=100000", r"'data.num_workers' must be in \[0, 256\]"),
    ("model.prior.langevin.steps=10000000", r"'model.prior.langevin.steps' must be in \[0, 1000000\]"),
])
def test_numeric_ranges_are_checked_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_numeric_field_has_a_range():
    def numeric(tp):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return tp in (int, float) or (typing.get_origin(tp) in (tuple, list) and args and
                                      all(a in (int, float) for a in args))

    missing = []
    for cls in (ModalityConfig, *[type(getattr(Config(), s)) for s in ("data", "model", "optim", "train",
                                                                        "eval")],
                LangevinConfig, PriorConfig):
        for name, tp in typing.get_type_hints(cls).items():
            if numeric(tp) and name not in RANGES.get(cls, {}):
                missing.append(f"{cls.__name__}.{name}")
    assert missing == []


def test_choices_are_checked_with_a_suggestion_and_match_the_code_registries():
    from mmebm_dist.models.aggregation import AGGREGATIONS
    from mmebm_dist.models.likelihoods import LIKELIHOODS
    from mmebm_dist.models.modality import FAMILIES
    from mmebm_dist.models.objectives import OBJECTIVES
    from mmebm_dist.prior import langevin
    from mmebm_dist.prior.densities import POSTERIOR_FAMILIES, REFERENCES
    from mmebm_dist.prior.energy import ACTIVATIONS

    with pytest.raises(ConfigError, match=r"'model.aggregation' must be one of moe, poe, mopoe, got 'pooe'; "
                                          r"did you mean 'poe'\?"):
        load_config(None, ["model.aggregation=pooe"])
    with pytest.raises(ConfigError, match="'train.mixed_precision' must be one of auto, no, bf16, got 'fp"):
        load_config(None, ["train.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="'data.on_error' must be one of raise, skip"):
        load_config(None, ["data.on_error=ignore"])
    registries = {
        Aggregation: AGGREGATIONS, Objective: OBJECTIVES, Activation: ACTIVATIONS, Reference: REFERENCES,
        Posterior: POSTERIOR_FAMILIES, LangevinBackend: langevin.BACKENDS,
        Likelihood: LIKELIHOODS,
    }
    for choice, registry in registries.items():
        assert set(typing.get_args(choice)) == set(registry), choice
    assert FAMILY_NAMES == set(FAMILIES)  # open: register_family adds to both


def test_cross_field_rules_run_at_load_time():
    with pytest.raises(ConfigError, match="model.prior.fit=posthoc trains only the energy"):
        load_config(None, ["model.prior.fit=posthoc"])
    with pytest.raises(ConfigError, match="set model.posterior=gaussian"):
        load_config(None, ["model.aggregation=poe"])
    with pytest.raises(ConfigError, match="H and W divisible by 4"):
        load_config(None, ["model.modalities.0.shape=[3,10,10]"])
    with pytest.raises(ConfigError, match="use iwae or dreg"):
        load_config(None, ["model.particles=3"])
    with pytest.raises(ConfigError, match=r"names must be unique"):
        load_config(None, ["model.modalities.1.name=m0"])
