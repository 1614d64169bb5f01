"""Benchmarks printing tables and writing JSON: Langevin sampler, training step, loader, Triton tiles."""
