"""train.trackers through accelerate: a tiny run logs to a real MLflow file store and to wandb offline
(scalars, the resolved config, sample grids), and its resumed segment continues the same tracker run."""

from __future__ import annotations

import importlib.util
import json

import pytest
from train_helpers import tiny_config

from mmebm_dist.config import ConfigError, load_config
from mmebm_dist.rundir import TRACKERS_FILE, read_jsonl
from mmebm_dist.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(data, tmp_path, trackers: list[str], steps: int = 4, *overrides: str):
    path = tiny_config(tmp_path / "tiny.yaml", data, train={"steps": steps, "checkpoint_every": 4,
                                                            "image_every": 4, "trackers": trackers})
    return load_config(path, [f"train.out_dir={tmp_path / 'run'}", *overrides])


def test_unknown_or_missing_tracker_is_a_config_error(data2, tmp_path, monkeypatch, in_process):
    with pytest.raises(ConfigError, match=r"train.trackers\[1\]' must be one of .*did you mean 'mlflow'"):
        _config(data2, tmp_path, ["tensorboard", "mlfow"])
    with pytest.raises(ConfigError, match="names a tracker twice"):
        _config(data2, tmp_path, ["wandb", "wandb"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'mmebm_dist\[wandb\]'"):
        train(_config(data2, tmp_path, ["wandb"]))


def test_mlflow_file_store_gets_scalars_params_grids_and_the_resumed_segment(data2, tmp_path, monkeypatch,
                                                                             in_process):
    pytest.importorskip("mlflow", reason="no mlflow extra: pip install 'mmebm_dist[mlflow]'")
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # mlflow >= 3.x: the file store is opt-in
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tiny")
    cfg = _config(data2, tmp_path, ["tensorboard", "mlflow"])
    train(cfg)
    run_dir = tmp_path / "run"
    run_id = json.loads((run_dir / TRACKERS_FILE).read_text())["mlflow"]
    client = MlflowClient(store)
    run = client.get_run(run_id)
    assert run.info.run_name == "run" and run.data.params["train.steps"] == "4"
    assert json.loads(run.data.params["train.trackers"]) == ["tensorboard", "mlflow"]
    records = read_jsonl(run_dir / "metrics.jsonl")
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in records]
    artifacts = [a.path for a in client.list_artifacts(run_id, "samples/joint/m0")]
    assert artifacts == ["samples/joint/m0/step-0000004.png"]
    assert (run_dir / "tb").is_dir()  # TensorBoard beside it, as before

    in_process()
    train(load_config(run_dir / "config.json", ["train.steps=8"]), resume=True)
    assert json.loads((run_dir / TRACKERS_FILE).read_text())["mlflow"] == run_id
    (experiment,) = [e for e in client.search_experiments() if e.name == "tiny"]
    assert len(client.search_runs([experiment.experiment_id])) == 1  # the same run, continued
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(1, 9))
    assert client.get_run(run_id).data.params["train.steps"] == "4"  # parameters of the first segment


def test_a_tracker_added_on_resume_starts_its_run_with_the_config(data2, tmp_path, monkeypatch, in_process):
    pytest.importorskip("mlflow", reason="no mlflow extra: pip install 'mmebm_dist[mlflow]'")
    from mlflow.tracking import MlflowClient

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    train(_config(data2, tmp_path, ["tensorboard"]))
    run_dir = tmp_path / "run"
    assert not (run_dir / TRACKERS_FILE).exists()  # TensorBoard needs no id
    in_process()
    train(load_config(run_dir / "config.json", ["train.steps=8", "train.trackers=[tensorboard,mlflow]"]),
          resume=True)
    run_id = json.loads((run_dir / TRACKERS_FILE).read_text())["mlflow"]
    run = MlflowClient(store).get_run(run_id)
    assert run.data.params["train.steps"] == "8" and run.data.params["model.latent_dim"] == "4"
    assert [m.step for m in MlflowClient(store).get_metric_history(run_id, "loss")] == [5, 6, 7, 8]


def _wandb_log(folder) -> bytes:
    """The bytes of an offline wandb run's record log (protobuf records: keys and JSON values as text), once
    wandb's service process has written it out (``wandb.teardown``)."""
    import wandb

    wandb.teardown()
    (log,) = folder.glob("run-*.wandb")
    return log.read_bytes()


def test_wandb_offline_run_gets_scalars_config_grids_and_is_continued_on_resume(data2, tmp_path, monkeypatch,
                                                                                in_process):
    pytest.importorskip("wandb", reason="no wandb extra: pip install 'mmebm_dist[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train(_config(data2, tmp_path, ["wandb"]))
    run_dir = tmp_path / "run"
    run_id = json.loads((run_dir / TRACKERS_FILE).read_text())["wandb"]
    (first,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    log = _wandb_log(first)
    assert b"train.steps" in log and b"model.prior.kind" in log  # the resolved config
    for record in read_jsonl(run_dir / "metrics.jsonl"):
        assert json.dumps(record["loss"]).encode() in log, record["step"]
    images = sorted(p.name.split("_")[:2] for p in (first / "files/media/images/samples/joint").iterdir())
    assert images == [["m0", "4"], ["m1", "4"]]
    assert not (run_dir / "tb").exists()  # only the trackers asked for

    in_process()
    train(load_config(run_dir / "config.json", ["train.steps=8"]), resume=True)
    assert json.loads((run_dir / TRACKERS_FILE).read_text())["wandb"] == run_id
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2  # one folder per segment, both of run `run_id` (`wandb sync` uploads them)
    resumed = [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["step"] > 4]
    assert [r["step"] for r in resumed] == [5, 6, 7, 8]
    assert all(json.dumps(r["loss"]).encode() in _wandb_log(segments[-1]) for r in resumed)
