"""The energy MLP f: shapes, the weights() view the fused samplers take, activations, spectral norm."""

import pytest
import torch
from torch.nn import functional as F

from mmebm_dist.prior.energy import ACTIVATIONS, EnergyMLP


def _manual_forward(energy: EnergyMLP, z: torch.Tensor) -> torch.Tensor:
    acts = {"gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"),
            "leaky_relu": lambda t: F.leaky_relu(t, 0.2), "silu": F.silu}
    h = z
    weights = energy.weights()
    for w, b in weights[:-1]:
        h = acts[energy.activation](h @ w.T + b)
    w, b = weights[-1]
    return (h @ w.T + b).squeeze(-1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layers", [1, 3])
def test_forward_matches_the_weights_view(activation, layers):
    torch.manual_seed(0)
    energy = EnergyMLP(6, hidden=9, layers=layers, activation=activation)
    z = torch.randn(5, 6)
    f = energy(z)
    assert f.shape == (5,)
    shapes = [tuple(w.shape) for w, _ in energy.weights()]
    assert shapes == [(9, 6)] + [(9, 9)] * (layers - 1) + [(1, 9)]
    torch.testing.assert_close(f, _manual_forward(energy, z))


def test_rejects_bad_layers_and_activation():
    with pytest.raises(ValueError, match="between 1 and 4"):
        EnergyMLP(4, layers=0)
    with pytest.raises(ValueError, match="unknown energy activation 'tanh'"):
        EnergyMLP(4, activation="tanh")


def test_spectral_norm_bounds_every_layer_and_weights_are_normalised():
    torch.manual_seed(1)
    energy = EnergyMLP(8, hidden=16, layers=2, spectral_norm=True)
    with torch.no_grad():
        for lin in energy.linears:
            lin.parametrizations.weight.original.mul_(10.0)  # make the raw weights far from norm 1
    for _ in range(30):  # power iterations run on each training-mode forward
        energy(torch.randn(4, 8))
    energy.eval()
    for w, _ in energy.weights():
        assert abs(torch.linalg.matrix_norm(w, ord=2).item() - 1.0) < 1e-3
    torch.testing.assert_close(energy(torch.ones(3, 8)), _manual_forward(energy, torch.ones(3, 8)))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layers,bound", [(1, 0.0), (3, 0.0), (2, 1.5)])
def test_analytic_grad_matches_autograd(activation, layers, bound):
    """grad() is what torch.compile traces instead of torch.autograd.grad (the training diagnostic); a wrong
    chain-rule term or a missing tanh' factor is off by O(1). fp64: only summation order differs."""
    torch.manual_seed(0)
    energy = EnergyMLP(6, hidden=9, layers=layers, activation=activation, bound=bound).double()
    z = (3 * torch.randn(11, 6, dtype=torch.float64)).requires_grad_(True)
    (expected,) = torch.autograd.grad(energy(z).sum(), z)
    with torch.no_grad():
        got = energy.grad(z.detach())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert expected.abs().max() > 1e-3  # a gradient that vanished everywhere would prove nothing
