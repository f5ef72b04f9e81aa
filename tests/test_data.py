"""Tests of tcjepa_jax.data: synthetic scenes, tokenizer, transforms, the Grain pipeline."""

import os
import pickle

import ml_collections
import numpy as np
import pytest

from tcjepa_jax.data import pipeline
from tcjepa_jax.data import synthetic
from tcjepa_jax.data import tokenizer as tok_lib
from tcjepa_jax.data import transforms
from tcjepa_jax.masks import MaskSpec

KEYS = {
        "image": np.float32, "text_ids": np.int32, "text_mask": np.bool_, "caption_valid": np.bool_,
        "context_idx": np.int32, "context_valid": np.bool_, "target_idx": np.int32,
        "target_valid": np.bool_,
}


# --- synthetic scenes ----------------------------------------------------------------------------

def test_synthetic_deterministic_and_splits_differ():
    a, b = synthetic.SyntheticScenes(seed=3), synthetic.SyntheticScenes(seed=3)
    val = synthetic.SyntheticScenes(seed=3, split="validation")
    ra, rb = a[17], pickle.loads(pickle.dumps(b))[17]
    np.testing.assert_array_equal(ra["image"], rb["image"])
    np.testing.assert_array_equal(ra["segmentation"], rb["segmentation"])
    assert ra["captions"] == rb["captions"]
    assert ra["image"].shape == (64, 64, 3) and ra["image"].dtype == np.uint8
    assert ra["segmentation"].shape == (64, 64) and ra["segmentation"].dtype == np.uint8
    assert not np.array_equal(ra["image"], val[17]["image"])
    assert not np.array_equal(ra["image"], a[18]["image"])
    assert len(a) == 1_000_000


def test_synthetic_labels_match_captions():
    src = synthetic.SyntheticScenes(image_size=64, seed=0, max_objects=4)
    counts = set()
    for i in range(60):
        r = src[i]
        n = r["label_count"]
        counts.add(n)
        summary = [c for c in r["captions"] if ":" in c]
        assert len(summary) == 1 and summary[0].startswith(synthetic._NUMBERS[n] + " object")
        # one sentence per object, n - 1 relations, one background sentence, the summary
        assert len(r["captions"]) == 1 + n + (n - 1) + 1
        assert (1 + r["label_shape"]) in r["segmentation"]  # largest object is never hidden
        largest = f"{synthetic.COLORS[r['label_color']]} {synthetic.SHAPES[r['label_shape']]}"
        assert largest in summary[0]
        assert r["segmentation"].max() <= len(synthetic.SHAPES)
    assert counts == {1, 2, 3, 4}
    assert synthetic.NUM_CLASSES == {"count": 4, "shape": len(synthetic.SHAPES),
                                                                      "color": len(synthetic.COLORS)}


def test_largest_object_scale_draws_and_a_larger_one_is_refused():
    src = synthetic.SyntheticScenes(max_objects=2, object_scale=synthetic.MAX_OBJECT_SCALE)
    for i in range(40):  # the largest radius must still fit: placement used to fail above ~2.27
        assert (1 + src[i]["label_shape"]) in src[i]["segmentation"]
    with pytest.raises(ValueError, match="object_scale"):
        synthetic.SyntheticScenes(object_scale=synthetic.MAX_OBJECT_SCALE + 0.1)


def test_plain_background_is_one_grey_and_keeps_objects_and_labels():
    textured = synthetic.SyntheticScenes(seed=2)
    plain = synthetic.SyntheticScenes(seed=2, background="plain")
    brightness = []
    for i in range(20):
        t, p = textured[i], plain[i]
        background = p["segmentation"] == 0
        pixels = p["image"][background].astype(np.float32)
        # grey: the three channels agree and sit near one level in every image
        assert np.abs(pixels - pixels.mean(axis=1, keepdims=True)).max() < 1e-3
        assert abs(pixels.mean() - synthetic._PLAIN_GREY) < 1.0
        brightness.append(t["image"][t["segmentation"] == 0].mean())
        for key in ("label_count", "label_shape", "label_color"):
            assert t[key] == p[key]
        assert "the background is plain." in p["captions"]
        assert not any("background is plain" in c for c in t["captions"])
    assert np.std(brightness) > 10  # the textured default still varies from scene to scene
    with pytest.raises(ValueError, match="background"):
        synthetic.SyntheticScenes(background="checkered")


# --- tokenizer -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    path = tok_lib.train_tokenizer(synthetic.iter_captions(0, 150), str(d / "spm"), 64)
    assert os.path.exists(path) and not [f for f in os.listdir(d) if f.startswith(".spm")]
    return tok_lib.Tokenizer(path)


def test_tokenizer_roundtrip_pad_truncate(tokenizer):
    assert tokenizer.vocab_size == 64
    text = "a small blue square in the lower left."
    ids, mask = tokenizer.encode([text, ""], 40)
    assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == (2, 40)
    n = int(mask[0].sum())
    assert ids[0, n - 1] == tok_lib.EOS_ID and (ids[0, n:] == 0).all() and (ids[0, :n] > 0).all()
    assert tokenizer.decode(ids[0]) == text
    assert ids[1, 0] == tok_lib.EOS_ID and mask[1].sum() == 1
    short, smask = tokenizer.encode([text], 4)
    assert smask.all() and short[0, -1] == tok_lib.EOS_ID
    np.testing.assert_array_equal(short[0, :3], ids[0, :3])
    again = pickle.loads(pickle.dumps(tokenizer))
    np.testing.assert_array_equal(again.encode([text], 40)[0], ids[:1])


def test_tokenizer_vocab_too_large_and_load_or_train(tmp_path):
    with pytest.raises(ValueError, match="too large"):
        tok_lib.train_tokenizer(synthetic.iter_captions(0, 50), str(tmp_path / "x"), 5000, strict=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tok_lib.load_or_train_tokenizer(str(tmp_path / "missing.model"), str(tmp_path), 64, list)
    calls = []

    def sentences():
        calls.append(1)
        return synthetic.iter_captions(0, 50)

    t1 = tok_lib.load_or_train_tokenizer(None, str(tmp_path), 5000, sentences)  # non-strict
    assert 3 < t1.vocab_size < 5000
    t2 = tok_lib.load_or_train_tokenizer(None, str(tmp_path), 5000, sentences)
    assert len(calls) == 1 and t2.vocab_size == t1.vocab_size


def test_tokenizer_refused_before_compiling(tmp_path):
    """A tokenizer without T5's ids, or larger than the embedding table, is a UserError in setup."""
    import sentencepiece as spm
    from configs import synthetic_tiny
    from tcjepa_jax.config_lib import UserError
    from tcjepa_jax.experiment import setup
    prefix = str(tmp_path / "plain")
    spm.SentencePieceTrainer.train(  # SentencePiece's own defaults: unk 0, bos 1, eos 2
            sentence_iterator=synthetic.iter_captions(0, 100), model_prefix=prefix, vocab_size=60,
            minloglevel=2)
    config = synthetic_tiny.get_config("smoke")
    config.tokenizer.model_path = prefix + ".model"
    with pytest.raises(UserError, match="T5 conventions"):
        setup(config, str(tmp_path / "a"))
    config.tokenizer.model_path = tok_lib.train_tokenizer(
            synthetic.iter_captions(0, 150), str(tmp_path / "t5ids"), 64)
    config.model.text_vocab_size = 32
    with pytest.raises(UserError, match="text_vocab_size=32"):
        setup(config, str(tmp_path / "b"))
    config.model.text_vocab_size = 100  # a larger table (e.g. T5's 32128 rows) is fine
    assert setup(config, str(tmp_path / "c")).models.text.vocab_size == 100
    (tmp_path / "junk.model").write_bytes(b"not a model")
    config.tokenizer.model_path = str(tmp_path / "junk.model")
    with pytest.raises(UserError, match="not a SentencePiece model"):
        setup(config, str(tmp_path / "d"))


# --- transforms ----------------------------------------------------------------------------------

def test_transforms():
    rng = np.random.default_rng(0)
    img = np.arange(40 * 30 * 3, dtype=np.uint8).reshape(40, 30, 3)
    out = transforms.random_resized_crop(img, rng, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    for _ in range(50):
        top, left, h, w = transforms.crop_box(40, 30, rng, (0.3, 1.0))
        assert 0 <= top <= 40 - h and 0 <= left <= 30 - w and h * w >= 0.25 * 1200
    # identity resize reproduces the image
    np.testing.assert_allclose(transforms.resize_bilinear(img, 40, 30), img.astype(np.float32))
    norm = transforms.normalize(np.full((2, 2, 3), 255, np.uint8))
    assert norm.dtype == np.float32
    np.testing.assert_allclose(norm[0, 0], (1 - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD)
    caps, valid = transforms.sample_captions(["a", "b", "c"], rng, 5)
    assert sorted(caps[:3]) == ["a", "b", "c"] and caps[3:] == ["", ""]
    assert valid.tolist() == [True] * 3 + [False] * 2
    caps, valid = transforms.sample_captions(list("abcdefgh"), rng, 4)
    assert len(set(caps)) == 4 and valid.all()


# --- pipeline ------------------------------------------------------------------------------------

def tiny_config(**input_overrides):
    c = ml_collections.ConfigDict()
    c.seed = 7
    c.batch_size = 4
    c.input = ml_collections.ConfigDict(dict(
            source="synthetic", image_size=32, crop_scale=(0.3, 1.0), num_captions=4,
            max_caption_len=12, synthetic_size=48, num_threads=0, prefetch=1))
    c.input.update(input_overrides)
    return c


SPEC = MaskSpec(grid=(8, 8))


class IndexSource:
    """Image filled with its own index; raises for indices in `bad`."""

    def __init__(self, size=48, bad=()):
        self.size, self.bad = size, set(bad)

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        if i in self.bad:
            raise IOError(f"corrupt record {i}")
        return {"image": np.full((16, 16, 3), i, np.uint8), "captions": [f"record {i}"]}


def decode_index(batch):
    px = batch["image"][:, 0, 0, 0] * transforms.IMAGENET_STD[0] + transforms.IMAGENET_MEAN[0]
    return np.round(px * 255).astype(int).tolist()


def take(it, n):
    return [next(it) for _ in range(n)]


def test_pipeline_shapes_and_determinism(tokenizer):
    c = tiny_config()
    batches = take(pipeline.make_train_iterator(c, tokenizer, SPEC), 3)
    nc, k, nt = SPEC.num_context_slots, SPEC.num_targets, SPEC.num_target_slots
    shapes = {"image": (4, 32, 32, 3), "text_ids": (4, 4, 12), "text_mask": (4, 4, 12),
                        "caption_valid": (4, 4), "context_idx": (4, nc), "context_valid": (4, nc),
                        "target_idx": (4, k, nt), "target_valid": (4, k, nt)}
    for b in batches:
        assert set(b) == set(KEYS)
        for key, dtype in KEYS.items():
            assert b[key].dtype == dtype, key
            assert b[key].shape == shapes[key], key
        assert (b["caption_valid"].sum(1) >= 3).all()  # every scene has >= 3 captions
        assert (b["text_mask"].any(-1)).all()
    again = take(pipeline.make_train_iterator(c, tokenizer, SPEC), 3)
    for b1, b2 in zip(batches, again):
        for key in KEYS:
            np.testing.assert_array_equal(b1[key], b2[key])
    other = next(pipeline.make_train_iterator(tiny_config(), tokenizer, SPEC, process_count=2))
    assert not np.array_equal(other["image"], batches[0]["image"][:2])


def test_pipeline_hosts_disjoint_and_cover_epoch(tokenizer):
    c = tiny_config()
    src = IndexSource(48)
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(c, tokenizer, SPEC, process_index=p, process_count=2,
                                                                            source=src)
        seen.append([i for b in take(it, 12) for i in decode_index(b)])  # 12 batches of 2 = 24
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(48))
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_train_dataset(tiny_config(), tokenizer, SPEC, process_count=3)


def test_pipeline_state_resumes_exactly(tokenizer):
    c = tiny_config(num_threads=2)
    it = pipeline.make_train_iterator(c, tokenizer, SPEC)
    take(it, 3)
    state = it.get_state()
    expected = take(it, 12)  # crosses into the next epoch (48 records / 4)
    it2 = pipeline.make_train_iterator(c, tokenizer, SPEC)
    it2.set_state(state)
    for b1, b2 in zip(expected, take(it2, 12)):
        for key in KEYS:
            np.testing.assert_array_equal(b1[key], b2[key])


def test_pipeline_skips_bad_records(tokenizer):
    counter = pipeline.BadRecordCounter()
    bad = set(range(0, 48, 5))
    it = pipeline.make_train_iterator(tiny_config(), tokenizer, SPEC, source=IndexSource(48, bad),
                                                                        counter=counter)
    got = [i for b in take(it, 8) for i in decode_index(b)]
    assert len(got) == 32 and not set(got) & bad
    assert counter.count > 0 and "corrupt record" in counter.last_error


def test_pipeline_stops_when_most_records_fail(tokenizer):
    counter = pipeline.BadRecordCounter(give_up_after=10)
    it = pipeline.make_train_iterator(tiny_config(), tokenizer, SPEC,
                                      source=IndexSource(48, set(range(48))), counter=counter)
    with pytest.raises(RuntimeError, match="records failed to load"):
        take(it, 1)


def test_unknown_source_and_probe_arrays():
    with pytest.raises(ValueError, match="synthetic"):
        pipeline.make_source(tiny_config(source="nope").input, "train")
    arrays = pipeline.load_probe_arrays(tiny_config(), "validation", 6)
    assert arrays["image"].shape == (6, 32, 32, 3) and arrays["image"].dtype == np.float32
    assert arrays["segmentation"].shape == (6, 32, 32) and arrays["segmentation"].dtype == np.uint8
    for k in ("label_count", "label_shape", "label_color"):
        assert arrays[k].shape == (6,) and arrays[k].dtype == np.int32
