"""`input.source = "tfds"`: any TFDS dataset prepared in ArrayRecord format, read at random.

    input.tfds_name     e.g. "imagenet2012" or "coco_captions" (optionally "name/config:version")
    input.split         e.g. "train" or "train[:99%]"
    input.data_dir      the TFDS data_dir ("" = TFDS's default, ~/tensorflow_datasets or $TFDS_DATA_DIR)
    input.image_key     the image feature (kept as encoded bytes, decoded in the worker)
    input.caption_key   a text or sequence-of-text feature with the captions ("" = none)
    input.id_key        the feature with the image id or file name ("" = the example's index)
    input.label_key     an integer label feature ("" = none)
    segmentation_key    a per-pixel class mask (Image or integer Tensor, "" = none); only the
                        evaluators set it, from probe.segmentation_key (docs/evaluation.md)
    input.caption_file  JSONL captions joined on the id (see docs/data.md)

Nested features are named with "/" (e.g. "captions/text" in coco_captions). Nothing is
downloaded: a dataset that is not prepared in data_dir is a clear error. check_tfds and
TfdsReader also serve `tools/make_dataset --tfds`, which names the same settings by its flags.
"""

from __future__ import annotations

import numpy as np

from tcjepa_jax.data.captions import CaptionFile
from tcjepa_jax.data.decode import BadRecord

# How check_tfds names each setting in its messages, by default the config fields.
CONFIG_NAMES = {"name": "input.tfds_name", "split": "input.split", "data_dir": "input.data_dir",
                "image_key": "input.image_key", "id_key": "input.id_key",
                "label_key": "input.label_key", "caption_key": "input.caption_key",
                "segmentation_key": "probe.segmentation_key"}


# ---- Checks before any work: every failure is one message for the user --------------------

def check_tfds(name: str, split: str, data_dir: str, keys: dict, names: dict = CONFIG_NAMES):
    """Checks that split `split` of `name` is prepared for random access in `data_dir` and has
    the features `keys` ({"image_key": "image", ...}). Returns (number of examples, the label
    feature's class names or None). Raises ValueError naming the setting with `names`."""
    # pylint: disable=import-outside-toplevel  # TFDS (and TensorFlow) only when used
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.registered import DatasetNotFoundError
    if not name:
        raise ValueError(f"{names['name']} is empty: name a TFDS dataset, e.g. imagenet2012.")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except DatasetNotFoundError:
        where = f" and is not prepared in {data_dir}" if data_dir else ""
        raise ValueError(f"{names['name']}={name}: no such TFDS dataset (it is not in the TFDS "
                         f"catalog{where}).") from None
    except Exception as e:  # pylint: disable=broad-except  # bad config or version in the name
        raise ValueError(f"{names['name']}={name}: {type(e).__name__}: {_first_line(e)}") from None
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"TFDS dataset {name} is not prepared in {builder.data_dir}. Prepare it first, e.g. "
            f"`tfds build {name} --file_format=array_record --data_dir=DIR` (ImageNet needs its "
            f"manual download), and set {names['data_dir']}=DIR; nothing is downloaded here.")
    info = builder.info
    if not info.available_file_formats() & tfds.core.file_adapters.FileFormat.with_random_access():
        raise ValueError(f"TFDS dataset {name} is prepared as {info.file_format.value}, which has "
                         "no random access; prepare it again with --file_format=array_record.")
    label_names = None
    for key_name, key in keys.items():
        if not key:
            continue
        feature = _feature(info.features, key, f"{names[key_name]}={key}", name)
        if key_name == "image_key" and not isinstance(feature, tfds.features.Image):
            raise ValueError(f"{names[key_name]}={key} is a {type(feature).__name__} feature of "
                             f"{name}, not an Image.")
        if key_name == "label_key" and isinstance(feature, tfds.features.ClassLabel):
            label_names = list(feature.names)
        if key_name == "segmentation_key":
            _check_mask_feature(feature, f"{names[key_name]}={key}", name)
    try:
        num_examples = info.splits[split].num_examples
    except Exception as e:  # pylint: disable=broad-except  # an unknown split, most likely
        raise ValueError(f"{names['split']}={split}: {_first_line(e)} (splits of {name}: "
                         f"{', '.join(info.splits)}).") from None
    if not num_examples:
        raise ValueError(f"TFDS dataset {name}, split {split} has no examples.")
    return num_examples, label_names


# ---- Reading ---------------------------------------------------------------------------------

class TfdsReader:
    """Reads one example by index; opens the data source lazily in each process (picklable)."""

    def __init__(self, name, split, data_dir, image_key, id_key="", label_key="", caption_key="",
                 segmentation_key=""):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.id_key = image_key, id_key
        self.label_key, self.caption_key = label_key, caption_key
        self.segmentation_key = segmentation_key
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def source(self):
        if self._source is None:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
            decoders = tfds.decode.SkipDecoding()  # keep the image's encoded bytes
            for part in reversed(self.image_key.split("/")):
                decoders = {part: decoders}
            self._source = tfds.data_source(self.name, split=self.split,
                                            data_dir=self.data_dir or None, download=False,
                                            decoders=decoders)
        return self._source

    def read(self, index: int, example=None):
        """(id, encoded image bytes, label or None, captions or None) of example `index` (or of
        `example`, that example as read from source())."""
        example = self.source()[index] if example is None else example
        image = bytes(_walk(example, self.image_key))
        key = _as_id(_walk(example, self.id_key)) if self.id_key else str(index)
        label = int(_walk(example, self.label_key)) if self.label_key else None
        captions = None
        if self.caption_key:
            captions = _walk(example, self.caption_key)
            if isinstance(captions, np.ndarray):
                captions = captions.tolist()
            elif isinstance(captions, (bytes, str)):
                captions = [captions]
            else:
                captions = list(captions)
        return key, image, label, captions

    def segmentation(self, example) -> np.ndarray:
        """The (H, W) per-pixel class mask of `example` (segmentation_key)."""
        return as_mask(_walk(example, self.segmentation_key))


class TfdsSource:
    """Training records of one TFDS split; captions from a caption feature or a caption file."""

    def __init__(self, reader: TfdsReader, num_examples: int, caption_file: str = ""):
        self.reader, self._len = reader, num_examples
        self.caption_file = CaptionFile(caption_file) if caption_file else None

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TfdsSource({self.reader.name!r}, split={self.reader.split!r}, {self._len} records)"

    def __getitem__(self, index: int) -> dict:
        example = self.reader.source()[int(index)]
        key, image, label, captions = self.reader.read(int(index), example)
        if self.caption_file is not None:
            captions = self.caption_file.get(key)  # None: the id is not in the file
        record = {"id": key, "image": image, "label": -1 if label is None else label,
                  "captions": captions}
        if self.reader.segmentation_key:
            record["segmentation"] = self.reader.segmentation(example)
        return record


def make(input_cfg, split: str) -> TfdsSource:
    caption_file = input_cfg.get("caption_file", "")
    if caption_file and not input_cfg.get("id_key", ""):
        raise ValueError("input.caption_file is joined on the image id: set input.id_key to the "
                         "TFDS feature holding it (e.g. 'file_name' for imagenet2012).")
    keys = {k: input_cfg.get(k, "") for k in ("image_key", "id_key", "label_key", "caption_key",
                                              "segmentation_key")}
    keys["image_key"] = keys["image_key"] or "image"
    name, data_dir = input_cfg.get("tfds_name", ""), input_cfg.get("data_dir", "")
    num_examples, _ = check_tfds(name, split, data_dir, keys)
    return TfdsSource(TfdsReader(name, split, data_dir, **keys), num_examples, caption_file)


# ---- Helpers -----------------------------------------------------------------------------------

def as_mask(value) -> np.ndarray:
    """A mask feature's value as an integer (H, W) array: an (H, W, C) mask must have equal
    channels (a grey mask stored as RGB); colour-coded masks are not class indices and are
    refused."""
    mask = np.asarray(value)
    if mask.ndim == 3 and mask.shape[-1] > 1 and not (mask == mask[..., :1]).all():
        raise BadRecord("colour_mask", "the segmentation mask's channels differ: a colour-coded "
                        "mask, not one class index per pixel")
    mask = mask[..., 0] if mask.ndim == 3 else mask
    if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
        raise BadRecord("bad_mask", f"the segmentation mask is {mask.dtype} of shape "
                        f"{mask.shape}, not integer (H, W) or (H, W, C)")
    return mask


def _check_mask_feature(feature, setting: str, name: str):
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    dtype = np.dtype(getattr(feature, "np_dtype", np.float32))
    rank = len(getattr(feature, "shape", ()) or ())
    if not isinstance(feature, (tfds.features.Image, tfds.features.Tensor)) or not (
            np.issubdtype(dtype, np.integer) and rank in (2, 3)):
        raise ValueError(f"{setting} is a {type(feature).__name__} feature of {name} "
                         f"({dtype}, rank {rank}), not a per-pixel class mask (an Image or an "
                         "integer Tensor of shape (H, W) or (H, W, C)).")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _walk(example, key: str):
    for part in key.split("/"):
        example = example[part]
    return example


def check_id(key: str) -> str:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a file name with bytes that are not UTF-8
        raise BadRecord("invalid_id", f"id {key!r} is not valid UTF-8") from None
    return key


def _as_id(value) -> str:
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("invalid_id", f"id {value!r} is not valid UTF-8") from None
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    return check_id(str(value))


def _feature(features, key: str, setting: str, name: str):
    feature = features
    try:
        for part in key.split("/"):
            feature = feature[part]
    except (KeyError, TypeError, IndexError):
        raise ValueError(f"{setting}: {name} has no such feature; its features are "
                         f"{', '.join(_flat_keys(features))}.") from None
    return feature


def _flat_keys(feature, prefix: str = "") -> list[str]:
    inner = getattr(feature, "feature", None)  # a Sequence of a FeaturesDict
    if hasattr(feature, "keys") or hasattr(inner, "keys"):
        d = feature if hasattr(feature, "keys") else inner
        return [k for name in d.keys() for k in _flat_keys(d[name], f"{prefix}{name}/")]
    return [prefix.rstrip("/")]
