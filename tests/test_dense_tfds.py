"""The dense evaluator on a TFDS segmentation set (probe.segmentation_key): masks are read with
their images, cropped like them (nearest-neighbour), reduced to per-patch labels with the ignore
label left out, and the evaluator runs end to end from a config; the config check refuses
'dense' on a source without masks and says which field to set."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import synthetic_tiny
from tcjepa_jax import evaluation, step as step_lib
from tcjepa_jax.config_lib import validate_config
from tcjepa_jax.data import transforms
from tcjepa_jax.data.decode import BadRecord
from tcjepa_jax.data.sources import tfds as tfds_source
from tcjepa_jax.evaluators import _features, dense

import tiny_tfds

NUM_EXAMPLES = 24
IGNORE = tiny_tfds.IGNORE


@pytest.fixture(scope="module")
def segments(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    name, examples = tiny_tfds.build_tiny_segments(data_dir, NUM_EXAMPLES, image_size=32)
    return name, str(data_dir), examples


def config_for(segments, image_size=32, **probe):
    name, data_dir, _ = segments
    config = synthetic_tiny.get_config("smoke")
    config.input.image_size = image_size     # the tiny encoder's 8 px patches: a 4x4 grid at 32
    config.probe.update(source="tfds", tfds_name=name, data_dir=data_dir, label_key="label",
                        segmentation_key="mask", train_split="train[:16]",
                        test_split="train[16:]", num_train=16, num_test=8, dense_images=16,
                        evaluators=("dense", "linear"))
    config.probe.update(**probe)
    return config


def test_masks_are_cropped_like_their_images_and_reduced_to_patch_labels(segments):
    _, _, examples = segments
    data = _features.load_split(config_for(segments), "train", 4)
    seg = data["segmentation"]
    assert seg.shape == (4, 32, 32) and seg.dtype == np.uint8
    assert data["labels"]["label"].tolist() == [0, 1, 2, 0]
    for i, (_, image, mask) in enumerate(examples[:4]):
        # 32 x 48 at image_size 32: no resize, the central 32 columns.
        np.testing.assert_array_equal(seg[i], mask[:, 8:40])
        np.testing.assert_allclose(data["image"][i], transforms.normalize(image[:, 8:40]),
                                   atol=1e-5)
    # The block is the top-left (even index) or top-right (odd) 2x2 patches; the ignored bottom
    # row does not vote, so the bottom patches stay background.
    expected = np.zeros((4, 4, 4), np.int32)
    for i, (label, _, _) in enumerate(examples[:4]):
        expected[i, :2, (2 if i % 2 else 0):(4 if i % 2 else 2)] = 1 + label
    np.testing.assert_array_equal(dense.patch_labels(seg, 8, IGNORE).reshape(4, 4, 4), expected)

    # At image_size 16 the 32 x 48 image is halved to 16 x 24 (nearest-neighbour for the mask:
    # source pixel 2j + 1 of output j), then columns 4..19 are kept.
    small = _features.load_split(config_for(segments, image_size=16), "train", 4)
    for i, (_, _, mask) in enumerate(examples[:4]):
        np.testing.assert_array_equal(small["segmentation"][i], mask[1::2, 9:40:2])
    assert set(np.unique(small["segmentation"])) <= {0, 1, 2, 3, IGNORE}


def test_patch_labels_and_scores_leave_out_the_ignore_label():
    seg = np.zeros((1, 4, 8), np.uint8)
    seg[0, :, :4] = IGNORE            # patch 0: only ignored pixels
    seg[0, :3, 4:] = IGNORE           # patch 1: 12 ignored pixels, 3 of class 2, 1 of class 0
    seg[0, 3, 4:7] = 2
    assert dense.patch_labels(seg, 4, IGNORE).tolist() == [[IGNORE, 2]]
    assert dense.patch_labels(seg, 4).tolist() == [[IGNORE, IGNORE]]  # no ignore: 255 wins
    assert dense.patch_labels(np.full((1, 2, 2), 7, np.int32), 2, ignore=-1).tolist() == [[7]]

    mask = np.zeros((8, 8, 3), np.uint8)
    mask[2:4, 2:4] = 5
    assert tfds_source.as_mask(mask).tolist() == mask[..., 0].tolist()  # equal channels: ok
    mask[0, 0, 1] = 1
    with pytest.raises(BadRecord, match="colour-coded"):
        tfds_source.as_mask(mask)


def test_dense_evaluator_runs_end_to_end_on_a_tfds_segmentation_set(segments):
    config = config_for(segments)
    validate_config(config)
    models = step_lib.build_models(config, vocab_size=64)
    # Only the encoder is evaluated: initialising it alone is much faster than the whole model.
    images = np.zeros((1, 32, 32, 3), np.float32)
    params = nn.unbox(models.encoder.init(jax.random.PRNGKey(0), images)["params"])
    data = evaluation.EvalData(config)
    assert data.test["segmentation"].shape == (8, 32, 32)
    results = evaluation.run_evaluators(config, models.encoder, params, data)
    assert set(results) == {"eval/dense/miou", "eval/dense/pixel_accuracy",
                            "eval/dense/patch_accuracy", "eval/linear/label"}
    assert all(0 <= v <= 1 for v in results.values()), results
    # The block's patches are solid colour on noise: even a random encoder's tokens separate
    # them. Predicting background everywhere scores 0.75 / 4 (a quarter of the pixels are a
    # block of one of three classes).
    assert results["eval/dense/miou"] > 0.5, results
    assert results["eval/dense/patch_accuracy"] > 0.9, results

    # A mask-only set: no label_key, only the dense evaluator, records need no image label.
    config = config_for(segments, label_key="", evaluators=("dense",))
    validate_config(config)
    data = evaluation.EvalData(config)
    assert data.train["labels"] == {} and data.train["segmentation"].shape == (16, 32, 32)
    results = evaluation.run_evaluators(config, models.encoder, params, data)
    assert set(results) == {"eval/dense/miou", "eval/dense/pixel_accuracy",
                            "eval/dense/patch_accuracy"}


@pytest.mark.parametrize("probe,needle", [
    (dict(segmentation_key=""), "probe.segmentation_key"),           # dense without a mask
    (dict(source="array_record", data_dir="/nowhere"), "probe.source='tfds'"),
    (dict(label_key=""), "probe.label_key"),                         # linear without labels
    (dict(segmentation_ignore="255"), "probe.segmentation_ignore"),
])
def test_config_refuses_dense_without_a_mask_and_names_the_field(probe, needle):
    config = config_for(("tiny_segments", "/nowhere", None))
    if "segmentation_ignore" in probe:  # a ConfigDict field keeps its type: replace it
        del config.probe["segmentation_ignore"]
    config.probe.update(**probe)
    with pytest.raises(ValueError, match=re.escape(needle)):
        validate_config(config)
    if not probe.get("segmentation_key", "x"):
        # the message names both ways out
        with pytest.raises(ValueError, match="remove 'dense'"):
            validate_config(config)
