"""Generated birds + captions: attributes, drawing, caption grammar, the reader, coherence, shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmebm_dist.data import shards, stream
from mmebm_dist.data.text import EOS_ID, UNK_ID, Vocabulary, tokenize
from mmebm_dist.datasets import birds, generated
from mmebm_dist.datasets.birds import (
    ATTRIBUTE_NAMES,
    ATTRIBUTES,
    MAX_TOKENS,
    UNMENTIONED,
    BirdParams,
    BirdsSpec,
    build_birds,
    caption_vocabulary,
    make_caption,
    read_caption_attributes,
    render_bird,
    sample_attributes,
)


@pytest.fixture(scope="module")
def photos():
    return generated.load_photos()


def _attribute_sets(n: int) -> list[dict[str, int]]:
    return [sample_attributes(np.random.default_rng([9, i])) for i in range(n)]


def test_every_template_and_attribute_value_gives_good_grammar():
    vocab = caption_vocabulary()
    rng = np.random.default_rng(0)
    captions = [make_caption(a, t, rng) for a in _attribute_sets(120) for t in range(len(birds.TEMPLATES))]
    vowels = tuple("aeiou")
    for caption in captions:
        words = tokenize(caption)
        assert len(words) + 1 <= MAX_TOKENS and caption.endswith(".") and "a/an" not in caption
        for w, nxt in zip(words, words[1:], strict=False):
            if w == "a":
                assert not nxt.startswith(vowels), caption
            if w == "an":
                assert nxt.startswith(vowels), caption
        ids = vocab.encode(caption)
        assert (ids == EOS_ID).sum() == 1 and ids[len(words)] == EOS_ID and UNK_ID not in ids
        assert vocab.decode(ids) == caption  # tokenizer round trip
    # CUB's vocabulary and both spellings appear
    seen = {w for c in captions for w in tokenize(c)}
    assert {
        "crown",
        "nape",
        "breast",
        "belly",
        "wingbars",
        "eye",
        "ring",
        "bill",
        "beak",
        "grey",
        "gray",
    } <= seen
    assert {"an", "a"} <= seen


def test_reader_recovers_exactly_what_each_template_states():
    rng = np.random.default_rng(1)
    for attrs in _attribute_sets(150):
        for t, (_, mentioned) in enumerate(birds.TEMPLATES):
            read = read_caption_attributes(make_caption(attrs, t, rng))
            for name in ATTRIBUTE_NAMES:
                assert read[name] == (attrs[name] if name in mentioned else UNMENTIONED), (
                    t,
                    name,
                    read,
                    attrs,
                )


def test_reader_on_free_text():
    read = read_caption_attributes("A small gray bird with black wings, no eye ring and a long orange beak.")
    assert read["size"] == ATTRIBUTES["size"].index("small")
    assert read["body_colour"] == birds.COLOURS.index("grey") and read["wing_colour"] == birds.COLOURS.index(
        "black"
    )
    assert (
        read["eye_ring"] == 0
        and read["beak_length"] == 1
        and read["beak_colour"] == birds.BEAK_COLOURS.index("orange")
    )
    assert read["crown_colour"] == UNMENTIONED and read["wingbars"] == UNMENTIONED
    assert all(v == UNMENTIONED for v in read_caption_attributes("<unk> <unk> .").values())


def test_drawing_is_deterministic_inside_the_frame_and_stands_out(photos):
    p = BirdParams()
    for i, attrs in enumerate(_attribute_sets(12)):
        a = render_bird(attrs, np.random.default_rng([2, i]), photos, p)
        b = render_bird(attrs, np.random.default_rng([2, i]), photos, p)
        assert a.image.tobytes() == b.image.tobytes() and a.image.shape == (64, 64, 3)
        assert birds.bird_contrast(a.image, a.alpha) >= p.min_contrast
        assert a.alpha[0].max() == 0 and a.alpha[-1].max() == 0 and a.alpha[:, 0].max() == 0
        assert a.alpha[:, -1].max() == 0 and a.alpha.sum() > 40  # a visible bird, fully inside
    other = render_bird(_attribute_sets(1)[0], np.random.default_rng([3, 0]), photos, p)
    assert (
        other.image.tobytes()
        != render_bird(_attribute_sets(1)[0], np.random.default_rng([2, 0]), photos, p).image.tobytes()
    )


def test_colour_attributes_change_the_image(photos):
    attrs = _attribute_sets(1)[0]
    recoloured = dict(attrs, body_colour=(attrs["body_colour"] + 1) % len(birds.COLOURS))
    a = render_bird(attrs, np.random.default_rng(5), photos)
    b = render_bird(recoloured, np.random.default_rng(5), photos)
    changed = (a.image != b.image).any(-1)
    assert changed.mean() > 0.02 and (changed <= (a.alpha > 0)).all()  # only bird pixels change


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("birds")
    out = root / "a"
    manifest = build_birds(
        BirdsSpec(out=str(out), num_train=24, num_test=10, shard_size=8, workers=1, seed=4), progress=False
    )
    return out, manifest


@pytest.mark.slow
def test_build_is_deterministic_across_workers(built, tmp_path):
    out, _ = built
    again = tmp_path / "b"
    build_birds(
        BirdsSpec(out=str(again), num_train=24, num_test=10, shard_size=8, workers=2, seed=4), progress=False
    )
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (out / name).read_bytes() == (again / name).read_bytes(), name


def test_raw_image_encoding_loads_the_same_data(built, tmp_path):
    from mmebm_dist.evaluate.judges.birds import load_split

    out, _ = built
    raw = tmp_path / "raw"
    manifest = build_birds(BirdsSpec(out=str(raw), num_train=24, num_test=10, shard_size=8, workers=1, seed=4,
                                     encoding="raw"), progress=False)
    assert [m["encoding"] for m in manifest["modalities"]] == ["raw", "npy"]
    assert shards.verify(raw, progress=False) == {"shards": 5, "samples": 34}
    png_split, raw_split = load_split(out, "test"), load_split(raw, "test")
    assert all((png_split[k] == raw_split[k]).all() for k in png_split)
    a = next(iter(stream.make_loader(out, batch_size=4, num_workers=0, split="test")))
    b = next(iter(stream.make_loader(raw, batch_size=4, num_workers=0, split="test")))
    assert all(torch.equal(a[k], b[k]) for k in ("image", "caption", "label"))


def test_shards_verify_load_and_keep_all_captions(built):
    from mmebm_dist.evaluate.judges.birds import load_split

    out, manifest = built
    assert shards.verify(out, progress=False) == {"shards": 5, "samples": 34}
    vocab = Vocabulary.load(out)
    assert vocab == caption_vocabulary() and manifest["modalities"][1]["vocab_size"] == len(vocab)
    loader = stream.make_loader(out, batch_size=4, num_workers=0, rank=0, world_size=1, split="test")
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["caption"].shape == (4, 32) and batch["caption"].dtype == torch.int64
    data = load_split(out, "test")
    assert data["all_captions"].shape == (10, birds.CAPTIONS_PER_IMAGE, 32)
    # the text modality is each image's first caption, and every caption states only true attributes
    assert (data["all_captions"][:, 0] == data["captions"]).all()
    assert batch["label"].tolist() == data["attributes"][:4, ATTRIBUTE_NAMES.index("body_colour")].tolist()
    for row, attrs in zip(data["all_captions"], data["attributes"], strict=True):
        texts = vocab.decode_batch(row)
        assert len(set(texts)) == birds.CAPTIONS_PER_IMAGE
        for text in texts:
            read = read_caption_attributes(text)
            assert all(read[n] in (UNMENTIONED, attrs[k]) for k, n in enumerate(ATTRIBUTE_NAMES)), text


def test_attribute_classifier_trains_saves_and_loads(built):
    from mmebm_dist.evaluate.judges.birds import load_classifier, save_classifier, train_attribute_classifier

    out, _ = built
    torch.manual_seed(0)
    model, report = train_attribute_classifier(out, steps=3, batch_size=8, width=4, progress=False)
    assert set(report) == set(ATTRIBUTE_NAMES) | {"mean"} and 0.0 <= report["mean"] <= 1.0
    path = out.parent / "clf.pt"
    save_classifier(model, report, path, shards.manifest_hash(out))
    images = torch.rand(2, 3, 64, 64)
    loaded = load_classifier(path, manifest_hash=shards.manifest_hash(out))
    for name, values in model.predict(images).items():
        assert (loaded.predict(images)[name] == values).all()
    with pytest.raises(ValueError, match="manifest hash"):
        load_classifier(path, manifest_hash="0" * 64)


class _CopyModel:
    """Stands in for a trained model: 'generates' real test tuples (joint) and the source tuple itself
    (conditional), or the tuples in reverse order (shuffle)."""

    modalities = ["image", "caption"]

    def __init__(self, chunks, shuffle: bool = False):
        self.tuples = {k: torch.cat([c[k] for c in chunks]) for k in self.modalities}
        self.shuffle = shuffle

    def parameters(self):
        return iter(())

    def generate_joint(self, n, *, langevin_steps=None, generator=None):
        return {k: v[:n] for k, v in self.tuples.items()}

    def generate_conditional(self, batch, sources, *, generator=None):
        order = torch.arange(len(batch["caption"])).flip(0) if self.shuffle else slice(None)
        return {"image": batch["image"][order], "caption": batch["caption"][order]}


class _LookupClassifier:
    """A perfect image attribute classifier: looks each image up among the data set's own."""

    def __init__(self, chunks):
        self.known = {c["image"][i].numpy().tobytes(): c["attributes"][i] for c in chunks
                      for i in range(len(c["image"]))}

    def predict(self, images):
        rows = torch.stack([self.known[x.numpy().tobytes()] for x in images]).numpy()
        return {name: rows[:, k] for k, name in enumerate(ATTRIBUTE_NAMES)}


def test_the_birds_judge_scores_a_copying_model_perfectly(built):
    from mmebm_dist.evaluate.coherence import measure_coherence
    from mmebm_dist.evaluate.judges.birds import BirdsJudge, read_test_chunks

    out, _ = built
    chunks = read_test_chunks(out, num=10, batch_size=4)
    judge = BirdsJudge(_LookupClassifier(chunks), Vocabulary.load(out))
    common = {"num_samples": 10, "batch_size": 4, "seed": 0, "aggregate": False}
    perfect = measure_coherence(_CopyModel(chunks), judge, chunks, **common)
    assert perfect["joint"]["coherence"] == 1.0 and perfect["real_data"]["coherence"] == 1.0
    assert perfect["cross"]["matrix"] == [[1.0, 1.0], [1.0, 1.0]]
    stated = perfect["cross"]["cells"]["image->caption"]["attributes"]
    assert 0 < sum(v["n"] for v in stated.values()) < 10 * len(ATTRIBUTE_NAMES)  # captions state some
    shuffled = measure_coherence(_CopyModel(chunks, shuffle=True), judge, chunks, **common)
    assert shuffled["cross"]["coherence"] < 0.9


def test_existing_output_is_refused(built):
    out, _ = built
    with pytest.raises(FileExistsError, match="--overwrite"):
        build_birds(BirdsSpec(out=str(out), num_train=2, num_test=2), progress=False)
