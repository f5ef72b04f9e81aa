"""make_dataset's inputs: a folder of image files or a prepared TFDS dataset, read by position.

An input is scanned / checked once in the main process (user errors raise InputError there,
before any work) and has
    len(input)                 the number of input items (item i goes to shard i // shard_size)
    input.refs(start, stop)    small picklable references to items [start, stop), sent with a task
    input.reader               a small picklable object whose read(ref) gives
                                   (id, encoded image bytes, label or None, captions or None)
                               in a worker process; captions are None unless they come from the
                               input itself (TFDS --caption_key)
    input.label_names          class names of the labels, or None
    input.describe()           one line for the console
Readers raise BadRecord for items that are unusable by construction (an id that is not UTF-8);
any other exception is counted by the caller as a read error.
"""

from __future__ import annotations

import os

import numpy as np

from tcjepa_jax.data.decode import BadRecord


class InputError(ValueError):
    """A user error in the input flags or data; its message is printed as `error: ...`."""


def _check_id(key: str) -> str:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:  # a file name with bytes that are not UTF-8
        raise BadRecord("invalid_id", f"id {key!r} is not valid UTF-8") from None
    return key


# --- a folder of image files ---------------------------------------------------------------------

class FolderInput:
    """Every non-hidden file under `root` (recursive, sorted by id = relative path with "/").

    label_from="dirname": label = index of the file's parent folder name among the sorted names
    of all parent folders (ImageNet-style class folders).
    """

    def __init__(self, root: str, label_from: str | None = None):
        if not os.path.isdir(root):
            raise InputError(f"--images={root}: no such folder")
        self.root = os.path.abspath(root)
        ids = []
        for folder, dirs, files in os.walk(self.root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = os.path.relpath(folder, self.root)
            prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            ids.extend(prefix + f for f in files if not f.startswith("."))
        if not ids:
            raise InputError(f"--images={root}: the folder has no (non-hidden) files")
        self.ids = sorted(ids)
        self.labels = self.label_names = None
        if label_from == "dirname":
            parents = [i.rpartition("/")[0].rpartition("/")[2] for i in self.ids]
            top = [i for i, p in zip(self.ids, parents) if not p]
            if top:
                raise InputError(
                        f"--label_from=dirname: {len(top)} file(s) directly in {root} (e.g. "
                        f"{top[0]}) have no class folder; move them into one or remove them")
            self.label_names = sorted(set(parents))
            index = {name: n for n, name in enumerate(self.label_names)}
            self.labels = np.asarray([index[p] for p in parents], np.int32)
        self.reader = FolderReader(self.root)

    def __len__(self) -> int:
        return len(self.ids)

    def refs(self, start: int, stop: int) -> list:
        return [(self.ids[i], None if self.labels is None else int(self.labels[i]))
                for i in range(start, min(stop, len(self.ids)))]

    def describe(self) -> str:
        classes = f", {len(self.label_names)} class folders" if self.label_names else ""
        return f"{len(self)} files in {self.root}{classes}"


class FolderReader:
    def __init__(self, root: str):
        self.root = root

    def read(self, ref):
        key, label = ref
        with open(os.path.join(self.root, *key.split("/")), "rb") as f:
            image = f.read()
        return _check_id(key), image, label, None


# --- a prepared TFDS dataset ---------------------------------------------------------------------

class TfdsInput:
    """A split of a TFDS dataset prepared (array_record) in data_dir, read with tfds.data_source.

    Keys name features; "/" walks nested ones ("captions/text"). Images are read as the stored
    encoded bytes (SkipDecoding). Without id_key an item's id is its index in the split.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str,
                 id_key: str = "", label_key: str = "", caption_key: str = ""):
        # pylint: disable=import-outside-toplevel  # TFDS only when it is used
        import tensorflow_datasets as tfds
        from tensorflow_datasets.core.registered import DatasetNotFoundError
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
        except DatasetNotFoundError:
            where = f" and is not prepared in {data_dir}" if data_dir else ""
            raise InputError(f"--tfds={name}: no such TFDS dataset (it is not in the TFDS "
                             f"catalog{where})") from None
        except Exception as e:  # pylint: disable=broad-except  # bad config or version in the name
            raise InputError(f"--tfds={name}: {type(e).__name__}: {_first_line(e)}") from None
        if not builder.is_prepared():
            raise InputError(
                    f"--tfds={name} is not prepared in {builder.data_dir}; prepare it first, e.g. "
                    f"`tfds build {name} --file_format=array_record --data_dir=DIR` and pass "
                    "--tfds_data_dir=DIR (make_dataset never downloads)")
        info, self.label_names = builder.info, None
        random_access = tfds.core.file_adapters.FileFormat.with_random_access()
        if not info.available_file_formats() & random_access:
            raise InputError(
                    f"--tfds={name} is prepared as {info.file_format.value}, which has no random "
                    "access; prepare it again with --file_format=array_record")
        for flag, key in (("image_key", image_key), ("id_key", id_key), ("label_key", label_key),
                          ("caption_key", caption_key)):
            if key:
                feature = _feature(info.features, key, flag, name)
                if flag == "image_key" and not isinstance(feature, tfds.features.Image):
                    raise InputError(f"--image_key={key} is a {type(feature).__name__} feature of "
                                     f"{name}, not an Image")
                if flag == "label_key" and isinstance(feature, tfds.features.ClassLabel):
                    self.label_names = list(feature.names)
        self.reader = TfdsReader(name, split, data_dir, image_key, id_key, label_key, caption_key)
        try:
            self._len = len(self.reader.source())
        except Exception as e:  # pylint: disable=broad-except  # an unknown split, most likely
            raise InputError(f"--tfds_split={split}: {_first_line(e)} (splits of {name}: "
                             f"{', '.join(info.splits)})") from None
        if not self._len:
            raise InputError(f"--tfds={name} --tfds_split={split} has no examples")
        self.name, self.split = name, split

    def __len__(self) -> int:
        return self._len

    def refs(self, start: int, stop: int) -> list:
        return list(range(start, min(stop, self._len)))

    def describe(self) -> str:
        return f"{self._len} examples of TFDS {self.name} split {self.split}"


class TfdsReader:
    """Reads one example by index; opens the data source lazily in each process."""

    def __init__(self, name, split, data_dir, image_key, id_key, label_key, caption_key):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.id_key = image_key, id_key
        self.label_key, self.caption_key = label_key, caption_key
        self._source = None

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def source(self):
        if self._source is None:
            import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
            decoders = tfds.decode.SkipDecoding()
            for part in reversed(self.image_key.split("/")):
                decoders = {part: decoders}
            self._source = tfds.data_source(self.name, split=self.split,
                                            data_dir=self.data_dir or None, download=False,
                                            decoders=decoders)
        return self._source

    def read(self, index: int):
        example = self.source()[index]
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
        return key, image, label, captions


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _walk(example, key: str):
    for part in key.split("/"):
        example = example[part]
    return example


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
    return _check_id(str(value))


def _feature(features, key: str, flag: str, name: str):
    feature = features
    try:
        for part in key.split("/"):
            feature = feature[part]
    except (KeyError, TypeError, IndexError):
        raise InputError(f"--{flag}={key}: {name} has no such feature; its features are "
                         f"{', '.join(_flat_keys(features))}") from None
    return feature


def _flat_keys(feature, prefix: str = "") -> list[str]:
    inner = getattr(feature, "feature", None)  # a Sequence of a FeaturesDict
    if hasattr(feature, "keys") or hasattr(inner, "keys"):
        d = feature if hasattr(feature, "keys") else inner
        return [k for name in d.keys() for k in _flat_keys(d[name], f"{prefix}{name}/")]
    return [prefix.rstrip("/")]
