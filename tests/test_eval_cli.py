"""End to end on tiny data: `mmebm classifiers train`, `mmebm eval`, `mmebm sample` and the periodic hook on a
run trained for a few steps by the real `mmebm train`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from train_helpers import REPO, env, free_port, trained_tiny_run

from mmebm_dist.cli import main
from mmebm_dist.config import load_config
from mmebm_dist.data.shards import manifest_hash
from mmebm_dist.evaluate.classifiers import ClassifierBundle, ClassifierMismatchError, ModalitySpec
from mmebm_dist.evaluate.report import fmt

EVAL_ARGS = ["--num-samples", "24", "--batch-size", "8", "--langevin-sweep", "0", "2", "--probe-fit", "32",
             "--device", "cpu", "--seed", "5"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data dir, run dir, config path): tiny 2-modality shards, classifiers, an 8-step EBM run."""
    return trained_tiny_run(tmp_path_factory.mktemp("eval"))


def _valid_png(path) -> None:
    with Image.open(path) as img:
        img.verify()
        assert img.format == "PNG"


def test_eval_writes_consistent_report(trained, capsys):
    data, run_dir, _ = trained
    assert main(["eval", "--run", str(run_dir), *EVAL_ARGS]) == 0
    out_dir = run_dir / "eval"
    res = json.loads((out_dir / "eval.json").read_text())
    assert res["run"]["step"] == 8
    assert res["run"]["manifest_hash"] == manifest_hash(data)
    assert set(res["classifiers"]["test_accuracy"]) == {"m0", "m1"}
    coh = res["coherence"]
    assert coh["joint"]["n"] == 24 and coh["cross"]["n"] == 16  # 16 test tuples exist
    assert [e["steps"] for e in coh["langevin_sweep"]] == [0, 2]
    assert all(0.0 <= v <= 1.0 for row in coh["cross"]["matrix"] for v in row)
    assert coh["subsets"].keys() == {"1"}  # M = 2: no k of M with 2 <= k < M
    assert set(res["elbo"]["terms"]) >= {"elbo", "rec/m0", "rec/m1", "loss"}
    assert res["linear_probe"]["n_fit"] == 32 and res["linear_probe"]["n_eval"] == 16
    md = (out_dir / "report.md").read_text()
    assert fmt(coh["joint"]["coherence"]) in md and fmt(coh["cross"]["coherence"]) in md
    for name in res["images"].values():
        assert f"]({name})" in md
        _valid_png(out_dir / name)
    assert "joint coherence" in capsys.readouterr().out


def test_sample_writes_joint_and_cross_grids(trained, tmp_path):
    _, run_dir, _ = trained
    assert main(["sample", "--run", str(run_dir), "--joint", "6", "--cross", "--cross-examples", "3",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["cross_step8.png", "joint_step8.png"]
    for name in pngs:
        _valid_png(tmp_path / name)


def test_eval_refuses_classifiers_of_other_data(trained, tmp_path):
    data, run_dir, _ = trained
    other = ClassifierBundle([ModalitySpec("m0", (3, 28, 28)), ModalitySpec("m1", (3, 28, 28))],
                             manifest_hash="f" * 64)
    other.save(tmp_path / "clf")
    with pytest.raises(ClassifierMismatchError) as exc:
        main(["eval", "--run", str(run_dir), "--classifiers", str(tmp_path / "clf"), *EVAL_ARGS,
              "--out", str(tmp_path / "out")])
    assert "f" * 64 in str(exc.value) and manifest_hash(data) in str(exc.value)
    assert "mmebm classifiers train" in str(exc.value)


def test_periodic_eval_returns_flat_figures(trained, tmp_path):
    from mmebm_dist.evaluate.generate import load_run
    from mmebm_dist.evaluate.periodic import periodic_eval

    _, run_dir, cfg_path = trained
    loaded = load_run(run_dir)
    figures = periodic_eval(loaded.model, loaded.cfg, 8, num_samples=12)
    assert {"joint_coherence", "cross_coherence", "self_coherence", "ceiling_coherence", "cross_to/m0",
            "cross_to/m1", "classifier_min_accuracy"} <= figures.keys()
    assert all(isinstance(v, float) for v in figures.values())
    assert 0.0 <= figures["joint_coherence"] <= 1.0
    assert figures["cross_coherence"] == pytest.approx((figures["cross_to/m0"] + figures["cross_to/m1"]) / 2)
    missing = load_config(cfg_path, [f"eval.classifiers={tmp_path / 'none'}", "train.eval_every=5"])
    with pytest.raises(FileNotFoundError, match="mmebm classifiers train"):
        periodic_eval(loaded.model, missing, 8, num_samples=12)


@pytest.mark.slow
def test_two_process_eval_matches_single_process(trained, tmp_path):
    """torchrun with 2 gloo processes: samples split over ranks, counts all-reduced, the same coherence."""
    _, run_dir, _ = trained
    single = json.loads((run_dir / "eval" / "eval.json").read_text()) if (run_dir / "eval").exists() else None
    if single is None:
        assert main(["eval", "--run", str(run_dir), *EVAL_ARGS]) == 0
        single = json.loads((run_dir / "eval" / "eval.json").read_text())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "-m", "mmebm_dist", "eval", "--run-dir", str(run_dir), *EVAL_ARGS,
           "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    double = json.loads((tmp_path / "eval.json").read_text())
    assert double["world_size"] == 2
    for key in ("joint", "cross", "subsets", "prior_ceiling"):
        strip = lambda d: {k: v for k, v in d.items() if k not in ("seconds", "ms_per_sample")}
        assert strip(double["coherence"][key]) == strip(single["coherence"][key]), key
    assert [e["coherence"] for e in double["coherence"]["langevin_sweep"]] == \
        [e["coherence"] for e in single["coherence"]["langevin_sweep"]]
    assert double["elbo"]["n"] == 16


class MeanModel(torch.nn.Module):
    """forward returns per-batch means, so the weighted average over chunks must be the global mean."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, batch):
        x = batch["x"]
        return {"loss": self.scale * x.mean(), "rec/x": x.mean().detach(), "vector": x.detach()}


def test_objective_terms_weight_by_batch_size_and_split_over_ranks():
    from mmebm_dist.evaluate.latent import objective_terms

    x = torch.arange(10, dtype=torch.float32)
    chunks = [{"x": x[:4], "label": torch.zeros(4, dtype=torch.long)},
              {"x": x[4:8], "label": torch.zeros(4, dtype=torch.long)},
              {"x": x[8:], "label": torch.zeros(2, dtype=torch.long)}]
    single = objective_terms(MeanModel(), chunks, all_reduce=lambda t: t)
    assert single["n"] == 10 and set(single["terms"]) == {"loss", "rec/x"}  # non-scalars are left out
    assert single["terms"]["rec/x"] == pytest.approx(4.5) and single["terms"]["loss"] == pytest.approx(9.0)
    captured = []
    for rank in (0, 1):
        objective_terms(MeanModel(), chunks, rank=rank, world_size=2,
                        all_reduce=lambda t: captured.append(t.clone()) or t)
    total = captured[0] + captured[1]
    split = objective_terms(MeanModel(), chunks, rank=0, world_size=2, all_reduce=lambda t: total)
    assert split["n"] == 10 and split["terms"] == pytest.approx(single["terms"])


def test_linear_probe_separates_informative_features_only():
    from mmebm_dist.evaluate.latent import linear_probe_accuracy

    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (600,), generator=gen)
    centers = 3 * torch.randn(10, 6, generator=gen)
    informative = centers[y] + 0.5 * torch.randn(600, 6, generator=gen)
    noise = torch.randn(600, 6, generator=gen)
    assert linear_probe_accuracy(informative[:400], y[:400], informative[400:], y[400:]) > 0.95
    assert linear_probe_accuracy(noise[:400], y[:400], noise[400:], y[400:]) < 0.3


def test_read_chunks_cuts_the_first_tuples_and_keeps_only_this_ranks(trained):
    from mmebm_dist.data.stream import make_loader
    from mmebm_dist.evaluate.generate import read_chunks

    data = trained[0]
    chunks = read_chunks(data, num=13, batch_size=5)
    assert [len(c["label"]) for c in chunks] == [5, 5, 3]
    first = next(iter(make_loader(data, batch_size=16, split="test", rank=0, world_size=1, num_workers=0)))
    assert torch.equal(torch.cat([c["m1"] for c in chunks]), first["m1"][:13])
    rank1 = read_chunks(data, num=13, batch_size=5, rank=1, world_size=2)
    assert rank1[0] is None and rank1[2] is None and torch.equal(rank1[1]["label"], chunks[1]["label"])


def test_eval_latent_sampler_entries(trained, tmp_path):
    """`mmebm eval --gmm-components --flow` writes latent_samplers (same n as the joint figure) into
    eval.json, report.md, and `mmebm results` shows them beside the prior's joint coherence; bad flags are one
    line."""
    _, run_dir, _ = trained
    out = run_dir / "eval_gmm"
    flags = ["--langevin-sweep", "--no-elbo", "--probe-fit", "0", "--no-frechet"]
    flow = ["--flow", "--flow-transforms", "2", "--flow-hidden", "8", "--flow-steps", "20",
            "--flow-eval-every", "10"]
    assert main(["eval", "--run", str(run_dir), *EVAL_ARGS, *flags, "--gmm-components", "1", "2", *flow,
                 "--sampler-fit", "40", "--out", str(out)]) == 0
    res = json.loads((out / "eval.json").read_text())
    samplers = res["latent_samplers"]
    assert set(samplers) == {"gmm_1", "gmm_2", "flow_maf"}  # eval.json sorts its keys
    for entry in samplers.values():
        assert entry["n"] == res["coherence"]["joint"]["n"] == 24
        assert entry["fit_split"] == "train" and 0.0 <= entry["joint"] <= 1.0
    assert samplers["gmm_2"]["fit_tuples"] == 40 and samplers["gmm_2"]["covariance"] == "full"
    maf = samplers["flow_maf"]
    assert (maf["fit_tuples"], maf["held_out_tuples"], maf["steps"], maf["transforms"]) == (36, 4, 20, 2)
    assert maf["best_step"] in (10, 20) and maf["fit_seconds"] > 0
    md = (out / "report.md").read_text()
    assert "## Post-hoc latent samplers" in md and f"| gmm_2 | {fmt(samplers['gmm_2']['joint'])} |" in md
    assert f"| flow_maf | {fmt(maf['joint'])} | {fmt(maf['stderr'])} | 24 | 36 | " \
           f"{fmt(maf['train_nll_per_dim'], 3)} | {fmt(maf['held_out_nll_per_dim'], 3)} (4 tuples) |" in md
    docs = tmp_path / "docs"
    assert main(["results", "--runs", str(run_dir), "--eval-name", "eval_gmm", "--out-md", str(docs / "r.md"),
                 "--out-json", str(docs / "r.json"), "--img-dir", str(docs / "img")]) == 0
    report = json.loads((docs / "r.json").read_text())
    (run,) = report["runs"]
    for name in ("gmm_1", "flow_maf"):
        assert run["latent_samplers"][name] == {k: samplers[name][k] for k in ("joint", "stderr", "n",
                                                                              "fit_tuples")}
    (setting,) = report["settings"]
    assert setting["latent_samplers"]["flow_maf"]["mean"] == maf["joint"]
    results_md = (docs / "r.md").read_text()
    section = results_md[results_md.index("## Post-hoc latent samplers"):]
    assert "| prior joint | gmm_1 | gmm_2 | flow_maf |" in section
    assert f"| {fmt(maf['joint'])} ± {fmt(maf['stderr'])} ± n/a |" in section
    for argv, message in ((["--gmm-components", "0"], "--gmm-components"),
                          (["--flow-steps", "5"], "--flow-steps given without --flow")):
        with pytest.raises(SystemExit, match=message):
            main(["eval", "--run", str(run_dir), *EVAL_ARGS, *argv, "--out", str(tmp_path / "x")])
