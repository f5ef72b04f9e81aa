"""Linear probes on frozen features (docs/method.md).

Image-level tasks probe the average-pooled patch tokens; the "patch" task probes every patch
token for the label of the object covering it (a dense probe). The probe is a multinomial
logistic regression on standardised features, full batch, its L2 strength picked on a held-out
fifth of the probe's training set.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import linen as nn

from tcjepa_jax import paths
from tcjepa_jax import step as step_lib
from tcjepa_jax.data import pipeline

L2_GRID = (1e-4, 1e-3, 1e-2)
# The dense probe sees every patch of this many images (64 patches each at the default size).
MAX_PATCH_IMAGES = 500


def encode(encoder, params, images: np.ndarray, batch_size: int = 256):
    """Returns (pooled (n, D), patch tokens (n, N, D)) as float32 numpy."""
    apply = jax.jit(lambda p, x: encoder.apply({"params": p}, x).astype(jnp.float32))
    tokens = []
    for start in range(0, len(images), batch_size):
        tokens.append(np.asarray(apply(params, images[start:start + batch_size])))
    tokens = np.concatenate(tokens)
    return tokens.mean(1), tokens


def patch_labels(segmentation: np.ndarray, patch_size: int) -> np.ndarray:
    """The majority label of each patch: (n, H, W) -> (n, H/p * W/p)."""
    n, h, w = segmentation.shape
    classes = int(segmentation.max()) + 1
    onehot = np.eye(classes, dtype=np.int32)[segmentation]
    counts = onehot.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size, classes)
    return counts.sum((2, 4)).argmax(-1).reshape(n, -1)


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit(x, y, l2, num_classes: int, steps: int = 300):
    params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
    tx = optax.adam(0.05)

    def loss(p):
        logits = x @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() + l2 * jnp.sum(
            jnp.square(p["w"]))

    def body(_, carry):
        p, s = carry
        updates, s = tx.update(jax.grad(loss)(p), s)
        return optax.apply_updates(p, updates), s

    params, _ = jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))
    return params


def _accuracy(params, x, y) -> float:
    return float(np.mean(np.argmax(x @ np.asarray(params["w"]) + np.asarray(params["b"]), -1) == y))


def fit_linear_probe(x_train, y_train, x_test, y_test, num_classes: int) -> dict:
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    split = len(x_train) * 4 // 5
    scores = {}
    for l2 in L2_GRID:
        params = _fit(x_train[:split], y_train[:split], l2, num_classes)
        scores[l2] = _accuracy(params, x_train[split:], y_train[split:])
    best = max(scores, key=scores.get)
    params = _fit(x_train, y_train, best, num_classes)
    return {"accuracy": _accuracy(params, x_test, y_test), "l2": best}


def run_probes(encoder, params, train: dict, test: dict, tasks, patch_size: int,
               batch_size: int = 256) -> dict:
    """Accuracy of a linear probe per task on the encoder's frozen features."""
    pooled_train, tokens_train = encode(encoder, params, train["image"], batch_size)
    pooled_test, tokens_test = encode(encoder, params, test["image"], batch_size)
    results = {}
    for task in tasks:
        if task == "patch":
            n = MAX_PATCH_IMAGES
            y_train = patch_labels(train["segmentation"][:n], patch_size).reshape(-1)
            y_test = patch_labels(test["segmentation"][:n], patch_size).reshape(-1)
            x_train = tokens_train[:n].reshape(-1, tokens_train.shape[-1])
            x_test = tokens_test[:n].reshape(-1, tokens_test.shape[-1])
        else:
            y_train, y_test = train[f"label_{task}"], test[f"label_{task}"]
            x_train, x_test = pooled_train, pooled_test
        num_classes = int(max(y_train.max(), y_test.max())) + 1
        results[task] = fit_linear_probe(x_train, np.asarray(y_train), x_test,
                                         np.asarray(y_test), num_classes)["accuracy"]
    return results


def probe_trained_and_init(config, workdir: str, models, ema_params) -> dict:
    """Probes of the trained target encoder next to the same probes at initialisation.

    Probe data are the held-out "validation" (probe training) and "test" splits of the source.
    Writes workdir/probe.json and returns {"probe/<task>/<trained|random_init>": accuracy}.
    """
    train = pipeline.load_probe_arrays(config, "validation", config.probe.num_train)
    test = pipeline.load_probe_arrays(config, "test", config.probe.num_test)
    rng = step_lib.init_rng(config)
    init_encoder = jax.jit(lambda: nn.unbox(step_lib.init_params(models, config, rng))["encoder"])()
    results = {}
    for name, params in (("trained", ema_params), ("random_init", init_encoder)):
        accuracy = run_probes(models.encoder, params, train, test, config.probe.tasks,
                              models.encoder.patch_size, config.probe.batch_size)
        for task, value in accuracy.items():
            results[f"probe/{task}/{name}"] = value
    lines = [f"  {task:>8s}: trained {results[f'probe/{task}/trained']:.3f}   "
             f"random init {results[f'probe/{task}/random_init']:.3f}" for task in config.probe.tasks]
    logging.info("Linear probe accuracy on held-out synthetic scenes:\n%s", "\n".join(lines))
    if jax.process_index() == 0:
        paths.write_text(os.path.join(workdir, "probe.json"), json.dumps(results, indent=2))
    return results
