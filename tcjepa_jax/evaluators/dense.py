"""Dense linear probe: a linear classifier on every patch token, scored per pixel as mIoU.

The probe learns each patch's majority pixel label (on at most probe.dense_images images of
the probe-training split); its patch predictions are repeated over the patch's pixels and
compared with the per-pixel labels of the test split. mIoU averages, over the classes present
in the labels or the predictions, |prediction ∩ label| / |prediction ∪ label|. Needs a source
with per-pixel labels (the synthetic scenes).
"""

import numpy as np

from tcjepa_jax.evaluators import _probes


def patch_labels(segmentation: np.ndarray, patch_size: int) -> np.ndarray:
    """The majority label of each patch: (n, H, W) -> (n, H/p * W/p)."""
    n, h, w = segmentation.shape
    classes = int(segmentation.max()) + 1
    onehot = np.eye(classes, dtype=np.int32)[segmentation]
    counts = onehot.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size, classes)
    return counts.sum((2, 4)).argmax(-1).reshape(n, -1)


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
                         "does not have; remove 'dense' from config.probe.evaluators.")
    n, p = int(config.probe.get("dense_images", 500)), features.patch_size
    y_train = patch_labels(train.segmentation[:n], p).reshape(-1)
    width = train.tokens.shape[-1]
    x_test = test.tokens[:n]
    classes = _probes.num_classes(y_train, test.segmentation[:n])
    pred = _probes.fit_predict(train.tokens[:n].reshape(-1, width), y_train,
                               x_test.reshape(-1, width), classes)
    grid = test.segmentation.shape[1] // p
    pixels = np.repeat(np.repeat(pred.reshape(len(x_test), grid, grid), p, 1), p, 2)
    label = test.segmentation[:n]
    return {"miou": mean_iou(pixels, label, classes),
            "pixel_accuracy": float(np.mean(pixels == label)),
            "patch_accuracy": float(np.mean(pred == patch_labels(label, p).reshape(-1)))}
