"""`input.source = "tfds"`: any TFDS dataset prepared in ArrayRecord format, read at random.

    input.tfds_name     e.g. "imagenet2012" or "coco_captions" (optionally "name/config:version")
    input.split         e.g. "train" or "train[:99%]"
    input.data_dir      the TFDS data_dir ("" = TFDS's default, ~/tensorflow_datasets or $TFDS_DATA_DIR)
    input.image_key     the image feature (kept as encoded bytes, decoded in the worker)
    input.caption_key   a text or sequence-of-text feature with the captions ("" = none)
    input.id_key        the feature with the image id or file name ("" = none)
    input.label_key     an integer label feature ("" = none)
    input.caption_file  JSONL captions joined on the id feature (see docs/data.md)

Nested features are named with "/" (e.g. "captions/text" in coco_captions). Nothing is
downloaded: a dataset that is not prepared in data_dir is a clear error.
"""

from __future__ import annotations

from tcjepa_jax.data.captions import CaptionFile


def _lookup(tree, key: str):
    for part in key.split("/"):
        tree = tree[part]
    return tree


def _feature_names(features, prefix: str = "") -> list[str]:
    """All feature paths of a FeaturesDict, nested ones as "a/b"."""
    import tensorflow_datasets as tfds
    names = []
    items = features.items() if hasattr(features, "items") else []
    for name, feature in items:
        names.append(prefix + name)
        inner = feature.feature if isinstance(feature, tfds.features.Sequence) else feature
        if isinstance(inner, tfds.features.FeaturesDict):
            names += _feature_names(inner, prefix + name + "/")
    return names


def _text(value) -> str | bytes:
    return value.item() if hasattr(value, "item") and getattr(value, "ndim", 1) == 0 else value


class TfdsSource:
    """Records of one TFDS split; the data source is opened lazily in each process."""

    def __init__(self, name: str, split: str, data_dir: str, image_key: str, caption_key: str = "",
                 id_key: str = "", label_key: str = "", caption_file: str = ""):
        self.name, self.split, self.data_dir = name, split, data_dir or None
        self.image_key, self.caption_key = image_key, caption_key
        self.id_key, self.label_key = id_key, label_key
        self._check()
        self.caption_file = CaptionFile(caption_file) if caption_file else None
        self._source = None
        self._len = len(self._open())

    # ---- Checks before any training: every failure here is a message for the user ------------
    def _check(self):
        import tensorflow_datasets as tfds
        if not self.name:
            raise ValueError("input.source='tfds' needs input.tfds_name (e.g. 'imagenet2012').")
        try:
            builder = tfds.builder(self.name, data_dir=self.data_dir)
        except Exception as e:  # DatasetNotFoundError and friends; their text lists close names
            raise ValueError(f"input.tfds_name={self.name!r}: {type(e).__name__}: {e}") from None
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {self.name!r} is not prepared in data_dir {builder.data_dir!r}. "
                f"Prepare it (`tfds build {self.name} --file_format=array_record`, or the "
                "dataset's manual-download instructions), or set input.data_dir to where it is.")
        file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
        if "array_record" not in file_format:
            raise ValueError(
                f"TFDS dataset {self.name!r} in {builder.data_dir} is stored as {file_format!r}; "
                "random access needs ArrayRecord. Rebuild it with --file_format=array_record, or "
                "convert it with `python -m tcjepa_jax.tools.make_dataset --tfds=...`.")
        features = _feature_names(builder.info.features)
        for field in ("image_key", "caption_key", "id_key", "label_key"):
            key = getattr(self, field)
            if key and key not in features:
                raise ValueError(f"input.{field}={key!r} is not a feature of TFDS dataset "
                                 f"{self.name!r}; its features are {features}.")

    def _open(self):
        if self._source is None:
            import tensorflow_datasets as tfds
            try:
                self._source = tfds.data_source(
                    self.name, split=self.split, data_dir=self.data_dir, download=False,
                    decoders={self.image_key: tfds.decode.SkipDecoding()})
            except Exception as e:
                raise ValueError(f"input.tfds_name={self.name!r}, input.split={self.split!r}: "
                                 f"{type(e).__name__}: {e}") from None
        return self._source

    # ---- Pickling: Grain workers reopen the source themselves ---------------------------------
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_source"} | {"_source": None}

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TfdsSource({self.name!r}, split={self.split!r}, {self._len} records)"

    def __getitem__(self, index: int) -> dict:
        example = self._open()[int(index)]
        record = {"image": _text(_lookup(example, self.image_key)), "label": -1,
                  "id": f"{self.name}/{self.split}/{int(index)}"}
        if self.id_key:
            value = _text(_lookup(example, self.id_key))
            record["id"] = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        if self.label_key:
            record["label"] = int(_lookup(example, self.label_key))
        if self.caption_file is not None:
            record["captions"] = self.caption_file.get(record["id"])  # None: id not in the file
        elif self.caption_key:
            value = _text(_lookup(example, self.caption_key))
            record["captions"] = [value] if isinstance(value, (str, bytes)) else list(value)
        else:
            record["captions"] = None
        return record


def make(input_cfg, split: str) -> TfdsSource:
    caption_file = input_cfg.get("caption_file", "")
    if caption_file and not input_cfg.get("id_key", ""):
        raise ValueError("input.caption_file is joined on the image id: set input.id_key to the "
                         "TFDS feature holding it (e.g. 'file_name' for imagenet2012).")
    return TfdsSource(input_cfg.tfds_name, split, input_cfg.get("data_dir", ""),
                      input_cfg.get("image_key", "image"), input_cfg.get("caption_key", ""),
                      input_cfg.get("id_key", ""), input_cfg.get("label_key", ""), caption_file)
