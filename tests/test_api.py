"""The Python API as docs/python-api.md shows it, and ``mmebm config init`` output training unchanged."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from mmebm_dist.cli import main
from mmebm_dist.config import load_config
from tests.import_helpers import cub_source, polymnist_folders, table_source

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")



API_PAGE = REPO / "docs" / "python-api.md"


def readme_api_example() -> str:
    """The Python block of the "Your own data and modality family" section of docs/python-api.md."""
    text = API_PAGE.read_text()
    section = text[text.index("## Your own data") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_example_registers_a_family_trains_and_samples(tmp_path, monkeypatch, in_process):
    from mmebm_dist.models.modality import unregister_family

    monkeypatch.chdir(tmp_path)
    unregister_family("signal1d")
    scope: dict = {}
    try:
        exec(compile(readme_api_example(), str(API_PAGE), "exec"), scope)
    finally:
        unregister_family("signal1d")
    assert scope["summary"]["step"] == 20
    assert all(math.isfinite(v) for v in scope["summary"]["terms"].values())
    model, samples = scope["model"], scope["samples"]
    assert type(model.encoders["signal"].trunk[1]) is torch.nn.Conv1d  # the custom family was used
    assert {k: tuple(v.shape) for k, v in samples.items()} == {"signal": (16, 64), "features": (16, 4)}
    assert all(torch.isfinite(v).all() for v in samples.values())
    manifest = (tmp_path / "data/my_signals/manifest.json").read_text()
    assert '"float32"' in manifest and (tmp_path / "runs/my_signals/checkpoints").is_dir()


def _init(data: Path, out: Path, *args: str) -> dict:
    assert main(["config", "init", "--data", str(data), "--out", str(out), *args]) == 0
    return yaml.safe_load(out.read_text())


def test_config_init_matches_the_manifest_and_trains_unchanged(tmp_path, in_process):
    from mmebm_dist.train.loop import train

    data = tmp_path / "poly"
    assert (
        main(
            [
                "data",
                "import",
                "polymnist-folders",
                str(polymnist_folders(tmp_path)),
                "--out",
                str(data),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    out = tmp_path / "poly.yaml"
    cfg = _init(data, out, "--steps", "3", "--run-dir", str(tmp_path / "run"), "--prior", "laplace")
    assert cfg["model"]["modalities"] == [
        {
            "name": f"m{k}",
            "shape": [3, 28, 28],
            "family": "conv",
            "likelihood": "laplace",
            "likelihood_scale": 0.75,
        }
        for k in range(2)
    ]
    assert cfg["model"]["prior"]["kind"] == "laplace" and cfg["data"]["batch_size"] == 24
    assert "# image: conv family" in out.read_text()
    assert main(["config", "init", "--data", str(data), "--out", str(out)]) == 1  # exists: refused
    summary = train(load_config(out))
    assert summary["step"] == 3 and math.isfinite(summary["terms"]["loss"])


def test_config_init_text_and_vector_modalities(tmp_path, in_process):
    from mmebm_dist.train.loop import train

    src, _ = cub_source(tmp_path)
    cub = tmp_path / "cub_data"
    assert main(["data", "import", "cub-captions", str(src), "--out", str(cub), "--workers", "1"]) == 0
    cfg = _init(cub, tmp_path / "cub.yaml", "--steps", "2", "--run-dir", str(tmp_path / "run_cub"))
    image, caption = cfg["model"]["modalities"]
    assert (image["family"], caption["family"], caption["likelihood"]) == ("conv", "text", "categorical")
    vocab = yaml.safe_load((cub / "vocab.json").read_text())
    assert caption["vocab_size"] == len(vocab["words"]) and caption["likelihood_scale"] == 3 * 64 * 64 / 32
    assert train(load_config(tmp_path / "cub.yaml"))["step"] == 2

    table = table_source(tmp_path / "t", rows=10)
    vec = tmp_path / "vec"
    assert (
        main(
            [
                "data",
                "import",
                "table",
                str(table),
                "--out",
                str(vec),
                "--modality",
                "signal=npy",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    (signal,) = _init(vec, tmp_path / "vec.yaml")["model"]["modalities"]
    assert (signal["family"], signal["likelihood"], signal["shape"]) == ("mlp", "gaussian", [16])
