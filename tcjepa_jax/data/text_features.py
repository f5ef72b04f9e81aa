"""Precomputed T5 word features (model.text_features = "precomputed"): how a record stores
them, the metadata that says which T5 made them, and what the pipeline and the trainer do with
them. docs/data.md has the format, docs/method.md (section 9) the option.

The frozen T5 gives a caption the same features every time it is sampled, so make_dataset
(--text_checkpoint, tools/text_writer.py) can run it once per caption sentence instead: each
sentence on its own, tokenized and cut to S = --max_caption_len tokens as the pipeline does it
(Tokenizer.encode), padded to S like a caption slot of the step. A record then carries

    "txt": {"d": "bfloat16" | "float32", "w": Dt, "f": [bytes, ...]}

one bytes string per entry of "cap", in order: the features of that sentence's L valid tokens
(its pieces, cut to S - 1, and eos), an (L, Dt) array in row-major order. Padding tokens are
not stored (they are zeros in the batch), so a record costs tokens x Dt x 2 bytes in bfloat16.
manifest.json's "text_features" section says which T5 made them (metadata()); the trainer
refuses a config that names another (check_dataset), since features of another encoder, size,
tokenizer or length would train silently on the wrong inputs.

Numpy only (with ml_dtypes for bfloat16): the pipeline's worker processes import this.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_dtypes
import numpy as np

from tcjepa_jax.data.decode import BadRecord

MODES = ("compute", "precomputed")       # model.text_features
DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}
RECORD_KEY = "txt"
MANIFEST_KEY = "text_features"


def precomputed(config) -> bool:
    """Whether the step reads batch["text_features"] instead of running T5."""
    model = config.get("model") or {}  # data-only configs (tests, tools) may have no model
    return (model.get("conditioning", "all") != "none"
            and model.get("text_features", "compute") == "precomputed")


# ---- In a record ---------------------------------------------------------------------------

def pack(features: list, dtype: str = "bfloat16") -> dict:
    """Per-sentence (L_i, Dt) float arrays -> the record's "txt" value."""
    widths = {int(np.shape(f)[-1]) for f in features}
    if len(widths) > 1 or any(np.ndim(f) != 2 for f in features):
        raise ValueError(f"text features must be (tokens, width) arrays of one width, got shapes "
                         f"{[np.shape(f) for f in features]}")
    return {"d": dtype, "w": widths.pop() if widths else 0,
            "f": [np.ascontiguousarray(f, DTYPES[dtype]).tobytes() for f in features]}


def unpack(value) -> list:
    """A record's "txt" value -> per-sentence (L_i, Dt) arrays; BadRecord if malformed."""
    try:
        dtype, width, blobs = DTYPES[value["d"]], int(value["w"]), value["f"]
        if width < 1 or not isinstance(blobs, list):
            raise ValueError(f"width {width}")
        return [np.frombuffer(b, dtype).reshape(-1, width) for b in blobs]
    except (TypeError, KeyError, ValueError) as e:
        raise BadRecord("bad_text_features", f"stored text features are malformed: {e}") from None


def example_features(record: dict, captions: list, text_mask: np.ndarray, width: int,
                     dtype: str = "bfloat16") -> np.ndarray:
    """(N, S, width) features of the N sampled `captions` (Tokenizer.encode gave `text_mask`),
    looked up among the record's sentences; zeros at padding and at empty ("") slots.
    BadRecord when the record has none, or ones that do not fit its captions."""
    out = np.zeros(text_mask.shape + (width,), DTYPES[dtype])
    if not any(captions):  # input.skip_uncaptioned=False: an unconditioned example
        return out
    value = record.get("text_features")
    if value is None:
        raise BadRecord("missing_text_features",
                        f"id {record.get('id')!r} has no stored text features")
    stored, sentences = unpack(value), record.get("captions") or []
    if len(stored) != len(sentences):
        raise BadRecord("bad_text_features", f"id {record.get('id')!r}: {len(stored)} feature "
                        f"arrays for {len(sentences)} caption sentences")
    by_text = dict(zip(sentences, stored))
    for slot, caption in enumerate(captions):
        if not caption:
            continue
        f = by_text.get(caption)
        length = int(text_mask[slot].sum())
        if f is None or f.shape != (length, width):
            got = "none" if f is None else f"shape {f.shape}"
            raise BadRecord("bad_text_features", f"id {record.get('id')!r}: caption {caption!r} "
                            f"has {length} tokens of width {width} here, stored: {got}")
        out[slot, :length] = f
    return out


# ---- Which T5 made them --------------------------------------------------------------------

def file_sha256(path: str) -> str:
    from tcjepa_jax import paths  # pylint: disable=import-outside-toplevel
    return hashlib.sha256(paths.read_bytes(path)).hexdigest()


def fingerprint(checkpoint: str) -> str:
    """A hash of a T5 checkpoint's values that does not depend on where it lies: its vocabulary
    size and its RMSNorm scales and relative position bias (small tensors, read in milliseconds
    even for T5-xl), which differ between any two trained (or fine-tuned) encoders."""
    from tcjepa_jax.models import t5_checkpoint  # pylint: disable=import-outside-toplevel
    cfg = t5_checkpoint.read_config(checkpoint)
    weights = t5_checkpoint._Weights(checkpoint)  # pylint: disable=protected-access
    names = sorted(n for n in weights.shapes if n.startswith("encoder.") and (
        "layer_norm" in n or "relative_attention_bias" in n))
    digest = hashlib.sha256(json.dumps({"vocab_size": cfg["vocab_size"], "tensors": names})
                            .encode())
    for name in names:
        digest.update(weights.read(name).tobytes())
    return digest.hexdigest()


def metadata(checkpoint: str, text: str, max_len: int, dtype: str, width: int) -> dict:
    """manifest.json's "text_features" section, less the counts make_dataset adds."""
    return {"checkpoint": os.path.abspath(checkpoint), "fingerprint": fingerprint(checkpoint),
            "text": text, "width": width,
            "tokenizer_sha256": file_sha256(os.path.join(checkpoint, "spiece.model")),
            "max_caption_len": int(max_len), "dtype": dtype, "compute_dtype": "float32"}


def dataset_dtype(data_dir: str) -> str:
    """The dtype the features of input.data_dir are stored in (check_dataset makes it one);
    bfloat16 where no manifest says (a custom source)."""
    try:
        metas = [(m or {}).get(MANIFEST_KEY) or {} for m in _manifests(data_dir).values()]
    except (ValueError, OSError):
        return "bfloat16"
    return next((m["dtype"] for m in metas if m.get("dtype") in DTYPES), "bfloat16")


def _manifests(data_dir: str) -> dict:
    """{shard folder: its manifest.json (None if absent)} of the shards input.data_dir names."""
    from tcjepa_jax import paths  # pylint: disable=import-outside-toplevel
    from tcjepa_jax.data.sources.array_record import find_shards  # pylint: disable=C0415
    out = {}
    for shard in find_shards(data_dir):
        folder = os.path.dirname(shard)
        if folder not in out:
            path = os.path.join(folder, "manifest.json")
            out[folder] = json.loads(paths.read_bytes(path)) if paths.exists(path) else None
    return out


def _differences(config, meta: dict, expected: dict) -> list:
    """What the config says against what made the features, with make_dataset's flag."""
    out = []
    if meta.get("text") != expected["text"]:
        out.append(f"model.text={expected['text']!r}, but they are T5-{meta.get('text')}'s "
                   "(--text)")
    if meta.get("max_caption_len") != expected["max_caption_len"]:
        out.append(f"input.max_caption_len={expected['max_caption_len']}, but their captions "
                   f"were cut to {meta.get('max_caption_len')} tokens (--max_caption_len)")
    if meta.get("fingerprint") != expected["fingerprint"]:
        out.append(f"model.text_checkpoint={config.model.text_checkpoint!r} holds other weights "
                   f"than {meta.get('checkpoint')!r}, which made them (--text_checkpoint)")
    if meta.get("tokenizer_sha256") != expected["tokenizer_sha256"]:
        out.append(f"the spiece.model of model.text_checkpoint is not the tokenizer of "
                   f"{meta.get('checkpoint')!r}, which made them (--text_checkpoint)")
    return out


def check_dataset(config) -> None:
    """The features of every shard folder of input.data_dir were made by the T5, tokenizer and
    S of `config`; one ValueError saying what differs and what to change otherwise."""
    expected = {"text": config.model.text, "max_caption_len": int(config.input.max_caption_len),
                "tokenizer_sha256": file_sha256(os.path.join(config.model.text_checkpoint,
                                                             "spiece.model")),
                "fingerprint": fingerprint(config.model.text_checkpoint)}
    dtypes = set()
    for folder, manifest in _manifests(config.input.data_dir).items():
        meta = (manifest or {}).get(MANIFEST_KEY)
        if not meta:
            raise ValueError(
                f"model.text_features='precomputed', but the shards in {folder} have no text "
                "features (its manifest.json has no 'text_features' section). Write them with "
                "`python -m tcjepa_jax.tools.make_dataset ... --text_checkpoint=DIR --text=SIZE "
                "--max_caption_len=S` (docs/data.md), or set model.text_features='compute'.")
        differ = _differences(config, meta, expected)
        if differ:
            raise ValueError(
                f"model.text_features='precomputed': the text features in {folder} were made "
                f"with another T5 setup than this config's: {'; '.join(differ)}. Make the config "
                "match, or rewrite the features with make_dataset's flags in parentheses, or set "
                "model.text_features='compute'.")
        dtypes.add(meta.get("dtype"))
    if len(dtypes) > 1:
        raise ValueError(f"input.data_dir={config.input.data_dir!r} mixes shard folders whose "
                         f"text features are stored in {sorted(map(str, dtypes))}; a batch needs "
                         "one dtype: rewrite one of them with make_dataset "
                         "--text_features_dtype.")
