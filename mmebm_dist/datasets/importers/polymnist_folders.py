"""PolyMNIST as its authors distribute it (and as ``mmebm data polymnist --format folders`` writes it).

Layout: ``SRC/{train,test}/m{k}/{i}.{label}.png``. The authors' generator (epalu/mmvaeplus,
src/datasets_PolyMNIST.py) numbers files per class, so ``0.3.png`` and ``0.5.png`` are different tuples, and
every modality folder holds the same file names; their loader pairs the k-th file of each folder's (unsorted)
listing and reads the label from the name. Here a tuple is the files of one name (index, label) across the
modality folders, in (index, label) order: the pairing their loader relies on, checked (a name missing from
one modality is an error instead of a silent shift; with ``--allow-missing`` that tuple lacks the modality).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmebm_dist.data.sources import DIGIT_CLASSES
from mmebm_dist.datasets.importers.common import (
    MISSING_HINT,
    ImportDataError,
    checked_image,
    first_image_spec,
    image_modality,
    parse_label,
    png_entry,
    staging_dir,
    write_import,
)

SPLITS = ("train", "test")
_FOLDER = re.compile(r"m(\d+)")


def scan_modality(folder: Path) -> dict[tuple[int, int], Path]:
    """(index, label) -> file of one modality folder; errors name bad names and duplicate keys."""
    found: dict[tuple[int, int], Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        parts = path.name.split(".")
        if len(parts) != 3 or parts[2].lower() != "png" or not parts[0].isdigit():
            raise ImportDataError(f"{path}: expected a file named INDEX.LABEL.png (e.g. 0.7.png)")
        key = (int(parts[0]), parse_label(parts[1], str(path)))
        if key in found:
            raise ImportDataError(
                f"{path}: duplicate key {key[0]}.{key[1]} (also {found[key].name}) in {folder}"
            )
        found[key] = path
    return found


def scan(
    src: Path, allow_missing: bool = False
) -> tuple[list[str], dict[str, list[tuple[list[Path | None], int]]]]:
    """Modality names (m0, m1, ... by number) and per split the tuples (one file per modality, label); with
    ``allow_missing`` a tuple is every name some folder holds, None where a folder lacks it."""
    names: list[str] | None = None
    tuples: dict[str, list[tuple[list[Path | None], int]]] = {}
    for split in SPLITS:
        root = src / split
        if not root.is_dir():
            if split == "test":
                tuples[split] = []
                continue
            raise ImportDataError(f"{root}: missing; polymnist-folders needs SRC/train/m0/0.LABEL.png ...")
        folders = sorted(
            (p for p in root.iterdir() if p.is_dir() and _FOLDER.fullmatch(p.name)),
            key=lambda p: int(p.name[1:]),
        )
        split_names = [p.name for p in folders]
        if not split_names:
            raise ImportDataError(f"{root}: no modality folders m0, m1, ...")
        if names is not None and split_names != names:
            raise ImportDataError(f"{root}: modality folders {split_names}, train has {names}")
        names = split_names
        scanned = [scan_modality(p) for p in folders]
        for folder, files in zip(folders, scanned, strict=True):
            for key in sorted(set(scanned[0]) ^ set(files)) if not allow_missing else ():
                missing, present = (
                    (folder, scanned[0][key]) if key in scanned[0] else (folders[0], files[key])
                )
                raise ImportDataError(
                    f"{missing}: no file {key[0]}.{key[1]}.png, but {present} exists; every modality "
                    f"folder needs the same file names, {MISSING_HINT}"
                )
        keys = sorted(set().union(*scanned))
        tuples[split] = [([files.get(key) for files in scanned], key[1]) for key in keys]
    assert names is not None
    return names, tuples


def _sample(st: dict[str, Any], split: str, i: int) -> tuple[list[tuple[str, bytes]], int]:
    paths, label = st["tuples"][split][i]
    entries = [
        png_entry(name, checked_image(path, st["modes"][m], st["resize"], st["shapes"][m]))
        for m, (name, path) in enumerate(zip(st["names"], paths, strict=True))
        if path is not None
    ]
    return entries, label


def import_polymnist_folders(
    src: str | Path,
    out: str | Path,
    *,
    resize: tuple[int, int] | None = None,
    shard_size: int = 1000,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    allow_missing: bool = False,
) -> dict[str, Any]:
    """Import ``src`` into shards + manifest in ``out``; the manifest."""
    src = Path(src)
    names, tuples = scan(src, allow_missing)
    if not tuples["train"]:
        raise ImportDataError(f"{src / 'train'}: no tuples")
    first = [next((paths[m] for paths, _ in tuples["train"] if paths[m] is not None), None)
             for m in range(len(names))]
    if None in first:
        raise ImportDataError(f"{src / 'train' / names[first.index(None)]}: no images")
    specs = [first_image_spec(p, resize) for p in first]
    labels = {label for split in SPLITS for _, label in tuples[split]}
    class_names = list(DIGIT_CLASSES) if max(labels) < 10 else [str(c) for c in range(max(labels) + 1)]
    with staging_dir(Path(out), overwrite) as stage:
        return write_import(
            stage,
            _sample,
            {s: len(tuples[s]) for s in SPLITS},
            state={
                "tuples": tuples,
                "names": names,
                "modes": [m for m, _ in specs],
                "shapes": [s for _, s in specs],
                "resize": resize,
            },
            modalities=[image_modality(n, s, f"{src}/*/{n}") for n, (_, s) in zip(names, specs, strict=True)],
            class_names=class_names,
            source={
                "name": "polymnist-folders",
                "origin": str(src),
                "path": str(src),
                **{s: len(tuples[s]) for s in SPLITS},
            },
            builder={"command": "import polymnist-folders", "resize": resize, "shard_size": shard_size},
            shard_size=shard_size,
            workers=workers,
            progress=progress,
            allow_missing=allow_missing,
        )
