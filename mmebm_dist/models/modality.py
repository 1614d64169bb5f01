"""Encoder/decoder families, registered by name: each builds the networks of one modality from its config.

An encoder maps x [B, *shape] to :class:`EncoderOutput` (location and unconstrained scale of q(z | x)
and, when ``private_dim`` > 0, of q(w | x)). A decoder maps u = cat(w, z) [N, private_dim + latent_dim] to the
likelihood parameters [N, *shape]. A new family is registered with
:func:`register_family`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from mmebm_dist.config import FAMILY_NAMES, ModalityConfig, ModelConfig
from mmebm_dist.models.blocks import LEAKY_SLOPE, LocScaleHead, ResidualBlock, leaky


class EncoderOutput(NamedTuple):
    """Posterior parameters of one modality (scales still raw; the posterior family maps them)."""

    z_loc: torch.Tensor
    """[B, latent_dim]"""
    z_raw: torch.Tensor
    """[B, latent_dim]"""
    w_loc: torch.Tensor | None
    """[B, private_dim], or None without private latents."""
    w_raw: torch.Tensor | None
    """[B, private_dim], or None without private latents."""


FamilyBuilder = Callable[[ModalityConfig, ModelConfig], tuple[nn.Module, nn.Module]]
FAMILIES: dict[str, FamilyBuilder] = {}
"""Family name -> builder(modality_cfg, model_cfg) returning (encoder, decoder)."""


def register_family(name: str) -> Callable[[FamilyBuilder], FamilyBuilder]:
    """Decorator adding an encoder/decoder builder to :data:`FAMILIES` under ``name``."""

    def add(builder: FamilyBuilder) -> FamilyBuilder:
        if name in FAMILIES:
            raise ValueError(f"modality family '{name}' is already registered")
        FAMILIES[name] = builder
        FAMILY_NAMES.add(name)  # a config may now name it
        return builder

    return add


def unregister_family(name: str) -> None:
    """Remove a family added by :func:`register_family` (tests, notebooks that redefine one)."""
    FAMILIES.pop(name, None)
    FAMILY_NAMES.discard(name)


def build_modality(mod: ModalityConfig, cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) of modality ``mod`` from its registered family."""
    return FAMILIES[mod.family](mod, cfg)


class _Encoder(nn.Module):
    """A feature trunk shared by z and w, with one location/scale head per latent."""

    def __init__(self, trunk: nn.Module, features: int, latent_dim: int, private_dim: int):
        super().__init__()
        self.trunk = trunk
        self.z_head = LocScaleHead(features, latent_dim)
        self.w_head = LocScaleHead(features, private_dim) if private_dim > 0 else None

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        h = self.trunk(x)
        z_loc, z_raw = self.z_head(h)
        if self.w_head is None:
            return EncoderOutput(z_loc, z_raw, None, None)
        w_loc, w_raw = self.w_head(h)
        return EncoderOutput(z_loc, z_raw, w_loc, w_raw)


TrunkEncoder = _Encoder
"""Public name of the trunk + heads encoder, for families registered outside this module (see the README)."""


# ------------------------------------------------------------------------------------------------ conv
@register_family("conv")
def conv_family(mod: ModalityConfig, cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """Small conv net for (C, H, W) images: two stride-2 4x4 convs (width, 2*width), an 8*width linear layer.

    z and w share the trunk (cheap on a CPU); the decoder mirrors it with transposed convs.
    """
    c, h, w = mod.shape  # (C, H, W) with H, W divisible by 4: config.validate_model
    width, hidden = cfg.width, 8 * cfg.width
    flat = 2 * width * (h // 4) * (w // 4)
    trunk = nn.Sequential(
        nn.Conv2d(c, width, 4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Flatten(), nn.Linear(flat, hidden), nn.LeakyReLU(LEAKY_SLOPE),
    )
    decoder = nn.Sequential(
        nn.Linear(cfg.latent_dim + cfg.private_dim, hidden), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(hidden, flat), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Unflatten(1, (2 * width, h // 4, w // 4)),
        nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE),
        nn.ConvTranspose2d(width, c, 4, stride=2, padding=1),
    )
    return _Encoder(trunk, hidden, cfg.latent_dim, cfg.private_dim), decoder


# ------------------------------------------------------------------------------------------------- mlp
@register_family("mlp")
def mlp_family(mod: ModalityConfig, cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """Two hidden layers of 8*width units on the flattened input; works for any shape (vectors, images)."""
    size, hidden = math.prod(mod.shape), 8 * cfg.width
    trunk = nn.Sequential(
        nn.Flatten(), nn.Linear(size, hidden), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(hidden, hidden), nn.LeakyReLU(LEAKY_SLOPE),
    )
    decoder = nn.Sequential(
        nn.Linear(cfg.latent_dim + cfg.private_dim, hidden), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(hidden, hidden), nn.LeakyReLU(LEAKY_SLOPE),
        nn.Linear(hidden, size), nn.Unflatten(1, tuple(mod.shape)),
    )
    return _Encoder(trunk, hidden, cfg.latent_dim, cfg.private_dim), decoder


# ------------------------------------------------------------------------------------------- mmvaeplus
class _MMVAEPlusBranch(nn.Module):
    """One MMVAE+ encoder branch: 3x3 conv to nf, block(nf), twice (3x3 avg-pool stride 2, block doubling)."""

    def __init__(self, channels: int, nf: int, spatial: tuple[int, int], dim: int):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, nf, 3, padding=1),
            ResidualBlock(nf, nf),
            nn.AvgPool2d(3, stride=2, padding=1), ResidualBlock(nf, 2 * nf),
            nn.AvgPool2d(3, stride=2, padding=1), ResidualBlock(2 * nf, 4 * nf),
            nn.Flatten(),
        )
        self.head = LocScaleHead(4 * nf * spatial[0] * spatial[1], dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.trunk(x))


class MMVAEPlusEncoder(nn.Module):
    """MMVAE+ PolyMNIST encoder: separate conv branches for the shared z and the private w.

    With ``channels_last`` the input is converted to NHWC once and both branches' convs run in that layout
    (the heads flatten in the usual C, H, W order, so the parameters mean the same either way).
    """

    def __init__(self, channels: int, nf: int, spatial: tuple[int, int], latent_dim: int, private_dim: int,
                 *, channels_last: bool = False):
        super().__init__()
        self.channels_last = channels_last
        self.z_branch = _MMVAEPlusBranch(channels, nf, spatial, latent_dim)
        self.w_branch = _MMVAEPlusBranch(channels, nf, spatial, private_dim) if private_dim > 0 else None

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        z_loc, z_raw = self.z_branch(x)
        if self.w_branch is None:
            return EncoderOutput(z_loc, z_raw, None, None)
        w_loc, w_raw = self.w_branch(x)
        return EncoderOutput(z_loc, z_raw, w_loc, w_raw)


class MMVAEPlusDecoder(nn.Module):
    """MMVAE+ PolyMNIST decoder: linear to 4nf x h x w, twice (block halving, upsample x2), block, act, conv.

    The last conv gives the likelihood location (MMVAE+: Laplace with fixed scale 0.75). ``channels_last``
    runs the convs on NHWC activations; ``subpixel_upsample`` runs each block that follows an upsampling in
    its sub-pixel form (``ResidualBlock(x, upsample=True)``). Both keep the parameters and the function.
    """

    def __init__(self, channels: int, nf: int, spatial: tuple[int, int], in_dim: int, *,
                 channels_last: bool = False, subpixel_upsample: bool = False):
        super().__init__()
        self.channels_last, self.subpixel_upsample = channels_last, subpixel_upsample
        self.fc = nn.Linear(in_dim, 4 * nf * spatial[0] * spatial[1])
        self.unflatten = nn.Unflatten(1, (4 * nf, *spatial))
        self.blocks = nn.Sequential(
            ResidualBlock(4 * nf, 2 * nf), nn.Upsample(scale_factor=2),
            ResidualBlock(2 * nf, nf), nn.Upsample(scale_factor=2),
            ResidualBlock(nf, nf),
        )
        self.conv_img = nn.Conv2d(nf, channels, 3, padding=1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u = cat(w, z) [N, in_dim] -> likelihood location [N, C, H, W] (contiguous)."""
        h = self.unflatten(self.fc(u))
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)
        upsample_next = False
        for layer in self.blocks:
            if self.subpixel_upsample and isinstance(layer, nn.Upsample):
                upsample_next = True  # folded into the next block
            elif upsample_next:
                h, upsample_next = layer(h, upsample=True), False
            else:
                h = layer(h)
        return self.conv_img(leaky(h)).contiguous()


@register_family("mmvaeplus")
def mmvaeplus_family(mod: ModalityConfig, cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """The MMVAE+ PolyMNIST reference network (epalu/mmvaeplus src/models/vae_polymnist.py); nf = cfg.width.

    At width 64 and 3x28x28 it is the authors' network (64 -> 128 -> 256 channels at 28 -> 14 -> 7).
    ``model.channels_last`` and ``model.subpixel_upsample`` choose faster forms of the same function.
    """
    c, h, w = mod.shape  # (C, H, W) with H, W divisible by 4: config.validate_model
    spatial = (h // 4, w // 4)
    encoder = MMVAEPlusEncoder(c, cfg.width, spatial, cfg.latent_dim, cfg.private_dim,
                               channels_last=cfg.channels_last)
    decoder = MMVAEPlusDecoder(c, cfg.width, spatial, cfg.latent_dim + cfg.private_dim,
                               channels_last=cfg.channels_last, subpixel_upsample=cfg.subpixel_upsample)
    return encoder, decoder
