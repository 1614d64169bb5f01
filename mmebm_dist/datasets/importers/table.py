"""A JSONL or CSV table, one row per tuple: each ``--modality NAME=KIND`` is a column holding an image path
(``image``), a ``.npy`` path (``npy``, stored as float32) or inline text (``text``, through the caption
tokenizer and vocabulary); relative paths resolve against the table's folder.

The label column (``--label``) is optional: without it every tuple is stored with label -1 and the manifest
says ``labelled: false`` (training needs no labels; coherence does). The split comes from a ``split`` column
(``train`` / ``test``) when the table has one, else a seeded ``--test-fraction`` of the rows is held out.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmebm_dist.data.text import Vocabulary
from mmebm_dist.datasets.importers.common import (
    MISSING_HINT,
    ImportDataError,
    check_shape,
    checked_image,
    encode_captions,
    first_image_spec,
    image_modality,
    missing_file,
    npy_entry,
    parse_label,
    png_entry,
    read_npy,
    read_utf8,
    staging_dir,
    text_modality,
    write_import,
)
from mmebm_dist.userfiles import UserFileError, inside

KINDS = ("image", "npy", "text")
SPLITS = ("train", "test")
UNLABELLED = -1
ON_MISSING = ("error", "skip")


def parse_modality(text: str) -> tuple[str, str]:
    """``NAME=KIND`` -> (NAME, KIND); argparse-friendly ValueError otherwise."""
    name, _, kind = text.partition("=")
    if not name or kind not in KINDS:
        raise ValueError(f"--modality {text!r}: expected NAME=KIND with KIND one of {', '.join(KINDS)}")
    return name, kind


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) of a ``.jsonl`` or ``.csv`` table; errors name the file and line."""
    text = read_utf8(path)
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ImportDataError(f"{path}: line {n} is not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ImportDataError(f"{path}: line {n} is a JSON {type(row).__name__}, not an object")
            rows.append((n, row))
        return rows
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        return [(reader.line_num, row) for row in reader]
    raise ImportDataError(f"{path}: unknown table type {suffix!r}; use .jsonl or .csv")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def select_rows(
    path: Path,
    rows: list[tuple[int, dict[str, Any]]],
    modalities: list[tuple[str, str]],
    label: str | None,
    key: str | None,
    on_missing: str,
    allow_missing: bool = False,
) -> tuple[list[tuple[int, dict]], int]:
    """The rows that have every modality (``on_missing`` ``skip`` drops the others and counts them;
    ``allow_missing`` keeps those with one at least); checks labels and duplicate keys, naming the line."""
    kept, skipped, seen = [], 0, {}
    for line, row in rows:
        where = f"{path}: line {line}"
        absent = [name for name, _ in modalities if _missing(row.get(name))]
        if absent and not (allow_missing and len(absent) < len(modalities)):
            if on_missing == "skip":
                skipped += 1
                continue
            raise ImportDataError(
                f"{where}: no value for modality {absent[0]!r}; fill it, pass --on-missing skip "
                + ("(the row has no modality)" if allow_missing else MISSING_HINT)
            )
        if label is not None:
            if label not in row:
                raise ImportDataError(f"{where}: no label column {label!r} (columns: {sorted(row)})")
            parse_label(row[label], f"{where}, column {label!r}")
        if key is not None:
            value = row.get(key)
            if _missing(value):
                raise ImportDataError(f"{where}: empty key column {key!r}")
            if value in seen:
                raise ImportDataError(f"{where}: duplicate key {value!r} (first on line {seen[value]})")
            seen[value] = line
        kept.append((line, row))
    return kept, skipped


def split_rows(
    rows: list[tuple[int, dict]], test_fraction: float, seed: int, path: Path
) -> dict[str, list[tuple[int, dict]]]:
    """Rows per split: from a ``split`` column when present, else a seeded ``test_fraction`` held out."""
    if rows and "split" in rows[0][1]:
        out: dict[str, list] = {s: [] for s in SPLITS}
        for line, row in rows:
            if row.get("split") not in SPLITS:
                raise ImportDataError(
                    f"{path}: line {line}: split {row.get('split')!r}; expected train or test"
                )
            out[row["split"]].append((line, row))
        return out
    test = np.random.default_rng(seed).permutation(len(rows))[: int(round(test_fraction * len(rows)))]
    held = set(test.tolist())
    return {
        "train": [r for i, r in enumerate(rows) if i not in held],
        "test": [r for i, r in enumerate(rows) if i in held],
    }


def _resolve(base: Path, value: Any) -> Path:
    """A file a table cell names, relative to the table's folder and refused outside it (an absolute path,
    ``..`` or a symlink out of the folder would copy any readable file into the shards)."""
    try:
        return inside(base, str(value), f"table cell (relative to {base})")
    except UserFileError as exc:
        raise ImportDataError(str(exc)) from None


def _sample(st: dict[str, Any], split: str, i: int) -> tuple[list[tuple[str, bytes]], int]:
    line, row = st["rows"][split][i]
    try:
        entries = []
        for name, kind in st["modalities"]:
            if _missing(row.get(name)) or (
                kind != "text" and missing_file(_resolve(st["base"], row[name]), st["allow_missing"])
            ):
                continue  # absent (--allow-missing): write_import counts it
            if kind == "image":
                mode, shape = st["images"][name]
                image = checked_image(_resolve(st["base"], row[name]), mode, st["resize"], shape)
                entries.append(png_entry(name, image))
            elif kind == "npy":
                path = _resolve(st["base"], row[name])
                arr = read_npy(path)
                check_shape(arr, st["arrays"][name], str(path), "every array of a modality needs one shape")
                entries.append(npy_entry(name, arr))
            else:
                entries.append(npy_entry(name, st["ids"][name][split][i]))
        label = UNLABELLED if st["label"] is None else parse_label(row[st["label"]], "")
    except ImportDataError as exc:
        raise ImportDataError(f"{exc} (table {st['table']}, line {line})") from exc
    return entries, label


def _first_row_shapes(
    src: Path, rows: list[tuple[int, dict]], modalities: list[tuple[str, str]], resize: tuple[int, int] | None
) -> tuple[dict[str, tuple[str, tuple[int, int, int]]], dict[str, tuple[int, ...]]]:
    """(mode, shape) of each image column and the shape of each ``.npy`` column, from the first train row
    holding a file of it: every other row must match them."""
    images, arrays = {}, {}
    for n, k in modalities:
        if k == "text":
            continue
        held = (r for r in rows if not _missing(r[1].get(n)) and _resolve(src.parent, r[1][n]).is_file())
        line, row = next(held, rows[0])  # none: the first row's error names the missing file
        try:
            path = _resolve(src.parent, row[n])
            if k == "image":
                images[n] = first_image_spec(path, resize)
            else:
                arrays[n] = read_npy(path).shape
        except ImportDataError as exc:
            raise ImportDataError(f"{exc} (table {src}, line {line})") from exc
    return images, arrays


def _encode_text_columns(
    rows: dict[str, list[tuple[int, dict]]], texts: list[str], max_tokens: int
) -> tuple[Vocabulary | None, dict[str, dict[str, np.ndarray]], int]:
    """One vocabulary for every text column (``vocab.json``), the ids per column and split, captions cut."""
    if not texts:
        return None, {}, 0
    all_text = {s: ["" if _missing(r.get(n)) else str(r[n]) for n in texts for _, r in rows[s]]
                for s in SPLITS}
    vocab, encoded, cut = encode_captions(all_text, max_len=max_tokens)
    ids = {
        n: {s: encoded[s][j * len(rows[s]) : (j + 1) * len(rows[s])] for s in SPLITS}
        for j, n in enumerate(texts)
    }
    return vocab, ids, cut


def import_table(
    src: str | Path,
    out: str | Path,
    *,
    modalities: list[tuple[str, str]],
    label: str | None = None,
    key: str | None = None,
    on_missing: str = "error",
    test_fraction: float = 0.1,
    seed: int = 0,
    resize: tuple[int, int] | None = None,
    max_tokens: int = 32,
    shard_size: int = 1000,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Import a JSONL/CSV table of tuples into shards + manifest in ``out``; the manifest."""
    src = Path(src)
    if not modalities:
        raise ImportDataError("name at least one column with --modality NAME=KIND")
    if on_missing not in ON_MISSING:
        raise ImportDataError(f"--on-missing {on_missing!r}: choose one of {', '.join(ON_MISSING)}")
    if allow_missing and on_missing == "skip":
        raise ImportDataError("--allow-missing keeps rows that --on-missing skip drops: choose one")
    kept, skipped = select_rows(src, read_rows(src), modalities, label, key, on_missing, allow_missing)
    rows = split_rows(kept, test_fraction, seed, src)
    if not rows["train"]:
        raise ImportDataError(f"{src}: no train rows with every modality ({skipped} skipped)")
    base = src.parent
    images, arrays = _first_row_shapes(src, rows["train"], modalities, resize)
    vocab, ids, cut = _encode_text_columns(rows, [n for n, k in modalities if k == "text"], max_tokens)
    specs = []
    for n, k in modalities:
        origin = f"{src}: column {n}"
        if k == "image":
            specs.append(image_modality(n, images[n][1], origin))
        elif k == "npy":
            specs.append(
                {"name": n, "shape": list(arrays[n]), "dtype": "float32", "encoding": "npy", "origin": origin}
            )
        else:
            specs.append(text_modality(n, vocab, origin))
    labels = [parse_label(r[label], "") for s in SPLITS for _, r in rows[s]] if label else []
    counts = {s: len(rows[s]) for s in SPLITS}
    with staging_dir(Path(out), overwrite) as stage:
        manifest = write_import(
            stage,
            _sample,
            counts,
            state={
                "rows": rows,
                "modalities": modalities,
                "images": images,
                "arrays": arrays,
                "ids": ids,
                "label": label,
                "base": base,
                "resize": resize,
                "table": str(src),
                "allow_missing": allow_missing,
            },
            modalities=specs,
            class_names=[str(c) for c in range(max(labels) + 1)] if labels else [],
            source={"name": "table", "origin": str(src), "path": str(src), **counts},
            builder={
                "command": "import table",
                "modalities": [f"{n}={k}" for n, k in modalities],
                "label": label,
                "labelled": label is not None,
                "key": key,
                "on_missing": on_missing,
                "skipped_rows": skipped,
                "captions_cut": cut,
                "test_fraction": test_fraction,
                "seed": seed,
                "resize": list(resize) if resize else None,
                "shard_size": shard_size,
            },
            shard_size=shard_size,
            workers=workers,
            progress=progress,
            vocab=vocab,
            allow_missing=allow_missing,
        )
    return manifest
