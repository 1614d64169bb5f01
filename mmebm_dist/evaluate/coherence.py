"""Coherence of generated modalities as judged by per-modality digit classifiers (MMVAE+ / MoPoE standard).

Joint coherence: share of joint samples on which all M classifiers give the same label.
Cross coherence: accuracy of the target's classifier on x_tgt ~ p(x_tgt | z), z ~ q(z | x_src), against the
source's true label; the summary is the mean over targets of the mean over sources != target.
Subset coherence (MoPoE): for k of M conditioning modalities, the mean over subsets of the mean over targets
not in the subset.

Everything is counted as (correct, total) tallies so that several processes can add their counts with one
all_reduce. Work is cut into fixed chunks seeded by (seed, stream, chunk index) and chunk i goes to rank
i % world_size, so the reduced counts do not depend on the number of processes.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

NUM_CLASSES = 10
Batch = dict[str, torch.Tensor]


class Predictor(Protocol):
    """Anything that labels a batch of one modality: the trained classifier bundle or a test stand-in."""

    def predict(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Class labels int64 [B] for the batch x [B, *shape] of modality ``name``."""
        ...


class GenerativeModel(Protocol):
    """The part of the model API (docs/architecture.md) that coherence needs."""

    modalities: list[str]

    def generate_joint(self, n: int, *, langevin_steps: int | None = None,
                       generator: torch.Generator | None = None) -> dict[str, torch.Tensor]: ...

    def generate_conditional(self, batch: dict[str, torch.Tensor], sources: Sequence[str], *,
                             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]: ...

    def aggregate_posterior_z(self, batch: dict[str, torch.Tensor], *,
                              generator: torch.Generator | None = None) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor,
               private: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------------ pure math


def binomial_stderr(rate: float, n: float) -> float:
    """Standard error sqrt(p (1 - p) / n) of a proportion p over n independent trials (nan if n = 0)."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(rate * (1.0 - rate), 0.0) / n)


def all_agree(labels: Sequence[torch.Tensor]) -> torch.Tensor:
    """Bool [N]: True where every tensor of labels [N] holds the same value."""
    if not labels:
        raise ValueError("all_agree needs the labels of at least one modality")
    first = labels[0]
    agree = torch.ones_like(first, dtype=torch.bool)
    for other in labels[1:]:
        agree &= other == first
    return agree


def expected_joint_coherence_uniform(num_modalities: int, num_classes: int = NUM_CLASSES) -> float:
    """Joint coherence of M independent uniform labels: sum_c (1/C)^M = 1 / C^(M-1)."""
    return float(num_classes) ** (1 - num_modalities)


def conditioning_subsets(modalities: Sequence[str], k: int) -> list[tuple[str, ...]]:
    """All C(M, k) subsets of k modalities, as name tuples in config order."""
    if not 1 <= k <= len(modalities):
        raise ValueError(f"subset size k must be between 1 and {len(modalities)}, got {k}")
    return list(itertools.combinations(modalities, k))


def cross_coherence(matrix: dict[tuple[str, str], float], modalities: Sequence[str]) -> float:
    """Mean over targets of the mean over sources != target of ``matrix[(source, target)]``."""
    if len(modalities) < 2:
        raise ValueError("cross coherence needs at least two modalities")
    m = len(modalities)
    per_target = [sum(matrix[(src, tgt)] for src in modalities if src != tgt) / (m - 1) for tgt in modalities]
    return sum(per_target) / len(per_target)


def subset_coherence(rates: dict[tuple[tuple[str, ...], str], float], modalities: Sequence[str],
                     k: int) -> float:
    """Mean over the k-subsets S of the mean over targets t not in S of ``rates[(S, t)]`` (MoPoE Table 1)."""
    if not 1 <= k < len(modalities):
        raise ValueError(f"subset coherence needs 1 <= k < {len(modalities)}, got {k}")
    per_subset = []
    for subset in conditioning_subsets(modalities, k):
        targets = [t for t in modalities if t not in subset]
        per_subset.append(sum(rates[(subset, t)] for t in targets) / len(targets))
    return sum(per_subset) / len(per_subset)


# ------------------------------------------------------------------------------------------------ tallies


@dataclass
class Tally:
    """Correct / total counts of one figure."""

    correct: float = 0.0
    total: float = 0.0

    @property
    def rate(self) -> float:
        return self.correct / self.total if self.total else math.nan

    @property
    def stderr(self) -> float:
        return binomial_stderr(self.rate, self.total)


AllReduce = Callable[[torch.Tensor], torch.Tensor]


def distributed_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all processes when torch.distributed is initialised; ``t`` itself otherwise."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            moved = t.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            return moved.cpu()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class Counts:
    """Tallies keyed by hashable names, reducible across processes in one all_reduce (fixed key order)."""

    def __init__(self) -> None:
        self.tallies: dict = {}

    def add(self, key, correct: float, total: float) -> None:
        tally = self.tallies.setdefault(key, Tally())
        tally.correct += float(correct)
        tally.total += float(total)

    def __getitem__(self, key) -> Tally:
        return self.tallies[key]

    def keys(self) -> list:
        return list(self.tallies)

    def reduce(self, keys: Sequence, all_reduce: AllReduce = distributed_sum) -> Counts:
        """Counts summed over processes. Every process must pass the same ``keys`` (missing ones count 0)."""
        flat = torch.zeros(2 * len(keys), dtype=torch.float64)
        for i, key in enumerate(keys):
            tally = self.tallies.get(key, Tally())
            flat[2 * i], flat[2 * i + 1] = tally.correct, tally.total
        flat = all_reduce(flat)
        out = Counts()
        for i, key in enumerate(keys):
            out.add(key, flat[2 * i].item(), flat[2 * i + 1].item())
        return out


# ------------------------------------------------------------------------------------------------ seeding


def chunk_seed(seed: int, stream: str, chunk: int) -> int:
    """A 62-bit seed for chunk ``chunk`` of random stream ``stream`` (independent of the process count)."""
    digest = hashlib.sha256(f"{seed}/{stream}/{chunk}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 2


@contextmanager
def seeded(seed: int, device: torch.device):
    """A torch.Generator seeded with ``seed``, with the global RNG forked and seeded too.

    The global seed makes model code that ignores the generator (e.g. private latents drawn inside
    ``decode``) reproducible per chunk as well.
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        yield gen


def my_chunks(num_chunks: int, rank: int, world_size: int) -> range:
    """The chunk indices rank ``rank`` of ``world_size`` handles: i with i % world_size == rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} out of range for world size {world_size}")
    return range(rank, num_chunks, world_size)


def chunk_sizes(total: int, chunk: int) -> list[int]:
    """Sizes of the chunks that cut ``total`` items into pieces of at most ``chunk``."""
    if chunk <= 0:
        raise ValueError(f"chunk size must be positive, got {chunk}")
    return [min(chunk, total - start) for start in range(0, total, chunk)]


# ------------------------------------------------------------------------------------------------ counting


def _device_of(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def joint_batches(model: GenerativeModel, *, num_samples: int, batch_size: int, seed: int,
                  langevin_steps: int | None, stream: str, rank: int = 0,
                  world_size: int = 1) -> Iterator[tuple[dict[str, torch.Tensor], float]]:
    """(joint samples, seconds spent generating them) for each of this rank's chunks of ``num_samples`` joint
    samples; chunk i is drawn from a generator seeded by (seed, stream, i)."""
    device = _device_of(model)
    sizes = chunk_sizes(num_samples, batch_size)
    for i in my_chunks(len(sizes), rank, world_size):
        with seeded(chunk_seed(seed, stream, i), device) as gen:
            start = time.perf_counter()
            samples = model.generate_joint(sizes[i], langevin_steps=langevin_steps, generator=gen)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        yield samples, seconds


@torch.no_grad()
def count_joint(model: GenerativeModel, classifiers: Predictor, *, num_samples: int, batch_size: int,
                seed: int, langevin_steps: int | None = None, rank: int = 0, world_size: int = 1,
                stream: str | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[Tally, float]:
    """This rank's joint-agreement tally over its chunks of ``num_samples`` joint samples, and seconds spent
    generating them (classification excluded)."""
    tally, seconds = Tally(), 0.0
    stream = stream or f"joint/{langevin_steps}"
    for samples, spent in joint_batches(model, num_samples=num_samples, batch_size=batch_size, seed=seed,
                                        langevin_steps=langevin_steps, stream=stream, rank=rank,
                                        world_size=world_size):
        seconds += spent
        labels = [classifiers.predict(name, samples[name]) for name in model.modalities]
        size = labels[0].numel()
        tally.correct += all_agree(labels).sum().item()
        tally.total += size
        if progress is not None:
            progress(size)
    return tally, seconds


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


CROSS_TUPLE = "cross/tuple"
CROSS_TUPLE_SQ = "cross/tuple_sq"


@torch.no_grad()
def count_conditional(model: GenerativeModel, classifiers: Predictor, chunks: Sequence[Batch | None],
                      subsets: Iterable[tuple[str, ...]], *, seed: int, rank: int = 0, world_size: int = 1,
                      progress: Callable[[int], None] | None = None) -> Counts:
    """Tallies keyed (subset, target) of the target classifier's accuracy against the true label when
    generating every target from q(z | x_subset); every target is counted, including those in the subset
    (for singletons the diagonal is the self coherence: source = target, private latent from its prior).

    When all singletons are among ``subsets`` it also tallies, per test tuple, its share s_i of correct
    off-diagonal cells (keys CROSS_TUPLE: sum s_i, CROSS_TUPLE_SQ: sum s_i^2): cross coherence is the mean
    of s_i, so these give its standard error over tuples.
    """
    device = _device_of(model)
    counts = Counts()
    subsets = list(subsets)
    names = list(model.modalities)
    with_tuples = all((m,) in subsets for m in names) and len(names) > 1
    for i in my_chunks(len(chunks), rank, world_size):
        batch = _to_device(chunks[i], device)
        label = batch["label"]
        off_diagonal = torch.zeros(label.shape[0], dtype=torch.float64, device=label.device)
        for subset in subsets:
            with seeded(chunk_seed(seed, "cond/" + ",".join(subset), i), device) as gen:
                generated = model.generate_conditional(batch, list(subset), generator=gen)
            for target in names:
                hit = classifiers.predict(target, generated[target]) == label
                counts.add((subset, target), hit.sum().item(), label.numel())
                if len(subset) == 1 and subset[0] != target:
                    off_diagonal += hit
        if with_tuples:
            share = off_diagonal / (len(names) * (len(names) - 1))
            counts.add(CROSS_TUPLE, share.sum().item(), label.numel())
            counts.add(CROSS_TUPLE_SQ, (share**2).sum().item(), label.numel())
        if progress is not None:
            progress(label.numel())
    return counts


def mean_stderr(sum_x: float, sum_x2: float, n: float) -> float:
    """Standard error of a mean from the sum and sum of squares of n values (nan if n < 2)."""
    if n < 2:
        return math.nan
    var = max(sum_x2 / n - (sum_x / n) ** 2, 0.0) * n / (n - 1)
    return math.sqrt(var / n)


@torch.no_grad()
def count_aggregate_posterior(model: GenerativeModel, classifiers: Predictor,
                              chunks: Sequence[Batch | None], *, seed: int, rank: int = 0,
                              world_size: int = 1) -> Tally:
    """Joint-agreement tally of decodes from z ~ the aggregate posterior (the ceiling of any prior)."""
    device = _device_of(model)
    tally = Tally()
    for i in my_chunks(len(chunks), rank, world_size):
        batch = _to_device(chunks[i], device)
        with seeded(chunk_seed(seed, "aggregate", i), device) as gen:
            z = model.aggregate_posterior_z(batch, generator=gen)
            decoded = model.decode(z)
        labels = [classifiers.predict(name, decoded[name]) for name in model.modalities]
        tally.correct += all_agree(labels).sum().item()
        tally.total += z.shape[0]
    return tally


# ------------------------------------------------------------------------------------------------ all figures


def _rate_entry(tally: Tally) -> dict:
    return {"coherence": tally.rate, "stderr": tally.stderr, "n": int(tally.total)}


def measure_coherence(model: GenerativeModel, classifiers: Predictor, chunks: Sequence[Batch | None], *,
                      num_samples: int, batch_size: int, seed: int, joint_langevin_steps: int | None = None,
                      subset_sizes: Sequence[int] = (), aggregate: bool = True,
                      langevin_sweep: Sequence[int] = (), rank: int = 0, world_size: int = 1,
                      all_reduce: AllReduce = distributed_sum, show_progress: bool = False) -> dict:
    """Joint, cross (full matrix), subset and aggregate-posterior coherence plus an optional Langevin sweep.

    ``chunks`` are the test batches (rank r handles chunks r, r + W, ... and may hold None for the others);
    ``num_samples`` joint samples are drawn in chunks of ``batch_size``. Counts are summed over processes with
    ``all_reduce`` (one call), so every rank returns the same figures. ``subset_sizes`` lists the k >= 2 of
    the k-of-M conditioning figures (k = 1 is the cross matrix, always measured).
    """
    from tqdm import tqdm

    names = list(model.modalities)
    m = len(names)
    bad = [k for k in subset_sizes if not 2 <= k < m]
    if bad:
        raise ValueError(f"subset sizes {bad} out of range: with {m} modalities k must be in 2..{m - 1}")
    subsets = [(n,) for n in names]
    subsets += [s for k in sorted(set(subset_sizes)) for s in conditioning_subsets(names, k)]
    own_test = sum(int(chunks[i]["label"].numel()) for i in my_chunks(len(chunks), rank, world_size))
    own_joint = sum(chunk_sizes(num_samples, batch_size)[i]
                    for i in my_chunks(len(chunk_sizes(num_samples, batch_size)), rank, world_size))
    units = own_joint * (1 + len(langevin_sweep)) + own_test * (1 + int(aggregate))
    bar = tqdm(total=units, desc="coherence", unit="sample", disable=not show_progress)

    counts = Counts()
    common = {"num_samples": num_samples, "batch_size": batch_size, "seed": seed, "rank": rank,
              "world_size": world_size, "progress": bar.update}
    joint, seconds = count_joint(model, classifiers, langevin_steps=joint_langevin_steps, stream="joint",
                                 **common)
    counts.add("joint", joint.correct, joint.total)
    counts.add("joint/time", seconds, joint.total)
    for steps in langevin_sweep:
        tally, seconds = count_joint(model, classifiers, langevin_steps=steps, **common)
        counts.add(("sweep", steps), tally.correct, tally.total)
        counts.add(("sweep/time", steps), seconds, tally.total)
    cond = count_conditional(model, classifiers, chunks, subsets, seed=seed, rank=rank, world_size=world_size,
                             progress=bar.update)
    for key in cond.keys():
        counts.add(key, cond[key].correct, cond[key].total)
    if aggregate:
        tally = count_aggregate_posterior(model, classifiers, chunks, seed=seed, rank=rank,
                                          world_size=world_size)
        counts.add("aggregate", tally.correct, tally.total)
        bar.update(own_test)
    bar.close()

    keys = ["joint", "joint/time"]
    keys += [k for steps in langevin_sweep for k in (("sweep", steps), ("sweep/time", steps))]
    keys += [(s, t) for s in subsets for t in names] + ([CROSS_TUPLE, CROSS_TUPLE_SQ] if m > 1 else [])
    keys += ["aggregate"] if aggregate else []
    total = counts.reduce(keys, all_reduce)

    def timing(key) -> dict:
        t = total[key]
        return {"seconds": t.correct, "ms_per_sample": 1e3 * t.correct / t.total if t.total else math.nan}

    num_test = int(total[((names[0],), names[0])].total)
    out: dict = {"modalities": names, "num_samples": int(total["joint"].total), "num_test": num_test,
                 "seed": seed}
    out["joint"] = {**_rate_entry(total["joint"]), "langevin_steps": joint_langevin_steps,
                    **timing("joint/time")}
    out["langevin_sweep"] = [{"steps": steps, **_rate_entry(total[("sweep", steps)]),
                              **timing(("sweep/time", steps))} for steps in langevin_sweep]
    matrix = [[total[((s,), t)].rate for t in names] for s in names]
    cross: dict = {"matrix": matrix, "n": int(total[((names[0],), names[0])].total),
                   "self_coherence": sum(matrix[i][i] for i in range(m)) / m}
    if m > 1:
        cell = {(s, t): matrix[i][j] for i, s in enumerate(names) for j, t in enumerate(names)}
        tup, sq = total[CROSS_TUPLE], total[CROSS_TUPLE_SQ]
        cross["coherence"] = cross_coherence(cell, names)
        cross["stderr"] = mean_stderr(tup.correct, sq.correct, tup.total)
    out["cross"] = cross
    rates = {key: total[key].rate for key in keys if isinstance(key, tuple) and isinstance(key[0], tuple)}
    out["subsets"] = {str(k): {"coherence": subset_coherence(rates, names, k), "num_subsets": math.comb(m, k)}
                      for k in [1, *sorted(set(subset_sizes))] if k < m}
    if aggregate:
        out["prior_ceiling"] = _rate_entry(total["aggregate"])
    return out


# ------------------------------------------------------------------------------------------------ attributes
# Data sets whose generating attributes are known (the generated birds): coherence is judged attribute by
# attribute instead of by one class label, with exact readers where they exist (captions) and trained
# classifiers otherwise (images). The layout of the result follows measure_coherence's.

UNSTATED = -1
"""Value of an attribute a reading says nothing about (a caption that does not mention it)."""


class AttributeJudge(Protocol):
    """Reads attribute values off a modality, and knows what each modality of a test tuple fixes."""

    attributes: Sequence[str]

    def read(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """int64 [B, A]: value index of each attribute in the batch x of modality ``name`` (UNSTATED where x
        says nothing about it)."""
        ...

    def known(self, name: str, batch: Batch) -> torch.Tensor:
        """int64 [B, A]: what modality ``name`` of the test tuples fixes (its true or stated attributes)."""
        ...


def attribute_agreement(readings: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coherent bool [B], compared bool [B, A], agree bool [B, A]) of K >= 2 readings int [B, A] of the same
    tuples. An attribute is compared where at least two readings state it and agrees where all the stated
    values are equal; a tuple is coherent when at least one attribute is compared and every compared one
    agrees (a generated caption that states nothing is not coherent)."""
    if len(readings) < 2:
        raise ValueError(f"attribute agreement needs at least two readings, got {len(readings)}")
    r = torch.stack([x.long().cpu() for x in readings])  # (K, B, A)
    stated = r != UNSTATED
    compared = stated.sum(0) >= 2
    highest = torch.where(stated, r, torch.iinfo(torch.int64).min).amax(0)
    lowest = torch.where(stated, r, torch.iinfo(torch.int64).max).amin(0)
    agree = compared & (highest == lowest)
    coherent = compared.any(1) & (agree | ~compared).all(1)
    return coherent, compared, agree


def _count_attributes(counts: Counts, key: str, attributes: Sequence[str],
                      readings: Sequence[torch.Tensor]) -> torch.Tensor:
    """Add the tuple tally under ``key`` and one tally per attribute under ``key|attribute``; the coherent
    mask [B]."""
    coherent, compared, agree = attribute_agreement(readings)
    counts.add(key, coherent.sum().item(), coherent.numel())
    for a, name in enumerate(attributes):
        counts.add(f"{key}|{name}", agree[:, a].sum().item(), compared[:, a].sum().item())
    return coherent


def _attribute_keys(key: str, attributes: Sequence[str]) -> list[str]:
    return [key, *(f"{key}|{name}" for name in attributes)]


def _attribute_entry(total: Counts, key: str, attributes: Sequence[str]) -> dict:
    """Tuple coherence with its binomial standard error, and accuracy per attribute over the tuples where it
    was compared (binomial standard error each); the mean over attributes carries sqrt(sum se^2) / A, the
    standard error it would have if the attributes were independent."""
    per = {name: {"accuracy": total[f"{key}|{name}"].rate, "stderr": total[f"{key}|{name}"].stderr,
                  "n": int(total[f"{key}|{name}"].total)} for name in attributes}
    measured = [v for v in per.values() if v["n"] > 0]
    mean = sum(v["accuracy"] for v in measured) / len(measured) if measured else math.nan
    mean_se = math.sqrt(sum(v["stderr"] ** 2 for v in measured)) / len(measured) if measured else math.nan
    return {**_rate_entry(total[key]), "attributes": per, "mean_attribute_accuracy": mean,
            "mean_attribute_stderr": mean_se}


@torch.no_grad()
def measure_attribute_coherence(model: GenerativeModel, judge: AttributeJudge, chunks: Sequence[Batch | None],
                                *, num_samples: int, batch_size: int, seed: int,
                                joint_langevin_steps: int | None = None, aggregate: bool = True,
                                langevin_sweep: Sequence[int] = (), rank: int = 0, world_size: int = 1,
                                all_reduce: AllReduce = distributed_sum, show_progress: bool = False) -> dict:
    """Joint, cross (every source -> target cell) and aggregate-posterior coherence judged by attributes.

    Joint: the readings of every generated modality must agree. Cell (source, target): the target generated
    from q(z | x_source) is read and compared with what the source fixes (an image: its true attributes; a
    caption: what it states). Figures are shares of tuples that agree on every compared attribute (binomial
    standard errors), plus accuracy per attribute. ``real_data``: the joint figure on the real test tuples,
    the most any model can score with these judges. Same seeding, chunking and reduction as
    :func:`measure_coherence`, so the figures do not depend on the number of processes.
    """
    from tqdm import tqdm

    names = list(model.modalities)
    attrs = list(judge.attributes)
    m = len(names)
    if m < 2:
        raise ValueError("attribute coherence needs at least two modalities")
    device = _device_of(model)
    mine = list(my_chunks(len(chunks), rank, world_size))
    own_test = sum(int(chunks[i]["label"].numel()) for i in mine)
    sizes = chunk_sizes(num_samples, batch_size)
    own_joint = sum(sizes[i] for i in my_chunks(len(sizes), rank, world_size))
    bar = tqdm(total=own_joint * (1 + len(langevin_sweep)) + own_test * (1 + int(aggregate)),
               desc="attribute coherence", unit="sample", disable=not show_progress)
    counts = Counts()
    streams = [("joint", "joint", joint_langevin_steps)]
    streams += [(f"sweep/{k}", f"joint/{k}", k) for k in langevin_sweep]
    for key, stream, steps in streams:
        for samples, seconds in joint_batches(model, num_samples=num_samples, batch_size=batch_size,
                                              seed=seed, langevin_steps=steps, stream=stream, rank=rank,
                                              world_size=world_size):
            coherent = _count_attributes(counts, key, attrs, [judge.read(n, samples[n]) for n in names])
            counts.add(f"{key}/time", seconds, coherent.numel())
            bar.update(coherent.numel())
    for i in mine:
        batch = _to_device(chunks[i], device)
        off_diagonal = torch.zeros(batch["label"].shape[0], dtype=torch.float64)
        for src in names:
            with seeded(chunk_seed(seed, "cond/" + src, i), device) as gen:
                generated = model.generate_conditional(batch, [src], generator=gen)
            fixed = judge.known(src, batch)
            for tgt in names:
                coherent = _count_attributes(counts, f"cell/{src}/{tgt}", attrs,
                                             [fixed, judge.read(tgt, generated[tgt])])
                if src != tgt:
                    off_diagonal += coherent
        _count_attributes(counts, "real", attrs, [judge.read(n, batch[n]) for n in names])
        share = off_diagonal / (m * (m - 1))
        counts.add(CROSS_TUPLE, share.sum().item(), share.numel())
        counts.add(CROSS_TUPLE_SQ, (share**2).sum().item(), share.numel())
        bar.update(share.numel())
        if aggregate:
            with seeded(chunk_seed(seed, "aggregate", i), device) as gen:
                decoded = model.decode(model.aggregate_posterior_z(batch, generator=gen))
            _count_attributes(counts, "aggregate", attrs, [judge.read(n, decoded[n]) for n in names])
            bar.update(share.numel())
    bar.close()

    keys = [k for key, _, _ in streams for k in (*_attribute_keys(key, attrs), f"{key}/time")]
    keys += [k for s in names for t in names for k in _attribute_keys(f"cell/{s}/{t}", attrs)]
    keys += [CROSS_TUPLE, CROSS_TUPLE_SQ, *_attribute_keys("real", attrs)]
    keys += _attribute_keys("aggregate", attrs) if aggregate else []
    total = counts.reduce(keys, all_reduce)

    def timing(key: str) -> dict:
        t = total[f"{key}/time"]
        return {"seconds": t.correct, "ms_per_sample": 1e3 * t.correct / t.total if t.total else math.nan}

    first = f"cell/{names[0]}/{names[0]}"
    out: dict = {"measure": "attributes", "attributes": attrs, "modalities": names,
                 "num_samples": int(total["joint"].total), "num_test": int(total[first].total), "seed": seed}
    out["joint"] = {**_attribute_entry(total, "joint", attrs), "langevin_steps": joint_langevin_steps,
                    **timing("joint")}
    out["langevin_sweep"] = [{"steps": k, **_rate_entry(total[f"sweep/{k}"]), **timing(f"sweep/{k}")}
                             for k in langevin_sweep]
    matrix = [[total[f"cell/{s}/{t}"].rate for t in names] for s in names]
    cell = {(s, t): matrix[i][j] for i, s in enumerate(names) for j, t in enumerate(names)}
    out["cross"] = {"matrix": matrix, "n": int(total[first].total),
                    "self_coherence": sum(matrix[i][i] for i in range(m)) / m,
                    "coherence": cross_coherence(cell, names),
                    "stderr": mean_stderr(total[CROSS_TUPLE].correct, total[CROSS_TUPLE_SQ].correct,
                                          total[CROSS_TUPLE].total),
                    "cells": {f"{s}->{t}": _attribute_entry(total, f"cell/{s}/{t}", attrs)
                              for s in names for t in names}}
    singles = {((s,), t): v for (s, t), v in cell.items()}
    out["subsets"] = {"1": {"coherence": subset_coherence(singles, names, 1), "num_subsets": m}}
    if aggregate:
        out["prior_ceiling"] = _attribute_entry(total, "aggregate", attrs)
    out["real_data"] = _attribute_entry(total, "real", attrs)
    return out
