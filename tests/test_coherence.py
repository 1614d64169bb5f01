"""Coherence math and counting on constructed generators whose coherence is known exactly."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mmebm_dist.evaluate.coherence import (
    Counts,
    attribute_agreement,
    binomial_stderr,
    conditioning_subsets,
    cross_coherence,
    expected_joint_coherence_uniform,
    measure_coherence,
    subset_coherence,
)
from mmebm_dist.evaluate.judges.digits import DigitJudge

C = 10


def onehot(labels: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, C).float()


class ArgmaxClassifiers:
    """Reads the label back from a one-hot 'image': a perfect classifier for the fake modalities."""

    def predict(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


PERFECT = DigitJudge(ArgmaxClassifiers())


class FakeModel:
    """Stand-in for the model API with a known behaviour.

    copy: every generated modality carries the conditioning label (joint samples share one label).
    random: every generated modality carries an independent uniform label.
    one_target: conditional generation is right for ``modalities[0]`` only (label + 1 elsewhere).
    """

    def __init__(self, mode: str, modalities: list[str]):
        self.mode, self.modalities = mode, modalities

    def parameters(self):
        return iter(())

    def _labels(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, C, (n,), generator=generator)

    def generate_joint(self, n, *, langevin_steps=None, generator=None):
        shared = self._labels(n, generator)
        if self.mode == "random":
            return {m: onehot(self._labels(n, generator)) for m in self.modalities}
        return {m: onehot(shared) for m in self.modalities}

    def generate_conditional(self, batch, sources, *, generator=None):
        label = batch[sources[0]].argmax(-1)
        if self.mode == "random":
            return {m: onehot(self._labels(label.numel(), generator)) for m in self.modalities}
        if self.mode == "one_target":
            wrong = (label + 1) % C
            return {m: onehot(label if m == self.modalities[0] else wrong) for m in self.modalities}
        return {m: onehot(label) for m in self.modalities}

    def aggregate_posterior_z(self, batch, *, generator=None):
        m = self.modalities[int(torch.randint(0, len(self.modalities), (1,), generator=generator))]
        return batch[m].argmax(-1)

    def decode(self, z, private=None):
        if self.mode == "random":
            return {m: onehot(torch.randint(0, C, z.shape)) for m in self.modalities}
        return {m: onehot(z) for m in self.modalities}


def make_chunks(num: int, batch: int, modalities: list[str], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, C, (num,), generator=gen)
    chunks = []
    for start in range(0, num, batch):
        lab = label[start:start + batch]
        chunks.append({"label": lab, **{m: onehot(lab) for m in modalities}})
    return chunks


def names(m: int) -> list[str]:
    return [f"m{k}" for k in range(m)]


def test_expected_uniform_joint_coherence_matches_enumeration():
    for m, c in [(2, 10), (3, 4), (4, 3)]:
        agree = sum(len(set(t)) == 1 for t in itertools.product(range(c), repeat=m))
        assert expected_joint_coherence_uniform(m, c) == pytest.approx(agree / c**m, rel=1e-12)
    assert expected_joint_coherence_uniform(5) == pytest.approx(1e-4)


def test_labels_agree_where_all_equal_and_stderr():
    a = torch.tensor([[1], [2], [3], [4]])  # a class label is one attribute that is always stated
    b = torch.tensor([[1], [2], [0], [4]])
    assert attribute_agreement([a, b, a])[0].tolist() == [True, True, False, True]
    assert binomial_stderr(0.5, 100) == pytest.approx(0.05)
    assert binomial_stderr(1.0, 10) == 0.0
    assert math.isnan(binomial_stderr(0.3, 0))


def test_perfect_copy_generator_has_coherence_one():
    mods = names(4)
    out = measure_coherence(FakeModel("copy", mods), PERFECT, make_chunks(50, 16, mods),
                            num_samples=40, batch_size=16, seed=0, subset_sizes=(2, 3))
    assert out["joint"]["coherence"] == 1.0 and out["joint"]["n"] == 40
    assert out["joint"]["stderr"] == 0.0
    assert out["cross"]["coherence"] == 1.0 and out["cross"]["n"] == 50
    assert all(v == 1.0 for row in out["cross"]["matrix"] for v in row)
    assert out["prior_ceiling"]["coherence"] == 1.0
    assert {k: v["coherence"] for k, v in out["subsets"].items()} == {"1": 1.0, "2": 1.0, "3": 1.0}
    assert {k: v["num_subsets"] for k, v in out["subsets"].items()} == {"1": 4, "2": 6, "3": 4}


@pytest.mark.parametrize("m", [2, 3])
def test_random_generator_matches_exact_expectation(m):
    mods = names(m)
    n = 6000
    out = measure_coherence(FakeModel("random", mods), PERFECT, make_chunks(2000, 500, mods),
                            num_samples=n, batch_size=500, seed=1)
    expected = expected_joint_coherence_uniform(m)  # 0.1 for M=2, 0.01 for M=3
    joint = out["joint"]
    assert joint["n"] == n
    assert abs(joint["coherence"] - expected) < 4 * math.sqrt(expected * (1 - expected) / n)
    # A random target is right with probability 1/C whatever the source.
    assert abs(out["cross"]["coherence"] - 1 / C) < 0.02
    assert out["cross"]["stderr"] > 0


def test_right_for_exactly_one_target_gives_cross_coherence_one_over_m():
    for m in (2, 3, 5):
        mods = names(m)
        out = measure_coherence(FakeModel("one_target", mods), PERFECT, make_chunks(30, 8, mods),
                                num_samples=8, batch_size=8, seed=0, aggregate=False)
        matrix = out["cross"]["matrix"]
        assert out["cross"]["coherence"] == pytest.approx(1 / m, abs=1e-12)
        # Column 0 (target m0) is all right, every other column all wrong (rows are sources).
        assert all(row[0] == 1.0 and all(v == 0.0 for v in row[1:]) for row in matrix)
        assert "prior_ceiling" not in out


def test_conditioning_subsets_counts_and_order():
    mods = names(5)
    assert [len(conditioning_subsets(mods, k)) for k in range(1, 6)] == [5, 10, 10, 5, 1]
    assert conditioning_subsets(["a", "b", "c"], 2) == [("a", "b"), ("a", "c"), ("b", "c")]
    with pytest.raises(ValueError, match="between 1 and 3"):
        conditioning_subsets(["a", "b", "c"], 0)


def test_subset_coherence_averages_only_targets_outside_the_subset():
    mods = ["a", "b", "c"]
    rates = {}
    for k in (1, 2):
        for s in conditioning_subsets(mods, k):
            for t in mods:  # distinct values outside the subset, a huge one inside (must never be averaged)
                rates[(s, t)] = 100.0 if t in s else (len(rates) + 1) / 50
    want_k2 = (rates[(("a", "b"), "c")] + rates[(("a", "c"), "b")] + rates[(("b", "c"), "a")]) / 3
    assert subset_coherence(rates, mods, 2) == pytest.approx(want_k2)
    want_k1 = sum((rates[((s,), t1)] + rates[((s,), t2)]) / 2
                  for s, t1, t2 in [("a", "b", "c"), ("b", "a", "c"), ("c", "a", "b")]) / 3
    assert subset_coherence(rates, mods, 1) == pytest.approx(want_k1)
    # k = 1 is the cross coherence: every off-diagonal cell weighted equally.
    matrix = {(s, t): rates[((s,), t)] for s in mods for t in mods}
    assert cross_coherence(matrix, mods) == pytest.approx(want_k1)
    with pytest.raises(ValueError):
        subset_coherence(rates, mods, 3)


def test_cross_coherence_ignores_diagonal_and_weights_targets_equally():
    mods = ["a", "b", "c"]
    matrix = {(s, t): 9.0 if s == t else 0.0 for s in mods for t in mods}
    matrix[("a", "b")] = 1.0  # target b: mean over sources {a, c} = 0.5
    assert cross_coherence(matrix, mods) == pytest.approx(0.5 / 3)


def test_measure_rejects_out_of_range_subset_sizes():
    mods = names(3)
    with pytest.raises(ValueError, match="2..2"):
        measure_coherence(FakeModel("copy", mods), PERFECT, make_chunks(4, 4, mods),
                          num_samples=4, batch_size=4, seed=0, subset_sizes=(3,))


def _run_rank(rank: int, world: int, all_reduce):
    mods = names(3)
    return measure_coherence(FakeModel("random", mods), PERFECT, make_chunks(90, 16, mods),
                             num_samples=100, batch_size=16, seed=3, subset_sizes=(2,), langevin_sweep=(0, 5),
                             rank=rank, world_size=world, all_reduce=all_reduce)


def _figures(out: dict) -> dict:
    """Every figure except timings (which legitimately differ between runs)."""
    drop = {"seconds", "ms_per_sample"}
    clean = lambda d: {k: v for k, v in d.items() if k not in drop}
    return {**out, "joint": clean(out["joint"]), "langevin_sweep": [clean(e) for e in out["langevin_sweep"]]}


def test_split_over_ranks_and_reduced_counts_equal_single_process():
    """Single-process stand-in of all_reduce: rank 0 and 1 count their chunks, the stand-in sums them."""
    single = _run_rank(0, 1, lambda t: t)
    captured = []
    for rank in (0, 1):
        _run_rank(rank, 2, lambda t: captured.append(t.clone()) or t)
    total = captured[0] + captured[1]
    assert not torch.equal(captured[0], total)  # each rank alone saw only part of the work
    reduced = _run_rank(0, 2, lambda t: total)
    assert _figures(reduced) == _figures(single)
    assert reduced["num_samples"] == 100 and reduced["cross"]["n"] == 90


def test_counts_reduce_keeps_key_order_and_fills_missing():
    counts = Counts()
    counts.add("b", 1, 2)
    out = counts.reduce(["a", "b"], lambda t: t * 2)
    assert (out["a"].correct, out["a"].total) == (0.0, 0.0)
    assert (out["b"].correct, out["b"].total) == (2.0, 4.0)
    assert math.isnan(out["a"].rate) and out["b"].rate == 0.5


def _gloo_worker(rank: int, world: int, port: int, queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from mmebm_dist.evaluate.coherence import distributed_sum

        queue.put((rank, _figures(_run_rank(dist.get_rank(), dist.get_world_size(), distributed_sum))))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_give_the_single_process_figures():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_gloo_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    single = _figures(_run_rank(0, 1, lambda t: t))
    assert results[0] == single and results[1] == single


# ------------------------------------------------------------------------------------------------ attributes
# Two fake modalities carry attribute values as floats: "a" states all three attributes (like an image read
# by a classifier), "b" never states the third (like a caption that does not mention it).

V, A = 2, 3  # values per attribute, attributes


def _hide(x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    out[:, 2] = -1
    return out


class FakeJudge:
    attributes = ("p", "q", "r")

    def read(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x.round().long()

    def known(self, name: str, batch) -> torch.Tensor:
        return batch["attributes"] if name == "a" else self.read(name, batch[name])


class FakeAttributeModel:
    """copy: everything generated carries the source's (or one shared) attributes; silent: generated "b"
    states nothing; random: every generated modality carries independent uniform attributes."""

    modalities = ["a", "b"]

    def __init__(self, mode: str):
        self.mode = mode

    def parameters(self):
        return iter(())

    def _random(self, n, generator):
        return torch.randint(0, V, (n, A), generator=generator).float()

    def _pair(self, a: torch.Tensor, b: torch.Tensor, generator) -> dict[str, torch.Tensor]:
        if self.mode == "random":
            a, b = self._random(len(a), generator), self._random(len(a), generator)
        b = torch.full_like(b, -1.0) if self.mode == "silent" else _hide(b)
        return {"a": a, "b": b}

    def generate_joint(self, n, *, langevin_steps=None, generator=None):
        shared = self._random(n, generator)
        return self._pair(shared, shared, generator)

    def generate_conditional(self, batch, sources, *, generator=None):
        x = batch[sources[0]]
        return self._pair(x, x, generator)

    def aggregate_posterior_z(self, batch, *, generator=None):
        return batch["a"]

    def decode(self, z, private=None):
        return self._pair(z, z, None)


def attribute_chunks(num: int, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    attrs = torch.randint(0, V, (num, A), generator=gen)
    return [{"a": attrs[s:s + batch].float(), "b": _hide(attrs[s:s + batch].float()), "attributes":
             attrs[s:s + batch], "label": attrs[s:s + batch, 0]} for s in range(0, num, batch)]


def test_attribute_agreement_compares_only_what_two_readings_state():
    from mmebm_dist.datasets.birds import UNMENTIONED
    from mmebm_dist.evaluate.coherence import UNSTATED

    assert UNSTATED == UNMENTIONED  # the birds reader's "not mentioned" is the judge's "not stated"
    image = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 2, 3], [1, 2, 3]])
    caption = torch.tensor([[1, -1, -1], [1, 0, -1], [-1, -1, -1], [-1, 2, 3]])
    coherent, compared, agree = attribute_agreement([image, caption])
    assert coherent.tolist() == [True, False, False, True]  # row 3 states nothing: not coherent
    assert compared.sum(0).tolist() == [2, 2, 1]
    assert agree.sum(0).tolist() == [2, 1, 1]
    with pytest.raises(ValueError, match="two readings"):
        attribute_agreement([image])


def test_attribute_coherence_of_a_copying_model_is_one_and_keeps_the_layout():
    out = measure_coherence(FakeAttributeModel("copy"), FakeJudge(), attribute_chunks(30, 8),
                                      num_samples=20, batch_size=8, seed=0, langevin_sweep=(0, 3))
    assert out["measure"] == "attributes" and out["attributes"] == ["p", "q", "r"]
    for key in ("modalities", "num_samples", "num_test", "seed", "joint", "langevin_sweep", "cross",
                "subsets", "prior_ceiling"):  # the keys of measure_coherence's block
        assert key in out, key
    assert out["num_samples"] == 20 and out["num_test"] == 30
    assert out["joint"]["coherence"] == 1.0 and out["joint"]["stderr"] == 0.0 and out["joint"]["n"] == 20
    assert [e["steps"] for e in out["langevin_sweep"]] == [0, 3]
    assert out["cross"]["matrix"] == [[1.0, 1.0], [1.0, 1.0]] and out["cross"]["coherence"] == 1.0
    assert out["prior_ceiling"]["coherence"] == 1.0 and out["real_data"]["coherence"] == 1.0
    # "b" never states "r": it is compared only where the source is an image and the target an image
    never = out["joint"]["attributes"]["r"]
    assert never["n"] == 0 and math.isnan(never["accuracy"])
    assert out["cross"]["cells"]["a->a"]["attributes"]["r"]["n"] == 30
    assert out["cross"]["cells"]["a->b"]["attributes"]["p"]["n"] == 30
    assert out["joint"]["mean_attribute_accuracy"] == 1.0


def test_a_model_whose_captions_state_nothing_is_not_coherent():
    out = measure_coherence(FakeAttributeModel("silent"), FakeJudge(), attribute_chunks(24, 8),
                                      num_samples=16, batch_size=8, seed=0)
    assert out["joint"]["coherence"] == 0.0
    cells = {k: v["coherence"] for k, v in out["cross"]["cells"].items()}
    assert cells == {"a->a": 1.0, "a->b": 0.0, "b->a": 1.0, "b->b": 0.0}
    assert out["cross"]["coherence"] == pytest.approx(0.5)  # mean over targets of the off-diagonal cells
    assert out["cross"]["stderr"] == 0.0  # every tuple scores exactly one of its two cross cells
    assert out["cross"]["self_coherence"] == pytest.approx(0.5)


def test_random_attributes_match_the_exact_expectation_with_binomial_errors():
    out = measure_coherence(FakeAttributeModel("random"), FakeJudge(), attribute_chunks(400, 100),
                                      num_samples=4000, batch_size=500, seed=2)
    joint = out["joint"]
    expected = (1 / V) ** 2  # the two attributes both state must agree
    assert joint["stderr"] == pytest.approx(binomial_stderr(joint["coherence"], 4000))
    assert abs(joint["coherence"] - expected) < 4 * joint["stderr"]
    p = joint["attributes"]["p"]
    assert abs(p["accuracy"] - 1 / V) < 4 * p["stderr"] and p["n"] == 4000
    assert joint["mean_attribute_stderr"] == pytest.approx(math.hypot(p["stderr"], joint["attributes"]["q"]
                                                                      ["stderr"]) / 2)


def test_attribute_coherence_split_over_ranks_equals_single_process():
    def run(rank, world, all_reduce):
        return measure_coherence(FakeAttributeModel("random"), FakeJudge(), attribute_chunks(40, 8),
                                           num_samples=30, batch_size=8, seed=3, langevin_sweep=(0,),
                                           rank=rank, world_size=world, all_reduce=all_reduce)

    single = run(0, 1, lambda t: t)
    captured = []
    for rank in (0, 1):
        run(rank, 2, lambda t: captured.append(t.clone()) or t)
    total = captured[0] + captured[1]
    reduced = run(0, 2, lambda t: total)
    drop = {"seconds", "ms_per_sample"}
    clean = lambda d: {k: v for k, v in d.items() if k not in drop}
    assert clean(reduced["joint"]) == clean(single["joint"]) and reduced["cross"] == single["cross"]
    assert reduced["real_data"] == single["real_data"]
