"""`mmebm results`: settings grouped by config hash, seed means with both standard errors, strict
results.json, results.md tables and picture links, skipped incomplete runs; synthetic runs, one real tiny."""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import pytest
from PIL import Image

from mmebm_dist.cli import main
from mmebm_dist.evaluate import results as res

# (prior kind, seed) -> (joint, joint se, cross, cross se, ceiling, ceiling se, sweep {steps: (coh, se)})
FIGURES = {
    ("laplace", 0): (0.21, 0.018, 0.62, 0.011, 0.55, 0.022, {}),
    ("laplace", 1): (0.25, 0.019, 0.58, 0.012, 0.57, 0.021, {}),
    ("ebm", 0): (0.41, 0.022, 0.60, 0.013, 0.56, 0.020, {0: (0.20, 0.018), 5: (0.41, 0.022)}),
    ("ebm", 1): (0.47, 0.023, 0.63, 0.010, 0.59, 0.024, {0: (0.24, 0.019), 5: (0.47, 0.023)}),
}
STEPS = 40  # logged every 10 steps
ARGV = "mmebm train --config configs/polymnist_ebm.yaml train.seed={seed}"


def config(data: Path, out_dir: Path, kind: str, seed: int, *, reference: str = "laplace",
           langevin_steps: int = 5) -> dict:
    """A config.json with the real layout (sections and the keys `mmebm results` reads)."""
    return {
        "data": {"path": str(data), "batch_size": 8, "num_workers": 0, "on_error": "raise",
                 "shuffle_buffer": 16},
        "eval": {"classifiers": "", "langevin_sweep": [0, 5], "num_samples": 100},
        "model": {"latent_dim": 4, "modalities": [{"name": "m0", "shape": [3, 28, 28]},
                                                  {"name": "m1", "shape": [3, 28, 28]}],
                  "prior": {"kind": kind, "reference": reference, "reference_scale": 1.0, "hidden": 16,
                            "langevin": {"backend": "auto", "step_size": 0.4, "steps": langevin_steps}}},
        "optim": {"lr": 0.001},
        "train": {"out_dir": str(out_dir), "seed": seed, "steps": STEPS, "log_every": 10},
    }


def write_run(root: Path, data: Path, kind: str, seed: int, figures: tuple, *, eval_name: str = "eval",
              commands: bool = True, **config_kw) -> Path:
    """A finished run dir: config.json, metrics.jsonl, commands.log, EVAL/eval.json and a tiny joint PNG."""
    joint, joint_se, cross, cross_se, ceil, ceil_se, sweep = figures
    label = f"ebm_{config_kw.get('reference', 'laplace')}" if kind == "ebm" else kind
    run_dir = root / f"{label}_s{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(config(data, run_dir, kind, seed, **config_kw), indent=2))
    records = []
    for i, step in enumerate(range(10, STEPS + 1, 10)):
        rec = {"step": step, "loss": 100.0 - step - seed, "elbo": -(100.0 - step), "kl_z": 1.0,
               "samples_per_s": 10.0 * (i + 1) + seed, "wall_time_s": 3.0 * step + seed, "rec/m0": 40.0}
        if kind == "ebm":
            rec["energy_gap"] = 0.01 * step
        records.append(rec)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if commands:
        (run_dir / "commands.log").write_text(
            f"2025-01-01T00:00:00Z\tworld_size=1\t{ARGV.format(seed=seed)}\n")
    out = run_dir / eval_name
    out.mkdir()
    ev = {
        "run": {"run_dir": str(run_dir), "step": STEPS, "prior": kind},
        "classifiers": {"test_accuracy": {"m0": 0.97, "m1": 0.96}},
        "coherence": {
            "modalities": ["m0", "m1"],
            "joint": {"coherence": joint, "stderr": joint_se, "n": 500,
                      "langevin_steps": 5 if kind == "ebm" else None},
            "cross": {"coherence": cross, "stderr": cross_se, "n": 400,
                      "matrix": [[0.9, cross + 0.01], [cross - 0.01, 0.9]], "self_coherence": 0.9},
            "prior_ceiling": {"coherence": ceil, "stderr": ceil_se, "n": 400},
            "langevin_sweep": [{"steps": k, "coherence": c, "stderr": s, "n": 500, "seconds": 0.1,
                                "ms_per_sample": 0.2} for k, (c, s) in sorted(sweep.items())],
        },
        "elbo": {"n": 400, "terms": {"elbo": -61.5 - seed}},
        "linear_probe": {"accuracy": 0.8},
    }
    (out / "eval.json").write_text(json.dumps(ev))
    Image.new("RGB", (24, 16), (40 * seed, 120, 200 if kind == "ebm" else 20)).save(out / "joint_samples.png")
    return run_dir


@pytest.fixture
def runs(tmp_path) -> Path:
    """2 settings (Laplace, EBM) x 2 seeds of synthetic finished runs, on a 'mnist' PolyMNIST data dir."""
    data = tmp_path / "polymnist"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"source": {"name": "mnist"}}))
    root = tmp_path / "runs"
    for (kind, seed), figures in FIGURES.items():
        write_run(root, data, kind, seed, figures, commands=seed == 0)
    return root


def aggregate(tmp_path: Path, run_args: list[str], *extra: str) -> tuple[dict, str, Path]:
    out = tmp_path / "docs"
    args = ["results", "--runs", *run_args, "--out-md", str(out / "results.md"),
            "--out-json", str(out / "results.json"), "--img-dir", str(out / "img" / "results"), *extra]
    assert main(args) == 0
    strict = json.loads((out / "results.json").read_text(), parse_constant=_reject)
    return strict, (out / "results.md").read_text(), out


def _reject(token: str):
    raise AssertionError(f"results.json is not strict JSON: it holds {token}")


def _setting(report: dict, prior: str) -> dict:
    (hit,) = [s for s in report["settings"] if s["prior"] == prior]
    return hit


def test_settings_group_seeds_by_config_hash(runs, tmp_path):
    report, _, _ = aggregate(tmp_path, [str(runs / "*")])
    hashes = {(r["prior"], r["seed"]): r["config_hash"] for r in report["runs"]}
    assert hashes[("laplace", 0)] == hashes[("laplace", 1)]
    assert hashes[("ebm/laplace", 0)] == hashes[("ebm/laplace", 1)]
    assert hashes[("laplace", 0)] != hashes[("ebm/laplace", 0)]
    assert all(re.fullmatch(r"[0-9a-f]{12}", h) for h in hashes.values())
    grouped = [(s["prior"], s["seeds"]) for s in report["settings"]]
    assert grouped == [("ebm/laplace", [0, 1]), ("laplace", [0, 1])]
    # the config file its runs started from (seed 1 has no commands.log), shown beside the hash
    assert [s["config_files"] for s in report["settings"]] == [["polymnist_ebm.yaml"]] * 2
    assert res.config_file([{"argv": "mmebm train --resume runs/x"},
                            {"argv": "mmebm train --config=a/b.yaml x=1"}]) == "b.yaml"
    assert res.config_file([{"argv": "mmebm train --resume runs/x"}]) is None
    assert {r["dataset"] for r in report["runs"]} == {"polymnist"}
    cfg = json.loads((runs / "ebm_laplace_s0" / "config.json").read_text())
    other = json.loads(json.dumps(cfg))
    other["train"]["seed"], other["train"]["out_dir"] = 7, "elsewhere"
    other["train"]["init_from"] = "runs/laplace_s7"  # the seed's source run of a post-hoc prior
    other["model"]["batched_decode"] = not other["model"].get("batched_decode", False)  # execution only
    other["model"]["channels_last"], other["train"]["threads"] = False, 3
    assert res.setting_hash(other) == res.setting_hash(cfg)
    other["model"]["prior"]["langevin"]["steps"] = 6
    assert res.setting_hash(other) != res.setting_hash(cfg)
    assert res.prior_label(cfg["model"]["prior"]) == "ebm/laplace"
    assert res.prior_label(cfg["model"]["prior"] | {"fit": "posthoc"}) == "ebm/laplace post-hoc"


def test_posthoc_runs_are_paired_with_the_run_they_were_fitted_to(runs, tmp_path):
    """Each post-hoc run minus its own source run (train.init_from), not minus the Laplace setting's mean."""
    data = tmp_path / "polymnist"
    posthoc = tmp_path / "posthoc"
    joints = {0: 0.50, 1: 0.60}
    for seed, joint in joints.items():
        figures = (joint, 0.02, FIGURES[("laplace", seed)][2], 0.011, 0.55, 0.02, {})
        run_dir = write_run(posthoc, data, "ebm", seed, figures)
        cfg = json.loads((run_dir / "config.json").read_text())
        cfg["model"]["prior"]["fit"] = "posthoc"
        cfg["train"]["init_from"] = str(runs / f"laplace_s{1 - seed}")  # crossed on purpose: pairs follow it
        (run_dir / "config.json").write_text(json.dumps(cfg))
    report, md, _ = aggregate(tmp_path, [str(runs / "*"), str(posthoc / "*")])
    (ds,) = report["datasets"]
    (paired,) = ds["minus_source_run"]
    assert paired["config_hash"] == _setting(report, "ebm/laplace post-hoc")["config_hash"]
    assert paired["base_config_hashes"] == [_setting(report, "laplace")["config_hash"]]
    assert sorted((p["run"], p["base"]) for p in paired["pairs"]) == [("ebm_laplace_s0", "laplace_s1"),
                                                                      ("ebm_laplace_s1", "laplace_s0")]
    diffs = [joints[0] - FIGURES[("laplace", 1)][0], joints[1] - FIGURES[("laplace", 0)][0]]
    assert sorted(paired["joint"]["per_pair"]) == pytest.approx(sorted(diffs))
    assert paired["joint"]["difference"] == pytest.approx(sum(diffs) / 2)
    assert paired["joint"]["stderr"] == pytest.approx(abs(diffs[0] - diffs[1]) / 2)
    assert paired["joint"]["stderr_kind"] == "across-pair"
    assert "**Minus the run it started from**" in md and f"{sum(diffs) / 2:+.4f}" in md
    # A main-pair comparison still prefers the jointly trained EBM.
    assert ds["main_ebm"] == _setting(report, "ebm/laplace")["config_hash"]
    # One pair: its two binomial SEs.
    report, _, _ = aggregate(tmp_path / "one", [str(runs / "*"), str(posthoc / "ebm_laplace_s0")])
    (single,) = report["datasets"][0]["minus_source_run"]
    assert single["joint"]["stderr_kind"] == "binomial"
    assert single["joint"]["stderr"] == pytest.approx(math.hypot(0.02, FIGURES[("laplace", 1)][1]))


def test_each_ebm_run_is_paired_with_its_own_reference_at_zero_langevin_steps(runs, tmp_path):
    """joint minus the sweep's 0-step entry, per run, for EBM settings only; one run: the two binomial SEs."""
    report, md, _ = aggregate(tmp_path, [str(runs / "*")])
    (gain,) = report["datasets"][0]["minus_own_reference"]
    assert gain["config_hash"] == _setting(report, "ebm/laplace")["config_hash"]
    diffs = [FIGURES[("ebm", s)][0] - FIGURES[("ebm", s)][6][0][0] for s in (0, 1)]
    assert gain["runs"] == ["ebm_laplace_s0", "ebm_laplace_s1"]
    assert gain["reference_joint"] == [FIGURES[("ebm", s)][6][0][0] for s in (0, 1)]
    assert gain["joint"]["per_pair"] == pytest.approx(diffs)
    assert gain["joint"]["difference"] == pytest.approx(sum(diffs) / 2)
    assert gain["joint"]["stderr"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(2))
    assert "**EBM prior − its Laplace reference on the same model**" in md and f"{sum(diffs) / 2:+.4f}" in md
    report, _, _ = aggregate(tmp_path / "one", [str(runs / "ebm_laplace_s1"), str(runs / "laplace_s0")])
    (single,) = report["datasets"][0]["minus_own_reference"]
    assert single["joint"]["stderr_kind"] == "binomial"
    assert single["joint"]["stderr"] == pytest.approx(math.hypot(FIGURES[("ebm", 1)][1],
                                                                 FIGURES[("ebm", 1)][6][0][1]))


def _expected(kind: str, index: int) -> dict:
    values = [FIGURES[(kind, s)][index] for s in (0, 1)]
    ses = [FIGURES[(kind, s)][index + 1] for s in (0, 1)]
    return {"mean": (values[0] + values[1]) / 2, "binomial_stderr": math.sqrt(ses[0] ** 2 + ses[1] ** 2) / 2,
            "seed_stderr": abs(values[0] - values[1]) / 2, "k": 2}  # sample std of two = |a - b| / sqrt(2)


def test_seed_means_and_both_standard_errors(runs, tmp_path):
    report, _, _ = aggregate(tmp_path, [str(runs / "*")])
    for kind, prior in (("laplace", "laplace"), ("ebm", "ebm/laplace")):
        s = _setting(report, prior)
        for name, index in (("joint", 0), ("cross", 2), ("ceiling", 4)):
            assert s[name] == pytest.approx(_expected(kind, index), rel=1e-12), (prior, name)
        # per run: 4 records at steps 10..40; the last half is steps 30, 40 -> samples_per_s 30+seed, 40+seed
        assert s["samples_per_s_mean"] == pytest.approx(35.5)
        assert s["wall_seconds_mean"] == pytest.approx(3.0 * STEPS + 0.5)
        assert s["steps"] == [STEPS, STEPS]
    sweep = _setting(report, "ebm/laplace")["langevin_sweep"]
    assert [e["steps"] for e in sweep] == [0, 5]
    zero = [FIGURES[("ebm", s)][6][0] for s in (0, 1)]
    assert sweep[0]["mean"] == pytest.approx((zero[0][0] + zero[1][0]) / 2, rel=1e-12)
    assert sweep[0]["seed_stderr"] == pytest.approx(statistics.stdev([zero[0][0], zero[1][0]]) / math.sqrt(2))
    assert sweep[0]["binomial_stderr"] == pytest.approx(math.hypot(zero[0][1], zero[1][1]) / 2)
    (ds,) = report["datasets"]
    diff = ds["ebm_minus_laplace"]["joint"]
    ebm, lap = _expected("ebm", 0), _expected("laplace", 0)
    assert diff["difference"] == pytest.approx(ebm["mean"] - lap["mean"], rel=1e-12)
    assert diff["stderr"] == pytest.approx(math.hypot(ebm["seed_stderr"], lap["seed_stderr"]), rel=1e-12)
    assert diff["stderr_kind"] == "across-seed"


def test_results_json_layout_and_strictness(runs, tmp_path):
    data = tmp_path / "polymnist"
    # a one-seed ablation: its across-seed SEs are nan and must be written as null
    write_run(runs, data, "ebm", 0, FIGURES[("ebm", 0)], reference="gaussian")
    report, md, _ = aggregate(tmp_path, [str(runs / "*")])
    assert report["generated_by"] == "mmebm results"
    assert report["paper"] == {"polymnist": {"joint_coherence": 0.746, "cross_coherence": 0.853}}
    assert report["command"].startswith("mmebm results --runs ")
    assert len(report["runs"]) == 5
    for run in report["runs"]:
        assert {"dataset", "prior", "seed", "joint_coherence", "cross_coherence", "steps", "wall_seconds",
                "samples_per_s", "config_hash", "commands", "joint_stderr", "joint_n", "cross_stderr",
                "cross_n", "ceiling_coherence", "ceiling_stderr", "langevin_sweep",
                "train_elbo"} <= run.keys()
    by_key = {(r["prior"], r["seed"]): r for r in report["runs"]}
    assert by_key[("ebm/laplace", 0)]["joint_coherence"] == FIGURES[("ebm", 0)][0]
    assert by_key[("ebm/laplace", 0)]["commands"][0]["argv"] == ARGV.format(seed=0)
    assert by_key[("ebm/laplace", 1)]["commands"] == []
    assert by_key[("laplace", 1)]["wall_seconds"] == 3.0 * STEPS + 1
    assert by_key[("laplace", 1)]["train_elbo"] == -(100.0 - STEPS)
    gaussian = _setting(report, "ebm/gaussian")
    assert gaussian["joint"]["seed_stderr"] is None and gaussian["joint"]["k"] == 1
    (ds,) = report["datasets"]
    assert ds["main_ebm"] == _setting(report, "ebm/laplace")["config_hash"]
    (ablation,) = ds["ablations"]
    assert ablation["ablation"] and list(ablation["changes"]) == ["model.prior.reference"]
    assert "model.prior.reference: \"gaussian\" (main \"laplace\")" in md
    # every other step-matched EBM setting gets its own EBM - Laplace line against the main Laplace setting
    (other,) = ds["other_ebm_minus_laplace"]
    lap = _setting(report, "laplace")
    assert (other["ebm"], other["laplace"]) == (gaussian["config_hash"], lap["config_hash"])
    assert other["joint"]["difference"] == pytest.approx(FIGURES[("ebm", 0)][0] - lap["joint"]["mean"])
    assert other["joint"]["stderr_kind"] == "binomial"  # one gaussian seed
    assert (f"**EBM − Laplace** (`{gaussian['config_hash']}` minus `{lap['config_hash']}`, another EBM "
            "setting against the main Laplace one") in md


def test_markdown_tables_and_picture_links(runs, tmp_path):
    report, md, out = aggregate(tmp_path, [str(runs / "*")])
    ebm = _setting(report, "ebm/laplace")
    start = f"| ebm/laplace | `{ebm['config_hash']}` (polymnist_ebm.yaml) |"
    row = next(line for line in md.splitlines() if line.startswith(start))
    assert res.fmt_figure(ebm["joint"]) in row and res.fmt_figure(ebm["cross"]) in row
    assert "| 0, 1 | 40 |" in row
    assert "paper's reported numbers" in md and "0.746" in md and "0.853" in md
    assert "Written by `mmebm results`" in md and report["command"] in md
    diff = report["datasets"][0]["ebm_minus_laplace"]["joint"]
    assert f"joint {diff['difference']:+.4f} ± {res.fmt(diff['stderr'])} (across-seed SE)" in md
    run_row = next(line for line in md.splitlines() if line.startswith("| ebm_laplace_s0 |"))
    assert f"`{ARGV.format(seed=0)}` (world_size=1)" in run_row
    assert next(line for line in md.splitlines() if line.startswith("| ebm_laplace_s1 |")).endswith("| n/a |")
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 3
    for link in links:
        assert not os.path.isabs(link)
        with Image.open(out / link) as img:
            img.verify()
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave no temp files


def test_cross_coherence_both_ways_per_run(runs, tmp_path):
    """Each run's cross matrix becomes "source -> target" figures in results.json and, for two or three
    modalities, a table in results.md (birds: image -> caption and caption -> image)."""
    report, md, _ = aggregate(tmp_path, [str(runs / "*")])
    run = next(r for r in report["runs"] if r["name"] == "ebm_laplace_s0")
    cross = FIGURES[("ebm", 0)][2]
    assert run["cross_directions"] == {"m0 -> m1": pytest.approx(cross + 0.01),
                                       "m1 -> m0": pytest.approx(cross - 0.01)}
    assert "## Cross coherence by direction" in md
    assert "| run | prior | seed | m0 -> m1 | m1 -> m0 |" in md
    row = next(line for line in md.splitlines() if line.startswith("| ebm_laplace_s0 | ebm/laplace | 0 |"))
    assert row.endswith(f"| {res.fmt(cross + 0.01)} | {res.fmt(cross - 0.01)} |")
    assert res.cross_directions({"modalities": ["a"], "cross": {}}) == {}


def test_output_is_deterministic(runs, tmp_path):
    _, md1, out = aggregate(tmp_path, [str(runs / "*")])
    json1 = (out / "results.json").read_text()
    _, md2, out = aggregate(tmp_path, sorted(str(p) for p in runs.iterdir())[::-1])
    strip = lambda text: re.sub(r"mmebm results --runs [^\n]*", "", text)
    assert strip(md1) == strip(md2)
    assert strip(json1) == strip((out / "results.json").read_text())


def test_incomplete_run_is_skipped_with_warning(runs, tmp_path, capsys):
    data = tmp_path / "polymnist"
    unfinished = write_run(runs, data, "ebm", 5, FIGURES[("ebm", 0)], reference="gaussian")
    (unfinished / "eval" / "eval.json").unlink()
    (runs / "ebm_s0.log").write_text("a log file beside the runs\n")
    report, md, _ = aggregate(tmp_path, [str(runs / "*")])
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if "skipping" in x]
    assert str(unfinished) in line and "eval.json" in line
    assert all(r["name"] != unfinished.name for r in report["runs"]) and unfinished.name not in md


def test_eval_name_selects_the_eval_dir(tmp_path):
    data = tmp_path / "polymnist"
    data.mkdir()
    (data / "manifest.json").write_text(json.dumps({"source": {"name": "fashion"}}))
    run_dir = write_run(tmp_path / "runs", data, "ebm", 0, FIGURES[("ebm", 1)], eval_name="eval_5000")
    with pytest.raises(res.ResultsError, match="complete eval/eval.json"):
        aggregate(tmp_path, [str(run_dir)])
    report, md, _ = aggregate(tmp_path, [str(run_dir)], "--eval-name", "eval_5000")
    assert report["runs"][0]["joint_coherence"] == FIGURES[("ebm", 1)][0]
    assert report["runs"][0]["dataset"] == "polyfashion" and "## Fashion-MNIST polymodal" in md
    assert report["datasets"][0]["ebm_minus_laplace"] is None and "EBM − Laplace**: n/a" in md


def test_runs_matching_nothing_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "*")
    with pytest.raises(res.ResultsError, match=re.escape(missing)):
        main(["results", "--runs", missing, "--out-md", str(tmp_path / "r.md"),
              "--out-json", str(tmp_path / "r.json"), "--img-dir", str(tmp_path / "img")])
    assert not (tmp_path / "r.md").exists()


def test_real_tiny_runs(tmp_path):
    """`mmebm train` (tiny EBM and Laplace runs) then `mmebm eval`, then `mmebm results` on them."""
    from train_helpers import build_tiny_polymnist, run_train, tiny_config

    start = time.perf_counter()
    data = build_tiny_polymnist(tmp_path, modalities=2, train=32, test=16)
    cfg = tiny_config(tmp_path / "tiny.yaml", data, train={"steps": 4, "log_every": 2, "checkpoint_every": 4})
    for kind in ("ebm", "laplace"):
        run_train(["--config", str(cfg), f"train.out_dir={tmp_path / 'runs' / kind}",
                   f"model.prior.kind={kind}"])
    assert main(["classifiers", "train", "--data", str(data), "--epochs", "1", "--batch-size", "16",
                 "--shuffle-buffer", "0", "--num-workers", "0", "--device", "cpu"]) == 0
    for kind in ("ebm", "laplace"):
        assert main(["eval", "--run", str(tmp_path / "runs" / kind), "--num-samples", "16",
                     "--batch-size", "8", "--langevin-sweep", "0", "2", "--probe-fit", "0", "--no-elbo",
                     "--device", "cpu"]) == 0
    report, md, _ = aggregate(tmp_path, [str(tmp_path / "runs" / "*")])
    print(f"real tiny runs: {time.perf_counter() - start:.1f} s")
    by_prior = {r["prior"]: r for r in report["runs"]}
    assert set(by_prior) == {"ebm/laplace", "laplace"}
    for run in by_prior.values():
        ev = json.loads((Path(run["eval_dir"]) / "eval.json").read_text())
        assert run["joint_coherence"] == ev["coherence"]["joint"]["coherence"]
        assert run["cross_coherence"] == ev["coherence"]["cross"]["coherence"]
        assert run["steps"] == 4 and run["eval_step"] == 4
        logged = (tmp_path / "runs" / run["name"] / "commands.log").exists()
        assert (f"train.out_dir={tmp_path / 'runs' / run['name']}" in run["commands"][0]["argv"]) if logged \
            else run["commands"] == []
        assert run["wall_seconds"] > 0
    assert [e["steps"] for e in by_prior["ebm/laplace"]["langevin_sweep"]] == [0, 2]
    assert (by_prior["ebm/laplace"]["model_steps"], by_prior["ebm/laplace"]["energy_steps"]) == (4, 4)
    assert (by_prior["laplace"]["model_steps"], by_prior["laplace"]["energy_steps"]) == (4, 0)
    assert by_prior["laplace"]["langevin_sweep"] == []
    assert report["datasets"][0]["ebm_minus_laplace"]["joint"]["stderr_kind"] == "binomial"
    assert len(re.findall(r"!\[", md)) == 3


def test_notes_are_included_marked_as_hand_written(runs, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("Budget: 1500 steps per run.\n")
    report, md, _ = aggregate(tmp_path, [str(runs / "*")], "--notes", str(notes))
    assert f"## Notes (hand-written, from `{notes}`" in md and "Budget: 1500 steps per run." in md
    assert report["command"].endswith(f"--notes {notes}")
    with pytest.raises(res.ResultsError, match="--notes .*missing.md: no such file"):
        aggregate(tmp_path, [str(runs / "*")], "--notes", str(tmp_path / "missing.md"))


def _edit(run_dir: Path, name: str, edit) -> None:
    """Rewrite the JSON file ``name`` of a run (config.json, eval/eval.json) through ``edit(dict)``."""
    path = run_dir / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_model_and_energy_steps_per_run(runs, tmp_path):
    """Optimizer steps per group up to the evaluated step: stages, post-hoc fits, fixed priors, and the
    train.init_from chain added when its runs are loaded (named in the tables when not)."""
    data, more = tmp_path / "polymnist", tmp_path / "more"
    staged = write_run(more, data, "ebm", 7, FIGURES[("ebm", 0)])
    _edit(staged, "config.json", lambda c: c["train"].update(schedule=[
        {"stage": "reference", "steps": 20}, {"stage": "energy", "steps": 10, "prior_lr": 0.01},
        {"stage": "joint", "steps": 10}]))
    _edit(staged, "eval/eval.json", lambda e: e["run"].update(step=35))  # an earlier checkpoint evaluated
    posthoc = write_run(more, data, "ebm", 8, FIGURES[("ebm", 1)])
    checkpoint = runs / "laplace_s0" / "checkpoints" / "step-0000020"  # fitted to step 20 of laplace_s0
    checkpoint.mkdir(parents=True)
    (checkpoint / "model.pt").write_bytes(b"")
    _edit(posthoc, "config.json", lambda c: (c["model"]["prior"].update(fit="posthoc"),
                                             c["train"].update(init_from=str(checkpoint))))
    tuned = write_run(more, data, "ebm", 9, FIGURES[("ebm", 1)])  # joint steps continuing the post-hoc run
    _edit(tuned, "config.json", lambda c: c["train"].update(init_from=str(posthoc)))
    orphan = write_run(more, data, "laplace", 9, FIGURES[("laplace", 1)])
    _edit(orphan, "config.json", lambda c: c["train"].update(init_from=str(tmp_path / "elsewhere")))

    report, md, _ = aggregate(tmp_path, [str(runs / "*"), str(more / "*")])
    steps = {(r["prior"], r["seed"]): (r["own_model_steps"], r["own_energy_steps"], r["model_steps"],
                                       r["energy_steps"], r["source_missing"]) for r in report["runs"]}
    assert steps[("laplace", 0)] == (STEPS, 0, STEPS, 0, None)
    assert steps[("ebm/laplace", 0)] == (STEPS, STEPS, STEPS, STEPS, None)
    # reference 1-20 and joint 31-35 train the model, energy 21-30 and joint 31-35 the energy
    assert steps[("ebm/laplace", 7)] == (25, 15, 25, 15, None)
    assert steps[("ebm/laplace post-hoc", 8)] == (0, STEPS, 20, STEPS, None)
    assert steps[("ebm/laplace", 9)] == (STEPS, STEPS, STEPS + 20, 2 * STEPS, None)
    assert steps[("laplace", 9)] == (STEPS, 0, STEPS, 0, str(tmp_path / "elsewhere"))
    laplace = _setting(report, "laplace")  # init_from is no part of the setting: the orphan is a seed of it
    assert (laplace["model_steps"], laplace["source_missing"]) == ([STEPS] * 3, [str(tmp_path / "elsewhere")])
    row = next(line for line in md.splitlines() if line.startswith(f"| laplace | `{laplace['config_hash']}`"))
    assert "| 40 / 0 (+ steps of" in row
    assert _setting(report, "ebm/laplace post-hoc")["energy_steps"] == [STEPS]
    # EBM - Laplace lines beyond the main pair: the staged (25 model steps) and post-hoc (20) settings, not
    # the main EBM setting, whose fine-tuned seed took 60 model steps against the Laplace runs' 40
    others = {o["ebm"] for o in report["datasets"][0]["other_ebm_minus_laplace"]}
    assert others == {_setting(report, "ebm/laplace post-hoc")["config_hash"],
                      next(r["config_hash"] for r in report["runs"] if r["seed"] == 7)}
    run_row = next(line for line in md.splitlines() if line.startswith("| ebm_laplace_s8 |"))
    assert "| 20 / 40 |" in run_row
    run_row = next(line for line in md.splitlines() if line.startswith("| laplace_s9 |"))
    assert f"40 / 0 (+ steps of `{tmp_path / 'elsewhere'}`: not loaded)" in run_row
    # Without its source the post-hoc run counts only its own steps, and says so.
    report, md, _ = aggregate(tmp_path / "alone", [str(posthoc)])
    assert (report["runs"][0]["model_steps"], report["runs"][0]["source_missing"]) == (0, str(checkpoint))
    assert "not loaded" in md


def test_latent_samplers_per_setting_beside_every_prior(runs, tmp_path):
    """The post-hoc samplers' table: every setting of the dataset (the EBM's joint among them) with its
    optimizer steps; each sampler's joint as a mean over the seeds that measured it; steps also in the
    ablation table and the EBM - Laplace line."""
    def add(run: str, samplers: dict) -> None:
        entries = {name: {"joint": j, "stderr": se, "n": 500, "fit_tuples": 1000} for name, (j, se) in
                   samplers.items()}
        _edit(runs / run, "eval/eval.json", lambda e: e.update(latent_samplers=entries))

    add("laplace_s0", {"gmm_10": (0.30, 0.02), "flow_maf": (0.34, 0.021), "gmm_2": (0.26, 0.02)})
    add("laplace_s1", {"gmm_10": (0.36, 0.021), "flow_maf": (0.40, 0.022)})
    write_run(runs, tmp_path / "polymnist", "ebm", 0, FIGURES[("ebm", 0)], reference="gaussian")  # ablation
    report, md, _ = aggregate(tmp_path, [str(runs / "*")])
    laplace, ebm = _setting(report, "laplace"), _setting(report, "ebm/laplace")
    assert set(laplace["latent_samplers"]) == {"gmm_2", "gmm_10", "flow_maf"}  # results.json sorts keys
    assert ebm["latent_samplers"] == {}
    flow = laplace["latent_samplers"]["flow_maf"]
    assert flow["k"] == 2 and flow["mean"] == pytest.approx(0.37)
    assert flow["binomial_stderr"] == pytest.approx(math.hypot(0.021, 0.022) / 2)
    assert flow["seed_stderr"] == pytest.approx(statistics.stdev([0.34, 0.40]) / math.sqrt(2))
    assert laplace["latent_samplers"]["gmm_2"]["k"] == 1
    section = md[md.index("## Post-hoc latent samplers"):]
    header = next(line for line in section.splitlines() if line.startswith("| dataset |"))
    assert header.endswith("| prior joint | gmm_2 | gmm_10 | flow_maf |")
    rows = {line.split(" | ")[1]: line for line in section.splitlines() if line.startswith("| polymnist |")}
    assert set(rows) == {"laplace", "ebm/laplace", "ebm/gaussian"}
    assert f"| 40 / 0 | {res.fmt_figure(laplace['joint'])} |" in rows["laplace"]
    assert rows["laplace"].endswith(f"| {res.fmt_figure(laplace['latent_samplers']['gmm_2'])} (k=1) | "
                                    f"{res.fmt_figure(laplace['latent_samplers']['gmm_10'])} | "
                                    f"{res.fmt_figure(flow)} |")
    assert f"| 40 / 40 | {res.fmt_figure(ebm['joint'])} | n/a | n/a | n/a |" in rows["ebm/laplace"]
    ablation = next(line for line in md.splitlines() if line.startswith("| polymnist | ebm/gaussian | `"))
    assert "| 40 / 40 |" in ablation
    assert "model / energy steps: EBM 40 / 40; Laplace 40 / 0)" in md
    # Without samplers in any eval there is no table.
    _, md, _ = aggregate(tmp_path / "none", [str(runs / "ebm_laplace_s0")])
    assert "## Post-hoc latent samplers" not in md
