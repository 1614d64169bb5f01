"""The prior's energy network f_alpha: an MLP R^d -> R, with p_alpha(z) = exp(f_alpha(z)) p0(z) / Z(alpha).

Sign convention (named once, used everywhere): f is the *negative* energy, i.e. a log-density correction.
Larger f means more probable; Langevin ascends f + log p0; the prior's loss is E_p[f] - E_q[f].
"""

from __future__ import annotations

import torch
from torch import nn

from mmebm_dist.kernels._utils import mlp_energy_grad

ACTIVATIONS = ("gelu", "gelu_tanh", "leaky_relu", "silu")
LEAKY_SLOPE = 0.2


def activation_module(name: str) -> nn.Module:
    """The nn.Module for an activation name in :data:`ACTIVATIONS`."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "leaky_relu":
        return nn.LeakyReLU(LEAKY_SLOPE)
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown energy activation '{name}'; choose one of {', '.join(ACTIVATIONS)}")


class EnergyMLP(nn.Module):
    """f(z) = w_out . act(W_L ... act(W_1 z + b_1) ... + b_L) + b_out: ``layers`` hidden layers.

    ``bound`` B > 0 soft-clips the output, f = B tanh(f_mlp / B): |f| < B, so exp(f) p0 stays proper for any
    weights and the Langevin drift is the MLP's slope times tanh' <= 1 (0: the plain MLP).
    """

    def __init__(self, latent_dim: int, hidden: int = 200, layers: int = 2, activation: str = "gelu",
                 spectral_norm: bool = False, bound: float = 0.0):
        super().__init__()
        if not 1 <= layers <= 4:
            raise ValueError(f"EnergyMLP layers must be between 1 and 4, got {layers}")
        if not bound >= 0:
            raise ValueError(f"EnergyMLP bound must be >= 0 (0: no bound), got {bound}")
        self.bound = float(bound)
        self.latent_dim, self.hidden, self.num_layers = latent_dim, hidden, layers
        self.activation = activation
        self.act = activation_module(activation)
        dims = [latent_dim] + [hidden] * layers
        linears = [nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:], strict=True)] + [nn.Linear(hidden, 1)]
        if spectral_norm:
            linears = [nn.utils.parametrizations.spectral_norm(lin) for lin in linears]
        self.linears = nn.ModuleList(linears)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Energies f(z): [B, d] -> [B]."""
        h = z
        for lin in self.linears[:-1]:
            h = self.act(lin(h))
        f = self.linears[-1](h).squeeze(-1)
        return self.bound * torch.tanh(f / self.bound) if self.bound > 0 else f

    def grad(self, z: torch.Tensor) -> torch.Tensor:
        """grad_z f(z) [B, d] by the chain rule, no autograd graph (so torch.compile traces it); with a bound,
        times tanh'(f_mlp / B) = 1 - tanh^2. Reads :meth:`weights` once, as one call of forward would."""
        f, grad = mlp_energy_grad(self.weights(), z, self.activation, LEAKY_SLOPE)
        if self.bound > 0:
            grad = grad * (1 - torch.tanh(f / self.bound).pow(2)).unsqueeze(-1)
        return grad

    def weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (weight [out, in], bias [out]) of every linear layer, hidden layers first, output last.

        Spectral-normalised weights are returned already normalised. This is what the fused samplers take
        (they compute the plain MLP, so ``mmebm_dist.prior.langevin`` refuses them a bounded energy).
        """
        return [(lin.weight, lin.bias) for lin in self.linears]
