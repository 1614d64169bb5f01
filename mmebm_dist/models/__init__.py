"""Models: the multimodal VAE (encoders/decoders per modality, aggregation, objectives) and the EBM prior."""

from mmebm_dist.models.multimodal_vae import MultimodalVAE, RunawayError, build_model
from mmebm_dist.prior.energy import EnergyMLP

__all__ = ["EnergyMLP", "MultimodalVAE", "RunawayError", "build_model"]

# Registers the `text` family and the `categorical` likelihood (token-id modalities).
from mmebm_dist.models import text as _text  # noqa: E402,F401
