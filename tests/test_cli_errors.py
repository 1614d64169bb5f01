"""The one top-level handler of ``mmebm`` (issue 33): every failure a careless or hostile input causes is one
line on stderr naming the file, key or value (exit 1; Ctrl-C outside training exits 130), and a truncated
``model.pt`` makes ``mmebm sample`` fall back to the older checkpoint."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from data_helpers import build_tiny
from train_helpers import tiny_config

from mmebm_dist.cli import EXIT_INTERRUPTED, error_line, main
from mmebm_dist.data.stream import make_loader


def _one_line(capsys, argv: list[str], rc: int = 1) -> str:
    assert main([str(a) for a in argv], one_line_errors=True) == rc
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny two-modality shards."""
    return build_tiny(tmp_path_factory.mktemp("cli"), modalities=2, train=16, test=8)


def test_config_errors_are_one_line_naming_file_or_key(tmp_path, capsys, data):
    config = tiny_config(tmp_path / "c.yaml", data)
    (tmp_path / "latin1.yaml").write_bytes(config.read_bytes() + b"# caf\xe9\n")
    line = _one_line(capsys, ["train", "--config", tmp_path / "latin1.yaml", "--dry-run"])
    assert line.startswith("mmebm train: ConfigError: config file ") and "is not UTF-8 text" in line
    line = _one_line(capsys, ["train", "--config", config, "train.dist_timeout_s=inf", "--dry-run"])
    assert "'train.dist_timeout_s' must be in (0, 604800], got inf" in line
    three = tiny_config(tmp_path / "three.yaml", data, modalities=3)
    line = _one_line(capsys, ["train", "--config", three, f"train.out_dir={tmp_path / 'r'}", "--dry-run"])
    assert "model.modalities ['m2'] are not in the data set" in line and "['m0', 'm1']" in line
    (tmp_path / "afile").write_text("x")
    line = _one_line(capsys, ["train", "--config", config, f"train.out_dir={tmp_path / 'afile'}"])
    assert f"train.out_dir '{tmp_path / 'afile'}' is an existing file" in line


def test_data_errors_are_one_line(tmp_path, capsys, data, monkeypatch):
    bad = tmp_path / "bad"
    bad.mkdir()
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["modalities"] = {"m0": 1}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    line = _one_line(capsys, ["data", "verify", bad])
    assert f"{bad / 'manifest.json'}: key 'modalities' must be a JSON list" in line
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros(3))
    (tmp_path / "t.jsonl").write_text('{"a": "x.npy"}\n{"a": "x.npy"}\n')
    line = _one_line(capsys, ["data", "import", "table", "t.jsonl", "--out", ".", "--overwrite",
                              "--modality", "a=npy"])
    assert "the current directory" in line and (tmp_path / "t.jsonl").exists()


def test_results_eval_and_device_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"data": {"path": "x"}}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "wall_time_s": 1.0}) + "\n")
    (run / "eval/eval.json").write_text(json.dumps({"coherence": ["not", "a", "mapping"]}))
    line = _one_line(capsys, ["results", "--runs", run, "--out-md", tmp_path / "r.md", "--out-json",
                              tmp_path / "r.json", "--img-dir", tmp_path / "img"])
    assert f"{run}: config.json, metrics.jsonl or eval/eval.json is not of the shape" in line
    if not torch.cuda.is_available():
        line = _one_line(capsys, ["sample", "--run", run, "--device", "cuda:7"])
        assert "--device cuda:7: this machine has no usable CUDA device; use --device cpu" in line


def test_worker_errors_reach_the_main_process_by_name(tmp_path, data):
    """A corrupt shard read by a DataLoader worker: the 45-line re-raised traceback becomes the worker's own
    one-line message, naming the shard."""
    copy = tmp_path / "data"
    copy.mkdir()
    for p in data.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    shard = copy / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(Exception) as info:
        list(make_loader(copy, batch_size=4, num_workers=1))
    line = error_line("train", info.value)
    assert "\n" not in line and line.startswith("mmebm train: DataLoader worker 0: ")
    assert f"ShardError: shard {shard}: unreadable" in line


def test_ctrl_c_outside_training_exits_130(capsys, monkeypatch):
    import mmebm_dist.commands.data as data_cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(data_cli, "run", interrupted)
    assert _one_line(capsys, ["data", "info", "x"], rc=EXIT_INTERRUPTED) == "mmebm data: interrupted (Ctrl-C)"


def test_sample_falls_back_from_a_truncated_model_file(tmp_path, data, in_process, caplog):
    """``model.pt`` of the newest checkpoint truncated: the run loads from the one before, with a warning;
    naming the damaged checkpoint is an error naming the file."""
    from mmebm_dist.config import load_config
    from mmebm_dist.evaluate.generate import load_run
    from mmebm_dist.train.loop import train

    cfg = load_config(tiny_config(tmp_path / "c.yaml", data),
                      [f"train.out_dir={tmp_path / 'run'}", "train.steps=4", "train.checkpoint_every=2"])
    train(cfg)
    model = tmp_path / "run/checkpoints/step-0000004/model.pt"
    model.write_bytes(model.read_bytes()[: os.path.getsize(model) // 2])
    caplog.set_level("WARNING")
    assert load_run(tmp_path / "run").step == 2
    assert "step-0000004 does not load" in caplog.text and "model.pt" in caplog.text
    with pytest.raises(ValueError, match=r"step-0000004/model.pt does not load"):
        load_run(tmp_path / "run", checkpoint="step-0000004")
