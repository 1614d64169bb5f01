"""The scaling model's formulas and its parsers of the committed benchmark logs (mmebm bench scaling)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from mmebm_dist.bench.scaling import (
    Interconnect,
    _fit_ring,
    allreduce_seconds,
    gpu_step,
    loader_rate,
    young_interval_s,
)

REPO = Path(__file__).resolve().parents[1]


def test_allreduce_inside_a_node_is_the_ring_formula():
    net = Interconnect(node_gbytes_s=100.0, node_latency_us=10.0)
    volume = 1e9
    assert allreduce_seconds(volume, 8, net) == pytest.approx(2 * 7 / 8 * volume / 100e9 + 14 * 10e-6)


def test_allreduce_across_nodes_adds_the_shard_ring_and_grows_with_nodes():
    net = Interconnect(net_gbytes_s=10.0, net_latency_us=20.0)
    inside = allreduce_seconds(8e8, 8, net)
    across = allreduce_seconds(8e8, 32, net)  # 4 nodes: each GPU's 1/8 shard over its NIC
    assert across - inside == pytest.approx(2 * 3 / 4 * 1e8 / 10e9 + 6 * 20e-6)
    times = [allreduce_seconds(8e8, g, net) for g in (8, 16, 64, 512)]
    assert times == sorted(times)


def test_young_interval_and_ring_fit():
    assert young_interval_s(2.0, 3600.0) == pytest.approx(math.sqrt(14400.0))
    bandwidth, latency = 2e9, 50e-6
    points = [(v, 2 * 3 / 4 * v / bandwidth + 6 * latency) for v in (1e6, 4e6, 16e6)]
    fitted_bandwidth, fitted_latency = _fit_ring(points, 4)
    assert fitted_bandwidth == pytest.approx(bandwidth) and fitted_latency == pytest.approx(latency)


def test_committed_logs_parse():
    step = gpu_step(REPO / "docs/bench/h200_run1_train.log")
    assert (step["batch"], step["step_s"]) == (128, 0.0272)
    loader = loader_rate(REPO / "docs/bench/h200_check1_data.log")
    assert (loader["workers"], loader["samples_s"], loader["host_cpus"]) == (4, 15322.0, 16)
    with pytest.raises(ValueError, match="no rows"):
        loader_rate(REPO / "docs/bench/h200_run1_train.log")
