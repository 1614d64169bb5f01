"""Sample quality offline: Frechet distance between generated and test data in a judge's feature space.

FD = |mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_r^1/2 S_g S_r^1/2)^1/2) over feature means and covariances (the FID
formula of Heusel et al. 2017; tr (S_g S_r)^1/2 is taken from the symmetric form, so it is real and exact).
The default judge is the project's own per-modality classifiers (their penultimate layer), so no weights are
fetched; the judge's sha256 is written beside every figure, because distances compare only within one judge.
With a local Inception weights file (torch-fidelity's InceptionV3 port) the standard FID is computed too.

Features are gathered as (count, sum, sum of outer products) moments, so processes add them with one
all_reduce; samples are drawn with the seeds coherence uses (same joint and conditional draws).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmebm_dist.evaluate.classifiers import ClassifierBundle, ImageClassifier, VectorClassifier
from mmebm_dist.evaluate.coherence import (
    AllReduce,
    Batch,
    GenerativeModel,
    chunk_seed,
    distributed_sum,
    joint_batches,
    my_chunks,
    seeded,
)

Features = Callable[[str, torch.Tensor], torch.Tensor]
"""(modality name, batch [B, *shape]) -> features [B, D]."""


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2) (float64; PSD covariances, maybe singular)."""
    mu1, mu2, cov1, cov2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, cov1, cov2))
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.size, mu1.size):
        raise ValueError(f"Frechet distance needs means [D] and covariances [D, D] of one D; got "
                         f"{mu1.shape}, {cov1.shape}, {mu2.shape}, {cov2.shape}")
    vals, vecs = np.linalg.eigh((cov1 + cov1.T) / 2)
    root = (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T  # cov1^1/2
    inner = root @ cov2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * trace_sqrt)


class Moments:
    """Count, sum and sum of outer products of feature vectors (float64), addable across processes."""

    def __init__(self, dim: int):
        self.count = 0.0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().to("cpu", torch.float64).reshape(features.shape[0], -1)
        self.count += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def flat(self) -> torch.Tensor:
        return torch.cat([torch.tensor([self.count], dtype=torch.float64), self.sum, self.outer.flatten()])

    def load(self, flat: torch.Tensor) -> None:
        d = self.sum.numel()
        self.count, self.sum, self.outer = flat[0].item(), flat[1:1 + d], flat[1 + d:].reshape(d, d)

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D]; needs at least two vectors."""
        if self.count < 2:
            raise ValueError(f"a Frechet distance needs at least 2 feature vectors per set, got {self.count}")
        mean = self.sum / self.count
        cov = (self.outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return mean.numpy(), cov.numpy()


def distance(a: Moments, b: Moments) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets."""
    return frechet_distance(*a.mean_cov(), *b.mean_cov())


# ------------------------------------------------------------------------------------------------ judges


def penultimate(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Activations feeding the last linear layer of a project classifier: [B, *shape] -> [B, D] (eval)."""
    param = next(net.parameters())
    x = x.to(device=param.device, dtype=param.dtype)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        if isinstance(net, ImageClassifier):
            out = net.head[:-1](net.features(x))
        elif isinstance(net, VectorClassifier):
            out = net.net[:-1](x.flatten(1))
        else:
            raise TypeError(f"no penultimate layer known for {type(net).__name__}")
    net.train(was_training)
    return out


def classifier_features(bundle: ClassifierBundle) -> Features:
    """The Features of a classifier bundle: each modality's classifier's penultimate layer."""
    return lambda name, x: penultimate(bundle.nets[name], x)


def module_sha256(module: nn.Module) -> str:
    """sha256 of a module's state dict (names, dtypes, shapes, bytes in key order): the judge's identity."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def inception_features(weights: str | Path, device: torch.device | str = "cpu") -> Features:
    """Features of the standard FID (InceptionV3 pool3, 2048-D, torch-fidelity's port of the TF graph) read
    from the local weights file ``weights``; images in [0, 1] become uint8 RGB (grey repeated)."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"--inception-weights {path}: no such file; pass the local InceptionV3 "
                                "weights torch-fidelity reads (weights-inception-2015-12-05-6726825d.pth)")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as exc:
        raise ImportError(f"--inception-weights needs torch-fidelity ({exc}); install it with "
                          "`pip install torch-fidelity` (it brings torchvision) or drop the flag") from exc
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(path)).to(device)

    def features(name: str, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"modality '{name}': the Inception FID takes images [B, 1 or 3, H, W], got "
                             f"{tuple(x.shape)}")
        images = (x.clamp(0, 1) * 255).round().to(device=device, dtype=torch.uint8)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        with torch.no_grad():
            return net(images)[0]

    return features


# ------------------------------------------------------------------------------------------------ measuring


def _feature_dim(features: Features, name: str, x: torch.Tensor) -> int:
    return int(features(name, x[:1]).shape[1])


@torch.no_grad()
def measure_frechet(model: GenerativeModel, features: Features, chunks: Sequence[Batch | None], *,
                    num_samples: int, batch_size: int, seed: int, joint_langevin_steps: int | None = None,
                    joint: bool = True, names: Sequence[str] | None = None, rank: int = 0,
                    world_size: int = 1, all_reduce: AllReduce = distributed_sum) -> dict:
    """Per-modality FD of joint samples and of cross generations (each target generated from every single
    other modality, pooled) against the test tuples ``chunks``, plus ``test_halves``: the FD between the even
    and odd test tuples (what sampling noise alone gives at half that count). ``names``: the modalities to
    measure (default all). Every rank returns the same figures."""
    names = list(names or model.modalities)
    device = next(iter(model.parameters())).device
    mine = list(my_chunks(len(chunks), rank, world_size))
    first = next(c for c in chunks if c is not None)
    dims = {n: _feature_dim(features, n, first[n].to(device)) for n in names}
    cross = len(model.modalities) > 1
    parts = ["test", "test_even", "test_odd"] + (["cross"] if cross else []) + (["joint"] if joint else [])
    moments = {(p, n): Moments(dims[n]) for p in parts for n in names}
    if joint:
        for samples, _ in joint_batches(model, num_samples=num_samples, batch_size=batch_size, seed=seed,
                                        langevin_steps=joint_langevin_steps, stream="joint", rank=rank,
                                        world_size=world_size):
            for n in names:
                moments[("joint", n)].add(features(n, samples[n]))
    for i in mine:
        batch = {k: v.to(device) for k, v in chunks[i].items()}
        offset = i * batch_size  # global tuple index (chunks hold batch_size tuples but the last), any world
        for n in names:
            f = features(n, batch[n])
            moments[("test", n)].add(f)
            index = torch.arange(offset, offset + f.shape[0], device=f.device)
            moments[("test_even", n)].add(f[index % 2 == 0])
            moments[("test_odd", n)].add(f[index % 2 == 1])
        for src in model.modalities if cross else ():
            with seeded(chunk_seed(seed, "cond/" + src, i), device) as gen:
                generated = model.generate_conditional(batch, [src], generator=gen)
            for tgt in names:
                if tgt != src:
                    moments[("cross", tgt)].add(features(tgt, generated[tgt]))
    keys = list(moments)
    flat = all_reduce(torch.cat([moments[k].flat() for k in keys]))
    start = 0
    for k in keys:
        size = moments[k].flat().numel()
        moments[k].load(flat[start:start + size])
        start += size

    def per_modality(part: str, reference: str = "test") -> dict:
        fd = {n: distance(moments[(part, n)], moments[(reference, n)]) for n in names}
        return {**fd, "mean": sum(fd.values()) / len(fd), "n": int(moments[(part, names[0])].count)}

    out = {"modalities": names, "feature_dim": dims, "n_test": int(moments[("test", names[0])].count),
           "test_halves": per_modality("test_even", "test_odd")}
    if cross:
        out["cross"] = per_modality("cross")
    if joint:
        out["joint"] = per_modality("joint")
    return out
