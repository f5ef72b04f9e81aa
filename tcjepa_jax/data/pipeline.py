"""The Grain input pipeline: random-access source -> per-host batches of fixed shapes.

        range(len(source)) -> shuffle(seed) -> repeat() -> [process_index::process_count]
            -> map_with_index: read record, decode image, RandomResizedCrop, normalize, clean,
                  sample and tokenize captions, sample masks; a marker if anything fails
            -> to_iter_dataset(threads, prefetch)                 | in input.workers processes
            -> mp_prefetch(input.workers)                          |  (none when 0)
            -> GoodBatches: drop markers counting them by kind, stack full batches (this process)

The shuffle is index based and reseeded each epoch by `repeat`; shuffling before the host slice
gives every host a disjoint part of every epoch. The record index comes out of the shuffle, so the
read sits inside the per-example function and an exception while reading a record is caught like
one in a transform. All randomness of an example is a pure function of (config.seed, epoch, record
index), and batches are formed after the workers' outputs are merged back in order, so the stream
is the same for any number of workers and threads, and resumable through the iterator's
get_state()/set_state(). Bad records are skipped (batches stay full) and counted by kind in the
iterator's `counter` (data/batching.py), which is checkpointed with the position.

Batch format (b = config.batch_size // process_count):
    image          float32 (b, S, S, 3)   normalized with the ImageNet mean/std
    text_ids       int32   (b, N, L)      N = input.num_captions, L = input.max_caption_len
    text_mask      bool    (b, N, L)
    caption_valid  bool    (b, N)
    text_features  bf16    (b, N, L, Dt)  only with model.text_features="precomputed": the stored
                                          T5 features of the sampled captions (text_features.py;
                                          float32 if stored so), zeros at padding
    context_idx    int32   (b, Nc)        Nc = mask_spec.num_context_slots
    context_valid  bool    (b, Nc)
    target_idx     int32   (b, K, Nt)     K = mask_spec.num_targets, Nt = mask_spec.num_target_slots
    target_valid   bool    (b, K, Nt)
"""

from __future__ import annotations

import grain
import numpy as np
from absl import flags

from tcjepa_jax import masks
from tcjepa_jax.data import decode
from tcjepa_jax.data import text_features as text_lib
from tcjepa_jax.data import transforms
from tcjepa_jax.data.batching import BadRecordCounter, GoodBatches
from tcjepa_jax.data.sources import available_sources, make_source  # noqa: F401 (re-exported)

_DATA_STREAM = 0x0DA7A  # keeps example randomness apart from the mask sampler's stream


def example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.Generator(
            np.random.Philox(np.random.SeedSequence([int(seed), int(epoch), int(index), _DATA_STREAM])))


def record_image(record: dict) -> np.ndarray:
    """The record's image as uint8 (H, W, 3): encoded bytes are decoded here, in the worker."""
    image = record.get("image")
    if image is None or isinstance(image, (bytes, bytearray, memoryview)):
        return decode.decode_image(bytes(image) if image is not None else b"")
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise decode.BadRecord("bad_image_array",
                               f"expected uint8 (H, W, 3), got {image.dtype} {image.shape}")
    if not image.size:
        raise decode.BadRecord("zero_size_image", f"image of shape {image.shape}")
    return image


def record_captions(record: dict, require: bool) -> tuple[list[str], dict]:
    """Cleaned caption sentences and the counts of dropped ones, by kind.

    A record without usable captions is a BadRecord when `require` (input.skip_uncaptioned);
    otherwise it trains with no caption, i.e. its predictor pass is unconditioned.
    """
    raw = record.get("captions")
    captions, dropped = decode.clean_captions(raw)
    if not captions and require:
        if raw is None:
            raise decode.BadRecord("missing_captions", f"id {record.get('id')!r} has no captions")
        raise decode.BadRecord("no_valid_captions", f"id {record.get('id')!r}: {dict(dropped)}")
    return captions, dict(dropped)


class TrainExample:
    """map_with_index transform: (position in this host's stream, record index) -> example | marker."""

    def __init__(self, source, config, tokenizer, mask_spec, process_index, process_count,
                 start: int = 0):
        self.source, self.tokenizer, self.mask_spec = source, tokenizer, mask_spec
        self.seed = int(config.seed)
        self.image_size = int(config.input.image_size)
        self.crop_scale = tuple(config.input.crop_scale)
        self.num_captions = int(config.input.num_captions)
        self.max_len = int(config.input.max_caption_len)
        self.require_captions = bool(config.input.get("skip_uncaptioned", True))
        self.text_width = 0  # > 0: read the records' precomputed T5 features
        if tokenizer is not None and text_lib.precomputed(config):
            from tcjepa_jax.models.text import T5_SIZES  # pylint: disable=C0415  # not in workers
            self.text_width = T5_SIZES[config.model.text]["width"]
            self.text_dtype = text_lib.dataset_dtype(config.input.get("data_dir", ""))
        self.process_index, self.process_count, self.start = process_index, process_count, start
        self.epoch_size = len(source)

    def __call__(self, position: int, record_index: int):
        global_position = self.start + position * self.process_count + self.process_index
        epoch = global_position // self.epoch_size
        record_index = int(record_index)
        try:
            return self.process(self.source[record_index], record_index, epoch)
        except Exception as e:  # pylint: disable=broad-except
            kind = e.kind if isinstance(e, decode.BadRecord) else f"error_{type(e).__name__}"
            return {"skipped": kind, "error": str(e)[:500], "index": record_index}

    def process(self, record: dict, index: int, epoch: int) -> dict:
        rng = example_rng(self.seed, epoch, index)
        image = transforms.random_resized_crop(record_image(record), rng, self.image_size,
                                               self.crop_scale)
        if self.tokenizer is None:  # I-JEPA: no text; the step ignores these fields
            text_ids = np.zeros((self.num_captions, self.max_len), np.int32)
            text_mask, caption_valid, dropped = text_ids != 0, np.zeros(self.num_captions, bool), {}
        else:
            sentences, dropped = record_captions(record, self.require_captions)
            captions, caption_valid = transforms.sample_captions(sentences, rng, self.num_captions)
            text_ids, text_mask = self.tokenizer.encode(captions, self.max_len)
        if self.text_width:
            features = text_lib.example_features(record, captions, text_mask, self.text_width,
                                                 self.text_dtype)
        m = masks.sample_masks(self.mask_spec, self.seed, index, epoch)
        example = {
                "image": transforms.normalize(image),
                "text_ids": text_ids,          # int32 and bool from Tokenizer.encode,
                "text_mask": text_mask,        # and the masks' dtypes from sample_masks
                "caption_valid": caption_valid,
                **m,
        }
        if self.text_width:
            example["text_features"] = features
        if dropped:
            example["dropped_captions"] = dropped  # counted and removed by GoodBatches
        return example


def source_captions(source, num_images: int):
    """Yields the clean caption sentences of up to `num_images` records spread over `source`
    (a tokenizer's training corpus). Records that fail to read are skipped."""
    n = len(source)
    for index in np.unique(np.linspace(0, n - 1, min(num_images, n)).astype(np.int64)):
        try:
            record = source[int(index)]
        except Exception:  # pylint: disable=broad-except
            continue
        yield from decode.clean_captions(record.get("captions"))[0]


def per_host_batch_size(config, process_count: int) -> int:
    if config.batch_size % process_count:
        raise ValueError(
                f"config.batch_size={config.batch_size} (global) is not divisible by the number of "
                f"processes {process_count}; choose a multiple of {process_count}.")
    return config.batch_size // process_count


def make_train_dataset(config, tokenizer, mask_spec, *, process_index: int = 0,
                       process_count: int = 1, source=None,
                       counter: BadRecordCounter | None = None, start: int = 0) -> GoodBatches:
    """This host's infinite stream of training batches (see the module docstring).

    `source` overrides make_source(config.input, config.input.split) (tests, custom data);
    `counter` overrides the iterator's own BadRecordCounter (tests); `start` skips that many
    records of the global (all hosts') stream: a run resumed on a different number of hosts
    continues where the old hosts stopped (resume.py).
    """
    batch = per_host_batch_size(config, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    src = make_source(config.input, config.input.get("split", "train")) if source is None else source
    if not len(src):
        raise ValueError(f"The training source {src!r} has no records.")
    fn = TrainExample(src, config, tokenizer, mask_spec, process_index, process_count, start)
    ds = grain.MapDataset.range(len(src)).shuffle(seed=int(config.seed) % 2**32).repeat(None)
    ds = ds[start:] if start else ds
    ds = ds[process_index::process_count].map_with_index(fn)
    prefetch = max(int(config.input.get("prefetch", 2)), 1) * batch
    workers = int(config.input.get("workers", 0))
    threads = int(config.input.get("num_threads", 2))
    read = grain.ReadOptions(num_threads=threads,
                             prefetch_buffer_size=max(prefetch // max(workers, 1), threads))
    ds = ds.to_iter_dataset(read)
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags (notebooks, tests)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(prefetch // workers, 1)))
    return GoodBatches(ds, batch, counter)


def make_train_iterator(config, tokenizer, mask_spec, **kwargs):
    """Iterator over make_train_dataset(...): get_state()/set_state() checkpoint its position
    and its bad-record counts; `.counter` holds the counts."""
    return iter(make_train_dataset(config, tokenizer, mask_spec, **kwargs))


def load_probe_arrays(config, split: str, num_examples: int) -> dict[str, np.ndarray]:
    """The first `num_examples` records of `split`, uncropped, for probes.

    Returns image float32 (n, S, S, 3) normalized at config.input.image_size, label_count,
    label_shape, label_color int32 (n,), segmentation uint8 (n, S, S).
    """
    if config.input.source != "synthetic":
        raise ValueError("The built-in linear probes read the synthetic scenes' labels; set "
                         f"probe.enabled=False for input.source={config.input.source!r}.")
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
