"""Dense linear probe: a linear classifier on every patch token, scored per pixel as mIoU.

The probe learns each patch's majority pixel label (on at most probe.dense_images images of
the probe-training split); its patch predictions are repeated over the patch's pixels and
compared with the per-pixel labels of the test split. mIoU averages, over the classes present
in the labels or the predictions, |prediction ∩ label| / |prediction ∪ label|. Pixels labelled
probe.segmentation_ignore (255 by default) neither train nor score the probe: a patch's label is
the majority of its other pixels, and a patch with no other pixel is left out. Needs a source
with per-pixel labels: the synthetic scenes, or a TFDS set with probe.segmentation_key.
"""

import numpy as np

from tcjepa_jax.evaluators import _probes


def patch_labels(segmentation: np.ndarray, patch_size: int, ignore=None) -> np.ndarray:
    """The majority label of each patch: (n, H, W) -> (n, H/p * W/p) int32. Pixels labelled
    `ignore` do not vote; a patch with only such pixels gets `ignore`. Ties go to the smaller
    class."""
    n, h, w = segmentation.shape
    p = patch_size
    patches = segmentation.reshape(n, h // p, p, w // p, p).transpose(0, 1, 3, 2, 4)
    patches = patches.reshape(-1, p * p).astype(np.int64)
    valid = patches != ignore if ignore is not None else np.ones(patches.shape, bool)
    classes = int(patches[valid].max()) + 1 if valid.any() else 1
    out = np.full(len(patches), -1 if ignore is None else ignore, np.int32)
    chunk = max(1, (1 << 24) // (classes * p * p))  # bounds the counts' memory
    for start in range(0, len(patches), chunk):
        block, ok = patches[start:start + chunk], valid[start:start + chunk]
        rows = np.broadcast_to(np.arange(len(block))[:, None], block.shape)
        counts = np.bincount((rows * classes + block)[ok], minlength=len(block) * classes)
        counts = counts.reshape(len(block), classes)
        out[start:start + chunk] = np.where(ok.any(1), counts.argmax(1), out[start:start + chunk])
    return out.reshape(n, -1)


def mean_iou(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    pred, label = pred.reshape(-1).astype(np.int64), label.reshape(-1).astype(np.int64)
    confusion = np.bincount(label * num_classes + pred, minlength=num_classes ** 2)
    confusion = confusion.reshape(num_classes, num_classes)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return float(np.mean(intersection[present] / union[present]))


def evaluate(features, config) -> dict:
    train, test = features.train, features.test
    if train.segmentation is None:
        raise ValueError("the dense evaluator needs per-pixel labels, which this probe source "
                         "does not have: set probe.segmentation_key (a TFDS mask feature), or "
                         "remove 'dense' from config.probe.evaluators.")
    n, p = int(config.probe.get("dense_images", 500)), features.patch_size
    ignore = int(config.probe.get("segmentation_ignore", 255))
    width = train.tokens.shape[-1]
    y_train = patch_labels(train.segmentation[:n], p, ignore).reshape(-1)
    x_train = train.tokens[:n].reshape(-1, width)[y_train != ignore]
    y_train = y_train[y_train != ignore]
    label = test.segmentation[:n]
    scored = label != ignore
    if not len(y_train) or not scored.any():
        which = "test" if len(y_train) else "training"
        raise ValueError(f"every pixel of the dense probe's {which} images is labelled "
                         f"probe.segmentation_ignore={ignore}: nothing to fit or score.")
    x_test = test.tokens[:n]
    classes = _probes.num_classes(y_train, label[scored])
    pred = _probes.fit_predict(x_train, y_train, x_test.reshape(-1, width), classes)
    grid_h, grid_w = label.shape[1] // p, label.shape[2] // p
    pixels = np.repeat(np.repeat(pred.reshape(len(x_test), grid_h, grid_w), p, 1), p, 2)
    test_patches = patch_labels(label, p, ignore).reshape(-1)
    return {"miou": mean_iou(pixels[scored], label[scored], classes),
            "pixel_accuracy": float(np.mean(pixels[scored] == label[scored])),
            "patch_accuracy": float(np.mean((pred == test_patches)[test_patches != ignore]))}
