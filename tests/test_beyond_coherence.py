"""End to end on tiny data: `mmebm eval` with the figures beyond coherence (Frechet distance, test
log-likelihood with the EBM's log Z, posterior refinement) lands in eval.json, report.md and results.md."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from train_helpers import trained_tiny_run

from mmebm_dist.cli import main
from mmebm_dist.evaluate.report import fmt

EVAL_ARGS = ["--num-samples", "16", "--batch-size", "8", "--langevin-sweep", "--probe-fit", "0", "--no-elbo",
             "--device", "cpu", "--seed", "2", "--likelihood-particles", "16", "--likelihood-tuples", "12",
             "--log-z-samples", "2000", "--refine-steps", "0", "2", "--refine-step-size", "0.01"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(run dir, eval.json dict, report.md text) of an 8-step tiny EBM run evaluated with every flag."""
    _, run_dir, _ = trained_tiny_run(tmp_path_factory.mktemp("beyond"))
    assert main(["eval", "--run", str(run_dir), *EVAL_ARGS]) == 0
    out = run_dir / "eval"
    return run_dir, json.loads((out / "eval.json").read_text()), (out / "report.md").read_text()


def test_eval_json_holds_every_figure(evaluated):
    _, res, _ = evaluated
    fd = res["frechet"]
    assert len(fd["judge"]["sha256"]) == 64 and fd["n_test"] == 16
    assert fd["joint"]["n"] == 16 and fd["cross"]["n"] == 16
    assert all(fd[part][m] >= 0 for part in ("joint", "cross", "test_halves") for m in ("m0", "m1"))
    ll = res["likelihood"]
    assert ll["particles"] == 16 and ll["n"] == 12 and set(ll["unimodal"]) == {"m0", "m1"}
    assert ll["log_z"]["method"] in ("mc", "ais") and ll["log_z"]["n"] >= 1000
    assert math.isfinite(ll["joint"]["mean"]) and ll["joint"]["stderr_total"] >= ll["joint"]["stderr"]
    refined = res["refinement"]
    assert [e["steps"] for e in refined] == [0, 2]
    assert refined[0]["cross"] == res["coherence"]["cross"]["coherence"]  # K = 0 is plain generation
    assert refined[0]["frechet_cross"]["mean"] == pytest.approx(fd["cross"]["mean"], rel=1e-9)


def test_report_and_results_show_them(evaluated, tmp_path):
    run_dir, res, md = evaluated
    assert fmt(res["frechet"]["joint"]["mean"], 3) in md and res["frechet"]["judge"]["sha256"][:16] in md
    assert fmt(res["likelihood"]["joint"]["mean"], 2) in md
    assert "## Posterior refinement" in md
    out_md = tmp_path / "results.md"
    assert main(["results", "--runs", str(run_dir), "--out-md", str(out_md), "--out-json",
                 str(tmp_path / "results.json"), "--img-dir", str(tmp_path / "img")]) == 0
    text = out_md.read_text()
    assert "## Beyond coherence" in text and fmt(res["frechet"]["cross"]["mean"], 3) in text
    assert f"K=2: {fmt(res['refinement'][1]['cross'])}" in text
    run = json.loads((tmp_path / "results.json").read_text())["runs"][0]
    assert run["beyond"]["log_px"] == pytest.approx(res["likelihood"]["joint"]["mean"])


def test_results_read_the_likelihood_from_a_separate_eval_with_its_paired_priors(evaluated, tmp_path):
    """--likelihood-eval NAME: an eval without log p(X) (the 5,000-sample coherence eval) takes it from the
    run's NAME/eval.json (the smaller likelihood eval), with each reference density's paired difference."""
    run_dir, res, _ = evaluated
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    main_eval = {k: v for k, v in res.items() if k != "likelihood"}
    (run / "coherence_only").mkdir()
    (run / "coherence_only" / "eval.json").write_text(json.dumps(main_eval))
    figures = {}
    for extra in ([], ["--likelihood-eval", "eval"]):
        out = tmp_path / f"r{len(extra)}"
        assert main(["results", "--runs", str(run), "--eval-name", "coherence_only", *extra, "--out-md",
                     str(out / "r.md"), "--out-json", str(out / "r.json"), "--img-dir", str(out / "i")]) == 0
        figures[bool(extra)] = json.loads((out / "r.json").read_text())["runs"][0]["beyond"]
    assert figures[False]["log_px"] is None  # nan in results.json is null
    got = figures[True]
    assert got["log_px"] == pytest.approx(res["likelihood"]["joint"]["mean"])
    (name, entry), = res["likelihood"]["priors"].items()
    assert got["log_px_priors"][name]["minus_prior"] == pytest.approx(entry["minus_prior"]["mean"])
    assert got["log_px_priors"][name]["minus_prior"] == pytest.approx(entry["mean"] - got["log_px"])
