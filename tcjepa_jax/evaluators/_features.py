"""What every evaluator reads: frozen features and labels of a probe-training and a test split.

Evaluation data come from any source with labels (tcjepa_jax/data/sources): by default the
training source (`config.input`), or another one named in `config.probe` (`source`,
`data_dir`, `tfds_name`, `label_key`, `segmentation_key`, `train_split`, `test_split`). Images
are resized (shorter side) and centre-cropped to `input.image_size`, never augmented. Tasks:
- the synthetic scenes: `count`, `shape`, `color` (image labels) and per-pixel object labels
  (`segmentation`) for the dense evaluators;
- any other source: `label` (its integer label; records without one are skipped and counted),
  and for a TFDS source with `probe.segmentation_key` the per-pixel class mask
  (`segmentation`), cropped like its image but resized nearest-neighbour (records without a
  usable mask are skipped and counted). With a mask but no `label_key`, records need no label
  and there is no image-level task (only the dense evaluator has something to fit).
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tcjepa_jax.data import pipeline, transforms
from tcjepa_jax.data.decode import BadRecord, decode_image
from tcjepa_jax.data.sources import make_source


class Split(NamedTuple):
    pooled: np.ndarray                   # (n, D) average-pooled patch tokens
    tokens: np.ndarray                   # (n, N, D) patch tokens
    labels: dict                         # task -> (n,) int32
    segmentation: Optional[np.ndarray]   # (n, S, S) per-pixel class labels, or None


class Features(NamedTuple):
    train: Split
    test: Split
    patch_size: int


def eval_input(config) -> ml_collections.ConfigDict:
    """config.input with the probe's own data settings laid over it."""
    cfg = config.input.copy_and_resolve_references()
    probe = config.probe
    for field in ("source", "data_dir", "tfds_name", "label_key", "segmentation_key"):
        if probe.get(field, ""):
            cfg[field] = probe[field]
    cfg.caption_file = ""  # evaluators read no text
    return cfg


def tasks_of(config) -> tuple:
    cfg = eval_input(config)
    if cfg.source == "synthetic":
        return tuple(t for t in config.probe.tasks if t != "patch")
    return ("label",) if _needs_label(cfg) else ()


def _needs_label(cfg) -> bool:
    """Whether the probe's records must have an image label: unless they are read for their
    masks only (a segmentation_key and no label_key)."""
    return bool(cfg.get("label_key", "")) or not cfg.get("segmentation_key", "")


def load_split(config, split: str, num_examples: int, skip: int = 0) -> dict:
    """{"image": (n, S, S, 3) float32, "labels": {task: (n,)}, "segmentation": ... or None},
    from the labelled records of `split` after the first `skip` labelled ones (a source without
    splits, such as ArrayRecord shards, gives the probe's test set the records after its
    training set)."""
    cfg = eval_input(config)
    if cfg.source == "synthetic":
        arrays = pipeline.load_probe_arrays(config, split, num_examples)
        return {"image": arrays["image"], "segmentation": arrays["segmentation"],
                "labels": {t: arrays[f"label_{t}"] for t in tasks_of(config)}}
    src = make_source(cfg, split)
    size, with_masks = int(cfg.image_size), bool(cfg.get("segmentation_key", ""))
    ignore = int(config.probe.get("segmentation_ignore", 255))
    images, labels, masks, skipped = [], [], [], collections.Counter()
    for index in range(len(src)):
        if len(images) == num_examples + skip:
            break
        try:
            record = src[index]
            label = int(record.get("label", -1))
            if label < 0 and _needs_label(cfg):
                skipped["no_label"] += 1
                continue
            image = record["image"]
            image = decode_image(image) if isinstance(image, (bytes, bytearray)) else image
            mask = _checked_mask(record["segmentation"], image, ignore) if with_masks else None
        except Exception as e:  # noqa: BLE001 - skipped and counted by kind, as in training
            skipped[getattr(e, "kind", "bad_record")] += 1
            continue
        keep = len(images) >= skip
        images.append(transforms.normalize(center_crop(image, size)) if keep else None)
        masks.append(center_crop(mask, size, nearest=True) if keep and with_masks else None)
        labels.append(label)
    images, labels, masks = images[skip:], labels[skip:], masks[skip:]
    if len(images) < num_examples:
        what = "labelled images" if _needs_label(cfg) else "images with a mask"
        raise ValueError(f"probe split {split!r} of {cfg.source} has {len(images) + skip} "
                         f"{what}, fewer than the {num_examples + skip} asked for "
                         f"(skipped: {dict(skipped) or 'none'}).")
    segmentation = None
    if with_masks:
        segmentation = np.stack(masks)
        small = segmentation.min() >= 0 and segmentation.max() < 256
        segmentation = segmentation.astype(np.uint8 if small else np.int32)
    return {"image": np.stack(images).astype(np.float32), "segmentation": segmentation,
            "labels": {t: np.asarray(labels, np.int32) for t in tasks_of(config)},
            "skipped": dict(skipped)}


def _checked_mask(mask: np.ndarray, image: np.ndarray, ignore: int) -> np.ndarray:
    """Raises BadRecord (counted by kind) for a mask the dense evaluator cannot use."""
    if mask.shape[:2] != image.shape[:2]:
        raise BadRecord("mask_size", f"mask {mask.shape[:2]} is not the image's size "
                        f"{image.shape[:2]}")
    if mask.min() < 0 and (mask[mask < 0] != ignore).any():
        raise BadRecord("negative_mask", "the mask has negative classes other than "
                        f"probe.segmentation_ignore={ignore}")
    return mask


def center_crop(image: np.ndarray, size: int, nearest: bool = False) -> np.ndarray:
    """Resize the shorter side to `size`, then cut the central size x size square. Bilinear,
    or `nearest` neighbour (for label masks: no class is blended into another), with the same
    half-pixel-centre geometry."""
    h, w = image.shape[:2]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (nh - size) // 2, (nw - size) // 2
    if nearest:
        rows = np.minimum(((np.arange(top, top + size) + 0.5) * (h / nh)).astype(np.int64), h - 1)
        cols = np.minimum(((np.arange(left, left + size) + 0.5) * (w / nw)).astype(np.int64),
                          w - 1)
        return image[rows][:, cols]
    image = transforms.resize_bilinear(image, nh, nw)
    return image[top:top + size, left:left + size]


# The encoder (a hashable flax module) is static: every evaluation of a run, and the train and
# test splits, reuse one compiled program per batch shape instead of compiling it again.
@functools.partial(jax.jit, static_argnums=0)
def _encode_batch(encoder, params, images):
    return encoder.apply({"params": params}, images).astype(jnp.float32)


def encode(encoder, params, images: np.ndarray, batch_size: int = 256):
    """(pooled (n, D), tokens (n, N, D)) of the frozen encoder, float32 numpy. The last batch is
    padded to the batch size so one program serves every batch."""
    tokens = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        pad = batch_size - len(chunk) if len(images) > batch_size else 0
        padded = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        tokens.append(np.asarray(_encode_batch(encoder, params, padded))[:len(chunk)])
    tokens = np.concatenate(tokens)
    return tokens.mean(1), tokens


def extract(encoder, params, data: dict, batch_size: int) -> Split:
    pooled, tokens = encode(encoder, params, data["image"], batch_size)
    return Split(pooled, tokens, data["labels"], data["segmentation"])
