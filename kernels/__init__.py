"""Fused Langevin kernels (Triton for CUDA tensors, fused torch for any device) with their torch references.

Imported as ``mmebm_dist.kernels``; this folder imports nothing from ``mmebm_dist``.
"""
