"""A starter config whose modalities match a data set's manifest (``mmebm config init --data DIR``).

Each modality's family and likelihood follow from its kind and shape (the YAML comments say why); the rest
are this repository's EBM-prior defaults at a CPU-friendly width, so the file trains as written.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path
from typing import Any

PRIORS = ("ebm", "laplace")
IMAGE_SCALE = 0.75


class StarterError(ValueError):
    """A manifest modality the starter config cannot map to a family; names the modality and the fix."""


def modality_choice(spec: dict[str, Any], biggest: int) -> tuple[dict[str, Any], str]:
    """The ``model.modalities`` entry of one manifest modality and a comment saying why.

    ``biggest``: element count of the largest non-text modality (a caption's weight balances against it).
    """
    name, shape, encoding = spec["name"], [int(d) for d in spec["shape"]], spec.get("encoding", "png")
    entry: dict[str, Any] = {"name": name, "shape": shape}
    if encoding == "png":
        _, h, w = shape
        conv = h % 4 == 0 and w % 4 == 0
        entry.update(family="conv" if conv else "mlp", likelihood="laplace", likelihood_scale=IMAGE_SCALE)
        why = (
            "image: conv family (two stride-2 convs, H and W divisible by 4)"
            if conv
            else f"image {h}x{w}: H or W not divisible by 4, so the mlp family"
        )
        return entry, why + f"; Laplace likelihood with scale {IMAGE_SCALE} as MMVAE+ on pixels in [0, 1]"
    if spec.get("vocab"):
        if len(shape) != 1 or shape[0] % 8:
            raise StarterError(
                f"modality {name!r}: captions of length {shape} need a length that is a multiple "
                "of 8 for the text family; re-import with --max-tokens 32"
            )
        weight = max(1.0, round(biggest / shape[0], 1))
        entry.update(
            family="text",
            likelihood="categorical",
            likelihood_scale=weight,
            vocab_size=int(spec["vocab_size"]),
        )
        return entry, (
            f"caption: text family (embedding + 1D convs), categorical over the {spec['vocab_size']}"
            f"-entry vocab.json; likelihood_scale {weight} weighs {shape[0]} tokens against "
            f"{biggest} values (MMVAE's llik_scaling)"
        )
    if not spec.get("dtype", "float32").startswith("float"):
        raise StarterError(
            f"modality {name!r}: {spec.get('dtype')} array without a vocabulary; store vectors "
            "as float32 (or token ids with a vocab.json)"
        )
    entry.update(family="mlp", likelihood="gaussian", likelihood_scale=1.0)
    return entry, (
        f"vector {shape}: mlp family; Gaussian likelihood with unit scale (standardise the values "
        "or set likelihood_scale to their noise level)"
    )


def starter_config(
    data: str | Path,
    *,
    prior: str = "ebm",
    steps: int = 2000,
    batch_size: int = 64,
    out_dir: str | None = None,
) -> str:
    """The YAML text of a starter config for the data set in ``data``."""
    from mmebm_dist.data.shards import read_manifest

    if prior not in PRIORS:
        raise StarterError(f"--prior {prior!r}: choose one of {', '.join(PRIORS)}")
    manifest = read_manifest(data)
    mods = manifest["modalities"]
    biggest = max([math.prod(m["shape"]) for m in mods if not m.get("vocab")] or [1])
    choices = [modality_choice(m, biggest) for m in mods]
    train_count = int(manifest["splits"]["train"]["count"])
    batch = max(1, min(batch_size, train_count))
    name = Path(data).resolve().name
    lines = [
        f"# Starter config for {data} (`mmebm config init`): {len(mods)} modalities, "
        f"{train_count} train tuples.",
        f"# Prior: {'EBM exp(f(z)) Laplace(z; 0, 1) / Z, f an MLP' if prior == 'ebm' else 'Laplace(0, 1)'}.",
        "# Shared z + private w per modality, stratified mixture of experts (MMVAE+).",
        "data:",
        f"  path: {json.dumps(str(data))}",
        f"  batch_size: {batch}{'  # the whole train split' if batch < batch_size else ''}",
        "  num_workers: 1",
        f"  shuffle_buffer: {min(2000, train_count)}",
        "model:",
        "  modalities:",
    ]
    for entry, why in choices:
        flow = ", ".join(f"{k}: {json.dumps(v)}" for k, v in entry.items())
        lines += [
            *textwrap.wrap(why, 108, initial_indent="    # ", subsequent_indent="    #   "),
            f"    - {{{flow}}}",
        ]
    lines += [
        "  latent_dim: 32",
        "  private_dim: 16",
        "  width: 32                 # conv channels; MMVAE+'s reference network uses 64 on a GPU",
        "  aggregation: moe",
        "  posterior: laplace",
        "  objective: elbo",
        "  beta: 1.0",
        "  prior:",
        f"    kind: {prior}",
        "    reference: laplace",
        "    hidden: 200",
        "    layers: 2",
        "    energy_l2: 0.1           # keeps the energy's magnitude bounded",
        "    lr: 5.0e-5",
        "    langevin: {steps: 60, step_size: 0.4, backend: auto}",
        "optim:",
        "  lr: 1.0e-3",
        "train:",
        f"  steps: {steps}",
        f"  out_dir: {json.dumps(out_dir or f'runs/{name}_{prior}')}",
        f"  log_every: {max(1, min(50, steps))}",
        f"  checkpoint_every: {max(1, min(1000, steps))}",
        "  image_every: 0",
    ]
    return "\n".join(lines) + "\n"
