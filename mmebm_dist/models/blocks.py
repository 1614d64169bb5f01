"""Network building blocks shared by the modality families (the MMVAE+ residual block and small helpers).

Speed forms with the same math (tests/test_speed_levers.py checks them against the plain forms):
``shortcut + 0.1 * dx`` is one ``torch.add(..., alpha=0.1)`` pass, and a block fed a 2x nearest-upsampled
input can run in sub-pixel form (:func:`upsampled_conv3x3`), with 4/9 of the first conv's multiply-adds.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

LEAKY_SLOPE = 0.2
"""Negative slope of every LeakyReLU in the modality networks (MMVAE+ uses 0.2)."""

# Nearest 2x upsampling repeats every input row: output row 2i + a of a 3x3 conv (padding 1) on the
# upsampled map reads input rows (i - 1, i, i) for a = 0 and (i, i, i + 1) for a = 1, so it is a 2-tap conv
# on the input whose taps are sums of kernel rows. _PHASE_TAPS[a] maps the 3 kernel rows to those 2 taps.
_PHASE_TAPS = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],
                            [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # (phase a, tap, kernel row)


def leaky(x: torch.Tensor) -> torch.Tensor:
    """LeakyReLU(0.2)."""
    return F.leaky_relu(x, LEAKY_SLOPE)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling (nn.Upsample(scale_factor=2)): [N, C, H, W] -> [N, C, 2H, 2W]."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


def upsampled_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """conv3x3(upsample2x(x), weight, bias, padding=1) in sub-pixel form: [N, Ci, H, W] -> [N, Co, 2H, 2W].

    Each of the four output phases (a, b) (rows 2i + a, columns 2j + b) is a 2x2 conv of x with the kernel
    rows and columns summed as _PHASE_TAPS says: 4 * 4 instead of 9 * 4 multiply-adds per input pixel, the
    same function up to float32 summation order. The result keeps x's memory format.
    """
    n, _, h, w = x.shape
    co = weight.shape[0]
    taps = _PHASE_TAPS.to(device=weight.device, dtype=weight.dtype)
    kernels = torch.einsum("ark,bsl,oikl->aboirs", taps, taps, weight)  # (2, 2, Co, Ci, 2, 2)
    # Phase a reads input rows (i - 1, i) for a = 0 and (i, i + 1) for a = 1: pad one row on that side.
    phases = [[F.conv2d(F.pad(x, (1 - b, b, 1 - a, a)), kernels[a, b], bias) for b in (0, 1)] for a in (0, 1)]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        # Interleave in NHWC memory order (N, H, a, W, b, Co), then view as a channels_last [N, Co, 2H, 2W].
        rows = [torch.stack([p.permute(0, 2, 3, 1) for p in row], dim=3) for row in phases]  # (N,H,W,2,Co)
        return torch.stack(rows, dim=2).reshape(n, 2 * h, 2 * w, co).permute(0, 3, 1, 2)
    rows = [torch.stack(row, dim=-1) for row in phases]  # (N, Co, H, W, 2)
    return torch.stack(rows, dim=3).reshape(n, co, 2 * h, 2 * w)


class UpsamplableConv2d(nn.Conv2d):
    """A 3x3 conv (padding 1) that can also be applied to upsample2x(x) without building it (sub-pixel form).

    A module (not a bare function of its weight) so that wrappers that gather parameters on a module's call,
    such as DeepSpeed ZeRO-3, see the use; its state dict is nn.Conv2d's.
    """

    def __init__(self, fin: int, fout: int):
        super().__init__(fin, fout, 3, padding=1)

    def forward(self, x: torch.Tensor, upsample: bool = False) -> torch.Tensor:
        """[N, fin, H, W] -> [N, fout, H, W], or with ``upsample`` conv(upsample2x(x)): [N, fout, 2H, 2W]."""
        return upsampled_conv3x3(x, self.weight, self.bias) if upsample else super().forward(x)


class ResidualBlock(nn.Module):
    """MMVAE+ PolyMNIST residual block: out = shortcut(x) + 0.1 * conv(act(conv(act(x)))).

    Both convs are 3x3 with padding 1; the hidden width is min(fin, fout); the shortcut is the identity when
    the widths agree and a bias-free 1x1 conv otherwise.
    """

    def __init__(self, fin: int, fout: int):
        super().__init__()
        hidden = min(fin, fout)
        self.conv_0 = UpsamplableConv2d(fin, hidden)
        self.conv_1 = nn.Conv2d(hidden, fout, 3, padding=1)
        self.shortcut = nn.Conv2d(fin, fout, 1, bias=False) if fin != fout else nn.Identity()

    def forward(self, x: torch.Tensor, *, upsample: bool = False) -> torch.Tensor:
        """[B, fin, H, W] -> [B, fout, H, W]; with ``upsample`` the block of upsample2x(x), [B, fout, 2H, 2W].

        The upsampled form never builds the upsampled input: the activation and the 1x1 shortcut commute with
        nearest upsampling (they act per pixel), and the first conv runs in sub-pixel form.
        """
        hidden = self.conv_0(leaky(x), upsample)
        shortcut = upsample2x(self.shortcut(x)) if upsample else self.shortcut(x)
        # In place on conv_0's own output (its backward keeps its input, not its output); not on the sub-pixel
        # result, a view, where autograd would copy the whole map back (CopySlices).
        dx = self.conv_1(F.leaky_relu(hidden, LEAKY_SLOPE, inplace=not upsample))
        return torch.add(shortcut, dx, alpha=0.1)


class LocScaleHead(nn.Module):
    """Linear maps from features to a location and a raw scale (the posterior family maps it)."""

    def __init__(self, features: int, dim: int):
        super().__init__()
        self.loc = nn.Linear(features, dim)
        self.raw_scale = nn.Linear(features, dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, features] -> (loc [B, dim], raw scale [B, dim])."""
        return self.loc(h), self.raw_scale(h)
