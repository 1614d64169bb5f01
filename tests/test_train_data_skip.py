"""``data.on_error=skip`` in training: a missing shard is skipped every epoch, ranks keep the planned epoch
length, the count reaches metrics.jsonl, the summary and the checkpoint, and a resumed run carries it on."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import build_tiny_polymnist, tiny_config

from mmebm_dist.config import load_config
from mmebm_dist.rundir import latest_checkpoint, read_jsonl, read_train_state


def test_skipped_shard_across_epochs_and_resume(tmp_path, in_process):
    from mmebm_dist.train.loop import train

    data = build_tiny_polymnist(tmp_path, modalities=2, train=64, shard_size=16)  # 4 shards: 8 batches of 8
    (data / "train-000001.tar").unlink()
    config = tiny_config(tmp_path / "c.yaml", data)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="train-000001.tar"):  # the default, on_error=raise
        train(load_config(config, [f"train.out_dir={tmp_path / 'strict'}", "train.steps=12"]))
    in_process()
    overrides = ["data.on_error=skip", f"train.out_dir={run}", "train.checkpoint_every=4"]
    first = train(load_config(config, [*overrides, "train.steps=12"]))  # 1.5 epochs of 8 batches
    in_process()
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))
    skipped = [r["data_skipped"] for r in records]
    # Counted at each read of the missing shard: epoch 0, maybe again while refilling it, and epoch 1.
    assert skipped == sorted(skipped) and skipped[0] == 1 and first["data_skipped"] == skipped[-1] >= 2
    assert records[7]["epoch"] == 1 and records[7]["epoch_batch"] == 0  # epoch 0 kept its 8 batches
    assert read_train_state(latest_checkpoint(run)).data_skipped == first["data_skipped"]  # persisted
    resumed = train(load_config(config, [*overrides, "train.steps=20"]), resume=True)
    assert resumed["step"] == 20 and resumed["data_skipped"] >= first["data_skipped"]
    # The count carries on across the resume: never below the first segment's total, ending in the checkpoint.
    after = [r["data_skipped"] for r in read_jsonl(run / "metrics.jsonl") if "loss" in r and r["step"] > 12]
    assert after and after == sorted(after) and after[0] >= first["data_skipped"]
    assert after[-1] == resumed["data_skipped"]
    assert read_train_state(latest_checkpoint(run)).data_skipped == resumed["data_skipped"]
    assert Path(resumed["run_dir"]) == run
