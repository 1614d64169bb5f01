"""Evaluation outputs: ``eval.json`` (every figure), ``report.md`` (tables + PNG links) and the PNG pictures.

Numbers in report.md are written with :func:`fmt` from the same dict that becomes eval.json, so the two never
disagree. Pictures use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from mmebm_dist.data.grid import image_grid  # noqa: E402
from mmebm_dist.data.text import is_token_modality  # noqa: E402
from mmebm_dist.reporting.tables import fmt, json_safe, md_table  # noqa: E402,F401  (also read from here)
from mmebm_dist.rundir import EVAL_JSON, JOINT_PNG, atomic_write_text  # noqa: E402

REPORT_MD = "report.md"
CROSS_PNG = "cross_generation.png"
HEATMAP_PNG = "coherence_matrix.png"
SWEEP_PNG = "coherence_vs_langevin.png"


def write_eval_json(path: str | Path, results: dict) -> Path:
    """Write ``results`` as strict JSON (nan -> null) atomically."""
    path = Path(path)
    atomic_write_text(path, json.dumps(json_safe(results), indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


# ------------------------------------------------------------------------------------------------ images


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, C, H, W] floats in [0, 1] -> uint8 [N, H, W, 3] (grey repeated, C > 3 keeps the first 3)."""
    if images.dim() == 2:  # vector modality: show each vector as a 1-pixel-high strip
        images = images[:, None, None, :]
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W] or vectors [N, D], got shape {tuple(images.shape)}")
    x = images.detach().float().cpu().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = x[:, :3]
    return (x.permute(0, 2, 3, 1).numpy() * 255 + 0.5).astype(np.uint8)


def as_pictures(samples: dict[str, torch.Tensor],
                vocabularies: dict | None = None) -> dict[str, torch.Tensor]:
    """``samples`` with every token modality replaced by its decoded captions drawn as float [N, 3, H, 2H]
    tiles (H: the tallest image modality, 64 when there is none), so grids stay images."""
    from mmebm_dist.data.text import caption_tiles

    tokens = [k for k, v in samples.items() if is_token_modality(v)]
    if not tokens:
        return dict(samples)
    missing = [k for k in tokens if k not in (vocabularies or {})]
    if missing:
        raise ValueError(f"token modalities {missing} need a vocabulary to be drawn (their data set's "
                         "vocab.json; evaluate.generate.text_vocabularies reads it)")
    height = max((v.shape[-2] for v in samples.values() if v.dim() == 4), default=64)
    return {k: torch.from_numpy(caption_tiles(v.cpu().numpy(), vocabularies[k], height=height,
                                              width=2 * height)) if k in tokens else v
            for k, v in samples.items()}


def decoded_texts(samples: dict[str, torch.Tensor], vocabularies: dict | None, limit: int) -> dict[str, list]:
    """The first ``limit`` decoded captions of every token modality of ``samples`` (for report.md)."""
    return {k: vocabularies[k].decode_batch(v[:limit].cpu().numpy())
            for k, v in samples.items() if is_token_modality(v) and k in (vocabularies or {})}


def _same_size(images: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """uint8 images per modality, padded to a common height and width (modalities may differ in size)."""
    arrays = {k: to_uint8(v) for k, v in images.items()}
    h = max(a.shape[1] for a in arrays.values())
    w = max(a.shape[2] for a in arrays.values())
    return {k: np.pad(a, ((0, 0), (0, h - a.shape[1]), (0, w - a.shape[2]), (0, 0)), constant_values=255)
            for k, a in arrays.items()}


def joint_per_row(samples: dict[str, torch.Tensor]) -> int:
    """Sample tuples per band of the joint grid: 16, or 8 when a caption tile (twice as wide) is in it."""
    return 8 if any(is_token_modality(v) for v in samples.values()) else 16


def save_joint_grid(path: str | Path, samples: dict[str, torch.Tensor], per_row: int | None = None,
                    title: str = "joint samples", vocabularies: dict | None = None) -> Path:
    """Joint samples: each column is one sample tuple (modalities stacked top to bottom), ``per_row`` tuples
    per band of rows (default 16, 8 with a text modality); coherent samples show the same digit down a
    column. Token modalities are drawn as their decoded captions (``vocabularies``)."""
    names = list(samples)
    per_row = per_row or joint_per_row(samples)
    arrays = _same_size(as_pictures(samples, vocabularies))
    n = arrays[names[0]].shape[0]
    bands = []
    for start in range(0, n, per_row):
        stop = min(start + per_row, n)
        block = np.stack([arrays[m][start:stop] for m in names], 0)  # (M, k, H, W, 3)
        k = stop - start
        band = image_grid(block.reshape(-1, *block.shape[2:]), k)
        if k < per_row:  # pad short last band to the full width
            full = image_grid(np.full((per_row, *block.shape[2:]), 255, np.uint8), per_row)
            band = np.concatenate([band, np.full((band.shape[0], full.shape[1] - band.shape[1], 3), 255,
                                                 np.uint8)], axis=1)
        if bands:  # a grey rule between bands of tuples
            bands.append(np.full((6, band.shape[1], 3), 160, np.uint8))
        bands.append(band)
    grid = np.concatenate(bands, axis=0)
    fig, ax = plt.subplots(figsize=(max(4.0, grid.shape[1] / 60), max(3.0, grid.shape[0] / 60)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_title(f"{title} (columns: samples; rows: {', '.join(names)})", fontsize=9)
    ax.axis("off")
    return save_figure(fig, path)


def save_cross_grid(path: str | Path, sources: dict[str, torch.Tensor],
                    generated: dict[str, dict[str, torch.Tensor]], title: str = "cross generation",
                    vocabularies: dict | None = None) -> Path:
    """Cross-generation matrix: row = source modality, first column = the source input, then one column per
    target showing the target generated from that source (k examples side by side in each cell). Token
    modalities are drawn as their decoded captions (``vocabularies``)."""
    names = list(sources)
    vocab = dict(vocabularies or {})
    cells: dict[str, dict[str, np.ndarray]] = {}
    for src in names:
        if src in vocab:
            vocab["input"] = vocab[src]
        cells[src] = _same_size(as_pictures({"input": sources[src], **generated[src]}, vocab))
        vocab.pop("input", None)
    k, h, w = cells[names[0]]["input"].shape[:3]
    columns = ["input", *names]
    rows = []
    for src in names:
        strips = [image_grid(cells[src][col], k) for col in columns]
        sep = np.full((strips[0].shape[0], 6, 3), 160, np.uint8)
        rows.append(np.concatenate([x for s in strips for x in (s, sep)][:-1], axis=1))
    grid = np.concatenate(rows, axis=0)
    strip_w = strips[0].shape[1] + 6
    strip_h = rows[0].shape[0]
    fig, ax = plt.subplots(figsize=(max(5.0, grid.shape[1] / 70), max(3.0, grid.shape[0] / 70 + 1)))
    ax.imshow(grid, interpolation="nearest")
    ax.set_xticks([strip_w * i + strip_w / 2 for i in range(len(columns))], ["source input", *names],
                  fontsize=8)
    ax.set_yticks([strip_h * i + strip_h / 2 for i in range(len(names))], names, fontsize=8)
    ax.set_xlabel("target modality")
    ax.set_ylabel("source modality")
    ax.set_title(title, fontsize=9)
    return save_figure(fig, path)


def save_heatmap(path: str | Path, matrix: Sequence[Sequence[float]], names: Sequence[str],
                 title: str = "cross coherence (rows: source, columns: target)") -> Path:
    """Heatmap of the source x target coherence matrix with the value in each cell."""
    values = np.array(matrix, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 0.8 + 0.7 * len(names)))
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    for i in range(len(names)):
        for j in range(len(names)):
            v = values[i, j]
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if not math.isnan(v) and v < 0.6 else "black")
    ax.set_xticks(range(len(names)), names)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target")
    ax.set_ylabel("source")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return save_figure(fig, path)


def save_sweep_plot(path: str | Path, sweep: Sequence[dict], ceiling: float | None = None) -> Path:
    """Joint coherence (with standard error bars) and sampling time per sample against Langevin steps."""
    steps = [e["steps"] for e in sweep]
    coh = [e["coherence"] for e in sweep]
    err = [e["stderr"] for e in sweep]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.errorbar(steps, coh, yerr=err, marker="o", capsize=3, label="joint coherence")
    if ceiling is not None and not math.isnan(ceiling):
        ax.axhline(ceiling, color="grey", linestyle="--", label="aggregate-posterior ceiling")
    ax.set_xlabel("Langevin steps K")
    ax.set_ylabel("joint coherence")
    ax.set_ylim(0, 1)
    ax2 = ax.twinx()
    ax2.plot(steps, [e["ms_per_sample"] for e in sweep], color="tab:red", marker="s", linestyle=":",
             label="ms / sample")
    ax2.set_ylabel("sampling time (ms / sample)", color="tab:red")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=8, loc="lower right")
    ax.set_title("joint coherence vs Langevin steps", fontsize=9)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path) -> Path:
    """Save a matplotlib figure as PNG atomically (temp file + os.replace) and close it; no Software tag, so
    the bytes do not depend on the matplotlib version."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.tight_layout()
    fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------------------------------------ report.md


def render_report(results: dict, images: dict[str, str]) -> str:
    """report.md text from the eval.json dict; ``images`` maps a caption to a PNG file name beside it."""
    run = results.get("run", {})
    coh = results["coherence"]
    names = coh["modalities"]
    lines = [f"# Evaluation of {run.get('run_dir', 'a run')}", ""]
    lines += md_table(["item", "value"], [
        ["checkpoint step", str(run.get("step"))],
        ["prior", str(run.get("prior"))],
        ["data manifest hash", f"`{run.get('manifest_hash')}`"],
        ["seed", str(coh["seed"])],
        ["joint samples / test tuples", f"{coh['num_samples']} / {coh['num_test']}"],
        ["processes", str(results.get("world_size", 1))],
    ])
    acc = results.get("classifiers", {}).get("test_accuracy", {})
    attributes = coh.get("measure") == "attributes"
    if attributes:
        lines += ["", "## Judges (the image classifier's accuracy bounds every image-side figure)", ""]
        lines += [results.get("classifiers", {}).get("note", ""), ""]
        lines += md_table(["attribute", "image classifier test accuracy"],
                        [[a, fmt(acc.get(a))] for a in [*coh["attributes"], "mean"]])
    else:
        lines += ["", "## Classifiers (their accuracy bounds every coherence figure)", ""]
        lines += md_table(["modality", *names], [["test accuracy", *[fmt(acc.get(m)) for m in names]]])
    joint, cross = coh["joint"], coh["cross"]
    lines += ["", "## Coherence", ""]
    if attributes:
        lines += ["A tuple is coherent when every attribute that both sides state agrees (and at least one "
                  "does); std. errors are binomial over tuples. For a cell source -> target, the generated "
                  "target is read and compared with what the source fixes (an image: its true attributes; a "
                  "caption: what it states).", ""]
    rows = [["joint (prior samples)", fmt(joint["coherence"]), fmt(joint["stderr"]), str(joint["n"])]]
    if "prior_ceiling" in coh:
        ceil = coh["prior_ceiling"]
        rows.append(["joint (aggregate-posterior ceiling)", fmt(ceil["coherence"]), fmt(ceil["stderr"]),
                     str(ceil["n"])])
    rows.append(["cross (mean over targets of mean over sources != target)", fmt(cross.get("coherence")),
                 fmt(cross.get("stderr")), str(cross["n"])])
    rows.append(["self (matrix diagonal: source = target)", fmt(cross["self_coherence"]), "",
                 str(cross["n"])])
    if attributes:
        rows += [[f"{cell} (cross)" if cell.split("->")[0] != cell.split("->")[1] else f"{cell} (self)",
                  fmt(e["coherence"]), fmt(e["stderr"]), str(e["n"])] for cell, e in cross["cells"].items()]
        real = coh["real_data"]
        rows.append(["real test tuples (the judges' ceiling)", fmt(real["coherence"]), fmt(real["stderr"]),
                     str(real["n"])])
    lines += md_table(["figure", "value", "std. error", "n"], rows)
    if attributes:
        lines += _attribute_table(coh)
    lines += ["", "### Cross-coherence matrix (rows: source, columns: target)", ""]
    lines += md_table(["source \\ target", *names],
                    [[src, *[fmt(v) for v in row]] for src, row in zip(names, cross["matrix"], strict=True)])
    lines += ["", "### Conditioning on k of M modalities (mean over subsets, then targets outside them)", ""]
    lines += md_table(["k", "coherence", "subsets"],
                    [[k, fmt(v["coherence"]), str(v["num_subsets"])] for k, v in coh["subsets"].items()])
    if coh.get("langevin_sweep"):
        lines += ["", "## Langevin sweep (joint coherence of prior samples)", ""]
        lines += md_table(["steps", "coherence", "std. error", "ms / sample"],
                        [[str(e["steps"]), fmt(e["coherence"]), fmt(e["stderr"]), fmt(e["ms_per_sample"])]
                         for e in coh["langevin_sweep"]])
    if results.get("elbo"):
        elbo = results["elbo"]
        lines += ["", f"## Test-set terms of the training objective (mean over {elbo['n']} test tuples)", ""]
        lines += md_table(["term", "value"], [[k, fmt(v)] for k, v in elbo["terms"].items()])
    if results.get("linear_probe"):
        probe = results["linear_probe"]
        lines += ["", "## Linear probe of the shared latent (posterior means)", ""]
        lines += md_table(["fit on", "reported on", "accuracy"],
                        [[f"{probe['n_fit']} {probe['fit_split']} tuples",
                          f"{probe['n_eval']} held-out {probe['eval_split']} tuples",
                          fmt(probe["accuracy"])]])
    from mmebm_dist.evaluate.beyond_coherence import report_lines

    lines += report_lines(results)
    from mmebm_dist.evaluate import latent_samplers

    lines += latent_samplers.report_lines(results)
    if images:
        lines += ["", "## Pictures", ""]
        for caption, name in images.items():
            lines.append(f"![{caption}]({name})")
            lines += _caption_lines(results.get("captions", {}), name)
    return "\n".join(lines) + "\n"


def _attribute_table(coh: dict) -> list[str]:
    """Accuracy per attribute (n compared) of the joint samples, every cell and the ceiling."""
    columns = {"joint": coh["joint"], **coh["cross"]["cells"]}
    if "prior_ceiling" in coh:
        columns["ceiling"] = coh["prior_ceiling"]
    columns["real tuples"] = coh["real_data"]
    lines = ["", "### Accuracy per attribute (tuples where both sides state it; std. error, n)", ""]
    rows = [[a, *[f"{fmt(e['attributes'][a]['accuracy'])} ({fmt(e['attributes'][a]['stderr'])}, "
                  f"{e['attributes'][a]['n']})" for e in columns.values()]] for a in coh["attributes"]]
    rows.append(["mean over attributes", *[f"{fmt(e['mean_attribute_accuracy'])} "
                                           f"({fmt(e['mean_attribute_stderr'])})" for e in columns.values()]])
    return lines + md_table(["attribute", *columns], rows)


def _caption_lines(captions: dict, picture: str) -> list[str]:
    """The decoded captions shown in ``picture`` (joint or cross grid) as a markdown table, if any."""
    if picture == JOINT_PNG and captions.get("joint"):
        texts = captions["joint"]
        names = list(texts)
        count = len(texts[names[0]])
        lines = ["", f"Captions of the first {count} joint samples (first band of the grid, left to right):",
                 ""]
        rows = [[str(i + 1), *[texts[n][i] for n in names]] for i in range(count)]
        return [*lines, *md_table(["#", *names], rows), ""]
    if picture == CROSS_PNG and captions.get("cross"):
        cross = captions["cross"]
        columns = [(f"input {n}", cross["source"][n]) for n in cross["source"]]
        columns += [(f"{n} from {src}", texts[n]) for src, texts in cross["generated"].items() for n in texts]
        count = len(columns[0][1])
        lines = ["", "Captions in the cross-generation grid (a row per test tuple, left to right in a cell):",
                 ""]
        rows = [[str(i + 1), *[t[i] for _, t in columns]] for i in range(count)]
        return [*lines, *md_table(["#", *[c for c, _ in columns]], rows), ""]
    return []


def write_report(out_dir: str | Path, results: dict, images: dict[str, str]) -> tuple[Path, Path]:
    """Write eval.json and report.md into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = write_eval_json(out_dir / EVAL_JSON, results)
    md_path = out_dir / REPORT_MD
    md_path.write_text(render_report(results, images))
    return json_path, md_path
