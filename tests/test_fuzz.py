"""Seeded fuzzing of what users and data hand the loaders (issue 33): mutated config YAML, manifests and tar
shards. Every input gives a result or the loader's own one-line error (ConfigError / ShardError /
FormatError, each a ValueError naming the file), never another exception type or a multi-line message.

A seeded generator rather than hypothesis: a few hundred cases in seconds, the same cases on every run (a
failure reproduces from its case number), and no new dependency."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

import pytest
from data_helpers import build_tiny

from mmebm_dist.config import ConfigError, load_config
from mmebm_dist.data import shards
from mmebm_dist.data.codec import FormatError, read_shard
from mmebm_dist.data.shards import ShardError, decode_entry, modality_specs, read_manifest, split_shards

REPO = Path(__file__).resolve().parents[1]
CASES = 300
ODD_VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**70, 1e400, -1e400, float("nan"), 0.5, "", "x", "inf", "-1",
    "[1, 2", "{a: 1}", "&a [1]", "*a", "!!python/object:os.system", [], {}, [1, "a", None], {"k": []}, "m0",
    "train", "\u00e9\u00e8", "../../etc/passwd", "/etc/passwd", "pipe:cat /etc/passwd",
]
YAML_TOKENS = ["&a ", "*a", "[", "]", "{", "}", ": ", "- ", "\n  ", "!!binary ", "!!python/name:os.system ",
               "base: ", "'", '"', "#", "\t", "\x00", "\xff", "<<: *a\n", "? ", "|\n", "%YAML 1.1\n"]


def _one_line(exc: BaseException) -> None:
    text = str(exc)
    assert "\n" not in text and 0 < len(text) < 2000, repr(text[:500])


def _paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            out += _paths(v, (*prefix, i))
    return out


def _mutate_tree(tree: Any, rng: random.Random) -> Any:
    """A deep copy of ``tree`` with 1-3 values replaced by odd ones, keys dropped or renamed."""
    tree = copy.deepcopy(tree)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(tree)[1:])
        parent = tree
        for step in path[:-1]:
            parent = parent[step]
        action = rng.random()
        if action < 0.6:
            parent[path[-1]] = copy.deepcopy(rng.choice(ODD_VALUES))
        elif action < 0.8 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[f"{path[-1]}_typo"] = parent.pop(path[-1])
    return tree


def _mutate_text(text: str, rng: random.Random) -> str:
    """``text`` with a few YAML tokens inserted, characters deleted or the tail cut."""
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(text) + 1)
        action = rng.random()
        if action < 0.5:
            text = text[:i] + rng.choice(YAML_TOKENS) + text[i:]
        elif action < 0.8:
            text = text[:i] + text[i + rng.randint(1, 8):]
        else:
            text = text[:i]
    return text


def test_config_loader_gives_a_config_or_a_one_line_config_error(tmp_path):
    import yaml

    base_text = (REPO / "configs/tiny.yaml").read_text()
    base_tree = yaml.safe_load(base_text)
    rng = random.Random(33)
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(CASES):
        path = tmp_path / f"case{case}.yaml"
        if case % 2:
            path.write_text(yaml.safe_dump(_mutate_tree(base_tree, rng)))
        else:
            data = _mutate_text(base_text, rng).encode("utf-8", "surrogateescape")
            path.write_bytes(data if case % 4 else data.replace(b"e", bytes([rng.randrange(128, 256)]), 1))
        try:
            load_config(path)
            outcomes["loaded"] += 1
        except ConfigError as exc:
            _one_line(exc)
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001 -- the point: nothing else may escape
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n{path.read_bytes()[:2000]!r}")
    assert outcomes["loaded"] > 10 and outcomes["refused"] > 100, outcomes  # both paths exercised


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("fuzz"), modalities=2, train=8, test=4, shard_size=4)


def test_manifest_reader_gives_a_manifest_or_a_one_line_shard_error(tmp_path, tiny_set):
    manifest = json.loads((tiny_set / shards.MANIFEST).read_text())
    rng = random.Random(34)
    outcomes = {"read": 0, "refused": 0}
    for case in range(CASES):
        folder = tmp_path / f"case{case}"
        folder.mkdir()
        text = json.dumps(_mutate_tree(manifest, rng))
        if case % 3 == 0:
            text = _mutate_text(text, rng)
        (folder / shards.MANIFEST).write_text(text, errors="surrogateescape")
        try:
            read = read_manifest(folder)
            modality_specs(read)
            for split in ("train", "test"):
                split_shards(read, split)
            outcomes["read"] += 1
        except (ShardError, ValueError) as exc:  # ShardError, or UserFileError for an unreadable file
            _one_line(exc)
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}\n{text[:2000]}")
    assert outcomes["read"] > 10 and outcomes["refused"] > 100, outcomes


def test_shard_reader_gives_samples_or_a_one_line_format_error(tmp_path, tiny_set):
    manifest = read_manifest(tiny_set)
    specs = modality_specs(manifest)
    original = (tiny_set / manifest["shards"][0]["name"]).read_bytes()
    rng = random.Random(35)
    outcomes = {"read": 0, "refused": 0}
    for case in range(CASES):
        data = bytearray(original)
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(data))
            action = rng.random()
            if action < 0.6:
                data[i] = rng.randrange(256)
            elif action < 0.8:
                del data[i : i + rng.randint(1, 600)]
            else:
                data = data[:i]
        path = tmp_path / f"case{case}.tar"
        path.write_bytes(bytes(data))
        try:
            for sample in read_shard(str(path)):
                for spec in specs:
                    if spec.entry in sample:
                        decode_entry(spec, sample[spec.entry])
            outcomes["read"] += 1
        except (FormatError, ShardError, ValueError) as exc:
            _one_line(exc)
            outcomes["refused"] += 1
        except Exception as exc:  # noqa: BLE001
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc}")
    assert outcomes["refused"] > 50, outcomes
