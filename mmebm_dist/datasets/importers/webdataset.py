"""Existing webdataset tar shards, imported in place: scan them, infer each modality from the first sample,
verify every sample, and write ``manifest.json`` beside them (the shards are not rewritten).

A sample's entries ``NAME.png`` (an image, any PNG the loader decodes) and ``NAME.npy`` (an array) become
modality ``NAME``; ``cls`` is the integer label every sample needs. The loader reads only those, so other
image or text encodings (``.jpg``, ``.txt``) are refused with the fix (re-encode, or import a table).
Shards are assigned to splits by file name (``--train-glob`` / ``--test-glob``).
"""

from __future__ import annotations

import fnmatch
import io
from pathlib import Path
from typing import Any

import numpy as np

from mmebm_dist.data import shards
from mmebm_dist.data.codec import FormatError, decode_png
from mmebm_dist.data.shards import ModalitySpec
from mmebm_dist.data.text import VOCAB_FILE, Vocabulary
from mmebm_dist.datasets import generated
from mmebm_dist.datasets.importers.common import MISSING_HINT, ImportDataError, mark_incomplete

SPLITS = ("train", "test")
REFUSED = {
    "jpg": "image",
    "jpeg": "image",
    "webp": "image",
    "gif": "image",
    "bmp": "image",
    "txt": "text",
    "text": "text",
}


def assign_splits(src: Path, train_glob: str, test_glob: str) -> dict[str, list[Path]]:
    """The ``.tar`` files of ``src`` per split (sorted by name); every tar must match exactly one glob."""
    tars = sorted(p for p in src.glob("*.tar") if p.is_file())
    if not tars:
        raise ImportDataError(f"{src}: no .tar shards")
    out: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for tar in tars:
        hits = [s for s, g in (("train", train_glob), ("test", test_glob)) if fnmatch.fnmatch(tar.name, g)]
        if len(hits) != 1:
            what = "both" if hits else "neither"
            raise ImportDataError(
                f"{tar}: matches {what} of --train-glob {train_glob!r} and --test-glob "
                f"{test_glob!r}; rename it or change the globs"
            )
        out[hits[0]].append(tar)
    if not out["train"]:
        raise ImportDataError(f"{src}: no shard matches --train-glob {train_glob!r}")
    return out


def _first_entries(tar: Path, allow_missing: bool) -> tuple[str, dict[str, bytes]]:
    """The first sample of ``tar`` (key, entries); with ``allow_missing`` the first sample's key with every
    entry name any sample of the shard has (the first of each), as samples may lack modalities."""
    try:
        samples = shards.iter_tar_samples(tar)
        key, sample = next(samples)
        for _, more in samples if allow_missing else ():
            sample = {**more, **sample}
    except StopIteration:
        raise ImportDataError(f"{tar}: empty shard") from None
    except (FormatError, OSError) as exc:
        raise ImportDataError(f"{tar}: unreadable tar ({exc})") from exc
    return key, sample


def infer_specs(
    tar: Path, vocab: Vocabulary | None, allow_missing: bool = False
) -> tuple[list[ModalitySpec], list[dict[str, Any]]]:
    """Modalities of the first sample of ``tar`` (its ``.png`` / ``.npy`` entries; with ``allow_missing`` of
    any sample of it), with manifest entries."""
    key, sample = _first_entries(tar, allow_missing)
    specs, entries = [], []
    for entry in sorted(sample):
        name, _, ext = entry.rpartition(".")
        where = f"{tar}: sample {key!r} entry {entry!r}"
        if ext in REFUSED:
            raise ImportDataError(
                f"{where}: {REFUSED[ext]} stored as .{ext}; the loader reads NAME.png images "
                "and NAME.npy arrays: re-encode the shards or import a table "
                "(mmebm data import table)"
            )
        if ext not in ("png", "npy"):
            continue  # cls and metadata entries
        if not name:
            raise ImportDataError(f"{where}: no modality name; name entries NAME.png / NAME.npy")
        if ext == "png":
            arr = _decode_png(entry, sample[entry], where)
            h, w, c = arr.shape
            spec = ModalitySpec(name, "png", (c, h, w), "uint8")
            entries.append({"name": name, "shape": [c, h, w], "dtype": "uint8", "encoding": "png"})
        else:
            arr = _load_npy(sample[entry], where)
            if arr.dtype.kind == "f" and arr.dtype != np.float32:
                raise ImportDataError(f"{where}: dtype {arr.dtype}; store float arrays as float32")
            spec = ModalitySpec(name, "npy", tuple(arr.shape), str(arr.dtype))
            item = {"name": name, "shape": list(arr.shape), "dtype": str(arr.dtype), "encoding": "npy"}
            if vocab is not None and arr.dtype.kind in "iu" and arr.ndim == 1:
                item.update(vocab=VOCAB_FILE, vocab_size=len(vocab))
            entries.append(item)
        specs.append(spec)
    if not specs:
        raise ImportDataError(
            f"{tar}: sample {key!r} has no NAME.png or NAME.npy entry (has {sorted(sample)})"
        )
    return specs, entries


def _decode_png(entry: str, data: bytes, where: str) -> np.ndarray:
    try:
        return decode_png(data)
    except (FormatError, OSError, ValueError) as exc:
        raise ImportDataError(f"{where}: cannot decode the PNG ({exc})") from exc


def _load_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ImportDataError(f"{where}: not a readable .npy array ({exc})") from exc


def _scan_shard(tar: Path) -> dict[str, Any]:
    """Verify every sample of one shard against the inferred modalities; its count, sha256, keys, labels and
    how many samples hold each modality."""
    specs, allow_missing = generated.worker_state()["specs"], generated.worker_state()["allow_missing"]
    keys, labels, key = [], [], None
    held = np.zeros(len(specs), dtype=np.int64)
    try:
        for key, sample in shards.iter_tar_samples(tar):
            where = f"{tar}: sample {key!r}"
            has = np.array([spec.entry in sample for spec in specs])
            if not has.any() or not (has.all() or allow_missing):
                lacks = specs[int(np.argmin(has))].entry
                fix = "a sample needs one modality at least" if not has.any() else MISSING_HINT
                raise ImportDataError(f"{where}: lacks {lacks!r} (has {sorted(sample)}); {fix}")
            held += has
            for spec in (s for s, h in zip(specs, has, strict=True) if h):
                try:
                    shards.decode_entry(spec, sample[spec.entry])
                except (OSError, ValueError) as exc:
                    raise ImportDataError(
                        f"{where}: {spec.entry}: {exc}; every sample of a modality "
                        "needs the first sample's shape and dtype"
                    ) from exc
            if shards.LABEL_EXT not in sample:
                raise ImportDataError(f"{where}: no label entry 'cls' (has {sorted(sample)})")
            label = shards.parse_label(sample[shards.LABEL_EXT])
            if label is None or label < 0:
                raise ImportDataError(
                    f"{where}: label {sample[shards.LABEL_EXT][:20]!r} is not a non-negative integer"
                )
            keys.append(key)
            labels.append(label)
    except FormatError as exc:
        raise ImportDataError(f"{tar}: unreadable tar after sample {key!r} ({exc})") from exc
    return {"keys": keys, "labels": labels, "sha256": shards.sha256_file(tar), "held": held}


def import_webdataset(
    src: str | Path,
    out: str | Path | None = None,
    *,
    train_glob: str = "*train*.tar",
    test_glob: str = "*test*.tar",
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Scan and verify the shards of ``src`` and write ``src/manifest.json``; the manifest (marked incomplete
    when, under ``allow_missing``, some samples lack modalities)."""
    src = Path(src)
    if out is not None and Path(out).resolve() != src.resolve():
        raise ImportDataError(
            f"--out {out}: webdataset shards are imported in place (the manifest is written "
            f"beside them in {src}); drop --out or pass the shards' folder"
        )
    if not src.is_dir():
        raise ImportDataError(f"{src}: not a folder of .tar shards")
    if (src / shards.MANIFEST).exists() and not overwrite:
        raise FileExistsError(f"{src / shards.MANIFEST} exists: pass --overwrite to replace it")
    tars = assign_splits(src, train_glob, test_glob)
    vocab = Vocabulary.load(src / VOCAB_FILE) if (src / VOCAB_FILE).is_file() else None
    specs, modalities = infer_specs(tars["train"][0], vocab, allow_missing)
    jobs = [t for s in SPLITS for t in tars[s]]
    scanned = generated.parallel_map(
        _scan_shard,
        jobs,
        state={"specs": specs, "allow_missing": allow_missing},
        workers=workers,
        desc="scan shards",
        unit="shard",
        progress=progress,
    )
    seen: dict[str, Path] = {}
    for tar, result in zip(jobs, scanned, strict=True):
        for key in result["keys"]:
            if key in seen:
                raise ImportDataError(f"{tar}: duplicate key {key!r} (also in {seen[key].name})")
            seen[key] = tar
    entries = [
        {"name": t.name, "split": s, "count": len(r["keys"]), "sha256": r["sha256"]}
        for s in SPLITS
        for t, r in zip(jobs, scanned, strict=True)
        if t in tars[s]
    ]
    counts = {s: sum(e["count"] for e in entries if e["split"] == s) for s in SPLITS}
    top = max(max(r["labels"], default=0) for r in scanned)
    manifest = generated.manifest_base(
        modalities=modalities,
        class_names=[str(c) for c in range(top + 1)],
        counts=counts,
        entries=entries,
        source={"name": "webdataset", "origin": str(src), "path": str(src), **counts},
        seed=0,
        builder={
            "command": "import webdataset",
            "train_glob": train_glob,
            "test_glob": test_glob,
            "rewritten": False,
        },
    )
    held = {s: sum((r["held"] for t, r in zip(jobs, scanned, strict=True) if t in tars[s]),
                   np.zeros(len(specs), dtype=np.int64)) for s in SPLITS}
    manifest = mark_incomplete(manifest, held)
    shards.write_manifest(src, manifest)
    return manifest
