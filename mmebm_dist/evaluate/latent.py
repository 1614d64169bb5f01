"""Figures about the model beyond coherence: test-set objective terms and a linear probe of the shared latent.

The probe is multinomial logistic regression (plain torch, full-batch Adam on standardised features) fit on
posterior means of one set of tuples and scored on a held-out set: how linearly the shared latent encodes
the digit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mmebm_dist.evaluate.coherence import NUM_CLASSES, AllReduce, Batch, distributed_sum, my_chunks


@torch.no_grad()
def objective_terms(model: torch.nn.Module, chunks: Sequence[Batch | None], *, rank: int = 0,
                    world_size: int = 1, all_reduce: AllReduce = distributed_sum, seed: int = 0) -> dict:
    """Mean of every scalar term of ``model(batch)`` over the test ``chunks`` (weighted by batch size),
    summed over processes with one all_reduce. Returns {"n": tuples, "terms": {name: mean}}."""
    device = next(model.parameters()).device
    sums: dict[str, float] = {}
    count = 0
    names: list[str] | None = None
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 7919 * rank)  # the model's Langevin negatives and reparameterised draws
        for i in my_chunks(len(chunks), rank, world_size):
            batch = {k: v.to(device) for k, v in chunks[i].items()}
            n = int(batch["label"].numel())
            terms = model(batch)
            if names is None:
                names = sorted(k for k, v in terms.items() if torch.is_tensor(v) and v.numel() == 1)
            for k in names:
                sums[k] = sums.get(k, 0.0) + float(terms[k].detach().float()) * n
            count += n
        if names is None:  # this rank had no chunk: learn the term names from 2 generated tuples
            batch = dict(model.generate_joint(2))
            batch["label"] = torch.zeros(2, dtype=torch.long, device=device)
            names = sorted(k for k, v in model(batch).items() if torch.is_tensor(v) and v.numel() == 1)
    model.train(was_training)
    names = names or []
    flat = torch.tensor([float(count)] + [sums.get(k, 0.0) for k in names], dtype=torch.float64)
    flat = all_reduce(flat)
    total = flat[0].item()
    if total == 0:
        raise ValueError("no test tuples to average the objective terms over; is the test split empty?")
    return {"n": int(total), "terms": {k: flat[1 + i].item() / total for i, k in enumerate(names)}}


@torch.no_grad()
def posterior_mean(model, batch: Batch) -> torch.Tensor:
    """Mean of q(z | X) [B, d]: the average location of its uniform mixture's components (the aggregation
    of every modality's expert; location = mean for the Laplace and Gaussian families)."""
    experts = model.encode(batch)
    loc, _ = model.aggregation.components(experts.z_loc, experts.z_scale)  # (C, B, d)
    return loc.mean(0)


def collect_features(features: Callable[[Batch], torch.Tensor], chunks: Sequence[Batch],
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``features(batch)`` [B, d] and labels over ``chunks`` (on CPU)."""
    feats, labels = [], []
    with torch.no_grad():
        for chunk in chunks:
            batch = {k: v.to(device) for k, v in chunk.items()}
            feats.append(features(batch).float().cpu())
            labels.append(chunk["label"].cpu())
    return torch.cat(feats), torch.cat(labels)


def linear_probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                          test_y: torch.Tensor, *, num_classes: int = NUM_CLASSES, steps: int = 300,
                          lr: float = 0.05, weight_decay: float = 1e-4, seed: int = 0) -> float:
    """Held-out accuracy of logistic regression fit on (train_x, train_y), features standardised with the
    training mean and std; full-batch Adam for ``steps`` steps."""
    if len(train_x) == 0 or len(test_x) == 0:
        raise ValueError("the linear probe needs non-empty fit and held-out sets")
    mean = train_x.mean(0)
    std = train_x.std(0).clamp_min(1e-6)
    xs, xt = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(xs.shape[1], num_classes, generator=gen)).requires_grad_()
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(xs @ weight + bias, train_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return ((xt @ weight + bias).argmax(-1) == test_y).float().mean().item()
