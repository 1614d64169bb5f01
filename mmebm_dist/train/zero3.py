"""DeepSpeed ZeRO-3 on the prior's side: the fused Langevin chains read the energy's full weights.

ZeRO-3 partitions every parameter (``numel() == 0`` outside a gather), so a fused chain could not read the
energy MLP's weights and ``auto`` would fall back to the autograd chain. Training hands the model a gather
instead: ``langevin.sample`` enters it around a fused chain. The energy MLP is small (tens of thousands of
parameters), so one all-gather per chain costs far less than the autograd chain. It is a collective: every
rank samples together, as training does (every rank draws its negatives each step).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial

from torch import nn


def energy_gather(energy: nn.Module) -> Callable[[], AbstractContextManager] | None:
    """A context factory gathering ``energy``'s ZeRO-3 partitioned parameters (``ds_id``); None without."""
    params = [p for p in energy.parameters() if hasattr(p, "ds_id")]
    if not params:
        return None
    import deepspeed  # only reached under ZeRO-3, where DeepSpeed is running

    return partial(deepspeed.zero.GatheredParameters, params, modifier_rank=None)


def hand_energy_gather(model: nn.Module) -> None:
    """Give ``model`` (unwrapped) the gather for its energy's chains when ZeRO-3 partitions it."""
    energy = getattr(model, "energy", None)
    if energy is not None:
        model.energy_gather = energy_gather(energy)
