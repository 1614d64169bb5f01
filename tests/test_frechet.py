"""Frechet distance: the formula against scipy's matrix square root, ~0 for a set with itself, growing with
noise; the measurement's layout and its split over processes; the judges' features and hashes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
from beyond_helpers import tiny_batch, tiny_model

from mmebm_dist.evaluate.classifiers import ClassifierBundle, ModalitySpec
from mmebm_dist.evaluate.frechet import (
    Moments,
    classifier_features,
    distance,
    frechet_distance,
    inception_features,
    measure_frechet,
    module_sha256,
    penultimate,
)


def _moments(x: torch.Tensor) -> Moments:
    m = Moments(x.shape[1])
    m.add(x)
    return m


def test_formula_matches_scipy_sqrtm_and_the_diagonal_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    cov1, cov2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    root = scipy.linalg.sqrtm(cov1 @ cov2).real  # the pytorch-fid way
    expected = (mu1 - mu2) @ (mu1 - mu2) + np.trace(cov1 + cov2 - 2 * root)
    assert frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(expected, rel=1e-9)
    d1, d2 = np.array([1.0, 4.0]), np.array([9.0, 1.0])  # diagonal: sum (sqrt d1 - sqrt d2)^2
    assert frechet_distance(np.zeros(2), np.diag(d1), np.ones(2), np.diag(d2)) == pytest.approx(2 + 4 + 1)


def test_a_set_with_itself_is_zero_and_the_distance_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g) @ torch.randn(8, 8, generator=g)
    assert abs(distance(_moments(x), _moments(x))) < 1e-8
    noisy = [distance(_moments(x), _moments(x + s * torch.randn(x.shape, generator=g)))
             for s in (0.1, 0.5, 2)]
    assert 0 < noisy[0] < noisy[1] < noisy[2]


def test_moments_of_two_halves_add_up_to_the_whole():
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    halves = Moments(3)
    halves.load(_moments(x[:20]).flat() + _moments(x[20:]).flat())
    mean, cov = halves.mean_cov()
    np.testing.assert_allclose(mean, x.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.double().numpy().T), rtol=1e-10)


def _chunks(model, sizes=(4, 4, 3)):
    return [tiny_batch(model, b, seed=i) for i, b in enumerate(sizes)]


def _identity_features(name, x):
    return x.flatten(1)


def test_measure_layout_and_real_data_beats_a_shifted_generator():
    model = tiny_model()
    out = measure_frechet(model, _identity_features, _chunks(model), num_samples=10, batch_size=4, seed=3)
    assert out["n_test"] == 11 and out["joint"]["n"] == 10 and out["cross"]["n"] == 2 * 11
    assert set(out["joint"]) == {"v0", "v1", "v2", "mean", "n"}
    shifted = measure_frechet(model, lambda n, x: x.flatten(1) + 5.0, _chunks(model), num_samples=10,
                              batch_size=4, seed=3)
    # the shift moves generated and test features alike: distances are unchanged (translation invariance)
    assert shifted["joint"]["mean"] == pytest.approx(out["joint"]["mean"], rel=1e-6)


def test_split_over_ranks_and_summed_equals_single_process():
    model = tiny_model()
    chunks = _chunks(model)
    kwargs = dict(num_samples=10, batch_size=4, seed=3)
    single = measure_frechet(model, _identity_features, chunks, **kwargs)
    captured = []
    for rank in (0, 1):
        mine = [c if i % 2 == rank else None for i, c in enumerate(chunks)]
        measure_frechet(model, _identity_features, mine, rank=rank, world_size=2,
                        all_reduce=lambda t: captured.append(t.clone()) or t, **kwargs)
    total = captured[0] + captured[1]
    reduced = measure_frechet(model, _identity_features, chunks, rank=0, world_size=2,
                              all_reduce=lambda t: total, **kwargs)
    for part in ("joint", "cross", "test_halves"):
        for key, value in single[part].items():
            assert reduced[part][key] == pytest.approx(value, rel=1e-9, abs=1e-12)


def test_classifier_penultimate_features_and_hash():
    specs = [ModalitySpec("img", (3, 28, 28)), ModalitySpec("vec", (6,))]
    bundle = ClassifierBundle(specs, manifest_hash="x")
    feats = classifier_features(bundle)
    assert feats("img", torch.rand(5, 3, 28, 28)).shape == (5, 128)
    assert feats("vec", torch.rand(5, 6)).shape == (5, 128 * bundle.width)
    net = bundle.nets["img"]
    x = torch.rand(3, 3, 28, 28)
    logits_from_features = net.head[-1](penultimate(net, x))
    torch.testing.assert_close(logits_from_features, net.eval()(x))  # it is the layer before the logits
    before = module_sha256(bundle)
    assert before == module_sha256(bundle)
    with torch.no_grad():
        bundle.nets["vec"].net[0].bias[0] += 1e-3
    assert module_sha256(bundle) != before


def test_inception_weights_must_be_a_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.pth"):
        inception_features(tmp_path / "no-such.pth")
