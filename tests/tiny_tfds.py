"""A tiny real TFDS dataset (array_record format) built inside tests, for tests that read TFDS.

    name, examples = build_tiny_tfds(tmp_path / "tfds", num_examples=12, image_size=32)
    # examples[i] = (id, captions, label, uint8 image (S, S, 3)), in the split's order

The dataset `tiny_captions` has one split, "train", and the features
    image     Image (PNG, so pixels round-trip exactly)
    captions  Sequence(Text)      two or three sentences per image
    id        Text                "img_000.png", ...
    label     ClassLabel          3 classes, label = index % 3
A second dataset, `tiny_segments` (build_tiny_segments), is a segmentation set for the dense
evaluator: wider-than-tall images (image_size x 3/2 image_size) with the coloured block in the
top half of the centre square, and the features
    image     Image (PNG)
    label     ClassLabel          as above
    mask      Image (H, W, 1)     per-pixel class: 1 + label on the block, 0 elsewhere, and
                                  IGNORE (255) on the bottom row
Everything is a pure function of (index, image_size), so repeated builds are identical. Once
prepared, the data is read back by name from `data_dir` without this module (TFDS falls back to
a read-only builder), so subprocesses and spawned workers need not import it.
"""

import numpy as np
import tensorflow_datasets as tfds

NAME = "tiny_captions"
CLASS_NAMES = ("red", "green", "blue")


def example(index: int, image_size: int):
    """(id, captions, label, image) of example `index`."""
    rng = np.random.default_rng(index)
    label = index % len(CLASS_NAMES)
    image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    image[: image_size // 2, : image_size // 2] = 0
    image[: image_size // 2, : image_size // 2, label] = 255  # a block in the class colour
    captions = [f"image number {index}.", f"a {CLASS_NAMES[label]} block in the top left."]
    if index % 2:
        captions.append("some noise around it.")
    return f"img_{index:03d}.png", captions, label, image


class TinyCaptions(tfds.core.GeneratorBasedBuilder):
    """Random images with a coloured block, captions, an id and a label."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, num_examples: int = 12, image_size: int = 32, **kwargs):
        self.num_examples, self.image_size = num_examples, image_size
        super().__init__(**kwargs)

    def _info(self):
        features = tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "captions": tfds.features.Sequence(tfds.features.Text()),
                "id": tfds.features.Text(),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
        })
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(self.num_examples):
            id_, captions, label, image = example(i, self.image_size)
            yield i, {"image": image, "captions": captions, "id": id_, "label": label}


def build_tiny_tfds(data_dir, num_examples: int = 12, image_size: int = 32):
    """Prepares `tiny_captions` in `data_dir` (array_record); returns (name, examples).

    examples: [(id, captions, label, uint8 image)] in the order of the "train" split.
    """
    builder = TinyCaptions(data_dir=str(data_dir), num_examples=num_examples, image_size=image_size)
    builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return NAME, [example(i, image_size) for i in range(num_examples)]


SEGMENTS = "tiny_segments"
IGNORE = 255


def segment_example(index: int, image_size: int):
    """(label, image (S, 3S/2, 3), mask (S, 3S/2)) of example `index`: the block covers rows
    [0, S/2) and columns [S/4 + S/2 * (index % 2 == 1), ...) of width S/2, i.e. the top-left or
    top-right quarter of the centre S x S square."""
    s, rng = image_size, np.random.default_rng(1000 + index)
    label = index % len(CLASS_NAMES)
    image = rng.integers(0, 256, (s, s * 3 // 2, 3), dtype=np.uint8)
    mask = np.zeros((s, s * 3 // 2), np.uint8)
    left = s // 4 + (s // 2 if index % 2 else 0)
    image[: s // 2, left:left + s // 2] = 0
    image[: s // 2, left:left + s // 2, label] = 255
    mask[: s // 2, left:left + s // 2] = 1 + label
    mask[-1] = IGNORE
    return label, image, mask


class TinySegments(TinyCaptions):
    """Random wide images with a coloured block, its per-pixel class mask and an image label."""

    def _info(self):
        features = tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
        })
        return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True)

    def _generate_examples(self):
        for i in range(self.num_examples):
            label, image, mask = segment_example(i, self.image_size)
            yield i, {"image": image, "label": label, "mask": mask[..., None]}


def build_tiny_segments(data_dir, num_examples: int = 12, image_size: int = 32):
    """Prepares `tiny_segments` in `data_dir` (array_record); returns (name, examples).

    examples: [(label, uint8 image, uint8 mask (H, W))] in the order of the "train" split.
    """
    builder = TinySegments(data_dir=str(data_dir), num_examples=num_examples,
                           image_size=image_size)
    builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return SEGMENTS, [segment_example(i, image_size) for i in range(num_examples)]
