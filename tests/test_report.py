"""Report files: eval.json is strict JSON, report.md shows the same numbers, PNGs are valid images."""

from __future__ import annotations

import json

import torch
from PIL import Image

from mmebm_dist.evaluate import report
from mmebm_dist.evaluate.report import fmt

NAMES = ["m0", "m1", "m2"]


def results() -> dict:
    """A results dict shaped like `mmebm eval`'s, with distinct values so a swapped cell would show."""
    matrix = [[0.91, 0.52, 0.43], [0.61, 0.87, 0.34], [0.25, 0.16, 0.77]]
    coherence = {
        "modalities": NAMES, "num_samples": 200, "num_test": 150, "seed": 3,
        "joint": {"coherence": 0.3125, "stderr": 0.0328, "n": 200, "langevin_steps": 30, "seconds": 1.5,
                  "ms_per_sample": 7.5},
        "langevin_sweep": [{"steps": 0, "coherence": 0.105, "stderr": 0.0217, "n": 200, "seconds": 0.2,
                            "ms_per_sample": 1.0},
                           {"steps": 30, "coherence": 0.3125, "stderr": 0.0328, "n": 200, "seconds": 1.5,
                            "ms_per_sample": 7.5}],
        "cross": {"matrix": matrix, "n": 150, "self_coherence": 0.85, "coherence": 0.385,
                  "stderr": 0.0211},
        "subsets": {"1": {"coherence": 0.385, "num_subsets": 3},
                    "2": {"coherence": 0.4567, "num_subsets": 3}},
        "prior_ceiling": {"coherence": 0.6789, "stderr": 0.0381, "n": 150},
    }
    return {
        "run": {"run_dir": "runs/x", "step": 1234, "prior": "ebm", "manifest_hash": "abc123"},
        "seed": 3, "world_size": 1,
        "classifiers": {"test_accuracy": {"m0": 0.981, "m1": 0.9725, "m2": float("nan")}},
        "coherence": coherence,
        "elbo": {"n": 150, "terms": {"elbo": -812.3456, "rec/m0": 300.125, "kl_z": 12.5}},
        "linear_probe": {"accuracy": 0.8533, "n_fit": 200, "fit_split": "train", "n_eval": 150,
                         "eval_split": "test"},
    }


def _row(md: str, first_cell: str) -> str:
    hits = [line for line in md.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(hits) == 1, (first_cell, hits)
    return hits[0]


def test_eval_json_and_report_md_agree(tmp_path):
    res = results()
    json_path, md_path = report.write_report(tmp_path, res, {"joint samples": report.JOINT_PNG})
    loaded = json.loads(json_path.read_text())  # strict JSON: nan became null
    assert loaded["classifiers"]["test_accuracy"]["m2"] is None
    assert loaded["coherence"]["cross"]["matrix"] == res["coherence"]["cross"]["matrix"]
    md = md_path.read_text()
    coh = loaded["coherence"]
    assert fmt(coh["joint"]["coherence"]) in _row(md, "joint (prior samples)")
    assert fmt(coh["joint"]["stderr"]) in _row(md, "joint (prior samples)")
    assert fmt(coh["prior_ceiling"]["coherence"]) in _row(md, "joint (aggregate-posterior ceiling)")
    cross_row = _row(md, "cross (mean over targets of mean over sources != target)")
    assert fmt(coh["cross"]["coherence"]) in cross_row and fmt(coh["cross"]["stderr"]) in cross_row
    for src, values in zip(NAMES, coh["cross"]["matrix"], strict=True):
        assert _row(md, src) == "| " + " | ".join([src, *[fmt(v) for v in values]]) + " |"
    for k, entry in coh["subsets"].items():
        assert _row(md, k).split(" | ")[1] == fmt(entry["coherence"])
    for entry in coh["langevin_sweep"]:
        assert _row(md, str(entry["steps"])) == (f"| {entry['steps']} | {fmt(entry['coherence'])} | "
                                                 f"{fmt(entry['stderr'])} | {fmt(entry['ms_per_sample'])} |")
    for term, value in loaded["elbo"]["terms"].items():
        assert _row(md, term) == f"| {term} | {fmt(value)} |"
    assert fmt(loaded["linear_probe"]["accuracy"]) in md
    assert _row(md, "test accuracy") == "| test accuracy | 0.9810 | 0.9725 | n/a |"
    assert "| checkpoint step | 1234 |" in md and "abc123" in md
    assert f"]({report.JOINT_PNG})" in md


def test_fmt_and_json_safety():
    assert fmt(0.123456) == "0.1235" and fmt(float("nan")) == "n/a" and fmt(None) == "n/a"
    assert report.json_safe({"a": (1.0, float("inf"))}) == {"a": [1.0, None]}


def _valid_png(path) -> tuple[int, int]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size


def test_pictures_are_valid_pngs(tmp_path):
    gen = torch.Generator().manual_seed(0)
    samples = {m: torch.rand(20, 3, 28, 28, generator=gen) for m in NAMES}
    samples["m2"] = torch.rand(20, 1, 28, 28, generator=gen)  # grey modality is drawn in RGB too
    w, h = _valid_png(report.save_joint_grid(tmp_path / "joint.png", samples, per_row=8))
    assert w > 8 * 28 and h > 3 * 3 * 28 / 2
    sources = {m: samples[m][:4] for m in NAMES}
    generated = {s: {t: samples[t][4:8] for t in NAMES} for s in NAMES}
    w, h = _valid_png(report.save_cross_grid(tmp_path / "cross.png", sources, generated))
    assert w > 4 * 4 * 28 / 2
    _valid_png(report.save_heatmap(tmp_path / "heat.png", results()["coherence"]["cross"]["matrix"], NAMES))
    _valid_png(report.save_sweep_plot(tmp_path / "sweep.png", results()["coherence"]["langevin_sweep"], 0.6))


def _attribute_results() -> dict:
    """An attribute-judged results dict (the birds) with distinct values per figure."""
    attrs = ["size", "beak_colour"]

    def entry(rate: float, n: int, accs: tuple[float, float]) -> dict:
        return {"coherence": rate, "stderr": round(rate / 10, 4), "n": n,
                "attributes": {a: {"accuracy": acc, "stderr": 0.01 + k / 100, "n": n - k}
                               for k, (a, acc) in enumerate(zip(attrs, accs, strict=True))},
                "mean_attribute_accuracy": sum(accs) / 2, "mean_attribute_stderr": 0.0123}

    cells = {"image->image": entry(0.41, 30, (0.9, 0.5)), "image->caption": entry(0.27, 30, (0.8, 0.25)),
             "caption->image": entry(0.33, 30, (0.7, 0.35)), "caption->caption": entry(0.88, 30, (1.0, 0.75))}
    res = results()
    res["classifiers"] = {"test_accuracy": {"size": 0.96, "beak_colour": 0.44, "mean": 0.7},
                          "note": "captions are read exactly"}
    res["coherence"] = {
        "measure": "attributes", "attributes": attrs, "modalities": ["image", "caption"], "num_samples": 40,
        "num_test": 30, "seed": 1, "joint": {**entry(0.1875, 40, (0.6, 0.15)), "langevin_steps": 60},
        "langevin_sweep": [], "prior_ceiling": entry(0.55, 30, (0.85, 0.45)),
        "real_data": entry(0.71, 30, (0.95, 0.65)),
        "cross": {"matrix": [[0.41, 0.27], [0.33, 0.88]], "n": 30, "self_coherence": 0.645, "coherence": 0.3,
                  "stderr": 0.0456, "cells": cells},
        "subsets": {"1": {"coherence": 0.3, "num_subsets": 2}},
    }
    res["captions"] = {"joint": {"caption": ["a red bird.", "a small bird with a blue crown."]},
                       "cross": {"source": {"caption": ["a grey bird."]},
                                 "generated": {"image": {"caption": ["a gray bird."]},
                                               "caption": {"caption": ["a black bird."]}}}}
    return res


def test_attribute_report_shows_every_cell_attribute_and_caption(tmp_path):
    res = _attribute_results()
    images = {"joint samples": report.JOINT_PNG, "cross": report.CROSS_PNG}
    _, md_path = report.write_report(tmp_path, res, images)
    md = md_path.read_text()
    coh = res["coherence"]
    for cell, e in coh["cross"]["cells"].items():
        kind = "self" if cell in ("image->image", "caption->caption") else "cross"
        expected = f"| {cell} ({kind}) | {fmt(e['coherence'])} | {fmt(e['stderr'])} | 30 |"
        assert _row(md, f"{cell} ({kind})") == expected
    assert fmt(coh["real_data"]["coherence"]) in _row(md, "real test tuples (the judges' ceiling)")
    classifier, accuracy = [line for line in md.splitlines() if line.startswith("| beak_colour |")]
    assert classifier == "| beak_colour | 0.4400 |"  # the classifier's test accuracy, then the figures'
    assert accuracy.split(" | ")[1:4] == ["0.1500 (0.0200, 39)", "0.5000 (0.0200, 29)", "0.2500 (0.0200, 29)"]
    assert "| 1 | a red bird. |" in md and "| 2 | a small bird with a blue crown. |" in md
    assert "| 1 | a grey bird. | a gray bird. | a black bird. |" in md
    assert md.index("a red bird.") > md.index(f"]({report.JOINT_PNG})")  # captions under their grid
    assert md.index("a grey bird.") > md.index(f"]({report.CROSS_PNG})")
