"""make_dataset --text_checkpoint: the frozen T5's word features of every caption sentence,
stored with the records (data/text_features.py has the format and the metadata).

The shard workers validate and write records as without the option but leave each shard under
its pending name (shard_writer.pending_name). The main process, the only one that runs JAX (on
the host's accelerators when it has some, the rows split over its local devices), takes each
pending shard as it appears, runs T5 on all its sentences in batches of fixed shape (one
compilation), rewrites its records with their features, adds the counts to the shard's stats
and commits the shard with the same rename as the workers. A pending shard is a temporary file:
an interrupted run redoes it when resumed.
"""

from __future__ import annotations

import json
import os

import numpy as np
from array_record.python import array_record_module

from tcjepa_jax.data import records
from tcjepa_jax.data import text_features as text_lib
from tcjepa_jax.tools import shard_writer
from tcjepa_jax.tools.dataset_inputs import InputError

ROWS_PER_DEVICE = 64   # sentences per device per T5 call
_CHUNK_ROWS = 8        # calls' worth of sentences gathered before running T5
STAT_KEYS = ("text_sentences", "text_tokens", "text_full", "text_bytes")


class FeatureEncoder:
    """T5 of a Hugging Face checkpoint (models/t5_checkpoint.py) in float32, with its tokenizer:
    sentences -> their valid tokens' features in `dtype`, as the train step would see them."""

    def __init__(self, checkpoint: str, text: str, max_len: int, dtype: str = "bfloat16"):
        if dtype not in text_lib.DTYPES:
            raise InputError(f"--text_features_dtype={dtype}: choose one of "
                             f"{', '.join(text_lib.DTYPES)}")
        if max_len < 2:
            raise InputError(f"--max_caption_len={max_len}: at least 2 (a piece and eos)")
        from tcjepa_jax.models import t5_checkpoint  # pylint: disable=import-outside-toplevel
        from tcjepa_jax.models.text import T5_SIZES  # pylint: disable=import-outside-toplevel
        if text not in T5_SIZES:
            raise InputError(f"--text={text}: choose one of {', '.join(T5_SIZES)}")
        try:
            self.tokenizer, vocab = t5_checkpoint.check_checkpoint(checkpoint, text)
            params = t5_checkpoint.load_text_params(checkpoint, text)
            self.metadata = text_lib.metadata(checkpoint, text, max_len, dtype,
                                              T5_SIZES[text]["width"])
        except (ValueError, FileNotFoundError) as e:
            raise InputError(str(e).replace("model.text_checkpoint=", "--text_checkpoint="))
        self.max_len, self.dtype = max_len, dtype
        self._apply, self._params, self.rows = _jitted_t5(params, vocab, T5_SIZES[text], dtype)

    def encode(self, sentences: list) -> list:
        """(L_i, Dt) arrays, L_i = the tokens of sentence i (Tokenizer.encode, cut to S)."""
        if not sentences:
            return []
        ids, mask = self.tokenizer.encode(list(sentences), self.max_len)
        n = len(ids)
        pad = -n % self.rows
        ids = np.concatenate([ids, np.zeros((pad, self.max_len), ids.dtype)])
        mask = np.concatenate([mask, np.ones((pad, self.max_len), bool)])  # no empty rows
        out = [np.asarray(self._apply(self._params, ids[i:i + self.rows], mask[i:i + self.rows]))
               for i in range(0, len(ids), self.rows)]
        features, lengths = np.concatenate(out)[:n], mask[:n].sum(1)
        return [features[i, :lengths[i]] for i in range(n)]


def _jitted_t5(params, vocab: int, size: dict, dtype: str):
    """T5's forward, jitted with the rows split over this host's devices; (fn, params, rows)."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from jax.sharding import Mesh, NamedSharding, PartitionSpec  # pylint: disable=C0415
    from tcjepa_jax.models.text import T5Encoder  # pylint: disable=import-outside-toplevel
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("rows",))
    rows, replicated = NamedSharding(mesh, PartitionSpec("rows")), NamedSharding(mesh,
                                                                               PartitionSpec())
    model = T5Encoder(vocab_size=vocab, **size, dtype=jnp.float32)
    # Cast on the device: half the bytes to fetch in bfloat16, rounded as jnp rounds in the step.
    fn = jax.jit(lambda p, i, m: model.apply({"params": p}, i, m).astype(dtype),
                 in_shardings=(replicated, rows, rows), out_shardings=rows)
    return fn, jax.device_put(params, replicated), ROWS_PER_DEVICE * len(devices)


def commit_pending(out: str, encoder: FeatureEncoder) -> int:
    """Adds the features to every pending shard in `out` and commits it; returns how many."""
    done = 0
    for name in sorted(os.listdir(out)):
        match = shard_writer.PENDING_RE.fullmatch(name)
        if match:
            index, num_shards = int(match.group(1)), int(match.group(2))
            _add_features(out, index, num_shards, encoder)
            done += 1
    return done


def _add_features(out: str, index: int, num_shards: int, encoder: FeatureEncoder) -> None:
    name = shard_writer.shard_name(index, num_shards)
    pending = os.path.join(out, shard_writer.pending_name(index, num_shards))
    temp = os.path.join(out, f".{name}.text.tmp")
    reader = array_record_module.ArrayRecordReader(pending)
    total = reader.num_records()
    counts = dict.fromkeys(STAT_KEYS, 0)
    writer = array_record_module.ArrayRecordWriter(temp, "group_size:1")
    try:
        start, chunk = 0, []
        while start < total or chunk:
            # Records in order, T5 on several calls' worth of their sentences at a time.
            while start < total and sum(len(r["captions"]) for r in chunk) < \
                    _CHUNK_ROWS * encoder.rows:
                chunk.append(records.decode_record(reader.read([start])[0]))
                start += 1
            features = iter(encoder.encode([s for r in chunk for s in r["captions"]]))
            for r in chunk:
                mine = [next(features) for _ in r["captions"]]
                packed = text_lib.pack(mine, encoder.dtype)
                writer.write(records.encode_record(id=r["id"], image=r["image"],
                                                   captions=r["captions"],
                                                   label=None if r["label"] < 0 else r["label"],
                                                   text_features=packed))
                counts["text_sentences"] += len(mine)
                counts["text_tokens"] += sum(len(f) for f in mine)
                counts["text_full"] += sum(len(f) == encoder.max_len for f in mine)
                counts["text_bytes"] += sum(len(b) for b in packed["f"])
            chunk = []
        writer.close()
    except BaseException:
        writer.close()
        reader.close()
        os.remove(temp)
        raise
    reader.close()
    stats_path = os.path.join(out, shard_writer.stats_name(index, num_shards))
    with open(stats_path, encoding="utf-8") as f:
        stats = json.load(f)
    with open(stats_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({**stats, **counts}, f)
    os.replace(stats_path + ".tmp", stats_path)
    os.replace(temp, os.path.join(out, name))  # the commit point, as in shard_writer
    os.remove(pending)


def manifest_section(out: str, num_shards: int, metadata: dict) -> dict:
    """manifest.json's "text_features": the metadata and the counts summed over the shards."""
    counts = dict.fromkeys(STAT_KEYS, 0)
    images = 0
    for i in range(num_shards):
        with open(os.path.join(out, shard_writer.stats_name(i, num_shards)),
                  encoding="utf-8") as f:
            stats = json.load(f)
        images += stats["num_records"]
        for key in STAT_KEYS:
            counts[key] += stats.get(key, 0)
    sentences = max(counts["text_sentences"], 1)
    return {**metadata, "sentences": counts["text_sentences"], "tokens": counts["text_tokens"],
            "tokens_per_sentence": round(counts["text_tokens"] / sentences, 3),
            # S tokens: cut to S, or exactly S - 1 pieces; many of them call for a larger S.
            "sentences_at_max_len": counts["text_full"], "bytes": counts["text_bytes"],
            "bytes_per_image": round(counts["text_bytes"] / max(images, 1), 1)}
