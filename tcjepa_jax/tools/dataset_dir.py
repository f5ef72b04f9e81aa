"""make_dataset's output folder: refuse, resume or overwrite; then the manifest.

Files make_dataset writes in DIR (and the only ones it ever deletes):
    .make_dataset_args.json                the arguments that determine the content, written first
    shard-00000-of-00012.array_record      complete shards (the rename into place is the commit)
    .shard-00000-of-00012.json             a shard's stats, written just before its rename
    .shard-00000-of-00012.*.tmp            a shard or stats file being written
    manifest.json                          written last: the output is complete
"""

from __future__ import annotations

import datetime
import json
import os

from tcjepa_jax.tools import shard_writer
from tcjepa_jax.tools.dataset_inputs import InputError

ARGS = ".make_dataset_args.json"
MANIFEST = "manifest.json"
FORMAT = "tcjepa_jax.records/1"


def _ours(name: str) -> bool:
    return (any(p.fullmatch(name) for p in (shard_writer.SHARD_RE, shard_writer.STATS_RE,
                                             shard_writer.TEMP_RE))
            or name.removesuffix(".tmp") in (ARGS, MANIFEST))


def _our_manifest(path: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_json(path: str, obj) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _flag(key: str) -> str:
    return "input items" if key == "num_items" else f"--{key}"


def check(out: str, args: dict, overwrite: bool) -> str:
    """Before any work: "new", "resume" or "complete"; InputError if DIR must not be written."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out={out} is a file, not a folder")
    if not os.path.isdir(out):
        return "new"
    names = os.listdir(out)
    if ARGS not in names:
        if MANIFEST in names and not _our_manifest(os.path.join(out, MANIFEST)):
            raise InputError(f"--out={out} has a {MANIFEST} that make_dataset did not write; "
                             "choose another --out")
        if names and not overwrite:
            raise InputError(
                    f"--out={out} is not empty and was not written by make_dataset; choose another "
                    "--out, or pass --overwrite to write into it (only make_dataset's own files "
                    "are ever deleted)")
        return "new"
    if overwrite:
        return "new"
    try:
        with open(os.path.join(out, ARGS), encoding="utf-8") as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{os.path.join(out, ARGS)} is unreadable ({e}); pass --overwrite to "
                         "start over") from None
    differ = [k for k in sorted(set(old) | set(args)) if old.get(k) != args.get(k)]
    if differ:
        was = ", ".join(f"{_flag(k)}={old.get(k)!r} (now {args.get(k)!r})" for k in differ)
        raise InputError(
                f"--out={out} holds make_dataset output written with different arguments: {was}. "
                "Re-run with the same arguments to resume it, or pass --overwrite to start over, "
                "or choose another --out")
    return "complete" if MANIFEST in names else "resume"


def start(out: str, args: dict, num_shards: int, overwrite: bool) -> tuple[set[int], int]:
    """Prepares DIR for writing; returns (indices of shards already complete, temp files removed).

    --overwrite deletes make_dataset's files (check() has refused a manifest that is not ours);
    otherwise only leftover temporary files of an interrupted run are removed.
    """
    os.makedirs(out, exist_ok=True)
    names = os.listdir(out)
    if overwrite:
        delete = [n for n in names if _ours(n)]
    else:
        delete = [n for n in names if n.endswith(".tmp") and _ours(n)]
    for name in delete:
        os.remove(os.path.join(out, name))
    _write_json(os.path.join(out, ARGS), args)
    names = set(os.listdir(out))
    done = {i for i in range(num_shards)
            if shard_writer.shard_name(i, num_shards) in names
            and shard_writer.stats_name(i, num_shards) in names}
    return done, 0 if overwrite else len(delete)


def finish(out: str, num_shards: int, source: dict, label_names, bad_lines,
           extra: dict | None = None) -> dict:
    """Sums the shards' stats into manifest.json (written last) and returns the manifest;
    `extra`: more sections (text_features)."""
    total, shards = shard_writer.empty_stats(), []
    for i in range(num_shards):
        with open(os.path.join(out, shard_writer.stats_name(i, num_shards)), encoding="utf-8") as f:
            stats = json.load(f)
        shard_writer.add_stats(total, stats)
        shards.append({"name": shard_writer.shard_name(i, num_shards),
                       "num_records": stats["num_records"]})
    n, sentences = total["num_records"], total["num_sentences"]
    manifest = {
            "format": FORMAT,
            "num_records": n,
            "skipped": dict(sorted(total["skipped"].items())),
            "dropped_captions": dict(sorted(total["dropped_captions"].items())),
            "caption_file_bad_lines": dict(sorted(bad_lines.items())),
            "shards": shards,
            "captions": {
                    "sentences_per_image": {"mean": round(sentences / max(n, 1), 3),
                                            "min": total["min_sentences"] or 0,
                                            "max": total["max_sentences"]},
                    "words_per_sentence": {"mean": round(total["num_words"] / max(sentences, 1), 3),
                                           "max": total["max_words"]},
                    "chars_per_sentence": {"mean": round(total["num_chars"] / max(sentences, 1), 3),
                                           "max": total["max_chars"]},
            },
            "label_names": label_names,
            "read_errors": total["errors"],
            "source": source,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **(extra or {}),
    }
    _write_json(os.path.join(out, MANIFEST), manifest)
    return manifest
