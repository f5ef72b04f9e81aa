"""The record format of the ArrayRecord shards written by tools/make_dataset.py.

One record = one image with its captions, a msgpack map with short fixed keys:
    "v"    int        format version (FORMAT_VERSION); a reader refuses other versions
    "id"   str        the image's id (a relative path for image folders, the id feature for TFDS)
    "img"  bytes      the ORIGINAL encoded image file (decode with decode.decode_image)
    "cap"  [str]      cleaned caption sentences (decode.clean_captions), at least one
    "lbl"  int        class label, -1 when the dataset has none
    "txt"  map        optional: T5 word features of each caption sentence (data/text_features.py),
                      written by make_dataset --text_checkpoint
Storing the original file keeps shards as small as the source and leaves every decoding choice
to decode.py, which the writer has already run on each record.
"""

from __future__ import annotations

import msgpack

from tcjepa_jax.data.decode import BadRecord

SHARD_SUFFIX = ".array_record"
FORMAT_VERSION = 1
_KEYS = {"v", "id", "img", "cap", "lbl"}
_OPTIONAL = {"txt"}


def encode_record(*, id: str, image: bytes, captions: list[str],
                  label: int | None = None, text_features: dict | None = None) -> bytes:
    """The record's bytes. Raises TypeError/ValueError on arguments of the wrong type.
    text_features: text_features.pack() of the captions' features, or None."""
    if not isinstance(id, str):
        raise TypeError(f"record id must be a str, got {type(id).__name__}")
    if not isinstance(image, (bytes, bytearray, memoryview)):
        raise TypeError(f"record image must be bytes, got {type(image).__name__}")
    if not isinstance(captions, (list, tuple)) or not all(isinstance(c, str) for c in captions):
        raise TypeError("record captions must be a list of str")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
        raise ValueError(f"record label must be an int >= 0 or None, got {label!r}")
    record = {"v": FORMAT_VERSION, "id": id, "img": bytes(image), "cap": list(captions),
              "lbl": -1 if label is None else label}
    if text_features is not None:
        record["txt"] = text_features
    try:
        return msgpack.packb(record, use_bin_type=True)
    except UnicodeEncodeError as e:  # lone surrogates, e.g. from undecodable file names
        raise ValueError(f"record id or captions are not valid UTF-8 text: {e}") from None


def decode_record(data: bytes) -> dict:
    """Record bytes -> {"id": str, "image": bytes, "captions": [str], "label": int (-1: none)},
    and "text_features" (the stored "txt" map, unpacked by text_features.unpack) if it has them.

    Raises BadRecord("bad_record", ...) on anything that is not a record of this format.
    """
    try:
        r = msgpack.unpackb(data, raw=False)
    except Exception as e:  # pylint: disable=broad-except  # msgpack raises many types
        raise BadRecord("bad_record", f"not a msgpack record: {type(e).__name__}: {e}") from None
    if not isinstance(r, dict) or not _KEYS <= set(r) <= _KEYS | _OPTIONAL:
        keys = sorted(map(str, r)) if isinstance(r, dict) else type(r).__name__
        raise BadRecord("bad_record", f"not a tcjepa_jax record (keys {keys})")
    if r["v"] != FORMAT_VERSION:
        raise BadRecord("bad_record", f"record format version {r['v']!r}; this code reads "
                                      f"version {FORMAT_VERSION}")
    captions, label = r["cap"], r["lbl"]
    if not (isinstance(r["id"], str) and isinstance(r["img"], bytes)
            and isinstance(captions, list) and all(isinstance(c, str) for c in captions)
            and isinstance(label, int) and not isinstance(label, bool) and label >= -1):
        raise BadRecord("bad_record", "record fields have the wrong types")
    out = {"id": r["id"], "image": r["img"], "captions": captions, "label": label}
    if "txt" in r:
        out["text_features"] = r["txt"]
    return out
