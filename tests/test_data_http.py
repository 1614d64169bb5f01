"""Streaming over HTTP from a real local server: the loader and a few training steps, 404s and dropped
connections retried a bounded number of times and then named."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from data_helpers import build_tiny, sample_ids
from train_helpers import build_tiny_polymnist, free_port, tiny_config

from mmebm_dist.data import codec, shards
from mmebm_dist.data.stream import make_loader


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(local root, its URL): ``python -m http.server`` serving a folder of tiny data sets."""
    root = tmp_path_factory.mktemp("http")
    build_tiny(root, modalities=3, train=40, test=12, shard_size=8)  # root/data
    build_tiny_polymnist(root, modalities=2, train=64, shard_size=16)  # root/polymnist
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(f"{url}/data/manifest.json", timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.1)
        yield root, url
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def no_backoff(monkeypatch):
    monkeypatch.setattr(codec, "HTTP_BACKOFF_S", 0.0)


def ids(path, **kw) -> list[str]:
    loader = make_loader(path, batch_size=5, num_workers=0, drop_last=False, **kw)
    return [i for batch in loader for i in sample_ids(batch)]


def test_loader_over_http_matches_the_local_files(served):
    root, url = served
    for kw in ({}, {"rank": 1, "world_size": 2, "shuffle_buffer": 6, "seed": 2, "epoch": 1}):
        local = ids(root / "data", **kw)
        assert ids(f"{url}/data", **kw) == local
        assert ids(f"{url}/data/manifest.json", check_sha256=True, **kw) == local
    assert len(ids(f"{url}/data")) == 40


def test_http_404_is_retried_then_names_the_url(served, no_backoff):
    root, url = served
    shutil.copytree(root / "data", root / "gone", dirs_exist_ok=True)
    (root / "gone" / "train-000002.tar").unlink()
    with pytest.raises(shards.ShardError, match=rf"{url}/gone/train-000002.tar: HTTPError: HTTP Error 404.*"
                                                r"gave up after 4 attempts"):
        ids(f"{url}/gone")
    with pytest.raises(shards.ShardError, match=rf"no manifest at {url}/nowhere/manifest.json: .*404"):
        ids(f"{url}/nowhere")


class Flaky(BaseHTTPRequestHandler):
    """Serves ``payload``, but the first ``drops`` responses send half the body and hang up."""

    payload = b""
    drops = 0
    requests = 0

    def do_GET(self):  # noqa: N802 (http.server's name)
        cls = type(self)
        cls.requests += 1
        self.send_response(200)
        self.send_header("Content-Length", str(len(cls.payload)))
        self.end_headers()
        if cls.requests <= cls.drops:
            self.wfile.write(cls.payload[: len(cls.payload) // 2])
            self.close_connection = True
            return
        self.wfile.write(cls.payload)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("drops", [1, 3, 4])
def test_dropped_connection_is_resumed_within_the_retry_budget(drops, no_backoff):
    Flaky.payload, Flaky.drops, Flaky.requests = bytes(range(256)) * 4000, drops, 0
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/shard.tar"
    try:
        if drops <= codec.HTTP_RETRIES:
            assert codec.fetch_url(url) == Flaky.payload
            assert Flaky.requests == drops + 1
        else:
            with pytest.raises(OSError, match=rf"{url}: IncompleteRead.*gave up after 4 attempts"):
                codec.fetch_url(url)
            assert Flaky.requests == 4
    finally:
        server.shutdown()
        server.server_close()


def test_training_streams_over_http(served, tmp_path):
    from accelerate.state import AcceleratorState

    from mmebm_dist.config import load_config
    from mmebm_dist.rundir import read_jsonl
    from mmebm_dist.train.loop import train

    root, url = served
    cfg = load_config(tiny_config(tmp_path / "c.yaml", root / "polymnist"),
                      [f"data.path={url}/polymnist", f"train.out_dir={tmp_path / 'run'}", "train.steps=3"])
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    AcceleratorState._reset_state(True)
    try:
        summary = train(cfg)
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    assert summary["step"] == 3 and summary["data_skipped"] == 0
    records = [r for r in read_jsonl(Path(summary["run_dir"]) / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["data_skipped"] == 0 for r in records)


def test_a_run_over_http_fetches_its_manifest_once(served, tmp_path, monkeypatch):
    """Setup resolves the data set once and hands it to the epoch planning and every epoch's loader: over
    setup and two epochs and a bit (8 batches per epoch, 17 steps) the manifest is fetched once."""
    from accelerate.state import AcceleratorState

    from mmebm_dist.config import load_config
    from mmebm_dist.train.loop import train

    fetched = []
    fetch = shards.fetch_url

    def counting(url, **kwargs):
        fetched.append(url)
        return fetch(url, **kwargs)

    monkeypatch.setattr(shards, "fetch_url", counting)
    root, url = served
    cfg = load_config(tiny_config(tmp_path / "c.yaml", root / "polymnist"),
                      [f"data.path={url}/polymnist", f"train.out_dir={tmp_path / 'run'}", "train.steps=17",
                       "train.checkpoint_every=0", "train.log_every=17"])
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    AcceleratorState._reset_state(True)
    try:
        summary = train(cfg)
    finally:
        AcceleratorState._reset_state(True)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    assert summary["step"] == 17
    assert fetched == [f"{url}/polymnist/manifest.json"]
