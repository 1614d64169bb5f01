"""`mmebm export` on a tiny evaluated run: the export loads back (folder and hf://) with equal parameters and
samples, its model card carries the eval's figures and pictures, and Hub failures are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from train_helpers import trained_tiny_run

from mmebm_dist import api, export
from mmebm_dist.cli import main
from mmebm_dist.model_card import fmt

EVAL_ARGS = ["--num-samples", "16", "--batch-size", "8", "--langevin-sweep", "0", "2", "--probe-fit", "16",
             "--device", "cpu", "--seed", "3", "--no-frechet"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(run dir, export dir, eval.json): an 8-step tiny EBM run, evaluated, exported by the real CLI."""
    root = tmp_path_factory.mktemp("export")
    _, run_dir, _ = trained_tiny_run(root)
    assert main(["eval", "--run", str(run_dir), *EVAL_ARGS]) == 0
    out = root / "tiny-ebm"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return run_dir, out, json.loads((run_dir / "eval" / "eval.json").read_text())


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_export_loads_back_with_equal_parameters_and_samples(exported):
    run_dir, out, _ = exported
    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", "config.json", "images", "model.safetensors"]
    assert b"pickle" not in (out / "model.safetensors").read_bytes()[:8]  # safetensors: a JSON header length
    from_run, from_export = api.load_trained(run_dir), api.load_trained(out)
    run_state, export_state = from_run.state_dict(), from_export.state_dict()
    assert run_state.keys() == export_state.keys() and len(run_state) > 0
    for name, value in run_state.items():
        assert torch.equal(value, export_state[name]), name
    a, b = api.sample(from_run, 6, seed=4), api.sample(from_export, 6, seed=4)
    assert a.keys() == {"m0", "m1"} and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == json.loads((run_dir / "config.json").read_text())


def test_sample_command_takes_an_export(exported, tmp_path):
    _, out, _ = exported
    assert main(["sample", "--run", str(out), "--joint", "4", "--device", "cpu", "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("joint_step8.png")
    with Image.open(png) as img:
        assert img.format == "PNG"


def test_card_renders_the_eval_figures_and_pictures(exported):
    run_dir, out, evaluation = exported
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "mmebm_dist" and "energy-based-prior" in meta["tags"]
    assert "license" not in meta and "# license:" in card  # left for the owner
    (result,) = meta["model-index"][0]["results"]
    values = {m["type"]: m["value"] for m in result["metrics"]}
    coherence = evaluation["coherence"]
    assert values == {"joint_coherence": round(coherence["joint"]["coherence"], 4),
                      "cross_coherence": round(coherence["cross"]["coherence"], 4)}
    body = card.split("---\n", 2)[2]
    assert f"| joint coherence | {fmt(coherence['joint']['coherence'])} |" in body
    assert f"| cross coherence | {fmt(coherence['cross']['coherence'])} |" in body
    for name, accuracy in evaluation["classifiers"]["test_accuracy"].items():
        assert f"{name} {fmt(accuracy)}" in body  # the judge beside its figures
    links = [line[line.index("](") + 2:-1] for line in body.splitlines() if line.startswith("![")]
    assert set(links) == {f"images/{n}" for n in evaluation["images"].values()}
    assert all((out / link).is_file() for link in links)
    assert "python -m mmebm_dist.train --config" in body and str(Path.cwd()) not in body  # portable command


def test_card_without_a_matching_eval_says_so(exported, tmp_path):
    run_dir, _, _ = exported
    out = tmp_path / "older"
    assert main(["export", str(run_dir), "--out", str(out), "--checkpoint", "step-0000004"]) == 0
    card = (out / "README.md").read_text()
    assert "model-index" not in _front_matter(card)
    assert "measured step 8, not the exported step 4" in card
    assert export.read_export(out).step == 4
    with pytest.raises(export.ExportError, match="exists and is not empty"):
        export.export_run(run_dir, out)


def _hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """The Hugging Face cache layout of one snapshot of ``repo_id`` holding ``folder``'s files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_hf_source_loads_through_huggingface_hub_offline(exported, tmp_path, monkeypatch):
    import huggingface_hub.constants

    run_dir, out, _ = exported
    _hub_cache(tmp_path / "hub", "someone/tiny-ebm", out)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    model = api.load_trained("hf://someone/tiny-ebm")
    reference = api.load_trained(run_dir).state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    with pytest.raises(export.ExportError, match="cannot download someone/absent from the Hugging Face Hub"):
        api.load_trained("hf://someone/absent")
    assert main(["sample", "--run", "hf://someone/absent", "--joint", "2", "--out", str(tmp_path)],
                one_line_errors=True) == 1
    with pytest.raises(export.ExportError, match="pass --out DIR"):  # never write into the Hub's cache
        main(["sample", "--run", "hf://someone/tiny-ebm", "--joint", "2"])


def test_push_without_network_is_one_line_naming_the_repo(exported, monkeypatch, capsys):
    import huggingface_hub.constants

    _, out, _ = exported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(export.ExportError, match="cannot push to someone/tiny-ebm") as info:
        export.push_export(out, "someone/tiny-ebm")
    assert "\n" not in str(info.value)
    with pytest.raises(export.ExportError, match="is not hf://USER/REPO"):
        export.resolve_source("hf://no-slash")
