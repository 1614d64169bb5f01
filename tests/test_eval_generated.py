"""The generated data sets end to end on tiny builds: attribute coherence of the birds (image <-> caption),
captions drawn into sample grids, TensorBoard and report.md, and MNIST-SVHN's two differently shaped
modalities through `mmebm classifiers train`, `mmebm eval` and `mmebm sample`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from data_helpers import write_idx
from PIL import Image
from train_helpers import run_train

from mmebm_dist.cli import main
from mmebm_dist.data.shards import manifest_hash
from mmebm_dist.data.text import Vocabulary
from mmebm_dist.datasets.birds import ATTRIBUTE_NAMES, BirdsSpec, build_birds
from mmebm_dist.evaluate.coherence import binomial_stderr
from mmebm_dist.evaluate.report import fmt

EVAL = ["--num-samples", "12", "--batch-size", "8", "--probe-fit", "16", "--device", "cpu"]
TINY_PRIOR = {"kind": "ebm", "hidden": 16, "lr": 1e-3,
              "langevin": {"steps": 3, "step_size": 0.1, "backend": "autograd"}}


def _config(path, data, out, modalities: list[dict], **train) -> str:
    cfg = {
        "data": {"path": str(data), "batch_size": 8, "num_workers": 0, "shuffle_buffer": 16},
        "model": {"modalities": modalities, "latent_dim": 4, "private_dim": 2, "width": 4,
                  "prior": TINY_PRIOR},
        "optim": {"lr": 3e-3},
        "train": {"steps": 4, "log_every": 1, "checkpoint_every": 4, "image_every": 0, "threads": 1,
                  "out_dir": str(out), **train},
        "eval": {"num_samples": 12, "langevin_sweep": [0, 2]},
    }
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _png(path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return np.asarray(img.convert("RGB"))


@pytest.fixture(scope="module")
def birds_run(tmp_path_factory):
    """(data, run): 48/16 generated birds, the attribute classifier, a 4-step EBM run drawing TB grids."""
    root = tmp_path_factory.mktemp("birds")
    data = root / "birds"
    manifest = build_birds(BirdsSpec(out=str(data), num_train=48, num_test=16, shard_size=16, workers=1,
                                     seed=1), progress=False)
    vocab_size = manifest["modalities"][1]["vocab_size"]
    modalities = [
        {"name": "image", "shape": [3, 64, 64], "family": "conv", "likelihood": "laplace"},
        {"name": "caption", "shape": [32], "family": "text", "likelihood": "categorical",
         "likelihood_scale": 50.0, "vocab_size": vocab_size},
    ]
    run = root / "run"
    run_train(["--config", _config(root / "birds.yaml", data, run, modalities, image_every=2)])
    assert main(["classifiers", "train", "--data", str(data), "--steps", "3", "--batch-size", "8", "--width",
                 "4", "--device", "cpu"]) == 0
    return data, run


def test_birds_attribute_classifier_is_cached_next_to_the_data(birds_run):
    from mmebm_dist.evaluate.judges.birds import load_judge

    data, _ = birds_run
    summary = json.loads((data / "classifiers" / "attribute_classifier.json").read_text())
    assert summary["manifest_hash"] == manifest_hash(data) and summary["steps"] == 3
    assert set(summary["test_accuracy"]) == {*ATTRIBUTE_NAMES, "mean"}
    judge = load_judge(data / "classifiers", data, manifest_hash=manifest_hash(data))
    assert judge.test_accuracy == summary["test_accuracy"]
    with pytest.raises(ValueError, match="manifest hash"):
        load_judge(data / "classifiers", data, manifest_hash="0" * 64)
    with pytest.raises(FileNotFoundError, match="mmebm classifiers train"):
        load_judge(data / "nowhere", data, manifest_hash=None)


def test_birds_eval_judges_by_attributes_and_lists_captions(birds_run, capsys):
    data, run = birds_run
    assert main(["eval", "--run", str(run), *EVAL, "--langevin-sweep", "0", "2"]) == 0
    out = run / "eval"
    res = json.loads((out / "eval.json").read_text())
    coh = res["coherence"]
    assert coh["measure"] == "attributes" and coh["modalities"] == ["image", "caption"]
    assert coh["joint"]["n"] == 12 and coh["cross"]["n"] == 12 and coh["num_test"] == 12
    assert set(coh["cross"]["cells"]) == {"image->image", "image->caption", "caption->image",
                                          "caption->caption"}
    for key in ("image->caption", "caption->image"):
        cell = coh["cross"]["cells"][key]
        assert cell["stderr"] == pytest.approx(binomial_stderr(cell["coherence"], cell["n"]))
        assert set(cell["attributes"]) == set(ATTRIBUTE_NAMES)
    assert coh["cross"]["matrix"][0][1] == coh["cross"]["cells"]["image->caption"]["coherence"]
    assert coh["cross"]["matrix"][1][0] == coh["cross"]["cells"]["caption->image"]["coherence"]
    # the real test tuples: every caption states only true attributes, so only the classifier can err
    real = coh["real_data"]
    assert 0.0 <= real["coherence"] <= 1.0 and real["n"] == 12
    assert [e["steps"] for e in coh["langevin_sweep"]] == [0, 2]
    assert set(res["classifiers"]["test_accuracy"]) == {*ATTRIBUTE_NAMES, "mean"}
    md = (out / "report.md").read_text()
    assert fmt(coh["cross"]["cells"]["image->caption"]["coherence"]) in md
    vocab = Vocabulary.load(data)
    sources = vocab.decode_batch(next(iter(_test_captions(data))))
    assert all(text in md for text in sources)  # the cross-grid inputs, as text
    assert res["captions"]["cross"]["source"]["caption"] == sources
    joint_texts = res["captions"]["joint"]["caption"]
    assert len(joint_texts) == 8 and all(f"| {i + 1} | {t} |" in md for i, t in enumerate(joint_texts))
    for name in res["images"].values():
        _png(out / name)
    printed = capsys.readouterr().out
    assert "image->caption: coherence" in printed and "caption->image: coherence" in printed


def _test_captions(data):
    from mmebm_dist.evaluate.judges.birds import load_split

    yield load_split(data, "test", limit=8)["captions"]


def test_birds_sample_and_tensorboard_draw_captions_as_text(birds_run, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = birds_run
    assert main(["sample", "--run", str(run), "--joint", "4", "--cross", "--cross-examples", "2", "--device",
                 "cpu", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["cross_step4.png", "joint_step4.png"]
    _png(tmp_path / "cross_step4.png")
    joint = _png(tmp_path / "joint_step4.png")
    assert joint.shape[1] > joint.shape[0]  # caption tiles are twice as wide as the images
    events = EventAccumulator(str(run / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert {"samples/joint/image", "samples/joint/caption"} <= set(events.Tags()["images"])
    grid = events.Images("samples/joint/caption")[-1]
    assert grid.step == 4 and (grid.width, grid.height) == (4 * 128, 4 * 64)  # 16 caption tiles, 4 x 4


def test_token_modalities_need_a_vocabulary_to_be_drawn(birds_run, tmp_path):
    from mmebm_dist.evaluate import report
    from mmebm_dist.train.metrics import MetricsWriter

    data, _ = birds_run
    vocab = Vocabulary.load(data)
    ids = torch.from_numpy(vocab.encode_batch(["a red bird with blue wings and a long bill.", ""]))
    samples = {"image": torch.rand(2, 3, 64, 64), "caption": ids}
    pictures = report.as_pictures(samples, {"caption": vocab})
    tiles = pictures["caption"]
    assert tiles.shape == (2, 3, 64, 128) and tiles.dtype == torch.float32
    assert (tiles[0] < 0.5).any() and not (tiles[1] < 0.5).any()  # text drawn; the empty caption is blank
    assert torch.equal(pictures["image"], samples["image"])
    with pytest.raises(ValueError, match="vocabulary"):
        report.save_joint_grid(tmp_path / "x.png", samples)
    writer = MetricsWriter(tmp_path / "norun", enabled=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        writer.images(1, samples)
    writer.close()


def test_birds_periodic_eval_uses_the_attribute_judge(birds_run):
    from mmebm_dist.evaluate.generate import load_run
    from mmebm_dist.evaluate.periodic import periodic_eval

    _, run = birds_run
    loaded = load_run(run)
    figures = periodic_eval(loaded.model, loaded.cfg, 4, num_samples=8)
    assert {"joint_coherence", "cross_coherence", "ceiling_coherence", "cross_to/image", "cross_to/caption",
            "classifier_min_accuracy"} <= figures.keys()
    mean = (figures["cross_to/image"] + figures["cross_to/caption"]) / 2
    assert figures["cross_coherence"] == pytest.approx(mean)


def test_mnist_svhn_classifiers_eval_and_sample_take_both_shapes(tmp_path):
    from mmebm_dist.datasets.mnist_svhn import MnistSvhnSpec, build_mnist_svhn

    idx = write_idx(tmp_path / "idx", train=60, test=20)
    data = tmp_path / "mnist_svhn"
    build_mnist_svhn(MnistSvhnSpec(out=str(data), source="idx", idx_dir=str(idx), num_train=30, num_test=20,
                                   factor=1, shard_size=16, workers=1, seed=2), progress=False)
    modalities = [{"name": "mnist", "shape": [1, 28, 28], "family": "conv", "likelihood": "laplace"},
                  {"name": "svhn", "shape": [3, 32, 32], "family": "conv", "likelihood": "laplace"}]
    run = tmp_path / "run"
    run_train(["--config", _config(tmp_path / "ms.yaml", data, run, modalities)])
    assert main(["classifiers", "train", "--data", str(data), "--epochs", "1", "--batch-size", "8",
                 "--shuffle-buffer", "0", "--num-workers", "0", "--device", "cpu"]) == 0
    summary = json.loads((data / "classifiers" / "classifiers.json").read_text())
    assert [m["shape"] for m in summary["modalities"]] == [[1, 28, 28], [3, 32, 32]]
    assert main(["eval", "--run", str(run), *EVAL, "--langevin-sweep"]) == 0
    res = json.loads((run / "eval" / "eval.json").read_text())
    assert set(res["classifiers"]["test_accuracy"]) == {"mnist", "svhn"}
    coh = res["coherence"]
    assert "measure" not in coh and coh["modalities"] == ["mnist", "svhn"]
    assert len(coh["cross"]["matrix"]) == 2 and coh["cross"]["n"] == 12 and coh["joint"]["n"] == 12
    assert "captions" not in res
    assert main(["sample", "--run", str(run), "--joint", "4", "--cross", "--cross-examples", "2", "--device",
                 "cpu", "--out", str(tmp_path / "s")]) == 0
    for name in ("joint_step4.png", "cross_step4.png"):
        _png(tmp_path / "s" / name)


def test_export_of_a_captioned_run_samples_without_the_data(birds_run, tmp_path):
    from mmebm_dist import export

    data, run = birds_run
    out = tmp_path / "birds-export"
    assert main(["export", str(run), "--out", str(out)]) == 0
    (saved,) = export.exported_vocabularies(out).values()
    assert saved == Vocabulary.load(data)
    assert sorted(p.name for p in (out / "vocab").iterdir()) == ["caption.json"]
    # the training data is not needed: the captions decode with the export's own vocabulary
    assert main(["sample", "--run", str(out), "--joint", "4", "--data", str(tmp_path / "absent"),
                 "--device", "cpu", "--out", str(tmp_path / "grids")]) == 0
    assert len(list((tmp_path / "grids").glob("joint_step*.png"))) == 1
    with pytest.raises(export.ExportError, match="pass --data DIR"):
        export.export_run(run, tmp_path / "again", data=tmp_path / "absent")
