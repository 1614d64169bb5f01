"""Test set-up shared by the whole suite.

TRITON_INTERPRET is read when @triton.jit decorates a kernel, so it must be set before anything imports
mmebm_dist.kernels; without CUDA the Triton kernels can only run in the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread: tiny shapes gain nothing from more, and multi-process tests must not oversubscribe 2 cores.
torch.set_num_threads(1)
