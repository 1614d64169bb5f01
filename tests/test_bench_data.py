"""``mmebm bench data``: the row it measures, CPU time of the DataLoader workers included."""

from __future__ import annotations

import pytest
from test_data_raw import build

from mmebm_dist.bench.data import measure


@pytest.mark.parametrize("workers", [0, 1])
def test_measure_reports_the_cpu_time_of_the_process_that_decodes(tmp_path, workers):
    data = build(tmp_path, "raw", train=40, shard_size=8)
    row = measure(str(data), batch_size=4, batches=3, num_workers=workers, shuffle_buffer=0, split="train")
    assert row["samples"] == 12 and row["encoding"] == ["raw"] and row["workers"] == workers
    assert len(row["worker_cpu_s"]) == workers  # one live child per DataLoader worker, none in-process
    assert row["samples_per_cpu_s"] > 0 and row["samples_per_main_cpu_s"] > 0
    assert row["samples_per_total_cpu_s"] <= row["samples_per_main_cpu_s"]
