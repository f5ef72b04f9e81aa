"""k-nearest-neighbour classification on average-pooled features, as in DINO's protocol.

Features are L2-normalised; each test image takes its k most cosine-similar training images,
each voting for its class with weight exp(similarity / T); the class with the largest sum
wins. k = probe.knn_k (DINO: 20), T = probe.knn_temperature (DINO: 0.07).
"""

import numpy as np

from tcjepa_jax.evaluators import _probes


def knn_predict(x_train, y_train, x_test, num_classes: int, k: int, temperature: float,
                chunk: int = 1024) -> np.ndarray:
    def unit(x):
        return x / (np.linalg.norm(x, axis=-1, keepdims=True) + 1e-12)

    x_train, x_test = unit(x_train.astype(np.float32)), unit(x_test.astype(np.float32))
    k = min(k, len(x_train))
    predictions = []
    for start in range(0, len(x_test), chunk):
        sim = x_test[start:start + chunk] @ x_train.T                       # (c, n)
        nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]              # (c, k)
        weights = np.exp(np.take_along_axis(sim, nearest, 1) / temperature)
        votes = np.zeros((len(sim), num_classes))
        np.add.at(votes, (np.arange(len(sim))[:, None], y_train[nearest]), weights)
        predictions.append(votes.argmax(1))
    return np.concatenate(predictions)


def evaluate(features, config) -> dict:
    k = int(config.probe.get("knn_k", 20))
    temperature = float(config.probe.get("knn_temperature", 0.07))
    return _probes.accuracy_per_task(
        features, lambda x, y, x_test, classes: knn_predict(x, y, x_test, classes, k, temperature))
