"""The on-disk dataset format: deterministic webdataset tar shards plus ``manifest.json``; verify and info.

A shard ``{split}-{index:06d}.tar`` holds, per sample key, the class label (``{key}.cls``, ASCII) and its
modalities, each stored as the manifest says: ``png`` (``{key}.{name}.png``), ``npy`` (``{key}.{name}.npy``,
e.g. token ids) or ``raw``: the uint8 [C, H, W] bytes of every raw modality, concatenated in manifest order,
in ONE record ``{key}.raw`` per sample (no header: the manifest gives the shapes). One record per tuple, not
per modality, because the loader's cost is per tar member (header, grouping) and not per byte: 2 members per
PolyMNIST tuple instead of 6. The manifest declares the modalities, counts per split and every shard's sample
count, byte size and sha256, so loaders can plan an epoch without reading data and ``verify`` can check all.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from mmebm_dist.data.codec import (
    FormatError,
    decode_png,
    fetch_url,
    group_samples,
    is_http,
    iter_tar_members,
)
from mmebm_dist.data.codec import (
    encode_png as encode_png,  # re-exported: the builders write PNGs through shards.encode_png
)
from mmebm_dist.userfiles import MAX_TEXT_BYTES, UserFileError, clip, inside, read_bytes

FORMAT_NAME = "mmebm-webdataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
LABEL_EXT = "cls"
ENCODINGS = ("png", "raw", "npy")
IMAGE_ENCODINGS = ("png", "raw")
"""Encodings of uint8 [C, H, W] images (batched as float32 in [0, 1]); ``npy`` arrays are batched as is."""
# A shard name in a manifest: a plain relative path (no scheme, no absolute path, no ``..``), so a hostile
# manifest cannot make the loader run a ``pipe:`` command or read outside the data set directory.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
# Fixed tar member metadata so that the same content always gives the same bytes.
TAR_MTIME = 0
TAR_MODE = 0o644


class ShardError(RuntimeError):
    """A shard, sample or manifest is missing or corrupt; the message names the file and sample key."""


# --------------------------------------------------------------------------------------------------- writing


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``."""
    return f"{split}-{index:06d}.tar"


def _write_tar_to(fileobj: Any, members: Iterable[tuple[str, bytes]]) -> None:
    with tarfile.open(fileobj=fileobj, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = TAR_MODE
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))


def write_tar(path: Path, members: Iterable[tuple[str, bytes]]) -> None:
    """Write a tar whose bytes depend only on the member names and contents (fixed mtime, owner, mode)."""
    tmp = _temp_name(path)
    with open(tmp, "wb") as f:
        _write_tar_to(f, members)
    os.replace(tmp, path)


def _temp_name(path: Path) -> Path:
    """A hidden temp file beside ``path``, unique to this process and call (two writers never share one)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def tar_digest(members: Iterable[tuple[str, bytes]]) -> tuple[int, str]:
    """(bytes, sha256) of the tar :func:`write_tar` would write, without writing it."""
    buf = io.BytesIO()
    _write_tar_to(buf, members)
    return buf.tell(), hashlib.sha256(buf.getvalue()).hexdigest()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest.json`` atomically (last, so an interrupted build has no manifest)."""
    path = Path(directory) / MANIFEST
    tmp = _temp_name(path)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------------- reading


def manifest_path(path: str | os.PathLike) -> Path:
    """``path`` itself if it is a manifest file, else ``path/manifest.json`` (local paths)."""
    p = Path(path)
    return p if p.suffix == ".json" else p / MANIFEST


def manifest_url(url: str) -> str:
    """The manifest of an http(s) data set: ``url`` if it ends in ``.json``, else ``url/manifest.json``."""
    return url if url.endswith(".json") else url.rstrip("/") + "/" + MANIFEST


def shard_location(path: str | os.PathLike, name: str) -> str:
    """Where shard ``name`` of the data set at ``path`` (directory, manifest file or http(s) URL) lives."""
    if isinstance(path, str) and is_http(path):
        return manifest_url(path).rpartition("/")[0] + "/" + name
    root = manifest_path(path).parent
    try:  # a shard that is a symlink out of the data set's folder is refused, not read
        inside(root, name, "shard")
    except UserFileError as exc:
        raise ShardError(str(exc)) from None
    return str(root / name)


def check_shard_name(name: Any, where: str) -> None:
    """A manifest's shard name must be a plain relative path: ShardError otherwise (no ``scheme:``, no
    absolute path, no ``..``), so a manifest can never make the loader run a command or leave its folder."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        raise ShardError(
            f"{where}: shard name {name!r} is not a plain relative path (letters, digits, '_', '-', '.', "
            "'/'; no scheme, no absolute path, no '..'); to stream from URLs, pass them as data.path"
        )


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Load and check a manifest (a directory holding ``manifest.json``, the file, or an http(s) URL): every
    key present with the JSON type it needs, so a damaged one fails here naming the key, not at a batch."""
    if isinstance(path, str) and is_http(path):
        where: Any = manifest_url(path)
        try:
            data = fetch_url(where, max_bytes=MAX_TEXT_BYTES)
        except OSError as exc:
            raise ShardError(f"no manifest at {where}: {clip(exc)}") from exc
    else:
        where = manifest_path(path)
        if not where.is_file():
            raise ShardError(f"no manifest at {where}: build the data with `mmebm data polymnist --out DIR`")
        data = read_bytes(where, "manifest")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ShardError(f"{where}: not UTF-8 (byte offset {exc.start}); rebuild the data") from None
    except json.JSONDecodeError as exc:
        raise ShardError(f"{where}: not valid JSON ({exc})") from exc
    _check_manifest_types(manifest, where)
    if manifest["format"] != FORMAT_NAME or manifest["format_version"] != FORMAT_VERSION:
        raise ShardError(
            f"{where}: format {manifest['format']!r} v{manifest['format_version']}, this code reads "
            f"{FORMAT_NAME!r} v{FORMAT_VERSION}; rebuild the data"
        )
    for spec in manifest["modalities"]:
        encoding = spec.get("encoding", "png")
        image = len(spec["shape"]) == 3 and spec["dtype"] == "uint8"
        if encoding not in ENCODINGS or (encoding in IMAGE_ENCODINGS and not image):
            raise ShardError(
                f"{where}: modality {spec['name']!r}: encoding {encoding!r} with {spec['dtype']} "
                f"{spec['shape']}; encodings are {ENCODINGS} and png/raw need uint8 [C, H, W]"
            )
    for entry in manifest["shards"]:
        check_shard_name(entry.get("name"), str(where))
    return manifest


def _is_count(x: Any, high: int = 2**40) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= high


_MANIFEST_TYPES = {"format": str, "format_version": int, "layout": str, "modalities": list, "splits": dict,
                   "shards": list, "source": (str, dict), "seed": int}


def _check_manifest_types(manifest: Any, where: Any) -> None:
    """Every key a reader uses is present with its JSON type, and every size and count is a bounded
    non-negative integer (a manifest decides how much memory a batch takes)."""
    if not isinstance(manifest, dict):
        raise ShardError(f"{where}: must hold a JSON object, got {type(manifest).__name__}")
    for key, tp in _MANIFEST_TYPES.items():
        if key not in manifest:
            raise ShardError(f"{where}: missing key {key!r}")
        if not isinstance(manifest[key], tp) or isinstance(manifest[key], bool):
            raise ShardError(f"{where}: key {key!r} must be a JSON {getattr(tp, '__name__', 'string')}, got "
                             f"{clip(repr(manifest[key]), 80)}")
    for i, spec in enumerate(manifest["modalities"]):
        ok = (isinstance(spec, dict) and isinstance(spec.get("name"), str)
              and isinstance(spec.get("dtype"), str) and isinstance(spec.get("shape"), list)
              and 1 <= len(spec["shape"]) <= 4
              and all(_is_count(d, 2**16) and d > 0 for d in spec["shape"])
              and isinstance(spec.get("encoding", "png"), str))
        if not ok:
            raise ShardError(f"{where}: modalities[{i}] = {clip(repr(spec), 120)}: needs name and dtype "
                             "(strings) and shape (1 to 4 integers in [1, 65536])")
    for i, entry in enumerate(manifest["shards"]):
        if not isinstance(entry, dict) or not isinstance(entry.get("split"), str):
            raise ShardError(f"{where}: shards[{i}] = {clip(repr(entry), 120)} needs a split name")
        for key in ("count", "bytes"):
            if key in entry and not _is_count(entry[key]):
                raise ShardError(f"{where}: shards[{i}].{key} must be a non-negative integer, got "
                                 f"{clip(repr(entry[key]), 80)}")
        if "sha256" in entry and not isinstance(entry["sha256"], str):
            raise ShardError(f"{where}: shards[{i}].sha256 must be a hex string")
    for split, info in manifest["splits"].items():
        if not isinstance(info, dict) or not _is_count(info.get("count")):
            raise ShardError(f"{where}: splits.{split} must be an object with a non-negative integer count, "
                             f"got {clip(repr(info), 80)}")


def manifest_hash(path: str | os.PathLike) -> str:
    """sha256 of the manifest's canonical JSON: identifies the exact data a run was trained on."""
    return manifest_dict_hash(read_manifest(path))


def manifest_dict_hash(manifest: dict[str, Any]) -> str:
    """:func:`manifest_hash` of a manifest not (yet) on disk, e.g. an incomplete set's complete twin."""
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def split_shards(manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The manifest's shard entries of ``split``, in order."""
    if split not in manifest["splits"]:
        raise ShardError(f"split {split!r} not in the manifest; it has {sorted(manifest['splits'])}")
    return [s for s in manifest["shards"] if s["split"] == split]


RAW_EXT = "raw"
"""Suffix of a sample's raw record: all its ``raw`` modalities' bytes, in manifest order."""
PRESENT_EXT = "present"
"""Suffix of a sample's presence mask in incomplete sets with raw modalities (:func:`sample_presence`)."""


class ModalitySpec(NamedTuple):
    """One modality as stored: tar entry ``{key}.{name}.{encoding}``, decoded ``shape`` and stored ``dtype``.

    ``png`` / ``raw``: an image, shape [C, H, W], uint8 on disk (raw: its C-order bytes), float32 in [0, 1] in
    batches. ``npy``: any array (e.g. token ids), kept as stored.
    """

    name: str
    encoding: str
    shape: tuple[int, ...]
    dtype: str
    offset: int = 0
    """``raw``: where this modality's bytes start in the sample's raw record."""
    record: int = 0
    """``raw``: bytes of the whole raw record (all raw modalities of the sample)."""

    @property
    def nbytes(self) -> int:
        """Bytes of one stored ``raw`` entry (uint8 of ``shape``)."""
        return math.prod(self.shape)

    @property
    def entry(self) -> str:
        """The sample entry (tar member suffix) holding this modality: ``{name}.{encoding}`` or ``raw``."""
        return RAW_EXT if self.encoding == "raw" else f"{self.name}.{self.encoding}"


def modality_specs(manifest: dict[str, Any]) -> list[ModalitySpec]:
    """The manifest's modalities, in order (raw ones with their place in the sample's raw record)."""
    specs = [
        ModalitySpec(m["name"], m.get("encoding", "png"), tuple(int(d) for d in m["shape"]), m["dtype"])
        for m in manifest["modalities"]
    ]
    record = sum(s.nbytes for s in specs if s.encoding == "raw")
    offset, out = 0, []
    for spec in specs:
        if spec.encoding == "raw":
            spec = spec._replace(offset=offset, record=record)
            offset += spec.nbytes
        out.append(spec)
    return out


def modality_names(manifest: dict[str, Any]) -> list[str]:
    """Modality names in manifest order."""
    return [m["name"] for m in manifest["modalities"]]


def check_raw(spec: ModalitySpec, data: bytes) -> bytes:
    """A sample's raw record, after checking its byte count against the manifest's shapes (ValueError)."""
    if len(data) != spec.record:
        raise ValueError(
            f"raw record is {len(data)} bytes, the manifest's raw modalities (uint8 {list(spec.shape)} "
            f"for {spec.name!r}) need {spec.record}"
        )
    return data


def decode_entry(spec: ModalitySpec, data: bytes) -> np.ndarray:
    """Decode one stored modality and check it against its spec; ValueError naming the mismatch.

    ``png`` gives uint8 [H, W, C] (layout change to [C, H, W] happens batched), ``raw`` uint8 [C, H, W] (a
    view of ``data``), ``npy`` the array.
    """
    if spec.encoding == "raw":
        check_raw(spec, data)
        return np.frombuffer(data, dtype=np.uint8, count=spec.nbytes, offset=spec.offset).reshape(spec.shape)
    if spec.encoding == "png":
        c, h, w = spec.shape
        arr = decode_png(data, max_pixels=h * w)  # a header larger than declared is refused undecoded
        if arr.shape != (h, w, c) or arr.dtype != np.uint8:
            raise ValueError(
                f"decoded to {arr.dtype} [H, W, C] = {list(arr.shape)}, "
                f"declared [C, H, W] = {list(spec.shape)}"
            )
        return arr
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.shape != spec.shape or arr.dtype != np.dtype(spec.dtype):
        raise ValueError(
            f"decoded to {arr.dtype} {list(arr.shape)}, declared {spec.dtype} {list(spec.shape)}"
        )
    return arr


def decode_image(spec: ModalitySpec, data: bytes) -> np.ndarray:
    """uint8 [H, W, C] of a ``png`` or ``raw`` image entry (what the builders draw and pictures show)."""
    arr = decode_entry(spec, data)
    return np.ascontiguousarray(arr.transpose(1, 2, 0)) if spec.encoding == "raw" else arr


def image_entries(
    images: dict[str, np.ndarray], encoding: str, present: Sequence[bool] | None = None
) -> list[tuple[str, bytes]]:
    """A sample's tar entries (suffix, bytes) for uint8 [H, W, C] images by modality name: one PNG each, or
    one raw record of all their [C, H, W] bytes in the given order (the manifest's).

    ``present`` (one bool per image, for incomplete sets): an absent image has no PNG entry; in a raw record
    its bytes are zeros (the layout stays fixed) and a ``present`` entry states the mask."""
    keep = [True] * len(images) if present is None else list(present)
    if encoding == "png":
        return [(f"{name}.png", encode_png(image))
                for (name, image), kept in zip(images.items(), keep, strict=True) if kept]
    if encoding == "raw":
        chw = [(im[:, :, None] if im.ndim == 2 else im).transpose(2, 0, 1) for im in images.values()]
        record = b"".join(np.ascontiguousarray(x if kept else np.zeros_like(x), dtype=np.uint8).tobytes()
                          for x, kept in zip(chw, keep, strict=True))
        return [(RAW_EXT, record)] + ([] if present is None else [(PRESENT_EXT, encode_presence(keep))])
    raise ValueError(f"image encoding {encoding!r}: choose one of {IMAGE_ENCODINGS}")


# --------------------------------------------------------------------------------------- incomplete tuples


def is_incomplete(manifest: dict[str, Any]) -> bool:
    """Whether the data set's tuples may lack modalities (manifest key ``incomplete``)."""
    return bool(manifest.get("incomplete", False))


def encode_presence(present: Sequence[bool]) -> bytes:
    """The ``present`` entry: ASCII '1' / '0' per modality in manifest order."""
    return b"".join(b"1" if p else b"0" for p in present)


def sample_presence(specs: Sequence[ModalitySpec], sample: dict[str, bytes]) -> list[bool]:
    """Which modalities a sample of an incomplete set holds: its entry is there and, when the sample has a
    ``present`` entry (required with raw modalities, whose record is always there), that entry says '1'.
    ValueError naming the problem for a bad or missing ``present`` entry."""
    mask = sample.get(PRESENT_EXT)
    if mask is None:
        if any(s.encoding == "raw" for s in specs):
            raise ValueError(f"lacks its {PRESENT_EXT!r} entry (which raw modalities it holds)")
        return [s.entry in sample for s in specs]
    if len(mask) != len(specs) or not set(mask) <= {ord("0"), ord("1")}:
        raise ValueError(f"{PRESENT_EXT!r} entry is {mask[:40]!r}; it must be one ASCII '0'/'1' per modality "
                         f"({len(specs)})")
    return [bit == ord("1") and s.entry in sample for bit, s in zip(mask, specs, strict=True)]


def missing_summary(manifest: dict[str, Any]) -> str | None:
    """'tuples lacking a modality: NAME N, ...' (all splits) of an incomplete manifest; None if complete."""
    if not is_incomplete(manifest):
        return None
    held = manifest["presence"]["counts"]
    missing = {n: sum(manifest["splits"][s]["count"] - held[s][n] for s in held)
               for n in modality_names(manifest)}
    return "tuples lacking a modality: " + ", ".join(f"{n} {k}" for n, k in missing.items())


def presence_summary(specs: Sequence[ModalitySpec], masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """The manifest's ``presence`` record: per split, tuples holding each modality, from bool [N, M] masks."""
    return {"counts": {split: {s.name: int(mask[:, m].sum()) for m, s in enumerate(specs)}
                       for split, mask in masks.items()}}


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of an array (for ``npy`` modalities)."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return buf.getvalue()


def iter_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) per sample of a local tar, grouped as webdataset groups them."""
    with open(path, "rb") as stream:
        for sample in group_samples(iter_tar_members(stream, str(path)), str(path)):
            key = sample.pop("__key__")
            sample.pop("__url__")
            yield key, sample


def first_samples(
    directory: str | os.PathLike, split: str, count: int
) -> tuple[dict[str, ModalitySpec], list[dict[str, bytes]]]:
    """The data set's modality specs by name and the first ``count`` samples of ``split`` in manifest order
    (fewer when the split holds fewer), each {suffix: bytes}: what a picture of the data set is drawn from."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    specs = {s.name: s for s in modality_specs(manifest)}
    samples: list[dict[str, bytes]] = []
    for entry in split_shards(manifest, split):
        for _, sample in iter_tar_samples(Path(shard_location(directory, entry["name"]))):
            samples.append(sample)
            if len(samples) == count:
                return specs, samples
    return specs, samples


# --------------------------------------------------------------------------------------------- verify / info


def verify(directory: str | os.PathLike, *, progress: bool = True) -> dict[str, int]:
    """Check every shard (or folder file) against the manifest; raise ShardError naming the first bad one.

    Checks presence, sha256, per-shard and per-split counts, that each sample has every modality and a label,
    and that each modality decodes to its declared shape. Returns counts of what was checked.
    """
    from tqdm import tqdm

    directory = Path(directory)
    manifest = read_manifest(directory)
    specs = modality_specs(manifest)
    num_classes = len(manifest.get("class_names", [])) or None
    if manifest["layout"] == "folders":
        return _verify_folders(directory, manifest, specs, progress=progress)
    checked = {"shards": 0, "samples": 0}
    per_split = {split: 0 for split in manifest["splits"]}
    incomplete = is_incomplete(manifest)
    held = {split: np.zeros(len(specs), dtype=np.int64) for split in manifest["splits"]}
    for entry in tqdm(manifest["shards"], desc="verify", unit="shard", disable=not progress):
        path = Path(shard_location(directory, entry["name"]))
        if not path.is_file():
            raise ShardError(f"{path}: shard listed in the manifest is missing")
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            raise ShardError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ShardError(f"{path}: sha256 {digest} differs from the manifest's {entry['sha256']}")
        count = 0
        key = None
        try:
            for key, sample in iter_tar_samples(path):
                held[entry["split"]] += _check_sample(path, key, sample, specs, num_classes, incomplete)
                count += 1
        except (FormatError, OSError) as exc:
            raise ShardError(f"{path}: unreadable tar after sample {key!r} ({exc})") from exc
        if count != entry["count"]:
            raise ShardError(f"{path}: {count} samples, the manifest says {entry['count']}")
        per_split[entry["split"]] += count
        checked["shards"] += 1
        checked["samples"] += count
    for split, info in manifest["splits"].items():
        if per_split[split] != info["count"]:
            raise ShardError(
                f"{directory}: split {split!r} has {per_split[split]} samples in its shards, "
                f"the manifest says {info['count']}"
            )
    if incomplete:
        _check_presence_counts(directory, manifest, specs, held)
    return checked


def _check_presence_counts(
    directory: Path, manifest: dict[str, Any], specs: list[ModalitySpec], held: dict[str, np.ndarray]
) -> None:
    """The tuples holding each modality, per split, must match the manifest's ``presence`` counts."""
    stated = manifest.get("presence", {}).get("counts")
    if stated is None:
        return
    for split, counts in held.items():
        found = {s.name: int(n) for s, n in zip(specs, counts, strict=True)}
        if split in stated and found != stated[split]:
            raise ShardError(f"{directory}: split {split!r} holds modalities {found} times, the manifest's "
                             f"presence counts say {stated[split]}")


def _check_sample(
    path: Path,
    key: str,
    sample: dict[str, bytes],
    specs: list[ModalitySpec],
    num_classes: int | None,
    incomplete: bool = False,
) -> np.ndarray:
    """Check one sample; bool [M] of the modalities it holds (all of them in a complete set)."""
    held = np.ones(len(specs), dtype=bool)
    if incomplete:
        try:
            held[:] = sample_presence(specs, sample)
        except ValueError as exc:
            raise ShardError(f"{path}: sample {key!r}: {exc}") from exc
        if not held.any():
            raise ShardError(f"{path}: sample {key!r} holds no modality (has {sorted(sample)})")
    for spec, kept in zip(specs, held, strict=True):
        data = sample.get(spec.entry)
        if not kept and spec.encoding != "raw":
            continue
        if data is None:
            raise ShardError(f"{path}: sample {key!r} lacks modality {spec.entry!r} (has {sorted(sample)}); "
                             "only a manifest with \"incomplete\": true allows missing modalities")
        try:
            decode_entry(spec, data)
        except (OSError, ValueError) as exc:
            raise ShardError(f"{path}: sample {key!r} modality {spec.name!r}: {exc}") from exc
    if LABEL_EXT not in sample:
        raise ShardError(f"{path}: sample {key!r} lacks its label {LABEL_EXT!r}")
    label = parse_label(sample[LABEL_EXT])
    if label is None or (num_classes is not None and not 0 <= label < num_classes):
        raise ShardError(f"{path}: sample {key!r} has bad label {sample[LABEL_EXT]!r}")
    return held


def parse_label(data: bytes) -> int | None:
    """The integer in a ``cls`` entry, or None if it is not one."""
    try:
        return int(data)  # int() takes ASCII bytes and strips whitespace itself
    except ValueError:
        return None


def _verify_folders(
    directory: Path, manifest: dict[str, Any], specs: list[ModalitySpec], *, progress: bool
) -> dict[str, int]:
    """Folders layout: every {split}/{name}/{i}.{label}.png decodes and the labels of sample i agree; in a
    complete set each folder holds samples 0..count-1, in an incomplete one any of them, each sample in at
    least one folder."""
    from tqdm import tqdm

    incomplete = is_incomplete(manifest)
    checked = {"files": 0, "samples": 0}
    for split, info in manifest["splits"].items():
        labels: dict[int, tuple[str, str]] = {}  # sample -> (first modality holding it, its label)
        for spec in specs:
            folder = directory / split / spec.name
            files = sorted(folder.glob("*.png"), key=lambda p: int(p.name.split(".")[0]))
            if not incomplete and len(files) != info["count"]:
                raise ShardError(f"{folder}: {len(files)} PNG files, the manifest says {info['count']}")
            for i, f in enumerate(
                tqdm(files, desc=f"verify {split}/{spec.name}", unit="file", disable=not progress)
            ):
                index, label, _ = f.name.split(".")
                if not incomplete and int(index) != i:
                    raise ShardError(f"{folder}: expected sample {i}, found {f.name}")
                if not 0 <= int(index) < info["count"]:
                    raise ShardError(f"{f}: sample {index} outside 0..{info['count'] - 1} of the manifest")
                try:
                    decode_entry(spec, f.read_bytes())
                except (OSError, ValueError) as exc:
                    raise ShardError(f"{f}: {exc}") from exc
                first = labels.setdefault(int(index), (spec.name, label))
                if first[1] != label:
                    raise ShardError(f"{folder}: sample {index} has label {label}, modality {first[0]!r} has "
                                     f"{first[1]}")
                checked["files"] += 1
        if len(labels) != info["count"]:
            lost = next(i for i in range(info["count"]) if i not in labels)
            raise ShardError(f"{directory / split}: sample {lost} has no file in any modality folder")
        checked["samples"] += info["count"]
    return checked


def convert(
    src: str | os.PathLike, dst: str | os.PathLike, encoding: str, *, progress: bool = True
) -> dict[str, Any]:
    """Rewrite the data set ``src`` into the new directory ``dst`` with every image modality in ``encoding``.

    Atomic: shards and manifest are written into a hidden sibling of ``dst`` that is renamed to ``dst`` only
    when complete, so a failed or interrupted convert leaves no ``dst``. Returns the new manifest.
    """
    from tqdm import tqdm

    src, dst = Path(src), Path(dst)
    if encoding not in IMAGE_ENCODINGS:
        raise ValueError(f"--encoding {encoding!r}: choose one of {IMAGE_ENCODINGS}")
    manifest = read_manifest(src)
    if manifest["layout"] != "shards":
        raise ShardError(f"{src}: layout {manifest['layout']!r}; convert reads webdataset shards")
    if dst.exists():
        raise FileExistsError(f"{dst} already exists: choose another --out or remove it")
    specs = modality_specs(manifest)
    tmp = dst.with_name(f".{dst.name}.converting-{os.getpid()}")
    try:
        tmp.mkdir(parents=True)
        entries = []
        shards = manifest["shards"]
        for entry in tqdm(shards, desc=f"convert to {encoding}", unit="shard", disable=not progress):
            out = tmp / entry["name"]
            out.parent.mkdir(parents=True, exist_ok=True)
            source = Path(shard_location(src, entry["name"]))
            write_tar(out, _converted_members(source, specs, encoding, is_incomplete(manifest)))
            entries.append({**entry, "bytes": out.stat().st_size, "sha256": sha256_file(out)})
        converted = {
            **manifest,
            "modalities": [
                {**m, "encoding": encoding} if m.get("encoding", "png") in IMAGE_ENCODINGS else m
                for m in manifest["modalities"]
            ],
            "shards": entries,
            "converted_from": {"path": str(src), "manifest_sha256": manifest_hash(src)},
        }
        write_manifest(tmp, converted)
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return converted


def _converted_members(
    path: Path, specs: list[ModalitySpec], encoding: str, incomplete: bool = False
) -> Iterator[tuple[str, bytes]]:
    """The tar members of shard ``path`` with its image modalities re-encoded (labels, npy unchanged); in an
    incomplete set absent images stay absent and every sample gets a ``present`` entry."""
    images = [s for s in specs if s.encoding in IMAGE_ENCODINGS]
    stored = {s.entry for s in images} | ({PRESENT_EXT} if incomplete else set())
    key = None
    try:
        for key, sample in iter_tar_samples(path):
            try:
                held = dict(zip(specs, sample_presence(specs, sample), strict=True)) if incomplete else {}
                decoded = {s.name: decode_image(s, sample[s.entry]) if held.get(s, True)
                           else np.zeros((*s.shape[1:], s.shape[0]), np.uint8) for s in images}
            except (KeyError, ValueError) as exc:
                raise ShardError(f"{path}: sample {key!r}: {type(exc).__name__}: {exc}") from exc
            present = [held[s] for s in images] if incomplete else None
            entries = image_entries(decoded, encoding, present)
            if incomplete:
                entries = [e for e in entries if e[0] != PRESENT_EXT]
                entries.append((PRESENT_EXT, encode_presence([held[s] for s in specs])))
            yield from ((f"{key}.{suffix}", data) for suffix, data in entries)
            yield from ((f"{key}.{suffix}", data) for suffix, data in sample.items() if suffix not in stored)
    except (FormatError, OSError) as exc:
        raise ShardError(f"{path}: unreadable tar after sample {key!r} ({exc})") from exc


def info(directory: str | os.PathLike) -> str:
    """A short human-readable summary of a built dataset."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    lines = [
        f"{directory}: {manifest['format']} v{manifest['format_version']} ({manifest['layout']})",
        f"  manifest sha256: {manifest_hash(directory)}",
        f"  source: {manifest['source'].get('name')} ({manifest['source'].get('origin')}), "
        f"seed {manifest['seed']}",
        "  modalities: "
        + ", ".join(
            f"{m['name']} {m['dtype']}{m['shape']}"
            + (f" on {m['background']}" if "background" in m else "")
            + f" ({m.get('encoding', 'png')})"
            for m in manifest["modalities"]
        ),
    ]
    for split, split_info in manifest["splits"].items():
        shards = split_shards(manifest, split)
        size = sum(
            (directory / s["name"]).stat().st_size for s in shards if (directory / s["name"]).is_file()
        )
        lines.append(
            f"  {split}: {split_info['count']} samples in {len(shards)} shards, {size / 2**20:.1f} MiB"
        )
    if is_incomplete(manifest):
        presence = manifest.get("presence", {})
        rate = presence.get("drop_rate")
        lines.append("  incomplete: tuples may lack modalities"
                     + (f" (each dropped with probability {rate})" if rate is not None else ""))
        for split, counts in presence.get("counts", {}).items():
            total = manifest["splits"][split]["count"]
            lines.append(f"  {split} tuples holding each modality: "
                         + ", ".join(f"{name} {n} ({n / max(total, 1):.0%})" for name, n in counts.items()))
    return "\n".join(lines)
