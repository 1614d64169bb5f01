"""DeepSpeed ZeRO-3 on the prior's side: the fused Langevin chains read the energy's full weights.

ZeRO-3 partitions every parameter (``numel() == 0`` outside a gather), so a fused chain could not read the
energy MLP's weights and ``auto`` would fall back to the autograd chain. Training hands the model a gather
instead: ``langevin.sample`` enters it around a fused chain. The energy MLP is small (tens of thousands of
parameters), so one all-gather per chain costs far less than the autograd chain. It is a collective: every
rank samples together, as training does (every rank draws its negatives each step).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial

from torch import nn


def energy_gather(energy: nn.Module) -> Callable[[], AbstractContextManager] | None:
    """A context factory gathering ``energy``'s ZeRO-3 partitioned parameters (``ds_id``); None without."""
    params = [p for p in energy.parameters() if hasattr(p, "ds_id")]
    return partial(_gathered, params) if params else None


@contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """The chain's weights whole: gathers the ones ZeRO-3 has partitioned now and partitions them again after.

    Parameters already whole (the training step's forward fetched them and has not released them yet: they
    are "active in submodules") are read as they are: gathering them too would free them on exit from under
    that forward (DeepSpeed raises "Cannot free a ZeRO-3 parameter while it is still active in submodules").
    Every rank runs the same step, so every rank gathers the same set (a collective).
    """
    import deepspeed  # only reached under ZeRO-3, where DeepSpeed is running
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    missing = [p for p in params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
    if not missing:
        yield
        return
    with deepspeed.zero.GatheredParameters(missing, modifier_rank=None):
        yield


def hand_energy_gather(model: nn.Module) -> None:
    """Give ``model`` (unwrapped) the gather for its energy's chains when ZeRO-3 partitions it."""
    energy = getattr(model, "energy", None)
    if energy is not None:
        model.energy_gather = energy_gather(energy)
