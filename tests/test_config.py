"""Typed config: strict keys with suggestions, dotted overrides (list indices too), JSON round trip."""

import json
from pathlib import Path

import pytest

from mmebm_dist.config import (
    Config,
    ConfigError,
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
    path = _write(tmp_path, "model:\n  latent_dim: 16\n  modalities:\n    - {name: a, shape: [4]}\n"
                            "    - {name: b, shape: [1, 8, 8]}\n")
    cfg = load_config(path, ["model.prior.langevin.steps=7", "model.prior.betas=[0.0, 0.9]",
                             "model.modalities.1.family=mlp", "model.modalities.0.shape=6",
                             "eval.langevin_sweep=0",
                             "optim.lr=1e-4", "train.compile=true", "data.path=/x/y"])
    assert cfg.model.latent_dim == 16  # the file's value survives unrelated overrides
    assert cfg.model.prior.langevin.steps == 7
    assert cfg.model.prior.betas == (0.0, 0.9)
    assert [m.family for m in cfg.model.modalities] == ["conv", "mlp"]
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


def test_paper_and_baseline_configs_differ_only_in_the_prior():
    ebm = config_to_dict(load_config(CONFIGS[0].parent / "polymnist_ebm.yaml"))
    lap = config_to_dict(load_config(CONFIGS[0].parent / "polymnist_laplace.yaml"))
    assert ebm["model"]["prior"]["kind"] == "ebm" and lap["model"]["prior"]["kind"] == "laplace"
    ebm["model"]["prior"]["kind"] = "laplace"
    ebm["train"]["out_dir"] = lap["train"]["out_dir"]
    assert ebm == lap
