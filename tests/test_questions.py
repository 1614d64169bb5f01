"""mmebm questions: tables of the paper's open questions computed from run directories' files."""

from __future__ import annotations

import json

from mmebm_dist.cli import main
from mmebm_dist.config import load_config, save_config
from tests.train_helpers import tiny_config


def _entry(c: float, se: float = 0.01, **extra) -> dict:
    return {"coherence": c, "stderr": se, "n": 1000, **extra}


def _run(root, name, data, overrides, evals):
    run = root / name
    run.mkdir()
    save_config(load_config(tiny_config(root / f"{name}.yaml", data), overrides), run / "config.json")
    for eval_name, ev in evals.items():
        (run / eval_name).mkdir()
        (run / eval_name / "eval.json").write_text(json.dumps(ev))
    return run


def test_questions_tabulate_priors_on_one_frozen_model_with_paired_gains(data2, tmp_path):
    source = _run(tmp_path, "lap", data2, ["model.prior.kind=laplace"], {
        "eval": {"coherence": {"joint": _entry(0.40), "cross": _entry(0.73), "prior_ceiling": _entry(0.66)},
                 "latent_samplers": {"gmm_50": {"components": 50, "joint": 0.61, "stderr": 0.01}}}})
    sweep = [_entry(0.597, steps=0, ms_per_sample=0.4), _entry(0.618, steps=60, ms_per_sample=2.9)]
    _run(tmp_path, "gmm_ref", data2, [
        "model.prior.fit=posthoc", f"train.init_from={source}", "model.prior.reference=gmm",
        "model.prior.reference_fit_tuples=64", "model.prior.reference_components=4",
        "model.prior.langevin.steps=60", "model.prior.langevin.step_size=0.1"], {
        "eval": {"coherence": {"joint": _entry(0.618, langevin_steps=60), "cross": _entry(0.73),
                               "langevin_sweep": sweep}}})
    _run(tmp_path, "unevaluated", data2, [], {})
    out = tmp_path / "q.md"
    assert main(["questions", "--runs", str(tmp_path / "*"), "--out-md", str(out), "--out-json",
                 str(tmp_path / "q.json")]) == 0
    text = out.read_text()
    assert "Priors on the frozen model `lap`" in text
    assert "| gmm_50 fitted after training | 0.6100 ± 0.0100 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| EBM on gmm-4"))
    assert "0.6180 ± 0.0100 (K 60)" in row and "| +0.021 |" in row  # 0.618 - its K = 0 figure 0.597
    assert "0.6180 ± 0.0100 (2.90 ms)" in text  # (b): the sweep entry and its cost
    assert len(json.loads((tmp_path / "q.json").read_text())["runs"]) == 2


def test_questions_without_an_evaluated_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["questions", "--runs", str(tmp_path / "none*")], one_line_errors=True) == 1
    assert "holds an evaluated run" in capsys.readouterr().err
