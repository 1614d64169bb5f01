"""Text modality: tokenizer/vocabulary round trip, caption tiles, text family, categorical likelihood."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmebm_dist.config import ModalityConfig, ModelConfig
from mmebm_dist.data.text import EOS_ID, PAD_ID, UNK_ID, Vocabulary, caption_tile, caption_tiles, normalize
from mmebm_dist.models import text as text_model  # registers the text family and the categorical likelihood
from mmebm_dist.models.likelihoods import LIKELIHOODS
from mmebm_dist.models.modality import FAMILIES

TEXTS = ["this bird has a red crown, a white breast and a short bill.", "an orange bird with grey wings."]


@pytest.fixture()
def vocab():
    return Vocabulary.build(TEXTS, max_len=16)


def test_encode_layout_words_eos_then_pad(vocab):
    ids = vocab.encode("An orange bird.")
    words = ["an", "orange", "bird", "."]
    assert ids.dtype == np.int64 and ids.shape == (16,)
    assert [vocab.words[i] for i in ids[:4]] == words
    assert ids[4] == EOS_ID and (ids[5:] == PAD_ID).all()


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(vocab, text):
    assert vocab.decode(vocab.encode(text)) == normalize(text) == text


def test_decode_stops_at_eos_and_unknown_words_map_to_unk(vocab):
    ids = vocab.encode("a purple bird.")
    assert ids[1] == UNK_ID and vocab.decode(ids) == "a <unk> bird."
    tail = ids.copy()
    tail[5:] = vocab.encode("red crown")[:11]  # junk after <eos> is ignored
    assert vocab.decode(tail) == "a <unk> bird."


def test_too_long_caption_is_refused(vocab):
    with pytest.raises(ValueError, match="max_len 16"):
        vocab.encode(" ".join(["bird"] * 16))


def test_save_and_load(tmp_path, vocab):
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path) == vocab
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        Vocabulary.load(tmp_path / "missing")


def test_caption_tiles_draw_text():
    tile = caption_tile("a small red bird with a long bill.", height=64, width=128)
    assert tile.shape == (64, 128, 3) and tile.dtype == np.uint8
    assert (tile < 128).any() and (tile == 255).mean() > 0.5  # dark text on a white tile
    vocab = Vocabulary.build(TEXTS)
    tiles = caption_tiles(vocab.encode_batch(TEXTS), vocab, height=32, width=64)
    assert tiles.shape == (2, 3, 32, 64) and 0.0 <= tiles.min() and tiles.max() <= 1.0
    assert not np.array_equal(tiles[0], tiles[1])


def test_eos_mask_keeps_positions_through_the_first_eos():
    ids = torch.tensor([[5, 6, EOS_ID, PAD_ID, EOS_ID], [5, 5, 5, 5, 5]])
    mask = text_model.eos_mask(ids)
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]


def test_categorical_log_prob_ignores_padding_and_broadcasts():
    torch.manual_seed(0)
    like = LIKELIHOODS["categorical"](1, 2.0)
    ids = torch.tensor([[4, 3, EOS_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID, PAD_ID]])
    logits = torch.randn(3, 1, 8, 7)  # (particles, B, L, V)
    lp = like.log_prob(ids, logits)
    assert lp.shape == (3, 1)
    manual = torch.log_softmax(logits, -1)[:, 0, [0, 1, 2], [4, 3, EOS_ID]].sum(-1)
    torch.testing.assert_close(lp[:, 0], 2.0 * manual)  # the weight is likelihood_scale
    changed = logits.clone()
    changed[..., 3:, :] = torch.randn_like(changed[..., 3:, :])  # positions after <eos> do not matter
    torch.testing.assert_close(like.log_prob(ids, changed), lp)
    assert like.mean(logits).dtype == torch.int64 and like.mean(logits).shape == (3, 1, 8)


def test_text_networks_shapes_and_gradients():
    enc = text_model.TextEncoder(vocab_size=11, length=16, width=4, latent_dim=5, private_dim=3)
    dec = text_model.TextDecoder(vocab_size=11, length=16, width=4, in_dim=8)
    ids = torch.randint(0, 11, (2, 16))
    out = enc(ids)
    assert out.z_loc.shape == (2, 5) and out.w_loc.shape == (2, 3)
    logits = dec(torch.cat([out.w_loc, out.z_loc], -1))
    assert logits.shape == (2, 16, 11)
    LIKELIHOODS["categorical"](1, 1.0).log_prob(ids, logits).sum().backward()
    assert enc.embed.weight.grad is not None and enc.embed.weight.grad.abs().sum() > 0
    with pytest.raises(TypeError, match="integer token ids"):
        enc(ids.float())


def test_text_family_in_a_multimodal_model_trains_one_step():
    from mmebm_dist.models import build_model

    assert "text" in FAMILIES
    cfg = ModelConfig(
        modalities=[
            ModalityConfig(name="image", shape=(3, 8, 8), family="conv"),
            ModalityConfig(
                name="caption",
                shape=(16,),
                family="text",
                likelihood="categorical",
                likelihood_scale=1.0,
                vocab_size=11,
            ),
        ],
        latent_dim=4,
        private_dim=2,
        width=4,
    )
    cfg.prior.hidden, cfg.prior.langevin.steps = 8, 2
    torch.manual_seed(0)
    model = build_model(cfg)
    batch = {
        "image": torch.rand(3, 3, 8, 8),
        "caption": torch.randint(0, 11, (3, 16)),
        "label": torch.zeros(3),
    }
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["rec/caption"] > 0
    assert model.encoders["caption"].embed.weight.grad.abs().sum() > 0
    joint = model.generate_joint(2)
    assert joint["caption"].shape == (2, 16) and joint["caption"].dtype == torch.int64


def test_text_family_config_errors_name_the_fix():
    from mmebm_dist.config import ConfigError
    from mmebm_dist.models import build_model

    def text(**kw):
        return ModelConfig(width=4, modalities=[ModalityConfig(name="caption", family="text", **kw)])

    with pytest.raises(ConfigError, match="vocab_size"):
        build_model(text(shape=(16,)))
    with pytest.raises(ConfigError, match="multiple of 8"):
        build_model(text(shape=(12,), vocab_size=9))
