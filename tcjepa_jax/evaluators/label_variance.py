"""How much of the average-pooled features' variance each image-level label explains.

Fits nothing. For each task, on the probe-test images: the between-class sum of squares of the
pooled features over their total sum of squares (eta squared, summed over feature dimensions),
0 when the class means coincide, 1 when every image sits on its class mean. It tells why the
kNN probe, whose cosine similarity weighs directions by their variance, misses an attribute
that the linear probe (standardised features) finds: a label can be decodable and still explain
almost none of the variance. Also `effective_rank` of the pooled features (exp of the entropy
of their covariance's normalised eigenvalues).
"""

import numpy as np


def explained_share(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    centred = x - x.mean(0)
    total = float(np.sum(centred ** 2))
    if total == 0.0:
        return 0.0
    between = sum(float(np.sum(y == c)) * float(np.sum(centred[y == c].mean(0) ** 2))
                  for c in np.unique(y))
    return between / total


def effective_rank(x: np.ndarray) -> float:
    eigenvalues = np.clip(np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False)), 0, None)
    if eigenvalues.sum() == 0.0:
        return 0.0
    p = eigenvalues[eigenvalues > 0] / eigenvalues.sum()
    return float(np.exp(-np.sum(p * np.log(p))))


def evaluate(features, config) -> dict:
    del config
    test = features.test
    results = {task: explained_share(test.pooled, y) for task, y in test.labels.items()}
    results["effective_rank"] = effective_rank(test.pooled)
    return results
