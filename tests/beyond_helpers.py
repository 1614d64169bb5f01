"""Tiny vector-modality models and batches shared by the tests of the figures beyond coherence."""

from __future__ import annotations

import torch

from mmebm_dist.config import LangevinConfig, ModalityConfig, ModelConfig, PriorConfig
from mmebm_dist.models import build_model


def tiny_model(*, prior: str = "ebm", aggregation: str = "moe", posterior: str = "laplace", private: int = 2,
               m: int = 3, seed: int = 0):
    """A seeded 3-modality MLP model over 6-D vectors (eval mode)."""
    mods = [ModalityConfig(name=f"v{i}", shape=(6,), family="mlp") for i in range(m)]
    cfg = ModelConfig(modalities=mods, latent_dim=4, private_dim=private, width=2, aggregation=aggregation,
                      posterior=posterior,
                      prior=PriorConfig(kind=prior, hidden=8, layers=1,
                                        langevin=LangevinConfig(steps=2, step_size=0.3, backend="autograd")))
    torch.manual_seed(seed)
    return build_model(cfg).eval()


def tiny_batch(model, b: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {n: torch.rand(b, *model.shapes[n], generator=g) for n in model.modalities}
    return batch | {"label": torch.randint(0, 10, (b,), generator=g)}
