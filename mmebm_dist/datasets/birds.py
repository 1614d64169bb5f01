"""Generated birds with captions: a GENERATED stand-in for CUB image+caption (CUB is in no package registry).

Each sample draws attributes (size, body/wing/crown/beak colour, beak length, wingbars, eye ring), paints a
simple bird from ellipses and polygons at 64x64x3 (MMVAE+'s CUB size) on a blurred crop of a bundled photo,
and writes about ten captions from templates that use CUB's vocabulary. Because the attributes are known,
coherence is exact: :func:`read_caption_attributes` parses a caption back into attributes (the birds judge,
``mmebm_dist.evaluate.judges.birds``, scores generated samples with it).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from mmebm_dist.data import shards
from mmebm_dist.data.text import VOCAB_FILE, Vocabulary, normalize, tokenize
from mmebm_dist.datasets import generated
from mmebm_dist.datasets.generated import LUMA, ring_contrast

COLOURS = ("black", "white", "grey", "brown", "red", "orange", "yellow", "green", "blue", "purple")
COLOUR_RGB = {
    "black": (28, 28, 30),
    "white": (245, 245, 240),
    "grey": (135, 135, 140),
    "brown": (120, 75, 35),
    "red": (205, 30, 35),
    "orange": (245, 135, 25),
    "yellow": (245, 220, 40),
    "green": (45, 160, 55),
    "blue": (40, 85, 215),
    "purple": (130, 45, 165),
}
BEAK_COLOURS = ("black", "grey", "yellow", "orange", "red")

# Attribute name -> its values; the value index is what classifiers predict and what shards store.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "size": ("small", "medium", "large"),
    "body_colour": COLOURS,
    "wing_colour": COLOURS,
    "crown_colour": COLOURS,
    "beak_colour": BEAK_COLOURS,
    "beak_length": ("short", "long"),
    "wingbars": ("no", "yes"),
    "eye_ring": ("no", "yes"),
}
ATTRIBUTE_NAMES = tuple(ATTRIBUTES)
LABEL_ATTRIBUTE = "body_colour"
"""The attribute stored as the sample's ``label`` (10 classes, like the digit data sets)."""
UNMENTIONED = -1
"""Value of an attribute a caption does not mention."""

CAPTIONS_PER_IMAGE = 10
MAX_TOKENS = 32
SIZE_SCALE = {"small": 0.62, "medium": 0.8, "large": 0.98}
OUTLINE = (35, 30, 30)


@dataclass(frozen=True, kw_only=True)
class BirdParams:
    """Every knob of the bird renderer; stored in the manifest so a data set can be regenerated."""

    size: int = 64
    """Output side in pixels (MMVAE+'s CUB images are 64x64)."""
    render_scale: int = 4
    """Drawn at size * render_scale and downsampled (anti-aliasing)."""
    crop_side: tuple[int, int] = (80, 260)
    """Side of the square background crop taken from a photo."""
    blur_radius: tuple[float, float] = (1.5, 3.0)
    """Gaussian blur radius of the background, in output pixels."""
    background_saturation: float = 0.6
    """Background colours are pulled toward their grey by this factor (0 grey, 1 unchanged)."""
    colour_jitter: float = 12.0
    """Std of per-channel jitter added to each part colour (0-255 units)."""
    min_contrast: float = 0.15
    """Reject a background when the mean RGB distance (in [0, 1]) between bird and its surround is below."""
    max_attempts: int = 50
    """Backgrounds tried before giving up with an error."""


def sample_attributes(rng: np.random.Generator) -> dict[str, int]:
    """Uniform attribute values (indices into :data:`ATTRIBUTES`); crown and wing colours differ from the body
    with probability 0.75 so captions that name parts carry information."""
    attrs = {name: int(rng.integers(len(values))) for name, values in ATTRIBUTES.items()}
    for part in ("wing_colour", "crown_colour"):
        if rng.random() < 0.75:
            while attrs[part] == attrs["body_colour"]:
                attrs[part] = int(rng.integers(len(COLOURS)))
    return attrs


def attribute_words(attrs: Mapping[str, int]) -> dict[str, str]:
    """Attribute indices -> value words."""
    return {name: ATTRIBUTES[name][int(attrs[name])] for name in ATTRIBUTE_NAMES}


# --------------------------------------------------------------------------------------------------- drawing


def _jitter(rng: np.random.Generator, name: str, p: BirdParams) -> tuple[int, int, int]:
    rgb = np.asarray(COLOUR_RGB[name], dtype=np.float64) + rng.normal(0.0, p.colour_jitter, 3)
    return tuple(int(v) for v in np.clip(np.rint(rgb), 0, 255))  # type: ignore[return-value]


def _arc(
    cx: float, cy: float, r: float, start_deg: float, stop_deg: float, n: int = 24
) -> list[tuple[float, float]]:
    """Points on a circle (local frame, y up) from ``start_deg`` to ``stop_deg``."""
    angles = np.radians(np.linspace(start_deg, stop_deg, n))
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def _bird_shapes(words: Mapping[str, str], rng: np.random.Generator, p: BirdParams) -> list[tuple]:
    """The bird facing right as (kind, points, fill), local frame (units, x forward, y up), painter's order.

    Body length is about 210 units from tail tip to a long beak's tip.
    """
    wing_rgb = _jitter(rng, words["wing_colour"], p)
    body_rgb, crown_rgb = _jitter(rng, words["body_colour"], p), _jitter(rng, words["crown_colour"], p)
    beak_rgb = _jitter(rng, words["beak_colour"], p)
    hx, hy, hr = 50.0, 30.0, 25.0  # head centre and radius
    shapes: list[tuple] = []
    for x in (-8.0, 8.0):
        shapes.append(("leg", [(x, -28.0), (x + 2, -60.0), (x + 14, -60.0)], OUTLINE))
    shapes.append(("poly", [(-44, 8), (-94, 4), (-92, -14), (-44, -10)], wing_rgb))
    shapes.append(("poly", [(56.0 * x, 34.0 * y) for x, y in _arc(0.0, 0.0, 1.0, 0, 360, 48)], body_rgb))
    shapes.append(("poly", [(24, 12), (4, 21), (-30, 15), (-66, 0), (-28, -10), (10, -7)], wing_rgb))
    if words["wingbars"] == "yes":
        bar = (250, 250, 245) if words["wing_colour"] not in ("white", "yellow") else (30, 30, 30)
        shapes += [("bar", [(2, 18), (8, -6)], bar), ("bar", [(-14, 16), (-8, -8)], bar)]
    shapes.append(("poly", _arc(hx, hy, hr, 0, 360, 36), body_rgb))
    shapes.append(("poly", _arc(hx, hy, hr, 18, 200, 24), crown_rgb))  # crown and nape: the upper back cap
    length = 16.0 if words["beak_length"] == "short" else 42.0
    shapes.append(
        (
            "poly",
            [(hx + hr * 0.96, hy + 3), (hx + hr * 0.8 + length, hy - 7), (hx + hr * 0.78, hy - 15)],
            beak_rgb,
        )
    )
    ex, ey = hx + 11.0, hy - 5.0
    if words["eye_ring"] == "yes":
        shapes.append(("ring", [(ex, ey), (10.5, 0)], (250, 250, 250)))
    shapes.append(("dot", [(ex, ey), (5.0, 0)], (10, 10, 10)))
    return shapes


def _bird_layer(attrs: Mapping[str, int], rng: np.random.Generator, p: BirdParams) -> Image.Image:
    """The bird alone, RGBA at size * render_scale (transparent elsewhere), placed fully inside the frame."""
    words = attribute_words(attrs)
    big = p.size * p.render_scale
    unit = big / 256.0 * 1.02 * SIZE_SCALE[words["size"]] * rng.uniform(0.95, 1.05)
    tilt = math.radians(rng.uniform(6.0, 24.0))
    ca, sa = math.cos(tilt), math.sin(tilt)
    line = max(2, round(big / 96))
    shapes = _bird_shapes(words, rng, p)

    def to_canvas(pts: Sequence[tuple[float, float]]) -> np.ndarray:
        xy = np.asarray(pts, dtype=np.float64)
        return np.stack(
            [unit * (xy[:, 0] * ca - xy[:, 1] * sa), -unit * (xy[:, 0] * sa + xy[:, 1] * ca)], axis=1
        )

    placed = []
    for kind, pts, fill in shapes:
        if kind in ("ring", "dot"):
            centre = to_canvas(pts[:1])[0]
            placed.append((kind, centre, pts[1][0] * unit, fill))
        elif kind == "leg":  # legs hang vertically from the hip whatever the tilt
            hip = to_canvas(pts[:1])[0]
            foot = hip + np.array([2.0, 32.0]) * unit
            placed.append((kind, np.stack([hip, foot, foot + [12 * unit, 0]]), None, fill))
        else:
            placed.append((kind, to_canvas(pts), None, fill))
    corners = np.concatenate([q[1].reshape(-1, 2) for q in placed])
    lo, hi = corners.min(0) - 2 * line, corners.max(0) + 2 * line
    offset = np.array([rng.uniform(-lo[k], max(-lo[k], big - hi[k])) for k in range(2)])
    layer = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for kind, pts, radius, fill in placed:
        pts = pts + offset
        if kind in ("ring", "dot"):
            box = [pts[0] - radius, pts[1] - radius, pts[0] + radius, pts[1] + radius]
            draw.ellipse(box, fill=fill, outline=OUTLINE if kind == "ring" else None, width=line)
        elif kind == "leg":
            draw.line([tuple(q) for q in pts], fill=fill, width=line + 1, joint="curve")
        elif kind == "bar":
            draw.line([tuple(q) for q in pts], fill=fill, width=round(4.5 * unit))
        else:
            draw.polygon([tuple(q) for q in pts], fill=fill, outline=OUTLINE, width=line)
    if rng.random() < 0.5:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return layer


def _photo_background(rng: np.random.Generator, photos: Sequence[np.ndarray], p: BirdParams) -> Image.Image:
    """A blurred photo crop with its colours pulled toward grey (so the bird's colours dominate)."""
    crop = generated.photo_crop(rng, photos, side=p.crop_side, size=p.size, blur=p.blur_radius)
    x = np.asarray(crop, dtype=np.float32)
    grey = (x @ LUMA)[..., None]
    x = grey + p.background_saturation * (x - grey)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def bird_contrast(image: np.ndarray, alpha: np.ndarray, ring: int = 3) -> float:
    """Colour distance (in [0, 1]) between the bird (coverage >= 0.5) and the ``ring``-px surround outside."""
    return ring_contrast(image, alpha, alpha, ring=ring, luminance=False)


@dataclass(frozen=True)
class Bird:
    """One rendered bird."""

    image: np.ndarray
    """uint8 [size, size, 3]."""
    alpha: np.ndarray
    """float32 [size, size]: bird coverage."""
    contrast: float
    attempts: int


def render_bird(
    attrs: Mapping[str, int],
    rng: np.random.Generator,
    photos: Sequence[np.ndarray],
    params: BirdParams = BirdParams(),
) -> Bird:
    """Paint the bird of ``attrs`` on a photo crop; backgrounds too close in colour to it are redrawn."""
    p = params
    layer = _bird_layer(attrs, rng, p).resize((p.size, p.size), Image.Resampling.BOX)
    alpha = np.asarray(layer.getchannel("A"), dtype=np.float32) / 255.0
    best = 0.0
    for attempt in range(1, p.max_attempts + 1):
        background = _photo_background(rng, photos, p)
        image = np.asarray(Image.alpha_composite(background.convert("RGBA"), layer).convert("RGB"))
        contrast = bird_contrast(image, alpha)
        best = max(best, contrast)
        if contrast >= p.min_contrast:
            return Bird(image=image, alpha=alpha, contrast=contrast, attempts=attempt)
    raise RuntimeError(
        f"no background with bird contrast >= {p.min_contrast} in {p.max_attempts} attempts "
        f"(best {best:.3f}) for attributes {attribute_words(attrs)}; lower min_contrast"
    )


# -------------------------------------------------------------------------------------------------- captions

# Each template names the attributes it mentions. Placeholders: {size} {body} {wing} {crown} {beak} {length}
# {bill} (bill/beak) and {bars} / {ring} (phrases for wingbars / eye ring, present or absent). "a/an" is a
# placeholder article resolved from the next word.
TEMPLATES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "this bird has a/an {body} breast and belly, {wing} wings and a/an {length} {beak} {bill}.",
        ("body_colour", "wing_colour", "beak_length", "beak_colour"),
    ),
    (
        "a/an {size} bird with a/an {crown} crown and a/an {body} body.",
        ("size", "crown_colour", "body_colour"),
    ),
    (
        "a/an {body} bird with {wing} wings and a/an {length} {bill}.",
        ("body_colour", "wing_colour", "beak_length"),
    ),
    (
        "the bird has a/an {crown} crown and nape, a/an {body} breast and {ring}.",
        ("crown_colour", "body_colour", "eye_ring"),
    ),
    (
        "this is a/an {size} {body} bird with a/an {length} {beak} {bill}.",
        ("size", "body_colour", "beak_length", "beak_colour"),
    ),
    (
        "this {size} bird has {wing} wings with {bars} and a/an {crown} crown.",
        ("size", "wing_colour", "wingbars", "crown_colour"),
    ),
    (
        "a/an {body} belly, a/an {crown} nape and a/an {beak} {bill} make this bird.",
        ("body_colour", "crown_colour", "beak_colour"),
    ),
    (
        "this bird is {body} with {wing} wings, {bars} and a/an {length} {bill}.",
        ("body_colour", "wing_colour", "wingbars", "beak_length"),
    ),
    (
        "a/an {size} bird that has a/an {crown} crown, {ring} and a/an {beak} {bill}.",
        ("size", "crown_colour", "eye_ring", "beak_colour"),
    ),
    (
        "the {size} bird has a/an {body} breast, {wing} wings and {bars}.",
        ("size", "body_colour", "wing_colour", "wingbars"),
    ),
    (
        "this bird has a/an {length} {beak} {bill}, a/an {crown} crown and {ring}.",
        ("beak_length", "beak_colour", "crown_colour", "eye_ring"),
    ),
    (
        "a/an {wing} winged bird with a/an {body} belly and a/an {crown} crown.",
        ("wing_colour", "body_colour", "crown_colour"),
    ),
    (
        "{wing} wings, a/an {body} breast and belly and a/an {length} {bill} on a/an {size} bird.",
        ("wing_colour", "body_colour", "beak_length", "size"),
    ),
    (
        "this {body} bird has {bars}, {ring} and a/an {beak} {bill}.",
        ("body_colour", "wingbars", "eye_ring", "beak_colour"),
    ),
)
BARS = {"yes": ("wingbars", "white wingbars", "bold wingbars"), "no": ("no wingbars",)}
RING = {"yes": ("an eye ring", "a white eye ring"), "no": ("no eye ring",)}
COLOUR_SYNONYMS = {"grey": ("grey", "gray")}
BILL_WORDS = ("bill", "beak")


def fix_articles(text: str) -> str:
    """Replace every ``a/an`` by ``an`` before a vowel sound and ``a`` otherwise (our vocabulary has no
    silent-h or 'you'-sounding words, so the first letter decides)."""
    words = text.split(" ")
    for i, word in enumerate(words):
        if word == "a/an":
            nxt = words[i + 1] if i + 1 < len(words) else ""
            words[i] = "an" if nxt[:1] in tuple("aeiou") else "a"
    return " ".join(words)


def make_caption(attrs: Mapping[str, int], template: int, rng: np.random.Generator) -> str:
    """One caption of ``attrs`` from template number ``template``, with synonyms drawn from ``rng``."""
    words = attribute_words(attrs)

    def colour(name: str) -> str:
        options = COLOUR_SYNONYMS.get(name, (name,))
        return options[int(rng.integers(len(options)))]

    text, _ = TEMPLATES[template]
    filled = text.format(
        size=words["size"],
        body=colour(words["body_colour"]),
        wing=colour(words["wing_colour"]),
        crown=colour(words["crown_colour"]),
        beak=colour(words["beak_colour"]),
        length=words["beak_length"],
        bill=BILL_WORDS[int(rng.integers(2))],
        bars=BARS[words["wingbars"]][int(rng.integers(len(BARS[words["wingbars"]])))],
        ring=RING[words["eye_ring"]][int(rng.integers(len(RING[words["eye_ring"]])))],
    )
    caption = normalize(fix_articles(filled))
    if len(tokenize(caption)) + 1 > MAX_TOKENS:
        raise ValueError(
            f"template {template} gives {len(tokenize(caption)) + 1} tokens > {MAX_TOKENS}: {caption}"
        )
    return caption


def make_captions(
    attrs: Mapping[str, int], rng: np.random.Generator, n: int = CAPTIONS_PER_IMAGE
) -> list[str]:
    """``n`` captions from distinct templates (in random order) describing ``attrs``."""
    order = rng.permutation(len(TEMPLATES))[:n]
    return [make_caption(attrs, int(t), rng) for t in order]


def caption_vocabulary() -> Vocabulary:
    """The vocabulary of every word the templates can produce (complete by construction, so never <unk>)."""
    words: set[str] = set()
    for text, _ in TEMPLATES:
        words |= set(tokenize(re.sub(r"\{\w+\}", " ", text.replace("a/an", "a an"))))
    for values in ATTRIBUTES.values():
        words |= set(values)
    for options in (*BARS.values(), *RING.values(), *COLOUR_SYNONYMS.values(), BILL_WORDS):
        for phrase in options:
            words |= set(tokenize(phrase))
    words.discard("yes")  # an attribute value, never written
    return Vocabulary.build([], max_len=MAX_TOKENS, extra_words=words)


# --------------------------------------------------------------------------------------------------- reading


_COLOUR_WORDS = {w: COLOURS.index(c) for c in COLOURS for w in COLOUR_SYNONYMS.get(c, (c,))}
_BEAK_WORDS = {w: BEAK_COLOURS.index(c) for c in BEAK_COLOURS for w in COLOUR_SYNONYMS.get(c, (c,))}


def read_caption_attributes(caption: str) -> dict[str, int]:
    """Rule-based reader: the attributes a caption states, as value indices; :data:`UNMENTIONED` otherwise.

    It reads the phrases the templates write (e.g. "a red crown", "blue wings", "a long yellow bill",
    "a small bird", "an eye ring", "no wingbars"), in any order, so it also scores free-running generated
    text: a phrase it cannot parse leaves its attribute unmentioned.
    """
    out = {name: UNMENTIONED for name in ATTRIBUTE_NAMES}
    w = tokenize(caption)
    n = len(w)
    for i, word in enumerate(w):
        prev = w[i - 1] if i > 0 else ""
        nxt = w[i + 1] if i + 1 < n else ""
        if word in ("crown", "nape") and prev in _COLOUR_WORDS:
            out["crown_colour"] = _COLOUR_WORDS[prev]
        elif word in ("breast", "belly", "body") and prev in _COLOUR_WORDS:
            out["body_colour"] = _COLOUR_WORDS[prev]
        elif word == "bird" and prev in _COLOUR_WORDS:
            out["body_colour"] = _COLOUR_WORDS[prev]
        elif word in ("wings", "winged") and prev in _COLOUR_WORDS:
            out["wing_colour"] = _COLOUR_WORDS[prev]
        elif word in BILL_WORDS:
            if prev in _BEAK_WORDS:
                out["beak_colour"] = _BEAK_WORDS[prev]
                prev = w[i - 2] if i > 1 else ""
            if prev in ATTRIBUTES["beak_length"]:
                out["beak_length"] = ATTRIBUTES["beak_length"].index(prev)
        elif word in ATTRIBUTES["size"] and nxt in ("bird", *_COLOUR_WORDS):
            out["size"] = ATTRIBUTES["size"].index(word)
        elif word == "wingbars":
            out["wingbars"] = 0 if prev == "no" else 1
        elif word == "ring" and prev == "eye":
            before = w[i - 2] if i > 1 else ""
            out["eye_ring"] = 0 if before == "no" else 1
        elif word == "is" and prev == "bird" and nxt in _COLOUR_WORDS:
            out["body_colour"] = _COLOUR_WORDS[nxt]
    return out


# -------------------------------------------------------------------------------------------------- building

TEXT_MODALITY = "caption"
IMAGE_MODALITY = "image"


@dataclass(kw_only=True)
class BirdsSpec:
    """Everything that determines a generated birds data set (plus where and how fast to write it)."""

    out: str = "data/birds"
    """Output directory."""
    seed: int = 0
    """Seed of attributes, drawings and captions."""
    num_train: int = 8855
    """Train images (MMVAE's CUB image-caption split: 8,855 train / 2,933 test images)."""
    num_test: int = 2933
    """Test images."""
    shard_size: int = 500
    """Samples per shard."""
    encoding: str = "png"
    """How the image is stored: ``png``, or ``raw`` (its uint8 [C, H, W] bytes: faster to load)."""
    workers: int = 0
    """Worker processes (0: os.cpu_count()); does not change the output."""
    overwrite: bool = False
    """Replace a data set already in ``out`` (only files this builder writes are removed)."""
    params: BirdParams = field(default_factory=BirdParams)
    """Bird renderer parameters."""


def make_sample(
    split: str,
    index: int,
    seed: int,
    photos: Sequence[np.ndarray],
    vocab: Vocabulary,
    params: BirdParams = BirdParams(),
) -> dict[str, Any]:
    """Sample ``index`` of ``split``: attributes, image, captions (text, ids); a function of its arguments."""
    rng = np.random.default_rng([seed, generated.SPLIT_IDS[split], 3, index])
    attrs = sample_attributes(rng)
    bird = render_bird(attrs, rng, photos, params)
    captions = make_captions(attrs, rng)
    return {
        "attributes": attrs,
        "image": bird.image,
        "contrast": bird.contrast,
        "captions": captions,
        "caption_ids": vocab.encode_batch(captions),
    }


def _write_bird_shard(job: tuple[str, int, int, int]) -> dict:
    split, index, start, end = job
    st = generated.worker_state()
    samples = []
    for i in range(start, end):
        s = make_sample(split, i, st["seed"], st["photos"], st["vocab"], st["params"])
        attrs = np.array([s["attributes"][n] for n in ATTRIBUTE_NAMES], dtype=np.int64)
        samples.append(
            (
                f"{i:09d}",
                [
                    *shards.image_entries({IMAGE_MODALITY: s["image"]}, st["encoding"]),
                    (f"{TEXT_MODALITY}.npy", shards.encode_npy(s["caption_ids"][0])),
                    ("captions.npy", shards.encode_npy(s["caption_ids"])),
                    ("attrs.npy", shards.encode_npy(attrs)),
                    (shards.LABEL_EXT, str(int(s["attributes"][LABEL_ATTRIBUTE])).encode()),
                ],
            )
        )
    return generated.write_shard(Path(st["out"]), split, index, samples)


def build_birds(spec: BirdsSpec, *, progress: bool = True) -> dict[str, Any]:
    """Draw the birds and captions, write shards + ``vocab.json`` + manifest; return the manifest.

    Per sample: ``image.png`` (modality ``image``, 3x64x64; a ``raw`` record with ``encoding='raw'``),
    ``caption.npy`` (modality ``caption``: int64
    [32] ids of the FIRST of its captions; the captions come in a random template order per image),
    ``captions.npy`` (int64 [10, 32], all captions), ``attrs.npy`` (int64 [8], in ATTRIBUTE_NAMES order)
    and ``cls`` (the body colour).
    """
    from mmebm_dist.datasets.mnist_svhn import params_to_dict

    for name, n in (("--num-train", spec.num_train), ("--num-test", spec.num_test)):
        if n < 1:
            raise ValueError(f"{name} must be >= 1, got {n}")
    if spec.encoding not in shards.IMAGE_ENCODINGS:
        raise ValueError(f"--encoding {spec.encoding!r}: choose one of {', '.join(shards.IMAGE_ENCODINGS)}")
    out = Path(spec.out)
    with generated.staged_output(out, spec.overwrite, [re.escape(VOCAB_FILE)]) as out:  # swapped in complete
        vocab = caption_vocabulary()
        vocab.save(out / VOCAB_FILE)
        counts = {"train": spec.num_train, "test": spec.num_test}
        state = {
            "seed": spec.seed,
            "photos": generated.load_photos(),
            "vocab": vocab,
            "params": spec.params,
            "out": str(out),
            "encoding": spec.encoding,
        }
        entries = generated.write_shards(
            _write_bird_shard,
            counts,
            spec.shard_size,
            state=state,
            workers=spec.workers,
            desc="birds shards",
            unit="img",
            progress=progress,
        )
        size = spec.params.size
        manifest = generated.manifest_base(
            modalities=[
                {
                    "name": IMAGE_MODALITY,
                    "shape": [3, size, size],
                    "dtype": "uint8",
                    "encoding": spec.encoding,
                    "origin": "generated birds (not CUB)",
                },
                {
                    "name": TEXT_MODALITY,
                    "shape": [MAX_TOKENS],
                    "dtype": "int64",
                    "encoding": "npy",
                    "vocab": VOCAB_FILE,
                    "vocab_size": len(vocab),
                    "origin": "templated captions (not CUB)",
                },
            ],
            class_names=COLOURS,
            counts=counts,
            entries=entries,
            source={
                "name": "birds-generated",
                "origin": "procedural birds on scikit-image photos, template captions",
                "train": counts["train"],
                "test": counts["test"],
            },
            seed=spec.seed,
            builder={
                "command": "birds",
                "num_train": spec.num_train,
                "num_test": spec.num_test,
                "shard_size": spec.shard_size,
                "encoding": spec.encoding,
                "renderer": params_to_dict(spec.params),
                "captions_per_image": CAPTIONS_PER_IMAGE,
                "text_modality_caption": "first",
                "label": LABEL_ATTRIBUTE,
                "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
                "extra_entries": {
                    "captions.npy": [CAPTIONS_PER_IMAGE, MAX_TOKENS],
                    "attrs.npy": [len(ATTRIBUTES)],
                },
                "versions": generated.versions(),
            },
        )
        shards.write_manifest(out, manifest)
        return manifest


# ------------------------------------------------------------------------------------------------ grid


def write_grid(
    directory: str | os.PathLike,
    png: str | os.PathLike,
    *,
    rows: int = 6,
    columns: int = 4,
    split: str = "test",
    scale: int = 2,
) -> Path:
    """A PNG of the first rows x columns samples of ``split``, each image beside its caption."""
    from mmebm_dist.data.text import caption_tile

    specs, samples = shards.first_samples(directory, split, rows * columns)
    vocab = Vocabulary.load(Path(directory) / VOCAB_FILE)
    tiles = []
    for sample in samples:
        image = shards.decode_image(specs[IMAGE_MODALITY], sample[specs[IMAGE_MODALITY].entry])
        ids = shards.decode_entry(specs[TEXT_MODALITY], sample[f"{TEXT_MODALITY}.npy"])
        text = caption_tile(vocab.decode(ids), height=image.shape[0], width=2 * image.shape[1])
        tiles.append(np.concatenate([image, text], axis=1))
    return generated.save_grid(png, tiles, columns, scale=scale)
