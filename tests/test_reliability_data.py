"""Data-side reliability (issue 33): builds that never interleave or lose the old set, nothing read from
outside the folder the user gave, bounded PNG / HTTP / YAML reads, manifests of the wrong types named."""

from __future__ import annotations

import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from data_helpers import build_tiny
from import_helpers import table_source

from mmebm_dist.config import ConfigError, load_config
from mmebm_dist.data import codec, shards
from mmebm_dist.data.codec import FormatError, LimitError
from mmebm_dist.data.shards import ShardError, read_manifest
from mmebm_dist.data.stream import make_loader
from mmebm_dist.datasets import generated
from mmebm_dist.locks import OutputLockedError, output_lock

SECRET = "TOP-SECRET-LINE do not print me"


def _samples(path) -> int:
    return sum(len(b["m0"]) for b in make_loader(path, batch_size=4, num_workers=0, drop_last=False))


def _rebuild(tmp_path, out, train: int, *, overwrite: bool = True) -> None:
    from mmebm_dist.datasets.polymnist import BuildSpec, build_polymnist

    build_polymnist(BuildSpec(source="idx", idx_dir=str(tmp_path / "idx"), modalities=3, out=str(out),
                              num_samples=train, test_samples=8, shard_size=8, seed=0, workers=1,
                              overwrite=overwrite), progress=False)


def test_build_into_a_locked_folder_is_refused_and_a_failed_overwrite_keeps_the_old_set(tmp_path,
                                                                                        monkeypatch):
    """A second build aimed at a folder being written is refused naming the first; an --overwrite killed
    after writing every shard (before its manifest) leaves the previous set byte-identical, no staging."""
    out = build_tiny(tmp_path, train=16, test=8)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with output_lock(out), pytest.raises(OutputLockedError, match=rf"{out} is being written by host \S+ PID"):
        _rebuild(tmp_path, out, 8)

    def killed(directory, manifest):
        raise KeyboardInterrupt  # as a Ctrl-C between the last shard and the manifest

    monkeypatch.setattr(shards, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        _rebuild(tmp_path, out, 24)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert _samples(out) == 16


def test_overwrite_swaps_the_new_set_in_whole(tmp_path):
    """--overwrite replaces the data set (every shard matches the new manifest) and keeps other files."""
    out = build_tiny(tmp_path, train=16, test=8)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds a data set"):
        _rebuild(tmp_path, out, 24, overwrite=False)
    _rebuild(tmp_path, out, 24)
    shards.verify(out, progress=False)
    assert _samples(out) == 24 and (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("cell", ["absolute", "dotdot", "symlink"])
def test_table_rows_cannot_read_outside_the_table_folder(tmp_path, cell):
    from mmebm_dist.datasets.importers.common import ImportDataError
    from mmebm_dist.datasets.importers.table import import_table

    table = table_source(tmp_path / "t", rows=6)
    outside = tmp_path / "outside.npy"
    outside.write_bytes((tmp_path / "t/sig/0.npy").read_bytes())
    if cell == "symlink":
        (tmp_path / "t/sig/link.npy").symlink_to(outside)
    name = {"absolute": str(outside), "dotdot": "../outside.npy", "symlink": "sig/link.npy"}[cell]
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    rows[1]["signal"] = name
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ImportDataError, match=r"outside .*/t; files it names must lie in that folder"):
        import_table(table, tmp_path / "out", modalities=[("photo", "image"), ("signal", "npy")])
    assert not (tmp_path / "out").exists()


def test_shard_symlinked_out_of_the_data_folder_is_refused_unread(tmp_path):
    out = build_tiny(tmp_path, train=16, test=8)
    secret = tmp_path / "passwd"
    secret.write_text(SECRET + "\n")
    first = out / read_manifest(out)["shards"][0]["name"]
    first.unlink()
    first.symlink_to(secret)
    with pytest.raises(ShardError, match=r"shard 'train-000000.tar' resolves to .*passwd, outside") as info:
        _samples(out)
    assert SECRET not in str(info.value)
    with pytest.raises(ShardError, match="outside"):
        shards.verify(out, progress=False)


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming ``width`` x ``height`` RGB, with a tiny IDAT and IEND."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return codec.PNG_SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(4096))) + chunk(
        b"IEND", b"")


def test_png_dimensions_are_checked_from_the_header_before_decoding():
    """A 20000x20000 header is refused as a FormatError (a ValueError: on_error=skip skips it) without
    inflating; a shape other than the manifest's too, and a generic PNG above MAX_PNG_PIXELS."""
    bomb = _png_header_only(20000, 20000)
    spec = shards.ModalitySpec("m0", "png", (3, 28, 28), "uint8")
    with pytest.raises(FormatError, match=r"declares 20000x20000 = 400,000,000 pixels, more than the 784"):
        shards.decode_entry(spec, bomb)
    with pytest.raises(FormatError, match="more than the 67,108,864"):
        codec.decode_png(bomb)
    small = shards.encode_png(np.zeros((28, 28, 3), dtype=np.uint8))
    assert shards.decode_entry(spec, small).shape == (28, 28, 3)


class _Slow(BaseHTTPRequestHandler):
    """``/trickle``: announces 1000 bytes and sends one every 0.3 s; ``/endless``: an unbounded body."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(200)
        if self.path == "/trickle":
            self.send_header("Content-Length", "1000")
            self.end_headers()
            for _ in range(1000):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.3)
        else:
            self.end_headers()
            block = bytes(1 << 16)
            for _ in range(1 << 14):  # 1 GiB at most; the reader stops long before
                self.wfile.write(block)

    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def slow_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_reads_have_a_deadline_and_a_byte_cap(slow_server, monkeypatch):
    """A trickling server trips the per-download deadline (the per-read timeout never fires); an endless
    body stops at the byte cap as the bytes arrive, not after reading it all."""
    monkeypatch.setattr(codec, "HTTP_DEADLINE_S", 1.5)
    start = time.monotonic()
    with pytest.raises(LimitError, match=r"/trickle: not downloaded within 1.5 s"):
        codec.fetch_url(f"{slow_server}/trickle")
    assert time.monotonic() - start < 10
    monkeypatch.setattr(codec, "HTTP_DEADLINE_S", 60.0)
    with pytest.raises(LimitError, match=r"/endless: more than 1,048,576 bytes"):
        codec.fetch_url(f"{slow_server}/endless", max_bytes=2**20)
    with pytest.raises(LimitError, match="Content-Length 1,000 bytes, more than the 10"):
        codec.fetch_url(f"{slow_server}/trickle", max_bytes=10)


@pytest.mark.parametrize("damage,message", [
    (lambda m: m.update(shards="train-000000.tar"), "key 'shards' must be a JSON list"),
    (lambda m: m["modalities"][0].update(shape=[3, "28", 28]), r"modalities\[0\] = .*shape \(1 to 4 int"),
    (lambda m: m["shards"][0].update(count=-1), r"shards\[0\].count must be a non-negative integer"),
    (lambda m: m["splits"].update(train=5), "splits.train must be an object with a non-negative integer"),
    (lambda m: m.pop("seed"), "missing key 'seed'"),
])
def test_manifest_of_the_wrong_types_is_named(tmp_path, damage, message):
    out = build_tiny(tmp_path, train=8, test=8)
    manifest = json.loads((out / "manifest.json").read_text())
    damage(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=message):
        read_manifest(out)


def test_manifest_not_utf8_is_named(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b'{"format": "\xff"}')
    with pytest.raises(ShardError, match=r"manifest.json: not UTF-8 \(byte offset 12\)"):
        read_manifest(tmp_path)


def test_yaml_alias_bomb_non_utf8_and_base_outside_give_short_errors(tmp_path):
    bomb = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        prev = chr(ord("a") + level - 1)
        bomb.append(f"{chr(ord('a') + level)}: &{chr(ord('a') + level)} [{', '.join(['*' + prev] * 10)}]")
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    assert len((tmp_path / "bomb.yaml").read_bytes()) < 500
    with pytest.raises(ConfigError, match="expands to more than 100,000 YAML nodes") as info:
        load_config(tmp_path / "bomb.yaml")
    assert len(str(info.value)) < 300
    quoted = "[" + ", ".join(["&b0 [x, x, x, x, x, x, x, x, x, x]"] + [
        f"&b{i} [{', '.join([f'*b{i - 1}'] * 10)}]" for i in range(1, 9)]) + "]"
    with pytest.raises(ConfigError, match="'eval.langevin_sweep' expands to more than 100,000 YAML nodes"):
        load_config(None, [f'eval.langevin_sweep="{quoted}"'])  # a list given as a string is parsed too
    (tmp_path / "latin1.yaml").write_bytes("train:\n  out_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1.yaml is not UTF-8 text \(byte 0xe9 at offset 21\)"):
        load_config(tmp_path / "latin1.yaml")
    secret = tmp_path / "secret.yaml"
    secret.write_text(f"{SECRET}: [unclosed\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub/c.yaml").write_text("base: ../secret.yaml\n")
    with pytest.raises(ConfigError, match=r"secret.yaml' is not valid YAML: .* at line 2") as info:
        load_config(tmp_path / "sub/c.yaml")
    assert SECRET not in str(info.value)
    (tmp_path / "sub/d.yaml").write_text(f"base: {secret.with_suffix('')}\n")
    with pytest.raises(ConfigError, match="base: must name one YAML file"):
        load_config(tmp_path / "sub/d.yaml")


def test_staging_refuses_to_replace_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "old.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileExistsError, match="is \\(or holds\\) the current directory"), \
            generated.staging(tmp_path.resolve()):
        pass


def test_builder_workers_are_bounded(tmp_path):
    from mmebm_dist.datasets.polymnist import BuildSpec, build_polymnist

    build_tiny(tmp_path, train=8, test=4)
    spec = BuildSpec(source="idx", idx_dir=str(tmp_path / "idx"), modalities=2, out=str(tmp_path / "w"),
                     num_samples=8, test_samples=4, shard_size=4, workers=100000)
    with pytest.raises(ValueError, match=r"--workers 100000: must be in \[0, 256\]"):
        build_polymnist(spec, progress=False)
    assert not (tmp_path / "w").exists() and not list(tmp_path.glob(".w.*"))


def test_staging_left_by_a_killed_build_is_removed_by_the_next(tmp_path, caplog):
    out = build_tiny(tmp_path, train=8, test=4)
    stale = tmp_path / ".data.staging-999-deadbeef"
    stale.mkdir()
    (stale / "train-000000.tar").write_bytes(b"partial")
    caplog.set_level("WARNING")
    _rebuild(tmp_path, out, 16)
    assert not stale.exists() and f"removing {stale}" in caplog.text
    assert _samples(out) == 16
