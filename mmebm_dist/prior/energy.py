"""The prior's energy network f_alpha: an MLP R^d -> R, with p_alpha(z) = exp(f_alpha(z)) p0(z) / Z(alpha).

Sign convention (named once, used everywhere): f is the *negative* energy, i.e. a log-density correction.
Larger f means more probable; Langevin ascends f + log p0; the prior's loss is E_p[f] - E_q[f].
"""

from __future__ import annotations

import torch
from torch import nn

from mmebm_dist.kernels._utils import FusedSpec, activation_fn, mlp_energy_grad
from mmebm_dist.kernels.names import ACTIVATIONS as ACTIVATIONS  # re-exported: the one list
from mmebm_dist.kernels.names import LEAKY_SLOPE


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
        self.act = activation_fn(activation, LEAKY_SLOPE)
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
        Spectral-normalised weights are returned already normalised (one power iteration per read in train
        mode)."""
        return [(lin.weight, lin.bias) for lin in self.linears]

    def fused_refusal(self) -> str | None:
        """Why the fused backends cannot reproduce this energy (None when :meth:`fused_spec` describes it).

        They compute the plain MLP of :class:`FusedSpec` and never call :meth:`forward`, so anything else is
        refused: a subclass that overrides forward or grad, a module added beside the linears, a linear that
        is not ``nn.Linear``, a bound, or weights DeepSpeed ZeRO-3 left partitioned here. Forward hooks are
        not refused: DeepSpeed ZeRO-3 puts its parameter-fetching hooks on every module.
        """
        name = type(self).__name__
        if type(self).forward is not EnergyMLP.forward or type(self).grad is not EnergyMLP.grad:
            return f"{name} overrides EnergyMLP.forward or grad, which the fused backends do not compute"
        extra = sorted(set(self._modules) - {"linears"})
        if not all(type(lin).forward is nn.Linear.forward for lin in self.linears):
            return f"{name} has a linear layer whose forward is not nn.Linear's (the fused ones compute that)"
        if extra:
            return f"{name} holds modules the fused backends do not compute: {', '.join(extra)}"
        if self.bound > 0:
            return (f"the fused backends compute the plain MLP, but this energy is soft-clipped "
                    f"(model.prior.energy_bound={self.bound:g}); set model.prior.energy_bound=0 to fuse it")
        if any(p.numel() == 0 for p in self.parameters()):
            return ("the energy's weights are not readable here: DeepSpeed ZeRO-3 partitions them "
                    "(param.numel() == 0); training hands the sampler a gather (train/zero3.py)")
        return None

    def fused_spec(self) -> FusedSpec | None:
        """What the fused Langevin backends need to reproduce this energy, or None when they cannot (then
        ``backend='auto'`` samples through autograd, which calls :meth:`forward`). Weights are read once:
        a spectral-normalised weight is recomputed on every read."""
        if self.fused_refusal() is not None:
            return None
        with torch.no_grad():
            return FusedSpec(self.weights(), self.activation, LEAKY_SLOPE)
