"""Linear probe on average-pooled patch tokens: accuracy per image-level task."""

from tcjepa_jax.evaluators import _probes


def evaluate(features, config) -> dict:
    del config
    return _probes.accuracy_per_task(features, _probes.fit_predict)
