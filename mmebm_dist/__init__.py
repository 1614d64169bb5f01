"""mmebm_dist: multimodal latent generative models with a learned energy-based prior, trained at scale."""

__version__ = "0.1.0"
