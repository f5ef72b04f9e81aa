"""Schedules hit their end points; weight decay skips 1-D parameters; frozen text stays put."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import synthetic_tiny
from tcjepa_jax import optim


@pytest.fixture
def config():
    config = synthetic_tiny.get_config()
    config.total_steps = 1000
    config.optim.warmup_steps = 100
    return config


def test_learning_rate_warmup_then_cosine(config):
    lr = optim.learning_rate_schedule(config.optim, config.total_steps)
    np.testing.assert_allclose(lr(0), config.optim.lr_start, rtol=1e-6)
    np.testing.assert_allclose(lr(100), config.optim.lr_peak, rtol=1e-6)
    np.testing.assert_allclose(lr(1000), config.optim.lr_end, rtol=1e-5)
    values = np.array([lr(s) for s in range(100, 1001, 50)])
    assert np.all(np.diff(values) < 0)  # cosine decay is monotone after warm-up


def test_weight_decay_rises_on_cosine(config):
    wd = optim.weight_decay_schedule(config.optim, config.total_steps)
    np.testing.assert_allclose(wd(0), 0.04, rtol=1e-6)
    np.testing.assert_allclose(wd(500), (0.04 + 0.4) / 2, rtol=1e-5)
    np.testing.assert_allclose(wd(1000), 0.4, rtol=1e-6)


def test_ema_momentum_linear(config):
    config.optim.ema_start = 0.996
    m = optim.ema_momentum_schedule(config.optim, config.total_steps)
    np.testing.assert_allclose(m(0), 0.996, rtol=1e-7)
    np.testing.assert_allclose(m(500), 0.998, rtol=1e-7)
    np.testing.assert_allclose(m(1000), 1.0, rtol=1e-7)
    np.testing.assert_allclose(m(5000), 1.0, rtol=1e-7)


def test_no_decay_on_vectors_and_frozen_text(config):
    params = {"encoder": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,)),
                          "qkv": {"bias": jnp.ones((2, 2))}},
              "predictor": {"scale": jnp.ones((4,))},
              "text": {"embedding": jnp.ones((8, 4))}}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    tx = optim.make_optimizer(config)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    # With zero gradients only weight decay moves parameters: the matrix, not the vectors.
    assert float(jnp.abs(updates["encoder"]["kernel"]).max()) > 0
    assert float(jnp.abs(updates["encoder"]["bias"]).max()) == 0
    assert float(jnp.abs(updates["encoder"]["qkv"]["bias"]).max()) == 0  # 2-D, still a bias
    assert float(jnp.abs(updates["predictor"]["scale"]).max()) == 0
    # The frozen text encoder gets no update even with a gradient.
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["text"]["embedding"]).max()) == 0
    config.model.text_trainable = True
    tx = optim.make_optimizer(config)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(jnp.abs(updates["text"]["embedding"]).max()) > 0


def test_decay_step_is_lr_times_wd(config):
    # Decoupled decay as in PyTorch's AdamW: with a zero gradient, p <- p - lr * wd * p.
    params = {"encoder": {"kernel": jnp.full((4, 4), 2.0)}, "predictor": {}}
    tx = optim.make_optimizer(config)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    expected = -config.optim.lr_start * config.optim.wd_start * 2.0
    np.testing.assert_allclose(updates["encoder"]["kernel"], expected, rtol=1e-5)
