"""Per-example numpy transforms. Each random one takes an explicit np.random.Generator."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def crop_box(height: int, width: int, rng: np.random.Generator,
                          scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params: (top, left, h, w); 10 tries, then a centre crop."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def _axis(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel-centre bilinear sample positions (align_corners=False) along one axis."""
    pos = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
    pos = np.clip(pos, 0, n_in - 1)
    lo = np.floor(pos).astype(np.int32)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (pos - lo).astype(np.float32)


def resize_bilinear(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Bilinear resize (no antialiasing) of (H, W, C) to float32 (out_h, out_w, C)."""
    image = np.asarray(image, np.float32)
    y0, y1, wy = _axis(image.shape[0], out_h)
    x0, x1, wx = _axis(image.shape[1], out_w)
    rows = image[y0] * (1 - wy)[:, None, None] + image[y1] * wy[:, None, None]
    return rows[:, x0] * (1 - wx)[None, :, None] + rows[:, x1] * wx[None, :, None]


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, out_size: int,
                                                scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3)) -> np.ndarray:
    """Random crop (torchvision semantics) resized to (out_size, out_size); float32 in [0, 255].

    Pillow's bilinear resize of the crop box, antialiased when shrinking, as torchvision's
    RandomResizedCrop on PIL images (the I-JEPA reference) does; it also reads only the box.
    """
    top, left, h, w = crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    resized = Image.fromarray(np.asarray(image, np.uint8)).resize(
            (out_size, out_size), Image.BILINEAR, box=(left, top, left + w, top + h))
    return np.asarray(resized, np.float32)


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8-range image (H, W, 3) -> float32 normalised with the ImageNet mean and std."""
    return ((np.asarray(image, np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def sample_captions(captions: Sequence[str], rng: np.random.Generator,
                                        num: int) -> tuple[list[str], np.ndarray]:
    """min(num, M) captions without replacement, padded with "" to num; and their validity."""
    n = min(num, len(captions))
    picked = [captions[i] for i in rng.permutation(len(captions))[:n]]
    valid = np.zeros((num,), bool)
    valid[:n] = True
    return picked + [""] * (num - n), valid
