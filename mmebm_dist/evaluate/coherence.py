"""Coherence of generated modalities as read by a judge (``evaluate.judges``; the MMVAE+ / MoPoE standard).

Joint coherence: share of joint samples whose modalities' readings agree (digits: all M classifiers give the
same label; birds: every attribute that two modalities state agrees).
Cross coherence: share of targets x_tgt ~ p(x_tgt | z), z ~ q(z | x_src), whose reading agrees with what
the source fixes (digits: the true label); the summary is the mean over targets of the mean over sources !=
target.
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mmebm_dist.evaluate.interfaces import (  # noqa: F401  (NUM_CLASSES, Batch: also read from here)
    NUM_CLASSES,
    UNSTATED,
    Batch,
    GenerativeModel,
    Judge,
)

# ------------------------------------------------------------------------------------------------ pure math


def binomial_stderr(rate: float, n: float) -> float:
    """Standard error sqrt(p (1 - p) / n) of a proportion p over n independent trials (nan if n = 0)."""
    if n <= 0:
        return math.nan
    return math.sqrt(max(rate * (1.0 - rate), 0.0) / n)


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


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


CROSS_TUPLE = "cross/tuple"
CROSS_TUPLE_SQ = "cross/tuple_sq"


def mean_stderr(sum_x: float, sum_x2: float, n: float) -> float:
    """Standard error of a mean from the sum and sum of squares of n values (nan if n < 2)."""
    if n < 2:
        return math.nan
    var = max(sum_x2 / n - (sum_x / n) ** 2, 0.0) * n / (n - 1)
    return math.sqrt(var / n)



# ------------------------------------------------------------------------------------------------ agreement


def attribute_agreement(readings: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coherent bool [B], compared bool [B, A], agree bool [B, A]) of K >= 2 readings int [B, A] of the same
    tuples. An attribute is compared where at least two readings state it and agrees where all the stated
    values are equal; a tuple is coherent when at least one attribute is compared and every compared one
    agrees (a generated caption that states nothing is not coherent). A class label is one attribute that is
    always stated, so labels are coherent where they are all equal."""
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


def _tally(counts: Counts, key, readings: Sequence[torch.Tensor],
           attributes: Sequence[str] | None) -> torch.Tensor:
    """Add the tally of coherent tuples under ``key`` and, when the judge names its attributes, one tally per
    attribute under (key, attribute); the coherent mask [B]."""
    if len(readings) == 1:  # a single modality agrees with itself
        readings = [readings[0], readings[0]]
    coherent, compared, agree = attribute_agreement(readings)
    counts.add(key, coherent.sum().item(), coherent.numel())
    for a, name in enumerate(attributes or ()):
        counts.add((key, name), agree[:, a].sum().item(), compared[:, a].sum().item())
    return coherent


def _keys(key, attributes: Sequence[str] | None) -> list:
    return [key, *((key, name) for name in attributes or ())]


@torch.no_grad()
def _count(model: GenerativeModel, judge: Judge, chunks: Sequence[Batch | None], *, num_samples: int,
           batch_size: int, seed: int, subsets: Sequence[tuple[str, ...]],
           streams: Sequence[tuple[str, str, int | None]], aggregate: bool, rank: int, world_size: int,
           progress: Callable[[int], None]) -> Counts:
    """This rank's tallies: joint samples of each stream (key, seed stream, Langevin steps), with generation
    seconds under ("time", key); cells ("cell", subset, target): targets generated from q(z | x_subset)
    against what the subset fixes (every target, including those in the subset: for singletons the diagonal
    is the self coherence); per test tuple its share s of coherent off-diagonal singleton cells (CROSS_TUPLE:
    sum s, CROSS_TUPLE_SQ: sum s^2, for the standard error of cross coherence); decodes of the aggregate
    posterior ("aggregate"); and, for judges that name attributes, the real test tuples ("real")."""
    names, attrs = list(model.modalities), judge.attributes
    m = len(names)
    device = _device_of(model)
    counts = Counts()
    for key, stream, steps in streams:
        for samples, seconds in joint_batches(model, num_samples=num_samples, batch_size=batch_size,
                                              seed=seed, langevin_steps=steps, stream=stream, rank=rank,
                                              world_size=world_size):
            coherent = _tally(counts, key, [judge.read(n, samples[n]) for n in names], attrs)
            counts.add(("time", key), seconds, coherent.numel())
            progress(coherent.numel())
    for i in my_chunks(len(chunks), rank, world_size):
        batch = _to_device(chunks[i], device)
        size = batch["label"].shape[0]
        off_diagonal = torch.zeros(size, dtype=torch.float64)
        for subset in subsets:
            with seeded(chunk_seed(seed, "cond/" + ",".join(subset), i), device) as gen:
                generated = model.generate_conditional(batch, list(subset), generator=gen)
            fixed = [judge.known(s, batch) for s in subset]
            for target in names:
                reading = judge.read(target, generated[target])
                coherent = _tally(counts, ("cell", subset, target), [*fixed, reading], attrs)
                if len(subset) == 1 and subset[0] != target:
                    off_diagonal += coherent
        if m > 1:
            share = off_diagonal / (m * (m - 1))
            counts.add(CROSS_TUPLE, share.sum().item(), size)
            counts.add(CROSS_TUPLE_SQ, (share**2).sum().item(), size)
        if attrs is not None:
            _tally(counts, "real", [judge.read(n, batch[n]) for n in names], attrs)
        progress(size)
        if aggregate:
            with seeded(chunk_seed(seed, "aggregate", i), device) as gen:
                decoded = model.decode(model.aggregate_posterior_z(batch, generator=gen))
            _tally(counts, "aggregate", [judge.read(n, decoded[n]) for n in names], attrs)
            progress(size)
    return counts


def count_conditional(model: GenerativeModel, judge: Judge, chunks: Sequence[Batch | None],
                      subsets: Sequence[tuple[str, ...]], *, seed: int, rank: int = 0,
                      world_size: int = 1) -> Counts:
    """The conditional tallies of :func:`measure_coherence` alone: cells ("cell", subset, target) and the
    per-tuple cross shares (CROSS_TUPLE, CROSS_TUPLE_SQ), on the same seeded draws (posterior refinement
    measures a model view with them)."""
    return _count(model, judge, chunks, num_samples=0, batch_size=1, seed=seed, subsets=list(subsets),
                  streams=(), aggregate=False, rank=rank, world_size=world_size, progress=lambda n: None)


def measure_joint(model: GenerativeModel, judge: Judge, *, num_samples: int, batch_size: int, seed: int,
                  langevin_steps: int | None = None, rank: int = 0, world_size: int = 1,
                  all_reduce: AllReduce = distributed_sum) -> dict:
    """The joint figure of :func:`measure_coherence` alone, on the same seeded draws (a latent sampler
    measures a model view with them): coherence, standard error, n and the generation time."""
    counts = _count(model, judge, [], num_samples=num_samples, batch_size=batch_size, seed=seed, subsets=[],
                    streams=[("joint", "joint", langevin_steps)], aggregate=False, rank=rank,
                    world_size=world_size, progress=lambda n: None)
    total = counts.reduce([*_keys("joint", judge.attributes), ("time", "joint")], all_reduce)
    entry = _rate_entry(total["joint"]) if judge.attributes is None else \
        _attribute_entry(total, "joint", judge.attributes)
    seconds = total[("time", "joint")]
    return {**entry, "ms_per_sample": 1e3 * seconds.correct / seconds.total if seconds.total else math.nan}


def _rate_entry(tally: Tally) -> dict:
    return {"coherence": tally.rate, "stderr": tally.stderr, "n": int(tally.total)}


def _attribute_entry(total: Counts, key, attributes: Sequence[str]) -> dict:
    """Tuple coherence with its binomial standard error, and accuracy per attribute over the tuples where it
    was compared (binomial standard error each); the mean over attributes carries sqrt(sum se^2) / A, the
    standard error it would have if the attributes were independent."""
    per = {name: {"accuracy": total[(key, name)].rate, "stderr": total[(key, name)].stderr,
                  "n": int(total[(key, name)].total)} for name in attributes}
    measured = [v for v in per.values() if v["n"] > 0]
    mean = sum(v["accuracy"] for v in measured) / len(measured) if measured else math.nan
    mean_se = math.sqrt(sum(v["stderr"] ** 2 for v in measured)) / len(measured) if measured else math.nan
    return {**_rate_entry(total[key]), "attributes": per, "mean_attribute_accuracy": mean,
            "mean_attribute_stderr": mean_se}


def measure_coherence(model: GenerativeModel, judge: Judge, chunks: Sequence[Batch | None], *,
                      num_samples: int, batch_size: int, seed: int, joint_langevin_steps: int | None = None,
                      subset_sizes: Sequence[int] = (), aggregate: bool = True,
                      langevin_sweep: Sequence[int] = (), rank: int = 0, world_size: int = 1,
                      all_reduce: AllReduce = distributed_sum, show_progress: bool = False) -> dict:
    """Joint, cross (full matrix), subset and aggregate-posterior coherence plus an optional Langevin sweep.

    ``chunks`` are the test batches (rank r handles chunks r, r + W, ... and may hold None for the others);
    ``num_samples`` joint samples are drawn in chunks of ``batch_size``. Counts are summed over processes with
    ``all_reduce`` (one call), so every rank returns the same figures. ``subset_sizes`` lists the k >= 2 of
    the k-of-M conditioning figures (k = 1 is the cross matrix, always measured). A judge that names its
    attributes adds accuracy per attribute to each figure, the cells of the cross matrix and ``real_data``
    (the joint figure on the real test tuples: the most any model can score with this judge).
    """
    from tqdm import tqdm

    names, attrs = list(model.modalities), judge.attributes
    m = len(names)
    if attrs is not None and m < 2:
        raise ValueError("attribute coherence needs at least two modalities")
    bad = [k for k in subset_sizes if not 2 <= k < m]
    if bad:
        raise ValueError(f"subset sizes {bad} out of range: with {m} modalities k must be in 2..{m - 1}")
    subsets = [(n,) for n in names]
    subsets += [s for k in sorted(set(subset_sizes)) for s in conditioning_subsets(names, k)]
    streams = [("joint", "joint", joint_langevin_steps)]
    # Every sweep entry starts its chains from the joint figure's draws (common random numbers): the entry at
    # 0 steps is the reference prior on the same model, judged on the very z0 the Laplace prior would draw.
    streams += [(("sweep", k), "joint", k) for k in langevin_sweep]
    own_test = sum(int(chunks[i]["label"].numel()) for i in my_chunks(len(chunks), rank, world_size))
    sizes = chunk_sizes(num_samples, batch_size)
    own_joint = sum(sizes[i] for i in my_chunks(len(sizes), rank, world_size))
    bar = tqdm(total=own_joint * len(streams) + own_test * (1 + int(aggregate)), desc="coherence",
               unit="sample", disable=not show_progress)
    counts = _count(model, judge, chunks, num_samples=num_samples, batch_size=batch_size, seed=seed,
                    subsets=subsets, streams=streams, aggregate=aggregate, rank=rank, world_size=world_size,
                    progress=bar.update)
    bar.close()

    keys = [k for key, _, _ in streams for k in (*_keys(key, attrs), ("time", key))]
    keys += [k for s in subsets for t in names for k in _keys(("cell", s, t), attrs)]
    keys += [CROSS_TUPLE, CROSS_TUPLE_SQ] if m > 1 else []
    keys += _keys("aggregate", attrs) if aggregate else []
    keys += _keys("real", attrs) if attrs is not None else []
    total = counts.reduce(keys, all_reduce)
    return _figures(total, names, attrs, subsets=subsets, langevin_sweep=langevin_sweep, seed=seed,
                    joint_langevin_steps=joint_langevin_steps, aggregate=aggregate)


def _figures(total: Counts, names: list[str], attrs: Sequence[str] | None, *, subsets: list[tuple[str, ...]],
             langevin_sweep: Sequence[int], seed: int, joint_langevin_steps: int | None,
             aggregate: bool) -> dict:
    """The figures of :func:`measure_coherence` from the reduced tallies."""
    m = len(names)
    entry = (lambda key: _rate_entry(total[key])) if attrs is None else \
        (lambda key: _attribute_entry(total, key, attrs))

    def timing(key) -> dict:
        t = total[("time", key)]
        return {"seconds": t.correct, "ms_per_sample": 1e3 * t.correct / t.total if t.total else math.nan}

    first = ("cell", (names[0],), names[0])
    out: dict = {"measure": "attributes", "attributes": list(attrs)} if attrs is not None else {}
    out.update({"modalities": names, "num_samples": int(total["joint"].total),
                "num_test": int(total[first].total), "seed": seed})
    out["joint"] = {**entry("joint"), "langevin_steps": joint_langevin_steps, **timing("joint")}
    out["langevin_sweep"] = [{"steps": k, **_rate_entry(total[("sweep", k)]), **timing(("sweep", k))}
                             for k in langevin_sweep]
    matrix = [[total[("cell", (s,), t)].rate for t in names] for s in names]
    cross: dict = {"matrix": matrix, "n": int(total[first].total),
                   "self_coherence": sum(matrix[i][i] for i in range(m)) / m}
    if m > 1:
        cell = {(s, t): matrix[i][j] for i, s in enumerate(names) for j, t in enumerate(names)}
        tup, sq = total[CROSS_TUPLE], total[CROSS_TUPLE_SQ]
        cross["coherence"] = cross_coherence(cell, names)
        cross["stderr"] = mean_stderr(tup.correct, sq.correct, tup.total)
    if attrs is not None:
        cross["cells"] = {f"{s}->{t}": entry(("cell", (s,), t)) for s in names for t in names}
    out["cross"] = cross
    rates = {(s, t): total[("cell", s, t)].rate for s in subsets for t in names}
    sizes = sorted({len(s) for s in subsets})
    out["subsets"] = {str(k): {"coherence": subset_coherence(rates, names, k), "num_subsets": math.comb(m, k)}
                      for k in sizes if k < m}
    if aggregate:
        out["prior_ceiling"] = entry("aggregate")
    if attrs is not None:
        out["real_data"] = entry("real")
    return out
