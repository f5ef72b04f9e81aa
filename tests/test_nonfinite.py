"""NaN / Inf in the loss or the gradients (config.nonfinite, docs/reliability.md): a NaN put
into the images of chosen steps makes the run stop (action "stop") or skip those steps (action
"skip") and stop after nonfinite.max_skips_in_a_row of them in a row; a skipped step leaves the
parameters, the EMA and the optimizer state untouched.

The tiny config of test_train.py on its 8 fake CPU devices. The skip runs and the step-level
test share one compiled step (same config); the stop run compiles the default one.
"""

import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax import nonfinite as nonfinite_lib
from tcjepa_jax import sharding as shard_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax import train as train_lib
from tcjepa_jax.nonfinite import NonFiniteError
from tcjepa_jax.config_lib import UserError, run_command
from tcjepa_jax.data import pipeline

import test_train  # the tiny config, its Setup helper and the shared compile cache

STEPS = test_train.TOTAL_STEPS  # 6


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)


@pytest.fixture
def keep_sigterm_handler():
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _config(tokenizer_path, action):
    config = test_train.tiny_config(tokenizer_path)
    config.log_every = 5          # metrics fetched at steps 1, 5 and 6 only
    config.checkpoint_every = 2   # saves at steps 2, 4 and 6
    config.nonfinite.action = action
    config.nonfinite.max_skips_in_a_row = 2
    return config


def _poison(image):
    image = np.array(image)
    image[0] = np.nan
    return image


def _inject_nan(monkeypatch, bad_steps):
    """train.py makes the batch of step k with the k-th make_global_batch call (a fresh run);
    the images of `bad_steps` get a NaN image."""
    calls = []
    original = shard_lib.make_global_batch

    def poisoned(host_batch, *args, **kwargs):
        calls.append(None)
        if len(calls) in bad_steps:
            host_batch = dict(host_batch, image=_poison(host_batch["image"]))
        return original(host_batch, *args, **kwargs)

    monkeypatch.setattr(shard_lib, "make_global_batch", poisoned)


def _checkpoints(config, workdir):
    checkpointer = ckpt_lib.Checkpointer(workdir, config)
    try:
        setup = test_train.Setup(config)
        steps = sorted(checkpointer.manager.all_steps())
        return steps, jax.device_get(checkpointer.restore(
            steps[-1], setup.abstract_state()))
    finally:
        checkpointer.close()


def _all_finite(tree):
    return all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree))


# ---- The check itself ------------------------------------------------------------------------

def test_nonfinite_gradients_alone_are_detected():
    """A NaN or Inf only in the gradients (the loss finite) fails the check, as does a
    non-finite loss; finite ones pass."""
    grads = {"encoder": {"w": jnp.ones((3, 2))}, "predictor": {"b": jnp.zeros(4)}}
    ok, norm = nonfinite_lib.finite_update(jnp.float32(1.5), grads)
    assert bool(ok) and float(norm) == pytest.approx(np.sqrt(6.0))
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = jax.tree.map(lambda x: x, grads)
        poisoned["predictor"]["b"] = poisoned["predictor"]["b"].at[2].set(bad)
        ok, _ = nonfinite_lib.finite_update(jnp.float32(1.5), poisoned)
        assert not bool(ok), bad
        ok, _ = nonfinite_lib.finite_update(jnp.float32(bad), grads)
        assert not bool(ok), bad


def test_counters():
    zero = {name: jnp.int32(0) for name in nonfinite_lib.NONFINITE_COUNTERS}

    def run(limit, oks):
        counters, out = zero, []
        for step, ok in enumerate(oks, start=1):
            counters = nonfinite_lib.count_nonfinite(counters, jnp.bool_(ok), step, limit)
            out.append({k: int(v) for k, v in counters.items()})
        return out

    # stop (limit 1): latched at the first non-finite step, whatever follows.
    out = run(1, [True, False, True, False])
    assert [c["stop_step"] for c in out] == [0, 2, 2, 2]
    assert [c["total"] for c in out] == [0, 1, 1, 2]
    # skip, max_skips_in_a_row=2: single bad steps are counted; the second in a row latches.
    out = run(2, [False, True, False, True, False, False, False])
    assert [c["in_a_row"] for c in out] == [1, 0, 1, 0, 1, 2, 3]
    assert [c["total"] for c in out] == [1, 1, 2, 2, 3, 4, 5]
    assert [c["stop_step"] for c in out] == [0, 0, 0, 0, 0, 6, 6]


# ---- The jitted step -------------------------------------------------------------------------

def test_skipped_step_leaves_the_state_untouched(tokenizer_path):
    setup = test_train.Setup(_config(tokenizer_path, "skip"))
    it = pipeline.make_train_iterator(setup.config, setup.tokenizer, setup.models.mask_spec)
    batches = [jax.tree.map(np.asarray, next(it)) for _ in range(2)]
    state = step_lib.create_train_state(setup.models, setup.config, setup.tx, setup.shardings)
    state, _ = setup.step(state, setup.batch(batches[0]))
    before = jax.device_get(state)

    bad = dict(batches[1], image=_poison(batches[1]["image"]))
    state, metrics = setup.step(state, setup.batch(bad))
    after = jax.device_get(state)
    assert not np.isfinite(metrics["loss"])
    for name in ("params", "ema_params", "opt_state"):
        b, a = getattr(before, name), getattr(after, name)
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(x, y, err_msg=name + jax.tree_util.keystr(path))
    assert int(after.step) == int(before.step) + 1 == 2   # the batch is consumed
    assert {k: int(v) for k, v in after.nonfinite.items()} == {
        "total": 1, "in_a_row": 1, "stop_step": 0}

    # The next finite step trains again from there and ends the run of bad steps.
    state, metrics = setup.step(state, setup.batch(batches[1]))
    state = jax.device_get(state)
    assert np.isfinite(metrics["loss"]) and _all_finite(state)
    assert not np.array_equal(state.params["encoder"]["patch_embed"]["kernel"],
                              after.params["encoder"]["patch_embed"]["kernel"])
    assert {k: int(v) for k, v in state.nonfinite.items()} == {
        "total": 1, "in_a_row": 0, "stop_step": 0}


# ---- The training loop -----------------------------------------------------------------------

def test_stop(tokenizer_path, tmp_path, monkeypatch, keep_sigterm_handler):
    """NaN at step 3, between metrics fetches (1, 5): caught before the save of step 4, so the
    last checkpoint is step 2's (Orbax also saves a new run's first step); the command ends
    with one message, no traceback."""
    config = _config(tokenizer_path, "stop")
    workdir = str(tmp_path / "run")
    _inject_nan(monkeypatch, {3})
    with pytest.raises(NonFiniteError) as info:
        train_lib.train(config, workdir)
    message = str(info.value)
    assert isinstance(info.value, UserError) and isinstance(info.value, FloatingPointError)
    assert message.startswith("step 3: the loss or the gradients are not finite"), message
    assert "The last good checkpoint is step 2 " in message, message
    assert "--config.nonfinite.action=skip" in message
    steps, state = _checkpoints(config, workdir)
    assert steps[-1] == 2
    assert _all_finite(state) and int(state.nonfinite["stop_step"]) == 0

    # What the command line prints: run_command makes it "error: ..." and exit status 1.
    def fails():
        raise info.value
    with pytest.raises(SystemExit) as exit_info:
        run_command(fails)
    assert exit_info.value.code == "error: " + message


def test_skip_one_bad_step(tokenizer_path, tmp_path, monkeypatch, keep_sigterm_handler):
    config = _config(tokenizer_path, "skip")
    workdir = str(tmp_path / "run")
    _inject_nan(monkeypatch, {3})
    metrics = train_lib.train(config, workdir)
    assert metrics["nonfinite_skips"] == 1 and metrics["nonfinite_in_a_row"] == 0
    assert np.isfinite(metrics["loss"])
    steps, state = _checkpoints(config, workdir)
    assert steps[-1] == STEPS and _all_finite(state)
    assert {k: int(v) for k, v in state.nonfinite.items()} == {
        "total": 1, "in_a_row": 0, "stop_step": 0}


@pytest.mark.slow  # CI time; test_skip_one_bad_step and test_stop cover the counters
def test_skip_too_many_in_a_row(tokenizer_path, tmp_path, monkeypatch, keep_sigterm_handler):
    """max_skips_in_a_row=2: bad steps 3 and 4 end the run before step 4 is saved."""
    config = _config(tokenizer_path, "skip")
    workdir = str(tmp_path / "run")
    _inject_nan(monkeypatch, {3, 4})
    with pytest.raises(NonFiniteError) as info:
        train_lib.train(config, workdir)
    message = str(info.value)
    assert message.startswith("steps 3-4: 2 steps in a row had a non-finite loss or gradients"), \
        message
    assert "2 skipped in all" in message and "The last good checkpoint is step 2 " in message
    steps, state = _checkpoints(config, workdir)
    assert steps[-1] == 2 and _all_finite(state)
