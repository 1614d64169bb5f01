"""Incomplete data sets end to end: ``mmebm data polymnist --drop-rate``, verify, the loader's ``present``
mask, training on it (MoE, PoE) and evaluation reading whole tuples."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from data_helpers import restamp, write_idx
from train_helpers import tiny_config

from mmebm_dist.config import load_config
from mmebm_dist.data import shards
from mmebm_dist.data.shards import ShardError
from mmebm_dist.data.stream import make_loader
from mmebm_dist.datasets.polymnist import BuildSpec, build_polymnist, drop_mask


def _build(root, name, *, rate, encoding="png", fmt="shards", seed=0, modalities=3):
    idx = root / "idx"
    if not idx.exists():
        write_idx(idx, train=48, test=16)
    out = root / name
    build_polymnist(BuildSpec(source="idx", idx_dir=str(idx), modalities=modalities, out=str(out),
                              num_samples=48, test_samples=16, shard_size=16, seed=seed, workers=1,
                              drop_rate=rate, encoding=encoding, format=fmt), progress=False)
    return out


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A complete set and its drop-rate-0.5 versions (png and raw, same seed): 48 train + 16 test tuples."""
    root = tmp_path_factory.mktemp("incomplete")
    return {"complete": _build(root, "complete", rate=0.0), "png": _build(root, "png", rate=0.5),
            "raw": _build(root, "raw", rate=0.5, encoding="raw"),
            "raw_complete": _build(root, "raw_complete", rate=0.0, encoding="raw"), "root": root}


def _truth(directory, split="train"):
    """{key: (presence from the shards, label)} read straight from the tars."""
    manifest = shards.read_manifest(directory)
    specs = shards.modality_specs(manifest)
    out = {}
    for entry in shards.split_shards(manifest, split):
        for key, sample in shards.iter_tar_samples(directory / entry["name"]):
            out[key] = (shards.sample_presence(specs, sample), int(sample["cls"]))
    return out


def test_drop_mask_is_seeded_has_rate_p_and_never_drops_everything():
    a = drop_mask(20000, 3, 0.25, seed=1, split="train")
    assert np.array_equal(a, drop_mask(20000, 3, 0.25, seed=1, split="train"))
    assert not np.array_equal(a, drop_mask(20000, 3, 0.25, seed=2, split="train"))
    assert not np.array_equal(a, drop_mask(20000, 3, 0.25, seed=1, split="test"))
    assert abs((~a).mean() - 0.25) < 0.015  # minus the rare restored all-dropped tuples (0.25^3 / 3)
    high = drop_mask(20000, 3, 0.9, seed=0, split="train")
    assert high.any(1).all()
    assert (high.sum(1) == 1).mean() > 0.7  # most tuples keep exactly one at p = 0.9
    assert drop_mask(100, 3, 0.0, seed=0, split="train").all()


def test_drop_rate_zero_is_the_complete_set_and_the_incomplete_set_keeps_its_images(sets):
    complete, png = sets["complete"], sets["png"]
    m_complete, m_png = shards.read_manifest(complete), shards.read_manifest(png)
    assert "incomplete" not in m_complete and "drop_rate" not in m_complete["builder"]
    assert m_png["incomplete"] is True and m_png["presence"]["drop_rate"] == 0.5
    assert m_png["presence"]["complete_manifest_hash"] == shards.manifest_hash(complete)
    raw = shards.read_manifest(sets["raw"])
    assert raw["presence"]["complete_manifest_hash"] == shards.manifest_hash(sets["raw_complete"])
    truth = _truth(png)
    counts = np.array([held for held, _ in truth.values()]).sum(0)
    assert m_png["presence"]["counts"]["train"] == {f"m{k}": int(c) for k, c in enumerate(counts)}
    assert all(any(held) for held, _ in truth.values()) and not all(all(h) for h, _ in truth.values())
    full = dict(shards.iter_tar_samples(complete / "train-000000.tar"))
    for key, sample in shards.iter_tar_samples(png / "train-000000.tar"):
        assert "present" not in sample
        assert {k: v for k, v in full[key].items() if k in sample} == sample  # present entries: same bytes
    # raw: every record has the full layout, zeros where the modality is absent, and a present entry.
    spec = shards.modality_specs(raw)
    raw_truth = _truth(sets["raw"])
    assert {k: v[0] for k, v in raw_truth.items()} == {k: v[0] for k, v in truth.items()}
    for key, sample in shards.iter_tar_samples(sets["raw"] / "train-000000.tar"):
        for s, held in zip(spec, raw_truth[key][0], strict=True):
            image = shards.decode_entry(s, sample["raw"])
            assert (image.any() if held else not image.any()), (key, s.name)


def test_verify_accepts_absent_modalities_only_in_an_incomplete_set(sets, tmp_path):
    for name in ("png", "raw"):
        assert shards.verify(sets[name], progress=False)["samples"] == 64
    folders = _build(sets["root"], "folders", rate=0.5, fmt="folders")
    assert shards.verify(folders, progress=False)["samples"] == 64
    assert len(list((folders / "train").glob("m*/*.png"))) < 3 * 48
    # the same absent file in a complete folders set is an error
    manifest = shards.read_manifest(folders)
    del manifest["incomplete"]
    shards.write_manifest(folders, manifest)
    with pytest.raises(ShardError, match="PNG files, the manifest says"):
        shards.verify(folders, progress=False)
    # a tuple holding no modality is refused, naming the shard and key
    bad = _build(tmp_path, "bad", rate=0.5)
    _rewrite_sample(bad, "train-000000.tar", "00000003", lambda sample: {"cls": sample["cls"]})
    with pytest.raises(ShardError, match=r"train-000000.tar: sample '00000003' holds no modality"):
        shards.verify(bad, progress=False)


def _rewrite_sample(directory, shard, key, change):
    path = directory / shard
    samples = [(k, change(s) if k == key else s) for k, s in shards.iter_tar_samples(path)]
    shards.write_tar(path, [(f"{k}.{ext}", data) for k, s in samples for ext, data in s.items()])
    restamp(directory, shard)


@pytest.mark.parametrize("name", ["png", "raw"])
def test_loader_present_mask_is_the_shards_truth_and_absent_modalities_are_zeros(sets, name):
    truth = _truth(sets[name])
    keys = sorted(truth)
    batches = list(make_loader(sets[name], batch_size=16, num_workers=0, drop_last=False))
    present = torch.cat([b["present"] for b in batches])
    assert present.dtype == torch.bool and present.shape == (48, 3)
    assert present.tolist() == [truth[k][0] for k in keys]
    assert torch.cat([b["label"] for b in batches]).tolist() == [truth[k][1] for k in keys]
    complete = torch.cat([b["m1"] for b in make_loader(sets["complete"], batch_size=16, num_workers=0)])
    images = torch.cat([b["m1"] for b in batches])
    assert torch.equal(images[present[:, 1]], complete[present[:, 1]])
    assert not images[~present[:, 1]].any()


def test_complete_set_batches_carry_no_mask_and_equal_the_stored_images(sets):
    for batch in make_loader(sets["complete"], batch_size=16, num_workers=0):
        assert "present" not in batch
    first = next(iter(make_loader(sets["complete"], batch_size=16, num_workers=0)))
    specs = {s.name: s for s in shards.modality_specs(shards.read_manifest(sets["complete"]))}
    stored = [s for _, s in shards.iter_tar_samples(sets["complete"] / "train-000000.tar")]
    expected = np.stack([shards.decode_entry(specs["m2"], s["m2.png"]) for s in stored]).transpose(0, 3, 1, 2)
    assert torch.equal(first["m2"], torch.from_numpy(expected.astype(np.float32) / np.float32(255.0)))


def test_convert_keeps_the_presence_and_to_device_the_mask(sets, tmp_path):
    from mmebm_dist.data.stream import to_device

    raw = shards.convert(sets["png"], tmp_path / "raw", "raw", progress=False)
    assert raw["incomplete"] is True and shards.verify(tmp_path / "raw", progress=False)["samples"] == 64
    back = tmp_path / "png"
    shards.convert(tmp_path / "raw", back, "png", progress=False)
    assert _truth(tmp_path / "raw") == _truth(sets["png"]) == _truth(back)
    a = next(iter(make_loader(sets["png"], batch_size=16, num_workers=0)))
    b = next(iter(make_loader(tmp_path / "raw", batch_size=16, num_workers=0)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    moved = to_device(a, torch.device("cpu"))
    assert moved["present"].dtype == torch.bool and torch.equal(moved["present"], a["present"])


def test_a_tuple_with_no_modality_is_an_error_or_a_counted_skip(sets, tmp_path):
    bad = _build(tmp_path, "bad", rate=0.5)
    _rewrite_sample(bad, "train-000001.tar", "00000020", lambda sample: {"cls": sample["cls"]})
    with pytest.raises(ShardError, match=r"train-000001.tar: sample '00000020' holds no modality"):
        list(make_loader(bad, batch_size=8, num_workers=0))
    loader = make_loader(bad, batch_size=8, num_workers=0, on_error="skip", drop_last=False)
    assert sum(len(b["label"]) for b in loader) == 47 and loader.skipped == 1


def test_eval_reads_whole_tuples_and_accepts_the_complete_twins_classifiers(sets):
    from mmebm_dist.evaluate.classifiers import ClassifierBundle, ClassifierMismatchError, ModalitySpec
    from mmebm_dist.evaluate.generate import read_chunks
    from mmebm_dist.evaluate.judges.digits import load_judge

    chunks = read_chunks(sets["png"], num=100, batch_size=4)
    whole = sum(all(held) for held, _ in _truth(sets["png"], "test").values())
    assert sum(len(c["label"]) for c in chunks) == whole > 0
    assert all("present" not in c for c in chunks)
    directory = sets["root"] / "clf"
    specs = [ModalitySpec(f"m{k}", (3, 28, 28)) for k in range(3)]
    ClassifierBundle(specs, manifest_hash=shards.manifest_hash(sets["complete"])).save(directory)
    load_judge(directory, sets["png"], manifest_hash=shards.manifest_hash(sets["png"]))
    with pytest.raises(ClassifierMismatchError, match="manifest hash"):
        load_judge(directory, sets["raw"], manifest_hash=shards.manifest_hash(sets["raw"]))


@pytest.mark.parametrize("aggregation,posterior", [("moe", "laplace"), ("poe", "gaussian")])
def test_training_on_an_incomplete_set_passes_the_mask_to_the_model(sets, tmp_path, in_process, monkeypatch,
                                                                    aggregation, posterior):
    from mmebm_dist.models.multimodal_vae import MultimodalVAE
    from mmebm_dist.train.loop import train

    seen = []
    presence = MultimodalVAE.presence

    def spy(self, batch):
        out = presence(self, batch)
        seen.append(None if out is None else out.float().mean().item())
        return out

    monkeypatch.setattr(MultimodalVAE, "presence", spy)
    config = tiny_config(tmp_path / "c.yaml", sets["png"], modalities=3)
    cfg = load_config(config, [f"train.out_dir={tmp_path / 'run'}", "train.steps=3",
                               f"model.aggregation={aggregation}", f"model.posterior={posterior}"])
    out = train(cfg)
    assert seen and all(s is not None and s < 1.0 for s in seen)  # every batch had an absent modality
    assert all(np.isfinite(v) for v in out["terms"].values())
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(np.isfinite(r["loss"]) for r in records)


def test_training_refuses_a_modality_order_other_than_the_manifests(sets, tmp_path, in_process):
    from mmebm_dist.train.loop import train

    config = tiny_config(tmp_path / "c.yaml", sets["png"], modalities=3)
    cfg = load_config(config, [f"train.out_dir={tmp_path / 'run'}", "train.steps=1"])
    cfg.model.modalities.reverse()
    with pytest.raises(ValueError, match="list model.modalities in that order"):
        train(cfg)


# ------------------------------------------------------------------------------ importers --allow-missing


def _import(*args) -> int:
    from mmebm_dist.cli import main

    return main(["data", "import", *map(str, args), "--workers", "1"])


def _presence_of(directory, split="train"):
    manifest = shards.read_manifest(directory)
    specs = shards.modality_specs(manifest)
    return [shards.sample_presence(specs, s) for e in shards.split_shards(manifest, split)
            for _, s in shards.iter_tar_samples(directory / e["name"])]


def test_polymnist_folders_allow_missing_imports_an_incomplete_set(tmp_path, capsys):
    from tests.import_helpers import polymnist_folders

    src = polymnist_folders(tmp_path, train=12, test=4, modalities=3)
    gone = [next((src / "train/m1").glob("3.*.png")), next((src / "train/m2").glob("5.*.png")),
            next((src / "train/m2").glob("7.*.png"))]
    for path in gone:
        path.unlink()
    out = tmp_path / "out"
    assert _import("polymnist-folders", src, "--out", out) == 1
    err = capsys.readouterr().err
    assert "3." in err and "--allow-missing" in err and not out.exists()
    assert _import("polymnist-folders", src, "--out", out, "--allow-missing") == 0
    assert "incomplete: tuples lacking a modality: m0 0, m1 1, m2 2" in capsys.readouterr().out
    manifest = shards.read_manifest(out)
    assert manifest["incomplete"] is True
    assert manifest["presence"]["counts"]["train"] == {"m0": 12, "m1": 11, "m2": 10}
    held = _presence_of(out)
    assert [i for i, h in enumerate(held) if not all(h)] == [3, 5, 7]  # (index, label) order = index here
    assert held[3] == [True, False, True] and held[5] == [True, True, False]
    assert shards.verify(out, progress=False)["samples"] == 16
    batch = next(iter(make_loader(out, batch_size=12, num_workers=0)))
    assert batch["present"].tolist() == held


def test_table_allow_missing_keeps_rows_with_some_modality(tmp_path, capsys):
    from tests.import_helpers import table_source

    table = table_source(tmp_path / "t", rows=10)
    rows = [json.loads(line) for line in table.read_text().splitlines()]
    rows[2]["signal"] = ""
    (tmp_path / "t/img/6.png").unlink()
    rows[8]["photo"], rows[8]["signal"] = "", ""
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    args = ("table", table, "--out", out, "--modality", "photo=image", "--modality", "signal=npy",
            "--label", "label")
    assert _import(*args) == 1
    assert "line 3: no value for modality 'signal'" in capsys.readouterr().err
    assert _import(*args, "--allow-missing") == 1  # line 9 has no modality at all
    assert "line 9" in capsys.readouterr().err
    rows[8]["signal"] = "sig/8.npy"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert _import(*args, "--allow-missing", "--on-missing", "skip") == 1
    assert "choose one" in capsys.readouterr().err
    assert _import(*args, "--allow-missing") == 0
    assert "photo 2, signal 1" in capsys.readouterr().out
    manifest = shards.read_manifest(out)
    # train rows are those with i % 5 != 0: 1, 2, 3, 4, 6, 7, 8, 9
    assert _presence_of(out) == [[True, True], [True, False], [True, True], [True, True], [False, True],
                                 [True, True], [False, True], [True, True]]
    assert manifest["presence"]["counts"]["train"] == {"photo": 6, "signal": 7}
    assert shards.verify(out, progress=False)["samples"] == 10


def test_webdataset_and_cub_allow_missing(tmp_path, capsys):
    import webdataset as wds

    from tests.import_helpers import cub_source, webdataset_source

    src = webdataset_source(tmp_path / "wds")
    samples = list(shards.iter_tar_samples(src / "train-001.tar"))
    with wds.TarWriter(str(src / "train-001.tar")) as sink:
        for n, (key, sample) in enumerate(samples):
            kept = {k: v for k, v in sample.items() if not (n == 2 and k == "vec.npy")}
            sink.write({"__key__": key, **kept})
    assert _import("webdataset", src) == 1
    assert "lacks 'vec.npy'" in capsys.readouterr().err and not (src / "manifest.json").exists()
    assert _import("webdataset", src, "--allow-missing") == 0
    manifest = shards.read_manifest(src)
    assert manifest["presence"]["counts"]["train"] == {"image": 18, "vec": 17}
    assert shards.verify(src, progress=False)["samples"] == 24
    cub, captions = cub_source(tmp_path)
    lines = captions["train"]
    lines[4] = ""
    (cub / "text_trainvalclasses.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "cub_out"
    assert _import("cub-captions", cub, "--out", out) == 1
    assert "--allow-missing" in capsys.readouterr().err
    assert _import("cub-captions", cub, "--out", out, "--allow-missing") == 0
    assert shards.read_manifest(out)["presence"]["counts"]["train"] == {"image": 30, "caption": 29}
    assert _presence_of(out)[4] == [True, False]


@pytest.mark.slow
def test_ddp_and_zero2_train_on_an_incomplete_set(sets, tmp_path):
    """The mask travels through accelerate's DDP and DeepSpeed ZeRO-2 (2 CPU processes): both ranks stay in
    step and every logged loss is finite."""
    from test_distributed import _deepspeed_launch
    from train_helpers import REPO, free_port, run_train

    from mmebm_dist.rundir import read_jsonl

    config = tiny_config(tmp_path / "c.yaml", sets["png"], modalities=3, train={"steps": 3})
    launchers = {
        "ddp": ["--config_file", str(REPO / "launch/accelerate/cpu_ddp_2proc.yaml"), "--main_process_port",
                str(free_port())],
        "zero2": _deepspeed_launch(tmp_path, REPO / "launch/deepspeed/zero2.json"),
    }
    for name, launcher in launchers.items():
        run = tmp_path / name
        run_train(["--config", str(config), f"train.out_dir={run}", "--trace-samples"], launcher=launcher)
        records = read_jsonl(run / "metrics.jsonl")
        assert [r["world_size"] for r in records] == [2, 2, 2]
        assert all(np.isfinite(r["loss"]) and np.isfinite(r["rec/m1"]) for r in records)
        ends = [[r for r in read_jsonl(p) if r.get("event") == "end"][-1]
                for p in sorted((run / "trace").glob("rank-*.jsonl"))]
        assert len(ends) == 2 and ends[0]["param_digest"] == ends[1]["param_digest"]


def test_results_name_an_incomplete_set_by_its_drop_rate(sets):
    from mmebm_dist.evaluate.results import dataset_of

    assert dataset_of(str(sets["complete"])) == ("polymnist-idx", "PolyMNIST (from IDX files)")
    assert dataset_of(str(sets["png"])) == ("polymnist-idx-drop0.5",
                                            "PolyMNIST (from IDX files), modalities dropped at rate 0.5")
