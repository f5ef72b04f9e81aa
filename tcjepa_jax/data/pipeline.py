"""The Grain input pipeline: random-access source -> per-host batches of fixed shapes.

        range(len(source)) -> shuffle(seed) -> repeat() -> [process_index::process_count]
            -> map_with_index: read record, RandomResizedCrop, normalize, sample + tokenize captions,
                  sample masks (None if anything raises: a bad record)
            -> filter(not None) -> to_iter_dataset(threads, prefetch) -> batch(per-host, drop_remainder)

The shuffle is index based and reseeded each epoch by `repeat`; shuffling before the host slice
gives every host a disjoint part of every epoch. The record index comes out of the shuffle, so the
read sits inside the per-example function and an exception while reading a record is caught like
one in a transform. All randomness of an example is a pure function of (config.seed, epoch, record
index), so the stream is reproducible and, through the iterator's get_state()/set_state(),
resumable. Bad records are skipped (batches stay full) and counted in `BAD_RECORDS`.

Batch format (b = config.batch_size // process_count):
    image          float32 (b, S, S, 3)   normalized with the ImageNet mean/std
    text_ids       int32   (b, N, L)      N = input.num_captions, L = input.max_caption_len
    text_mask      bool    (b, N, L)
    caption_valid  bool    (b, N)
    context_idx    int32   (b, Nc)        Nc = mask_spec.num_context_slots
    context_valid  bool    (b, Nc)
    target_idx     int32   (b, K, Nt)     K = mask_spec.num_targets, Nt = mask_spec.num_target_slots
    target_valid   bool    (b, K, Nt)
"""

from __future__ import annotations

import logging
import threading

import grain
import numpy as np

from tcjepa_jax import masks
from tcjepa_jax.data import synthetic
from tcjepa_jax.data import transforms

SOURCES = ("synthetic",)  # array_record and tfds come in later issues
_DATA_STREAM = 0x0DA7A  # keeps example randomness apart from the mask sampler's stream
_MAX_LOGGED = 5


class BadRecordCounter:
    """Thread-safe count of skipped records, with the last error for logging.

    A few bad records are skipped; a source where most records fail (wrong format, a bug in a
    custom source) stops the run with the error instead of skipping forever.
    """

    def __init__(self, give_up_after: int = 100, give_up_fraction: float = 0.5):
        self._lock = threading.Lock()
        self.count = self.seen = 0
        self.last_error = ""
        self.give_up_after, self.give_up_fraction = give_up_after, give_up_fraction

    def ok(self) -> None:
        with self._lock:
            self.seen += 1

    def add(self, index: int, error: BaseException) -> None:
        with self._lock:
            self.seen += 1
            self.count += 1
            self.last_error = f"record {index}: {type(error).__name__}: {error}"
            n, seen = self.count, self.seen
        if n <= _MAX_LOGGED:
            logging.warning("Skipping bad record (%d so far) %s", n, self.last_error)
        if n >= self.give_up_after and n > self.give_up_fraction * seen:
            raise RuntimeError(
                f"{n} of the first {seen} records failed to load; the data or the source is "
                f"broken, not a few records. Last error: {self.last_error}") from error

    def reset(self) -> None:
        with self._lock:
            self.count, self.seen, self.last_error = 0, 0, ""


# Records skipped by every pipeline in this process (read-ahead by prefetch threads included).
BAD_RECORDS = BadRecordCounter()


def bad_record_count() -> int:
    return BAD_RECORDS.count


def make_source(input_cfg, split: str):
    """The random-access source named by `input_cfg.source` for `split`."""
    name = input_cfg.source
    if name == "synthetic":
        return synthetic.SyntheticScenes(
                image_size=input_cfg.image_size,
                seed=input_cfg.get("seed", 0),
                split=split,
                size=input_cfg.get("synthetic_size", 1_000_000),
                min_objects=input_cfg.get("min_objects", 1),
                max_objects=input_cfg.get("max_objects", 4),
        )
    raise ValueError(f"Unknown config.input.source={name!r}; valid sources: {', '.join(SOURCES)}.")


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.Generator(
            np.random.Philox(np.random.SeedSequence([int(seed), int(epoch), int(index), _DATA_STREAM])))


class TrainExample:
    """map_with_index transform: (position in this host's stream, record index) -> example | None."""

    def __init__(self, source, config, tokenizer, mask_spec, process_index, process_count,
                              counter: BadRecordCounter):
        self.source, self.tokenizer, self.mask_spec = source, tokenizer, mask_spec
        self.seed = int(config.seed)
        self.image_size = int(config.input.image_size)
        self.crop_scale = tuple(config.input.crop_scale)
        self.num_captions = int(config.input.num_captions)
        self.max_len = int(config.input.max_caption_len)
        self.process_index, self.process_count = process_index, process_count
        self.counter = counter
        self.epoch_size = len(source)

    def __call__(self, position: int, record_index: int):
        global_position = position * self.process_count + self.process_index
        epoch = global_position // self.epoch_size
        record_index = int(record_index)
        try:
            example = self.process(self.source[record_index], record_index, epoch)
        except Exception as e:  # pylint: disable=broad-except
            self.counter.add(record_index, e)
            return None
        self.counter.ok()
        return example

    def process(self, record: dict, index: int, epoch: int) -> dict:
        rng = example_rng(self.seed, epoch, index)
        image = transforms.random_resized_crop(record["image"], rng, self.image_size, self.crop_scale)
        captions, caption_valid = transforms.sample_captions(record["captions"], rng, self.num_captions)
        text_ids, text_mask = self.tokenizer.encode(captions, self.max_len)
        m = masks.sample_masks(self.mask_spec, self.seed, index, epoch)
        return {
                "image": transforms.normalize(image),
                "text_ids": text_ids,          # int32 and bool from Tokenizer.encode,
                "text_mask": text_mask,        # and the masks' dtypes from sample_masks
                "caption_valid": caption_valid,
                **m,
        }


def per_host_batch_size(config, process_count: int) -> int:
    if config.batch_size % process_count:
        raise ValueError(
                f"config.batch_size={config.batch_size} (global) is not divisible by the number of "
                f"processes {process_count}; choose a multiple of {process_count}.")
    return config.batch_size // process_count


def make_train_dataset(config, tokenizer, mask_spec, *, process_index: int = 0,
                                              process_count: int = 1, source=None,
                                              counter: BadRecordCounter | None = None) -> grain.IterDataset:
    """This host's infinite stream of training batches (see the module docstring).

    Returns a grain.IterDataset (not a MapDataset: skipping bad records needs the iterator's
    filtering). `source` overrides make_source(config.input, "train") (tests, custom data).
    """
    batch = per_host_batch_size(config, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    src = make_source(config.input, "train") if source is None else source
    fn = TrainExample(src, config, tokenizer, mask_spec, process_index, process_count,
                                        BAD_RECORDS if counter is None else counter)
    ds = grain.MapDataset.range(len(src)).shuffle(seed=int(config.seed) % 2**32).repeat(None)
    ds = ds[process_index::process_count].map_with_index(fn).filter(lambda x: x is not None)
    read = grain.ReadOptions(num_threads=int(config.input.get("num_threads", 2)),
                                                      prefetch_buffer_size=max(int(config.input.get("prefetch", 2)), 1) * batch)
    return ds.to_iter_dataset(read).batch(batch, drop_remainder=True)


def make_train_iterator(config, tokenizer, mask_spec, **kwargs) -> grain.DatasetIterator:
    """Iterator over make_train_dataset(...); get_state()/set_state() checkpoint its position."""
    return iter(make_train_dataset(config, tokenizer, mask_spec, **kwargs))


def load_probe_arrays(config, split: str, num_examples: int) -> dict[str, np.ndarray]:
    """The first `num_examples` records of `split`, uncropped, for probes.

    Returns image float32 (n, S, S, 3) normalized at config.input.image_size, label_count,
    label_shape, label_color int32 (n,), segmentation uint8 (n, S, S).
    """
    src = make_source(config.input, split)
    size = int(config.input.image_size)
    if num_examples > len(src):
        raise ValueError(f"Asked for {num_examples} probe examples but split {split!r} has {len(src)}.")
    out = {k: [] for k in ("image", "label_count", "label_shape", "label_color", "segmentation")}
    for i in range(num_examples):
        r = src[i]
        image, seg = r["image"], r["segmentation"]
        if image.shape[:2] != (size, size):
            image = transforms.resize_bilinear(image, size, size)
            rows = (np.arange(size) * seg.shape[0]) // size  # nearest neighbour for labels
            seg = seg[rows][:, (np.arange(size) * seg.shape[1]) // size]
        out["image"].append(transforms.normalize(image))
        for k in ("label_count", "label_shape", "label_color"):
            out[k].append(r[k])
        out["segmentation"].append(seg)
    return {
            "image": np.stack(out["image"]).astype(np.float32),
            "label_count": np.asarray(out["label_count"], np.int32),
            "label_shape": np.asarray(out["label_shape"], np.int32),
            "label_color": np.asarray(out["label_color"], np.int32),
            "segmentation": np.stack(out["segmentation"]).astype(np.uint8),
    }
