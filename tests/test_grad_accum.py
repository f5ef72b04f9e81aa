"""Gradient accumulation: k micro-batches inside the jitted step equal one step on the batch."""

import jax
import numpy as np
import pytest

from tcjepa_jax import step as step_lib
from tcjepa_jax.config_lib import UserError
from tcjepa_jax.data import pipeline
from tcjepa_jax.experiment import setup

import test_train  # the tiny config, its Setup helper and the shared compile cache


def _one_step(tokenizer_path, accum, mesh=(("data", 2), ("fsdp", 2)), conditioning="all"):
    config = test_train.tiny_config(tokenizer_path, mesh=mesh)
    config.grad_accum = accum
    config.model.conditioning = conditioning
    run = test_train.Setup(config, devices=jax.devices()[:4])
    state = step_lib.create_train_state(run.models, config, run.tx, run.shardings)
    it = pipeline.make_train_iterator(config, run.tokenizer, run.models.mask_spec)
    batch = run.batch(next(it))
    state, metrics = run.step(state, batch)
    return jax.device_get(state), jax.device_get(metrics)


# "none" (I-JEPA) is in the default run; "all" adds the text path (slow: CI time).
@pytest.mark.parametrize("conditioning", [pytest.param("all", marks=pytest.mark.slow), "none"])
def test_four_micro_batches_equal_one_batch(tokenizer_path, conditioning):
    whole_state, whole = _one_step(tokenizer_path, 1, conditioning=conditioning)
    accum_state, accum = _one_step(tokenizer_path, 4, conditioning=conditioning)
    for name in ("loss", "loss_pred", "loss_sparse", "loss_consistency", "grad_norm", "lr"):
        np.testing.assert_allclose(accum[name], whole[name], rtol=2e-5, atol=1e-7, err_msg=name)
    if conditioning == "all":
        assert float(whole["loss_sparse"]) > 0  # the penalty terms really were compared
        np.testing.assert_allclose(accum["o_mean/layer0"], whole["o_mean/layer0"], rtol=2e-5)
    assert int(accum_state.step) == int(whole_state.step) == 1  # schedules and EMA step once
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(accum_state),
                                 jax.tree_util.tree_leaves_with_path(whole_state)):
        # Adam's first step moves each parameter by about lr * sign(g): compare at that scale.
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_micro_batches_must_divide_each_device_share(tokenizer_path, tmp_path):
    config = test_train.tiny_config(tokenizer_path)  # batch 16 over 8 devices: 2 each
    config.grad_accum = 4
    with pytest.raises(UserError, match="grad_accum=4"):
        setup(config, str(tmp_path))


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)
