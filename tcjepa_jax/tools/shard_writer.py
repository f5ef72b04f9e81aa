"""make_dataset's worker side: validate the items of one shard and write the shard atomically.

A task is one whole shard: (out_dir, shard index, number of shards, item refs). Each item is read,
its captions looked up (caption file) and cleaned, its image fully decoded, and it is either
written as a record (the ORIGINAL image bytes) or skipped with a kind. The shard goes to a hidden
temporary name; its stats file is written next, then the shard is renamed into place: a shard's
final name is the commit point, so a shard that exists is complete and has its stats. With
make_dataset --text_checkpoint the worker renames it to its pending name instead, and the main
process commits it once it has added the text features (text_writer.py).
"""

from __future__ import annotations

import collections
import json
import os
import re

from array_record.python import array_record_module

from tcjepa_jax.data import records
from tcjepa_jax.data.decode import BadRecord, clean_captions, decode_image

# The kinds make_dataset counts, with what each one means (printed in its summary).
SKIP_KINDS = {
        "empty_image": "the image data is empty (0 bytes)",
        "truncated_image": "the image data ends early (a truncated file)",
        "undecodable_image": "not an image Pillow can decode (other format, corrupt, or too large)",
        "zero_size_image": "the image has zero width or height",
        "invalid_id": "the id (file name or id feature) is not valid UTF-8",
        "missing_captions": "the id is not in the caption file",
        "no_valid_captions": "no caption sentence was left after cleaning (or there were none)",
        "read_error": "an unexpected error while reading the item (first messages shown below)",
}
DROP_KINDS = {
        "empty_caption": "empty or only whitespace",
        "invalid_utf8_caption": "not valid UTF-8",
        "invalid_caption": "not a string",
}
BAD_LINE_KINDS = {
        "bad_caption_line": 'not a JSON object with an "id" (str, int) and "captions" (list, str)',
        "invalid_utf8_caption_line": "not valid UTF-8",
        "duplicate_caption_id": "an id already on an earlier line (the first one is used)",
}

SHARD_RE = re.compile(r"shard-(\d{5,})-of-(\d{5,})" + re.escape(records.SHARD_SUFFIX))
STATS_RE = re.compile(r"\.shard-(\d{5,})-of-(\d{5,})\.json")
TEMP_RE = re.compile(r"\.shard-\d{5,}-of-\d{5,}\..*\.tmp")
PENDING_RE = re.compile(r"\.shard-(\d{5,})-of-(\d{5,})" + re.escape(records.SHARD_SUFFIX)
                        + r"\.pending\.tmp")  # a TEMP_RE name: removed when a run resumes
_MAX_ERRORS = 3  # read_error messages kept per shard


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}{records.SHARD_SUFFIX}"


def stats_name(index: int, num_shards: int) -> str:
    return f".shard-{index:05d}-of-{num_shards:05d}.json"


def pending_name(index: int, num_shards: int) -> str:
    return f".{shard_name(index, num_shards)}.pending.tmp"


def empty_stats() -> dict:
    """A shard's stats; also the sum over shards (see add_stats)."""
    return {"num_records": 0, "skipped": {}, "dropped_captions": {}, "errors": [],
            "num_sentences": 0, "min_sentences": None, "max_sentences": 0,
            "num_words": 0, "max_words": 0, "num_chars": 0, "max_chars": 0}


def add_stats(total: dict, shard: dict) -> dict:
    for key in ("num_records", "num_sentences", "num_words", "num_chars"):
        total[key] += shard[key]
    for key in ("max_sentences", "max_words", "max_chars"):
        total[key] = max(total[key], shard[key])
    if shard["min_sentences"] is not None:
        total["min_sentences"] = min(total["min_sentences"] or shard["min_sentences"],
                                     shard["min_sentences"])
    for key in ("skipped", "dropped_captions"):
        total[key] = dict(collections.Counter(total[key]) + collections.Counter(shard[key]))
    total["errors"] = (total["errors"] + shard["errors"])[:5]
    return total


# --- worker process state ------------------------------------------------------------------------

_worker = {}


def init_worker(reader, caption_file, progress, pending: bool = False) -> None:
    """Pool initializer: the input reader, the CaptionFile (or None) and a progress counter.

    `progress` is a multiprocessing Value (items done, summed over workers, polled by the main
    process) or, in the main process, a callable taking the number of items just done.
    `pending`: leave finished shards under pending_name, for text_writer to commit.
    """
    if not callable(progress):
        value = progress

        def progress(n):
            with value.get_lock():
                value.value += n

    _worker.update(reader=reader, captions=caption_file, progress=progress, pending=pending)


def write_shard(task) -> dict:
    """Validates and writes one shard; returns its stats (also saved next to it)."""
    out_dir, index, num_shards, refs = task
    stats = empty_stats()
    skipped, dropped = collections.Counter(), collections.Counter()
    name = shard_name(index, num_shards)
    temp = os.path.join(out_dir, f".{name}.tmp")
    writer = array_record_module.ArrayRecordWriter(temp, "group_size:1")  # random access reads
    try:
        for ref in refs:
            record = _record(ref, stats, skipped, dropped)
            if record is not None:
                writer.write(record)
                stats["num_records"] += 1
            _worker["progress"](1)
        writer.close()
    except BaseException:
        writer.close()
        os.remove(temp)
        raise
    stats["skipped"], stats["dropped_captions"] = dict(skipped), dict(dropped)
    stats_path = os.path.join(out_dir, stats_name(index, num_shards))
    with open(stats_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(stats, f)
    os.replace(stats_path + ".tmp", stats_path)
    final = pending_name(index, num_shards) if _worker.get("pending") else name
    os.replace(temp, os.path.join(out_dir, final))  # the commit point (unless pending)
    return stats


def _record(ref, stats: dict, skipped: collections.Counter, dropped: collections.Counter):
    """One item -> record bytes, or None (skipped, counted by kind)."""
    try:
        key, image, label, captions = _worker["reader"].read(ref)
        if _worker["captions"] is not None:
            captions = _worker["captions"].get(key)
            if captions is None:
                raise BadRecord("missing_captions", f"{key} is not in the caption file")
        sentences, drops = clean_captions(captions)
        dropped.update(drops)
        if not sentences:
            raise BadRecord("no_valid_captions", f"{key} has no usable caption")
        decode_image(image)
        record = records.encode_record(id=key, image=image, captions=sentences, label=label)
    except BadRecord as e:
        skipped[e.kind] += 1
        return None
    except Exception as e:  # pylint: disable=broad-except  # one item never stops a run
        skipped["read_error"] += 1
        if len(stats["errors"]) < _MAX_ERRORS:
            stats["errors"].append(f"item {ref!r}: {type(e).__name__}: {e}")
        return None
    n = len(sentences)
    stats["num_sentences"] += n
    stats["min_sentences"] = min(stats["min_sentences"] or n, n)
    stats["max_sentences"] = max(stats["max_sentences"], n)
    for s in sentences:
        stats["num_words"] += len(s.split())
        stats["max_words"] = max(stats["max_words"], len(s.split()))
        stats["num_chars"] += len(s)
        stats["max_chars"] = max(stats["max_chars"], len(s))
    return record
