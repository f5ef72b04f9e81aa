"""A linear classifier on frozen features, shared by the linear and dense evaluators.

Multinomial logistic regression on standardised features, full batch (Adam, a fixed number of
steps), its L2 strength picked on a held-out fifth of the training set.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

L2_GRID = (1e-4, 1e-3, 1e-2)


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


def _predict(params, x) -> np.ndarray:
    return np.argmax(x @ np.asarray(params["w"]) + np.asarray(params["b"]), -1)


def fit_predict(x_train, y_train, x_test, num_classes: int) -> np.ndarray:
    """Predicted classes of x_test from a probe fitted on (x_train, y_train)."""
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    split = len(x_train) * 4 // 5
    scores = {}
    for l2 in L2_GRID:
        params = _fit(x_train[:split], y_train[:split], l2, num_classes)
        scores[l2] = float(np.mean(_predict(params, x_train[split:]) == y_train[split:]))
    params = _fit(x_train, y_train, max(scores, key=scores.get), num_classes)
    return _predict(params, x_test)


def num_classes(*labels) -> int:
    return int(max(int(np.max(y)) for y in labels)) + 1


def accuracy_per_task(features, predict, use: str = "pooled") -> dict:
    """{task: test accuracy} of predict(x_train, y_train, x_test, num_classes) on each
    image-level task, x being the splits' `use` features ("pooled" or "tokens")."""
    train, test = features.train, features.test
    results = {}
    for task, y_train in train.labels.items():
        y_test = test.labels[task]
        pred = predict(getattr(train, use), y_train, getattr(test, use),
                       num_classes(y_train, y_test))
        results[task] = float(np.mean(pred == y_test))
    return results
