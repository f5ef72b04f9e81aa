"""make_dataset from a real TFDS dataset built in the test (tests/tiny_tfds.py): round trip with
its own captions or a caption file, and the user errors of TFDS inputs."""

import os

import numpy as np
import pytest

from tcjepa_jax.data import decode
from tcjepa_jax.tools.dataset_inputs import InputError
from tcjepa_jax.tools.dataset_writer import write_dataset
from tiny_tfds import build_tiny_tfds

from test_make_dataset import read_dataset, write_lines


# --- make_dataset from TFDS ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    name, examples = build_tiny_tfds(data_dir)
    return name, str(data_dir), examples


def test_tfds_roundtrip(tiny, tmp_path):
    name, data_dir, examples = tiny
    args = dict(tfds=name, tfds_data_dir=data_dir, id_key="id", label_key="label", shard_size=5)
    manifest = write_dataset(str(tmp_path / "a"), caption_key="captions", workers=2, **args)
    assert manifest["num_records"] == 12 and not manifest["skipped"]
    assert manifest["label_names"] == ["red", "green", "blue"]
    got = read_dataset(str(tmp_path / "a"), manifest)
    for key, caps, label, image in examples:
        assert got[key]["captions"] == caps and got[key]["label"] == label
        np.testing.assert_array_equal(decode.decode_image(got[key]["image"]), image)

    # A caption file (ids without extension) replaces the caption feature; one id is missing.
    lines = [{"id": key[:-4], "captions": [f"file caption {key}"]} for key, *_ in examples[1:]]
    caption_file = write_lines(tmp_path / "c.jsonl", lines)
    manifest = write_dataset(str(tmp_path / "b"), captions=caption_file, caption_key="captions",
                             workers=1, **args)
    assert manifest["skipped"] == {"missing_captions": 1}
    assert manifest["source"]["caption_key"] == ""  # ignored
    got = read_dataset(str(tmp_path / "b"), manifest)
    assert sorted(got) == [key for key, *_ in examples[1:]]
    for key, _, label, image in examples[1:]:
        assert got[key]["captions"] == [f"file caption {key}"] and got[key]["label"] == label
        np.testing.assert_array_equal(decode.decode_image(got[key]["image"]), image)


def test_tfds_user_errors(tiny, tmp_path):
    name, data_dir, _ = tiny
    out = str(tmp_path / "out")
    base = dict(tfds_data_dir=data_dir, caption_key="captions")
    for kwargs, message in [
            (dict(tfds="no_such_dataset_xyz"), "no such TFDS dataset"),
            (dict(tfds="mnist"), "not prepared"),
            (dict(tfds=name, id_key="file_name"),
             "no such feature; its features are image, captions, id, label"),
            (dict(tfds=name, caption_key="nope/text"), "no such feature"),
            (dict(tfds=name, image_key="label"), "not an Image"),
            (dict(tfds=name, tfds_split="validation"), "splits of tiny_captions: train"),
    ]:
        with pytest.raises(InputError, match=message):
            write_dataset(out, **{**base, **kwargs})
    assert not os.path.exists(out)
