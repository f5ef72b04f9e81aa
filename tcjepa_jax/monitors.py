"""Health monitors of a JEPA run: signs of representation collapse, measured every step.

Computed inside the jitted step from tensors the loss already has (so no extra host sync), and
logged with the other metrics under `monitor/`:

    monitor/target_std      mean over dimensions of the per-dimension std of the target
                            encoder's output tokens (before the loss's normalisation)
    monitor/target_rank     effective rank (RankMe: exp of the entropy of the normalised
                            singular values) of those tokens, between 1 and the width
    monitor/pred_std        the same std for the predictor's outputs at valid target slots
    monitor/pred_target_cos mean cosine between predictions and their targets

A collapsing encoder maps every patch to nearly the same vector: the std and the rank fall
long before the loss looks wrong (the loss of a collapsed JEPA is small). `CollapseWatch`
compares them with their first logged values and warns in the console.
"""

import jax
import jax.numpy as jnp
from absl import logging


def _masked_moments(x, weight):
    """Mean (D,) and covariance (D, D) of rows of x (n, D) weighted by weight (n,)."""
    total = jnp.maximum(weight.sum(), 1.0)
    mean = (x * weight[:, None]).sum(0) / total
    centred = (x - mean) * weight[:, None]
    return mean, (centred.T @ (x - mean)) / total


def effective_rank(cov):
    """RankMe (Garrido et al., 2023) from a covariance matrix: the singular values of the
    centred feature matrix are the square roots of its eigenvalues."""
    sigma = jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(cov.astype(jnp.float32)), 0.0))
    p = sigma / (sigma.sum() + 1e-12) + 1e-7
    return jnp.exp(-jnp.sum(p * jnp.log(p)))


def feature_stats(x, weight=None):
    """(mean per-dimension std, effective rank) of rows of x (..., D), optionally weighted."""
    x = jax.lax.stop_gradient(x.astype(jnp.float32)).reshape(-1, x.shape[-1])
    weight = jnp.ones(x.shape[:1]) if weight is None else weight.reshape(-1).astype(jnp.float32)
    _, cov = _masked_moments(x, weight)
    return jnp.sqrt(jnp.maximum(jnp.diagonal(cov), 0.0)).mean(), effective_rank(cov)


def health_metrics(raw_target, pred, targets, target_valid) -> dict:
    """raw_target (B, N, D): the target encoder's tokens; pred, targets (B, K, T, D) and
    target_valid (B, K, T): the predictions and what they are compared with."""
    target_std, target_rank = feature_stats(raw_target)
    pred_std, _ = feature_stats(pred, target_valid)
    pred = jax.lax.stop_gradient(pred.astype(jnp.float32))
    cos = jnp.sum(pred * targets, -1) * jax.lax.rsqrt(
        jnp.sum(pred * pred, -1) * jnp.sum(targets * targets, -1) + 1e-12)
    valid = target_valid.astype(jnp.float32)
    return {"monitor/target_std": target_std, "monitor/target_rank": target_rank,
            "monitor/pred_std": pred_std,
            "monitor/pred_target_cos": jnp.sum(cos * valid) / jnp.maximum(valid.sum(), 1.0)}


class CollapseWatch:
    """Warns when the target features' std or effective rank falls below `fraction` of its
    first logged value (config.monitor.collapse_fraction; 0 turns the warning off)."""

    WATCHED = ("monitor/target_std", "monitor/target_rank")

    def __init__(self, fraction: float):
        self.fraction = float(fraction)
        self.initial = {}
        self.warned = set()

    def update(self, step: int, metrics: dict) -> list:
        """Returns the names that collapsed at this step (and logs a warning for each)."""
        fired = []
        for name in self.WATCHED:
            if name not in metrics or self.fraction <= 0:
                continue
            value = float(metrics[name])
            start = self.initial.setdefault(name, value)
            if start > 0 and value < self.fraction * start and name not in self.warned:
                self.warned.add(name)
                fired.append(name)
                logging.warning(
                    "Possible collapse at step %d: %s = %.4g, below %.0f%% of its value at the "
                    "start of the run (%.4g). The target encoder is mapping patches to ever more "
                    "similar features; check the learning rate, the EMA momentum and the masks.",
                    step, name, value, 100 * self.fraction, start)
        return fired
