"""Network building blocks shared by the modality families (the MMVAE+ residual block and small helpers)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.2
"""Negative slope of every LeakyReLU in the modality networks (MMVAE+ uses 0.2)."""


def leaky(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(0.2)."""
    return F.leaky_relu(x, LEAKY_SLOPE)


class ResidualBlock(nn.Module):
    """MMVAE+ PolyMNIST residual block: out = shortcut(x) + 0.1 * conv(act(conv(act(x)))).

    Both convs are 3x3 with padding 1; the hidden width is min(fin, fout); the shortcut is the identity when
    the widths agree and a bias-free 1x1 conv otherwise.
    """

    def __init__(self, fin: int, fout: int):
        super().__init__()
        hidden = min(fin, fout)
        self.conv_0 = nn.Conv2d(fin, hidden, 3, padding=1)
        self.conv_1 = nn.Conv2d(hidden, fout, 3, padding=1)
        self.shortcut = nn.Conv2d(fin, fout, 1, bias=False) if fin != fout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, fin, H, W] -> [B, fout, H, W]."""
        dx = self.conv_1(leaky(self.conv_0(leaky(x))))
        return self.shortcut(x) + 0.1 * dx


class LocScaleHead(nn.Module):
    """Linear maps from features to a location and a raw scale (the posterior family maps it)."""

    def __init__(self, features: int, dim: int):
        super().__init__()
        self.loc = nn.Linear(features, dim)
        self.raw_scale = nn.Linear(features, dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, features] -> (loc [B, dim], raw scale [B, dim])."""
        return self.loc(h), self.raw_scale(h)
