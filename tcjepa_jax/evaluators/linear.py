"""Linear probe on average-pooled patch tokens: accuracy per image-level task."""

import numpy as np

from tcjepa_jax.evaluators import _probes


def evaluate(features, config) -> dict:
    del config
    train, test = features.train, features.test
    results = {}
    for task, y_train in train.labels.items():
        y_test = test.labels[task]
        pred = _probes.fit_predict(train.pooled, y_train, test.pooled,
                                   _probes.num_classes(y_train, y_test))
        results[task] = float(np.mean(pred == y_test))
    return results
