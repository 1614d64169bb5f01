"""The names a Langevin chain is configured by, defined once (no torch import: the config reads them).

Every other list of these names is derived with ``typing.get_args`` (``ACTIVATIONS``, ``FIXED_REFERENCES``,
the config's choices), so adding one here is the only edit that lists it.
"""

from __future__ import annotations

from typing import Literal, get_args

Activation = Literal["gelu", "gelu_tanh", "leaky_relu", "silu"]
"""The energy MLP's elementwise activation (every backend computes each of them)."""
FixedReference = Literal["laplace", "gaussian"]
"""References given by a name and a scale: the fused kernels compute their score -sign(z)/b and -z/b^2."""
Reference = Literal[FixedReference, "gmm"]
"""Every ``model.prior.reference``: a fixed one, or ``gmm`` (a mixture fitted in the run; its score is handed
to a chain as a function, ``reference_score``)."""
Backend = Literal["auto", "autograd", "torch", "triton"]
"""The Langevin sampler's backends: ``autograd`` (the reference), ``torch``, ``triton`` (fused), ``auto``."""

ACTIVATIONS: tuple[str, ...] = get_args(Activation)
FIXED_REFERENCES: tuple[str, ...] = get_args(FixedReference)
REFERENCES: tuple[str, ...] = get_args(Reference)
BACKENDS: tuple[str, ...] = get_args(Backend)
LEAKY_SLOPE = 0.2
"""Negative slope of the energy MLP's leaky_relu (EnergyMLP, the reference and both fused backends)."""
