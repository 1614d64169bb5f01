"""The Python API: the CLI's config, model, training loop, importers and sampler, callable from a script.

Register a modality family, describe the experiment as a :class:`Config`, ``train(cfg)``, then
``load_trained(run_dir)`` and ``sample(model, n)``; docs/python-api.md shows a whole example.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mmebm_dist.config import (
    Config,
    DataConfig,
    LangevinConfig,
    ModalityConfig,
    ModelConfig,
    OptimConfig,
    PriorConfig,
    TrainConfig,
    config_from_dict,
    load_config,
)
from mmebm_dist.datasets.importers.cub_captions import import_cub_captions
from mmebm_dist.datasets.importers.mnist_svhn import import_mnist_svhn
from mmebm_dist.datasets.importers.polymnist_folders import import_polymnist_folders
from mmebm_dist.datasets.importers.table import import_table
from mmebm_dist.datasets.importers.webdataset import import_webdataset
from mmebm_dist.datasets.starter import starter_config
from mmebm_dist.models import MultimodalVAE, build_model
from mmebm_dist.models.blocks import LocScaleHead
from mmebm_dist.models.likelihoods import LIKELIHOODS
from mmebm_dist.models.modality import FAMILIES, EncoderOutput, TrunkEncoder, register_family
from mmebm_dist.train.loop import train

__all__ = [
    "FAMILIES",
    "LIKELIHOODS",
    "Config",
    "DataConfig",
    "EncoderOutput",
    "LangevinConfig",
    "LocScaleHead",
    "ModalityConfig",
    "ModelConfig",
    "MultimodalVAE",
    "OptimConfig",
    "PriorConfig",
    "TrainConfig",
    "TrunkEncoder",
    "build_model",
    "config_from_dict",
    "import_cub_captions",
    "import_mnist_svhn",
    "import_polymnist_folders",
    "import_table",
    "import_webdataset",
    "load_config",
    "load_trained",
    "register_family",
    "sample",
    "starter_config",
    "train",
]


def load_trained(run_dir: str | Path, *, device: str = "cpu") -> MultimodalVAE:
    """The model of a training run (its newest complete checkpoint), of an export folder (``mmebm export``)
    or of ``hf://USER/REPO`` (an export on the Hugging Face Hub, via ``huggingface_hub``), in eval mode."""
    from mmebm_dist.evaluate.generate import load_run

    return load_run(run_dir, device=device).model


@torch.no_grad()
def sample(
    model: MultimodalVAE, n: int, *, seed: int = 0, langevin_steps: int | None = None
) -> dict[str, torch.Tensor]:
    """``n`` joint samples {modality: decoded mean [n, *shape]}: z from the prior (Langevin for the EBM)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    return {
        k: v.cpu()
        for k, v in model.generate_joint(n, langevin_steps=langevin_steps, generator=generator).items()
    }
