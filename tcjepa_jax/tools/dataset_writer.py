"""write_dataset: inputs -> validated ArrayRecord shards + manifest.json (make_dataset's engine).

    check arguments and inputs (InputError) -> check the output folder (refuse / resume / done)
        -> index the caption file -> write the missing shards in a spawn pool, one task a shard,
           a progress bar over input items [-> T5 features of their captions, in this process,
           text_writer.py] -> manifest.json -> summary

Kept apart from the CLI (make_dataset.py) so it can be called without absl flags, e.g. by tests.
"""

from __future__ import annotations

import json
import multiprocessing
import os

from tqdm import tqdm

from tcjepa_jax.data.captions import CaptionFile
from tcjepa_jax.tools import dataset_dir
from tcjepa_jax.tools import shard_writer
from tcjepa_jax.tools import text_writer
from tcjepa_jax.tools.dataset_inputs import FolderInput, InputError, TfdsInput

TFDS_DEFAULTS = {"tfds_split": "train", "tfds_data_dir": "", "image_key": "image", "id_key": "",
                 "label_key": "", "caption_key": ""}


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def write_dataset(out: str, *, images: str | None = None, label_from: str | None = None,
                  tfds: str | None = None, captions: str | None = None, shard_size: int = 1000,
                  workers: int | None = None, overwrite: bool = False,
                  text_checkpoint: str | None = None, text: str = "base",
                  max_caption_len: int = 64, text_features_dtype: str = "bfloat16",
                  **tfds_args) -> dict:
    """Writes (or resumes, or finds complete) the dataset in `out`; returns its manifest.

    Arguments are make_dataset's flags; the TFDS ones (TFDS_DEFAULTS) may only be given with
    `tfds`. With `text_checkpoint` every record also stores the T5 features of its captions
    (text_writer.py). User errors raise InputError before anything is written.
    """
    _check_args(out, images, label_from, tfds, captions, shard_size, workers, tfds_args)
    workers = workers or default_workers()
    t = {**TFDS_DEFAULTS, **tfds_args}
    if images:
        source = FolderInput(images, label_from)
        args = {"images": source.root, "label_from": label_from or ""}
    else:
        t["caption_key"] = "" if captions else t["caption_key"]  # a caption file wins
        t["tfds_data_dir"] = os.path.abspath(t["tfds_data_dir"]) if t["tfds_data_dir"] else ""
        source = TfdsInput(tfds, t["tfds_split"], t["tfds_data_dir"], t["image_key"], t["id_key"],
                           t["label_key"], t["caption_key"])
        args = {"tfds": tfds, **t}
    args.update(captions=os.path.abspath(captions) if captions else "", shard_size=shard_size,
                num_items=len(source))
    if text_checkpoint:  # absent otherwise, so that datasets written before the option resume
        args.update(text_checkpoint=os.path.abspath(text_checkpoint), text=text,
                    max_caption_len=max_caption_len, text_features_dtype=text_features_dtype)

    state = dataset_dir.check(out, args, overwrite)
    if state == "complete":
        print(f"{out} is already complete ({dataset_dir.MANIFEST} is there); nothing to do. "
              "Pass --overwrite to write it again.")
        with open(os.path.join(out, dataset_dir.MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    encoder = None
    if text_checkpoint:  # loads T5: after the cheap checks, before anything is written
        print(f"loading T5-{text} from {text_checkpoint} ...", flush=True)
        encoder = text_writer.FeatureEncoder(text_checkpoint, text, max_caption_len,
                                             text_features_dtype)
    caption_file = None
    if captions:
        print(f"indexing caption file {captions} ...", flush=True)
        try:
            caption_file = CaptionFile(captions)
        except ValueError as e:  # no valid line
            raise InputError(str(e)) from None

    num_shards = -(-len(source) // shard_size)
    done, removed = dataset_dir.start(out, args, num_shards, overwrite)
    print(f"input: {source.describe()}"
          + (f"; captions for {len(caption_file)} ids" if caption_file else ""))
    if state == "resume":
        print(f"resuming: {len(done)} of {num_shards} shards were already complete"
              + (f"; removed {removed} temporary files of the interrupted run" if removed else ""))
    print(f"writing {num_shards - len(done)} of {num_shards} shards of up to {shard_size} items "
          f"to {out} with {workers} workers", flush=True)
    todo = [i for i in range(num_shards) if i not in done]
    tasks = ((out, i, num_shards, source.refs(i * shard_size, (i + 1) * shard_size))
             for i in todo)  # made as the pool takes them: a task carries its items' refs
    done_items = sum(min(shard_size, len(source) - i * shard_size) for i in done)
    for _ in _run(tasks, len(todo), source.reader, caption_file, workers, done_items,
                  len(source), pending=encoder is not None):
        if encoder is not None:
            text_writer.commit_pending(out, encoder)
    extra = {}
    if encoder is not None:
        extra[text_writer.text_lib.MANIFEST_KEY] = text_writer.manifest_section(
            out, num_shards, encoder.metadata)
    manifest = dataset_dir.finish(out, num_shards,
                                  {**args, "input": "images" if images else "tfds"},
                                  source.label_names,
                                  dict(caption_file.bad_lines) if caption_file else {}, extra)
    print(summary(out, manifest))
    return manifest


def _check_args(out, images, label_from, tfds, captions, shard_size, workers, tfds_args) -> None:
    """User errors in the arguments alone."""
    if not out:
        raise InputError("give --out=DIR, the folder to write the shards to")
    if bool(images) == bool(tfds):
        raise InputError("give exactly one input: --images=DIR or --tfds=NAME")
    unknown = set(tfds_args) - set(TFDS_DEFAULTS)
    if unknown:
        raise TypeError(f"write_dataset() got unexpected arguments {sorted(unknown)}")
    if images:
        if tfds_args:
            raise InputError(f"{', '.join('--' + k for k in sorted(tfds_args))}: TFDS flags, "
                             "they go with --tfds, not with --images")
        if not captions:
            raise InputError("--images needs --captions=FILE.jsonl")
        if os.path.commonpath([os.path.abspath(out), os.path.abspath(images)]) == \
                os.path.abspath(images):
            raise InputError(f"--out={out} is inside --images={images}; choose another --out")
    else:
        if label_from:
            raise InputError("--label_from goes with --images; for TFDS use --label_key")
        if not (captions or tfds_args.get("caption_key")):
            raise InputError("--tfds needs captions: give --caption_key=FEATURE or "
                             "--captions=FILE.jsonl")
    if label_from not in (None, "", "dirname"):
        raise InputError(f"--label_from={label_from}: the only choice is dirname")
    if captions and not os.path.isfile(captions):
        raise InputError(f"--captions={captions}: caption file does not exist")
    if shard_size < 1 or (workers is not None and workers < 1):
        raise InputError("--shard_size and --workers must be >= 1")


def _run(tasks, num_tasks: int, reader, caption_file, workers: int, done_items: int,
         total_items: int, pending: bool = False):
    """Writes the shards of `tasks`, with a progress bar over input items; yields their stats.
    `pending`: the shards are left for text_writer to commit."""
    with tqdm(total=total_items, initial=done_items, unit="img", desc="writing", smoothing=0.05,
              dynamic_ncols=True) as bar:
        if workers == 1 or num_tasks <= 1:  # no process start-up for a single shard
            shard_writer.init_worker(reader, caption_file, bar.update, pending)
            yield from map(shard_writer.write_shard, tasks)
            return
        ctx = multiprocessing.get_context("spawn")  # TF or JAX may be imported: never fork
        items_done = ctx.Value("q", 0)  # summed over the workers item by item, polled here
        with ctx.Pool(min(workers, num_tasks), shard_writer.init_worker,
                      (reader, caption_file, items_done, pending)) as pool:
            results = pool.imap_unordered(shard_writer.write_shard, tasks)
            while True:
                try:
                    stats = results.next(timeout=0.2)
                except multiprocessing.TimeoutError:
                    stats = None
                except StopIteration:
                    return
                finally:
                    bar.update(done_items + items_done.value - bar.n)
                if stats is not None:
                    yield stats


def summary(out: str, manifest: dict) -> str:
    """The console summary: records written, skipped / dropped / bad lines by kind, captions."""
    def section(title: str, counts: dict, meanings: dict) -> list[str]:
        n = sum(counts.values())
        return [title.format(n=n, s="" if n == 1 else "s") + (":" if n else "")] + [
                f"  {kind:<26}{count:>9}  {meanings.get(kind, '')}"
                for kind, count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]

    lines = [f"wrote {manifest['num_records']} records in {len(manifest['shards'])} shards to "
             f"{out} (see {dataset_dir.MANIFEST})"]
    lines += section("skipped {n} record{s}", manifest["skipped"], shard_writer.SKIP_KINDS)
    lines += [f"    read error: {e}" for e in manifest["read_errors"]]
    if manifest["dropped_captions"]:
        lines += section("dropped {n} caption sentence{s} (their records were kept)",
                         manifest["dropped_captions"], shard_writer.DROP_KINDS)
    if manifest["caption_file_bad_lines"]:
        lines += section("caption file: {n} line{s} not used", manifest["caption_file_bad_lines"],
                         shard_writer.BAD_LINE_KINDS)
    c = manifest["captions"]
    if manifest["num_records"]:
        lines.append(f"captions: {c['sentences_per_image']['mean']:.2f} sentences per image (min "
                     f"{c['sentences_per_image']['min']}, max {c['sentences_per_image']['max']}), "
                     f"{c['words_per_sentence']['mean']:.1f} words per sentence (max "
                     f"{c['words_per_sentence']['max']})")
    t = manifest.get(text_writer.text_lib.MANIFEST_KEY)
    if t:
        lines.append(f"text features: T5-{t['text']} ({t['checkpoint']}), {t['dtype']}, "
                     f"{t['tokens_per_sentence']:.1f} tokens per sentence of at most "
                     f"{t['max_caption_len']} ({t['sentences_at_max_len']} at the limit), "
                     f"{t['bytes_per_image'] / 1024:.1f} KiB per image")
    return "\n".join(lines)
