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

from tcjepa_jax.data.sources import tfds as tfds_source


class InputError(ValueError):
    """A user error in the input flags or data; its message is printed as `error: ...`."""


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
        return tfds_source.check_id(key), image, label, None


# --- a prepared TFDS dataset ---------------------------------------------------------------------

class TfdsInput:
    """A split of a TFDS dataset prepared (array_record) in data_dir, read with tfds.data_source.

    Keys name features; "/" walks nested ones ("captions/text"). Images are read as the stored
    encoded bytes (SkipDecoding). Without id_key an item's id is its index in the split.
    """

    def __init__(self, name: str, split: str, data_dir: str | None, image_key: str,
                 id_key: str = "", label_key: str = "", caption_key: str = ""):
        keys = {"image_key": image_key, "id_key": id_key, "label_key": label_key,
                "caption_key": caption_key}
        try:
            self._len, self.label_names = tfds_source.check_tfds(
                    name, split, data_dir or "", keys, _FLAG_NAMES)
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e)) from None
        self.reader = tfds_source.TfdsReader(name, split, data_dir, **keys)
        self.name, self.split = name, split

    def __len__(self) -> int:
        return self._len

    def refs(self, start: int, stop: int) -> list:
        return list(range(start, min(stop, self._len)))

    def describe(self) -> str:
        return f"{self._len} examples of TFDS {self.name} split {self.split}"


_FLAG_NAMES = {"name": "--tfds", "split": "--tfds_split", "data_dir": "--tfds_data_dir",
               **{k: f"--{k}" for k in ("image_key", "id_key", "label_key", "caption_key")}}
