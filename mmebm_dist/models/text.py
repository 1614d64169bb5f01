"""Text modality: the ``text`` encoder/decoder family and the ``categorical`` likelihood over tokens.

A caption is int64 ids [B, L] (``mmebm_dist.data.text``: words, ``<eos>``, ``<pad>``). The encoder embeds the
ids and runs three stride-2 1D convolutions; the decoder mirrors it with transposed convolutions and returns
per-position logits [N, L, V], all positions at once (MMVAE's CUB sentence networks work the same way). The
likelihood sums log softmax of the observed ids over the positions up to and including the first ``<eos>``:
the ``<pad>`` after it carries no information. Importing this module registers both by name.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from mmebm_dist.config import TEXT_DOWNSAMPLE, ModalityConfig, ModelConfig
from mmebm_dist.data.text import EOS_ID
from mmebm_dist.models.blocks import LEAKY_SLOPE, LocScaleHead
from mmebm_dist.models.likelihoods import LIKELIHOODS, Likelihood
from mmebm_dist.models.modality import EncoderOutput, register_family

DOWNSAMPLE = TEXT_DOWNSAMPLE
"""The sequence length shrinks by this factor (three stride-2 convolutions) in the encoder."""


def text_geometry(mod: ModalityConfig) -> tuple[int, int]:
    """(length, vocab_size) of a text modality (checked by ``config.validate_model``)."""
    return mod.shape[0], int(mod.vocab_size)


class TextEncoder(nn.Module):
    """ids [B, L] -> embedding -> three stride-2 Conv1d (2w, 4w, 8w channels) -> linear 8w -> z, w heads."""

    def __init__(self, vocab_size: int, length: int, width: int, latent_dim: int, private_dim: int):
        super().__init__()
        self.vocab_size = vocab_size
        embed = 2 * width
        hidden = 8 * width
        self.embed = nn.Embedding(vocab_size, embed)
        self.trunk = nn.Sequential(
            nn.Conv1d(embed, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv1d(2 * width, 4 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv1d(4 * width, 8 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Flatten(),
            nn.Linear(8 * width * (length // DOWNSAMPLE), hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
        )
        self.z_head = LocScaleHead(hidden, latent_dim)
        self.w_head = LocScaleHead(hidden, private_dim) if private_dim > 0 else None

    def forward(self, ids: torch.Tensor) -> EncoderOutput:
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TypeError(
                f"the text encoder takes integer token ids, got {ids.dtype}; text modalities must be "
                "stored with encoding 'npy' and an integer dtype"
            )
        h = self.trunk(self.embed(ids.long()).transpose(1, 2))  # (B, E, L) -> (B, hidden)
        z_loc, z_raw = self.z_head(h)
        if self.w_head is None:
            return EncoderOutput(z_loc, z_raw, None, None)
        w_loc, w_raw = self.w_head(h)
        return EncoderOutput(z_loc, z_raw, w_loc, w_raw)


class TextDecoder(nn.Module):
    """u [N, D] -> linear -> three stride-2 ConvTranspose1d -> 1x1 conv to logits [N, L, V]."""

    def __init__(self, vocab_size: int, length: int, width: int, in_dim: int):
        super().__init__()
        hidden = 8 * width
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Linear(hidden, 8 * width * (length // DOWNSAMPLE)),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Unflatten(1, (8 * width, length // DOWNSAMPLE)),
            nn.ConvTranspose1d(8 * width, 4 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.ConvTranspose1d(4 * width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.ConvTranspose1d(2 * width, 2 * width, 4, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE),
            nn.Conv1d(2 * width, vocab_size, 1),
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.net(u).transpose(1, 2)  # (N, V, L) -> (N, L, V)


@register_family("text")
def text_family(mod: ModalityConfig, cfg: ModelConfig) -> tuple[nn.Module, nn.Module]:
    """Conv1d encoder/decoder over token ids of shape (L,) with ``vocab_size`` words; width = cfg.width."""
    length, vocab = text_geometry(mod)
    encoder = TextEncoder(vocab, length, cfg.width, cfg.latent_dim, cfg.private_dim)
    decoder = TextDecoder(vocab, length, cfg.width, cfg.latent_dim + cfg.private_dim)
    return encoder, decoder


def eos_mask(ids: torch.Tensor) -> torch.Tensor:
    """bool [..., L]: positions up to and including the first ``<eos>`` (all positions when there is none)."""
    is_eos = ids == EOS_ID
    after = (
        torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()
    )  # number of <eos> strictly before each position
    return after == 0


class CategoricalLikelihood(Likelihood):
    """Categorical over the vocabulary at each position; decoder output = logits [..., L, V].

    log p(x | logits) = weight * sum_{t <= first <eos>} log softmax(logits_t)[x_t]; the weight is the
    modality's ``likelihood_scale`` (MMVAE's llik_scaling: it balances a 32-token caption against an image
    of thousands of pixels; 1 gives the plain likelihood). ``mean`` returns the most likely ids (int64).
    """

    def log_prob(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        ids = x.long()
        if ids.shape != params.shape[-1 - ids.dim() : -1]:
            raise ValueError(
                f"token ids {tuple(ids.shape)} do not match logits {tuple(params.shape)} [..., B, L, V]"
            )
        logp = F.log_softmax(params.float(), dim=-1)
        picked = logp.gather(-1, ids.expand(params.shape[:-1]).unsqueeze(-1)).squeeze(-1)  # (..., B, L)
        return self.scale * (picked * eos_mask(ids)).sum(-1)

    def mean(self, params: torch.Tensor) -> torch.Tensor:
        return params.argmax(dim=-1)


if "categorical" in LIKELIHOODS:
    raise RuntimeError("likelihood 'categorical' is already registered; mmebm_dist.models.text must own it")
LIKELIHOODS["categorical"] = CategoricalLikelihood
