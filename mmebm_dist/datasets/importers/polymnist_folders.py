"""PolyMNIST as its authors distribute it (and as ``mmebm data polymnist --format folders`` writes it).

Layout: ``SRC/{train,test}/m{k}/{i}.{label}.png``. As in the authors' loader, tuple i is file i of every
modality folder and its label is the one in the file name; here files are matched by the index in their
names (not by position in a sorted listing), and every modality must hold the same indices with the same
labels, so a missing or mislabelled file is an error instead of a silent shift.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmebm_dist.data.sources import DIGIT_CLASSES
from mmebm_dist.datasets.importers.common import (
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


def scan_modality(folder: Path) -> dict[int, tuple[Path, int]]:
    """index -> (file, label) of one modality folder; errors name duplicate indices and bad names."""
    found: dict[int, tuple[Path, int]] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        parts = path.name.split(".")
        if len(parts) != 3 or parts[2].lower() != "png" or not parts[0].isdigit():
            raise ImportDataError(f"{path}: expected a file named INDEX.LABEL.png (e.g. 0.7.png)")
        index, label = int(parts[0]), parse_label(parts[1], str(path))
        if index in found:
            raise ImportDataError(f"{path}: duplicate key {index} (also {found[index][0].name}) in {folder}")
        found[index] = (path, label)
    return found


def scan(src: Path) -> tuple[list[str], dict[str, list[tuple[list[Path], int]]]]:
    """Modality names (m0, m1, ... by number) and per split the tuples (one file per modality, label)."""
    names: list[str] | None = None
    tuples: dict[str, list[tuple[list[Path], int]]] = {}
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
        first = scanned[0]
        for folder, files in zip(folders, scanned, strict=True):
            for index in sorted(set(first) ^ set(files)):
                where = folder if index not in files else folders[0]
                raise ImportDataError(
                    f"{where}: no file for index {index} (it exists in another modality); "
                    "every modality needs the same indices"
                )
            for index, (path, label) in files.items():
                if label != first[index][1]:
                    raise ImportDataError(
                        f"{path}: label {label}, but {first[index][0]} has {first[index][1]}"
                    )
        tuples[split] = [([files[i][0] for files in scanned], first[i][1]) for i in sorted(first)]
    assert names is not None
    return names, tuples


def _sample(st: dict[str, Any], split: str, i: int) -> tuple[list[tuple[str, bytes]], int]:
    paths, label = st["tuples"][split][i]
    entries = [
        png_entry(name, checked_image(path, st["modes"][m], st["resize"], st["shapes"][m]))
        for m, (name, path) in enumerate(zip(st["names"], paths, strict=True))
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
) -> dict[str, Any]:
    """Import ``src`` into shards + manifest in ``out``; the manifest."""
    src = Path(src)
    names, tuples = scan(src)
    first = tuples["train"][0][0] if tuples["train"] else None
    if first is None:
        raise ImportDataError(f"{src / 'train'}: no tuples")
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
        )
