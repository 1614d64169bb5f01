"""Per-modality classifiers: shapes, training on an easy dataset, save/load and the manifest-hash refusal."""

from __future__ import annotations

import pytest
import torch

from mmebm_dist.evaluate.classifiers import (
    ClassifierBundle,
    ClassifierMismatchError,
    ImageClassifier,
    ModalitySpec,
    evaluate_accuracy,
    load_classifiers,
    train_classifiers,
)

SPECS = [ModalitySpec("a", (3, 12, 16)), ModalitySpec("b", (1, 16, 16))]


def easy_batches(n: int, batch: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Class c lights cell c of a 3x4 grid of 4x4 cells (modality a) or a horizontal bar at rows c+3, c+4 (b),
    under uniform noise: easy for a CNN, impossible to guess."""
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 10, (n,), generator=gen)
    a = 0.3 * torch.rand(n, 3, 12, 16, generator=gen)
    b = 0.3 * torch.rand(n, 1, 16, 16, generator=gen)
    for i, c in enumerate(label.tolist()):
        r, col = divmod(c, 4)
        a[i, :, 4 * r:4 * r + 4, 4 * col:4 * col + 4] += 0.7
        b[i, 0, c + 3:c + 5, :] += 0.7
    return [{"label": label[s:s + batch], "a": a[s:s + batch], "b": b[s:s + batch]}
            for s in range(0, n, batch)]


def test_mmvaeplus_shape_flattens_to_980():
    net = ImageClassifier((3, 28, 28))
    assert net.head[0].in_features == 980
    assert net(torch.rand(2, 3, 28, 28)).shape == (2, 10)


def test_training_reaches_high_accuracy_on_easy_data():
    torch.manual_seed(0)
    bundle = ClassifierBundle(SPECS, manifest_hash="h")
    train = easy_batches(1500, 50, seed=0)
    test = easy_batches(500, 100, seed=1)
    before = evaluate_accuracy(bundle, test)
    losses = train_classifiers(bundle, lambda epoch: train, epochs=3, lr=3e-3, seed=0, show_progress=False)
    after = evaluate_accuracy(bundle, test)
    assert losses[-1] < losses[0]
    assert all(v < 0.5 for v in before.values())
    assert all(v >= 0.95 for v in after.values()), after


def test_save_load_round_trip_and_hash_refusal(tmp_path):
    torch.manual_seed(0)
    bundle = ClassifierBundle(SPECS, manifest_hash="aaaa1111")
    bundle.test_accuracy = {"a": 0.9, "b": 0.8}
    bundle.save(tmp_path / "clf")
    x = torch.rand(5, 3, 12, 16)
    loaded = load_classifiers(tmp_path / "clf", manifest_hash="aaaa1111", modalities=["a", "b"])
    assert torch.equal(loaded.predict("a", x), bundle.predict("a", x))
    assert loaded.test_accuracy == {"a": 0.9, "b": 0.8}
    assert (tmp_path / "clf" / "classifiers.json").is_file()

    with pytest.raises(ClassifierMismatchError) as exc:
        load_classifiers(tmp_path / "clf", manifest_hash="bbbb2222", data_path="data/other")
    msg = str(exc.value)
    assert "aaaa1111" in msg and "bbbb2222" in msg
    assert "mmebm classifiers train --data data/other" in msg

    with pytest.raises(ClassifierMismatchError, match="not \\['c'\\]"):
        load_classifiers(tmp_path / "clf", manifest_hash="aaaa1111", modalities=["a", "c"])
    with pytest.raises(FileNotFoundError, match="mmebm classifiers train"):
        load_classifiers(tmp_path / "missing", manifest_hash="aaaa1111")


def test_predict_unknown_modality_names_the_known_ones():
    bundle = ClassifierBundle(SPECS, manifest_hash="h")
    with pytest.raises(KeyError, match="a, b"):
        bundle.predict("z", torch.rand(1, 3, 12, 16))
