"""`input.source = "array_record"`: shards written by `python -m tcjepa_jax.tools.make_dataset`.

`input.data_dir` names the shards: a directory (every *.array_record file in it), a glob pattern,
or several of either separated by commas (e.g. two datasets mixed in one epoch). Records are
decoded lazily in the worker; `input.caption_file`, when set, replaces the captions stored in the
records by those of a JSONL caption file joined on the record id (see docs/data.md).
"""

from __future__ import annotations

import glob
import os

import grain

from tcjepa_jax.data import records
from tcjepa_jax.data.captions import CaptionFile


def _glob(pattern: str) -> list[str]:
    if "://" in pattern:  # gs://... and other remote file systems
        from etils import epath
        path = epath.Path(pattern)
        return sorted(str(p) for p in path.parent.glob(path.name))
    return sorted(glob.glob(os.path.expanduser(pattern)))


def find_shards(spec: str) -> list[str]:
    """The shard files named by `spec` (see the module docstring); a clear error if none."""
    parts = [p.strip() for p in (spec or "").split(",") if p.strip()]
    if not parts:
        raise ValueError("input.source='array_record' needs input.data_dir: a directory of "
                         "*.array_record shards written by `python -m tcjepa_jax.tools.make_dataset`, "
                         "or a glob pattern.")
    paths = []
    for part in parts:
        local = "://" not in part
        if local and not glob.has_magic(part) and not os.path.exists(os.path.expanduser(part)):
            raise FileNotFoundError(f"input.data_dir: {part!r} does not exist. Write shards there "
                                    "with `python -m tcjepa_jax.tools.make_dataset --out=DIR ...` "
                                    "(see docs/data.md), or fix the path.")
        is_dir = local and os.path.isdir(os.path.expanduser(part))
        found = _glob(os.path.join(part, "*" + records.SHARD_SUFFIX) if is_dir else part)
        if not found:
            what = "directory" if is_dir else "pattern"
            raise FileNotFoundError(
                f"input.data_dir: no *{records.SHARD_SUFFIX} shards found for {what} {part!r}. "
                "Write them with `python -m tcjepa_jax.tools.make_dataset --out=DIR ...` "
                "(see docs/data.md), or fix the path.")
        paths += found
    return paths


class ArrayRecordSource:
    """Random access over the records of all shards, in shard order."""

    def __init__(self, paths: list[str], caption_file: str = ""):
        self.paths = list(paths)
        self._records = grain.sources.ArrayRecordDataSource(self.paths)
        self.caption_file = CaptionFile(caption_file) if caption_file else None

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return (f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records"
                + (f", captions from {self.caption_file.path}" if self.caption_file else "") + ")")

    def __getitem__(self, index: int) -> dict:
        record = records.decode_record(self._records[int(index)])
        if self.caption_file is not None:
            record["captions"] = self.caption_file.get(record["id"])  # None: id not in the file
        return record


def make(input_cfg, split: str) -> ArrayRecordSource:
    del split  # one set of shards per config; point data_dir at another set for another split
    return ArrayRecordSource(find_shards(input_cfg.data_dir), input_cfg.get("caption_file", ""))
