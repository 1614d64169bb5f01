"""Test set-up shared by the whole suite.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before anything imports
mmebm_dist.kernels; without CUDA the Triton kernels can only run in the interpreter.
"""

import os

import pytest
import torch

from mmebm_dist.bench.common import num_threads

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread: tiny shapes gain nothing from more, and multi-process tests must not oversubscribe 2 cores.
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """One torch thread during the test, whatever an earlier test left set, restored after it: tiny models are
    overhead-bound, and one thread avoids OpenMP barrier stalls on a busy 2-core machine (the training-loop
    test took 40 s with 2 threads, 2.5 s with 1). Modules opt in with ``pytest.mark.usefixtures``."""
    with num_threads(1):
        yield


@pytest.fixture
def in_process():
    """Run the training loop inside pytest: reset accelerate's process-wide state around it (the fixture's
    value resets it once more, for a test that trains twice), restore torch's threads and RNG after."""
    from accelerate.state import AcceleratorState

    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    AcceleratorState._reset_state(True)
    yield lambda: AcceleratorState._reset_state(True)
    AcceleratorState._reset_state(True)
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


@pytest.fixture(scope="module")
def data2(tmp_path_factory):
    """Tiny two-modality PolyMNIST-style shards: 64 train tuples in 4 shards."""
    from train_helpers import build_tiny_polymnist

    return build_tiny_polymnist(tmp_path_factory.mktemp("data2"), modalities=2, train=64, shard_size=16)
