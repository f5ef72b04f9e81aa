"""The sharded train step and the train loop: one compilation, mesh invariance, learning, resume,
and user errors reported before any compilation.

Everything runs a tiny TC-JEPA (32 px scenes, a 4x4 patch grid, one predictor block) on the 8 fake
CPU devices of conftest.py. The compiled step is shared through module-scoped fixtures, and a
persistent XLA cache (a temporary directory) lets the train.train runs of the resume test reuse the
programs compiled by the fixtures instead of compiling them again.
"""

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from configs import synthetic_tiny
from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax import optim
from tcjepa_jax import sharding as shard_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax import train as train_lib
from tcjepa_jax.config_lib import UserError
from tcjepa_jax.data import pipeline, synthetic
from tcjepa_jax.data.tokenizer import Tokenizer, train_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 6  # one value for every test, so every program is compiled once (see _CACHE_DIR)

# Must be set before the first compilation in this process; pytest imports every test module
# before running any test, so this holds for the whole session.
_CACHE_DIR = tempfile.mkdtemp(prefix="tcjepa-test-xla-cache-")
atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# ---- Compilation and tracing events --------------------------------------------------------

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_EVENTS = []


def _record_duration(event, duration, **kwargs):
    del duration
    _EVENTS.append((event, kwargs.get("fun_name", "")))


def _record_event(event, **kwargs):
    _EVENTS.append((event, kwargs.get("fun_name", "")))


@pytest.fixture(scope="module", autouse=True)
def _event_listeners():
    jax.monitoring.register_event_duration_secs_listener(_record_duration)
    jax.monitoring.register_event_listener(_record_event)
    yield
    jax.monitoring.unregister_event_duration_listener(_record_duration)
    jax.monitoring.unregister_event_listener(_record_event)


def _events(name):
    return [fun for event, fun in _EVENTS if event == name]


@contextlib.contextmanager
def traced_functions():
    """Names of the functions JAX traces inside the block: each is compiled, or loaded from the
    persistent cache above (which a count of compilations would miss)."""
    names = []

    def listener(event, duration, **kwargs):
        del duration
        if event == TRACE_EVENT:
            names.append(kwargs.get("fun_name", ""))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ---- Config and shared compiled work -------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A small SentencePiece model, trained once (train.train would train one per workdir)."""
    prefix = str(tmp_path_factory.mktemp("tokenizer") / "spm")
    return train_tokenizer(synthetic.iter_captions(0, 1000), prefix, vocab_size=256)


def tiny_config(tokenizer_path, mesh=(("data", 2), ("fsdp", 4))):
    config = synthetic_tiny.get_config("smoke")
    config.batch_size = 16
    config.total_steps = TOTAL_STEPS
    config.log_every = 1
    config.checkpoint_every = 3
    config.input.image_size = 32          # a 4x4 grid of 8 px patches
    config.input.num_captions = 2
    config.input.max_caption_len = 8
    config.masks.min_keep = 4             # 16 patches: the default 10 rarely survives 4 targets
    config.model.predictor_depth = 1
    config.optim.warmup_steps = 1
    config.probe.enabled = False
    config.tokenizer.model_path = tokenizer_path
    config.mesh = mesh
    return config


class Setup:
    """What train.py builds before the loop, for one mesh."""

    def __init__(self, config, devices=None):
        self.config = config
        self.tokenizer = Tokenizer(config.tokenizer.model_path)
        self.mesh = shard_lib.make_mesh(config, devices=devices)
        self.models = step_lib.build_models(config, self.tokenizer.vocab_size)
        self.tx = optim.make_optimizer(config)
        self.shardings = step_lib.state_shardings(self.models, config, self.tx, self.mesh)
        self.batch_sharding = shard_lib.batch_sharding(self.mesh)
        self.step = step_lib.jit_train_step(
            step_lib.make_train_step(self.models, config, self.tx, self.mesh), self.shardings,
            self.mesh)

    def state(self, host_state):
        """A fresh device copy of `host_state` in this mesh's layout (the step donates its input)."""
        return jax.device_put(host_state, self.shardings)

    def batch(self, host_batch):
        return shard_lib.make_global_batch(host_batch, self.batch_sharding)

    def abstract_state(self):
        shapes = jax.eval_shape(
            lambda: step_lib.create_train_state(self.models, self.config, self.tx, self.shardings))
        return ckpt_lib.abstract_like(shapes, self.shardings)


@pytest.fixture(scope="module")
def mesh8(tokenizer_path):
    return Setup(tiny_config(tokenizer_path))


@pytest.fixture(scope="module")
def host_init(mesh8):
    """The initial TrainState on the host, created the way train.py creates it."""
    state = step_lib.create_train_state(mesh8.models, mesh8.config, mesh8.tx, mesh8.shardings)
    return jax.device_get(state)


@pytest.fixture(scope="module")
def host_batches(mesh8):
    """The first TOTAL_STEPS batches of the real pipeline, as numpy."""
    it = pipeline.make_train_iterator(mesh8.config, mesh8.tokenizer, mesh8.models.mask_spec)
    return [jax.tree.map(np.asarray, next(it)) for _ in range(TOTAL_STEPS)]


@pytest.fixture(scope="module")
def run8(mesh8, host_init, host_batches):
    """TOTAL_STEPS steps on the 2x4 mesh; records the compile events of every step after the first."""
    state = mesh8.state(host_init)
    metrics, events_after_first = [], []
    for i, host_batch in enumerate(host_batches):
        start = len(_EVENTS)
        state, m = mesh8.step(state, mesh8.batch(host_batch))
        metrics.append(jax.device_get(m))
        if i > 0:
            events_after_first.extend(_EVENTS[start:])
    return {"state": jax.device_get(state), "metrics": metrics, "events": events_after_first,
            "final_shardings": jax.tree.map(lambda x: x.sharding, state)}


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


# ---- 1. One compilation --------------------------------------------------------------------

def test_batches_differ(host_batches):
    """The compile test below is only meaningful if it is fed different batches."""
    for key in ("image", "text_ids", "context_idx", "target_idx"):
        for a, b in zip(host_batches, host_batches[1:]):
            assert not np.array_equal(a[key], b[key]), key


def test_train_step_compiles_once(mesh8, run8):
    compiled = [e for e in run8["events"] if e[0] == COMPILE_EVENT]
    traced = [e for e in run8["events"] if e[0] == TRACE_EVENT]
    cache_hits = [e for e in run8["events"] if e[0] == CACHE_HIT_EVENT]
    assert not compiled, f"steps 2..{TOTAL_STEPS} compiled again: {compiled}"
    assert not traced, f"steps 2..{TOTAL_STEPS} traced again: {traced}"
    assert not cache_hits, f"steps 2..{TOTAL_STEPS} looked up the persistent cache: {cache_hits}"
    assert mesh8.step._cache_size() == 1


def test_state_layout_is_stable(mesh8, run8):
    """The step returns the state in the layout it takes (else the next call would recompile)."""
    expected = jax.tree.leaves(mesh8.shardings)
    actual = jax.tree.leaves(run8["final_shardings"])
    ndims = [np.ndim(x) for x in jax.tree.leaves(run8["state"])]
    assert len(expected) == len(actual) == len(ndims)
    for e, a, ndim in zip(expected, actual, ndims):
        assert a.is_equivalent_to(e, ndim), (a, e)


# ---- 2. Mesh invariance --------------------------------------------------------------------

def _names_fsdp(sharding) -> bool:
    for axis in sharding.spec:
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        if "fsdp" in axes:
            return True
    return False


def test_one_device_matches_eight(tokenizer_path, mesh8, host_init, host_batches, run8):
    # The 2x4 run really is sharded over fsdp (so the comparison is not vacuous).
    sharded = [jax.tree_util.keystr(path) for path, s in _leaves(mesh8.shardings.params)
               if isinstance(s, NamedSharding) and _names_fsdp(s)]
    assert sharded, "no parameter is sharded over 'fsdp' on the data=2 x fsdp=4 mesh"
    assert mesh8.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
    encoder_kernel = mesh8.shardings.params["encoder"]["patch_embed"]["kernel"]
    assert _names_fsdp(encoder_kernel), encoder_kernel

    steps = 3
    one = Setup(tiny_config(tokenizer_path, mesh=(("data", 1), ("fsdp", 1))),
                devices=jax.devices()[:1])
    assert one.mesh.size == 1
    state = one.state(host_init)
    losses = []
    for host_batch in host_batches[:steps]:
        state, m = one.step(state, one.batch(host_batch))
        losses.append(float(m["loss"]))
    assert {d for leaf in jax.tree.leaves(state) for d in leaf.devices()} == {jax.devices()[0]}

    # Same losses as the 8-device run, step by step ...
    np.testing.assert_allclose(losses, [float(m["loss"]) for m in run8["metrics"][:steps]],
                               rtol=1e-5, atol=1e-6)
    # ... and the same parameters after `steps` steps. run8 ran TOTAL_STEPS steps, so rerun
    # the 8-device step for `steps` (its compiled program is cached).
    state8 = mesh8.state(host_init)
    for host_batch in host_batches[:steps]:
        state8, _ = mesh8.step(state8, mesh8.batch(host_batch))
    state1, state8 = jax.device_get(state), jax.device_get(state8)
    assert int(state1.step) == int(state8.step) == steps
    for (path, a), (_, b) in zip(_leaves((state1.params, state1.ema_params)),
                                 _leaves((state8.params, state8.ema_params))):
        # Adam divides by sqrt(v): where a gradient is near zero, float32 reduction-order noise
        # in it can move a parameter by a visible fraction of the learning rate (3e-3 here).
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5, err_msg=jax.tree_util.keystr(path))
    # The parameters did move (else equality says nothing).
    init_kernel = host_init.params["encoder"]["patch_embed"]["kernel"]
    assert not np.allclose(state1.params["encoder"]["patch_embed"]["kernel"], init_kernel)


# ---- 3. Learning ---------------------------------------------------------------------------

def test_loss_goes_down(run8):
    losses = np.array([float(m["loss_pred"]) for m in run8["metrics"]])
    assert np.all(np.isfinite(losses)), losses
    first, last = losses[:3].mean(), losses[-3:].mean()
    assert last < 0.85 * first, f"loss_pred did not drop: {losses}"
    # The learning rate was not zero (the drop comes from the optimizer, not the EMA alone).
    assert all(float(m["lr"]) > 0 for m in run8["metrics"])


# ---- 4. Resume -----------------------------------------------------------------------------

@pytest.fixture
def keep_sigterm_handler():
    """train.train installs a SIGTERM handler; give pytest its own back afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def _restore(setup, workdir, step):
    checkpointer = ckpt_lib.Checkpointer(workdir, setup.config)
    try:
        assert checkpointer.latest_step() == step
        return jax.device_get(checkpointer.restore(step, setup.abstract_state()))
    finally:
        checkpointer.close()


def _latest_step(setup, workdir):
    checkpointer = ckpt_lib.Checkpointer(workdir, setup.config)
    try:
        return checkpointer.latest_step()
    finally:
        checkpointer.close()


class _CountBatches:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = shard_lib.make_global_batch

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(shard_lib, "make_global_batch", counted)


def test_resume_matches_uninterrupted_run(mesh8, host_init, run8, tmp_path, monkeypatch,
                                          keep_sigterm_handler):
    """Preempted after step 3 and resumed, train.train ends where an uninterrupted run ends.

    The uninterrupted reference is run8: the same jitted step from the same init over the same
    first TOTAL_STEPS pipeline batches, with the same config (so the same LR/EMA schedules).
    """
    config = mesh8.config
    workdir = str(tmp_path / "run")

    # A run preempted after step 3 (the SIGTERM path: save at once, then exit 0) ...
    with monkeypatch.context() as m:
        m.setattr(ckpt_lib.Checkpointer, "preempted", lambda self, step: step == 3)
        with pytest.raises(SystemExit) as exit_info:
            train_lib.train(config, workdir)
        assert exit_info.value.code in (0, None)
    assert _latest_step(mesh8, workdir) == 3
    # ... resumes at step 4: it reads only the batches of steps 4..6 ...
    with monkeypatch.context() as m:
        counter = _CountBatches(m)
        metrics = train_lib.train(config, workdir)
        assert counter.calls == TOTAL_STEPS - 3
    assert np.isfinite(metrics["loss"])
    # ... and ends where the uninterrupted run ended (same data order, same state).
    resumed = _restore(mesh8, workdir, TOTAL_STEPS)
    reference = run8["state"]
    assert int(resumed.step) == int(reference.step) == TOTAL_STEPS
    for (path, a), (_, b) in zip(_leaves(resumed), _leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
    init_kernel = host_init.ema_params["patch_embed"]["kernel"]
    assert not np.allclose(resumed.ema_params["patch_embed"]["kernel"], init_kernel)

    # Rerunning a finished run does nothing: no batch is read, nothing is saved.
    with monkeypatch.context() as m:
        def no_batches(*args, **kwargs):
            raise AssertionError("a finished run read a batch")
        m.setattr(shard_lib, "make_global_batch", no_batches)
        assert train_lib.train(config, workdir) == {}
    assert _latest_step(mesh8, workdir) == TOTAL_STEPS


# ---- 5. User errors ------------------------------------------------------------------------

def _expect_user_error(config, workdir, *needles):
    start = len(_EVENTS)
    with pytest.raises(UserError) as info:
        train_lib.train(config, workdir)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    compiled = [e for e in _EVENTS[start:] if e[0] == COMPILE_EVENT]
    assert not compiled, f"compiled before reporting the error: {compiled}"
    return message


def test_user_errors(tokenizer_path, tmp_path, keep_sigterm_handler):
    config = tiny_config(tokenizer_path)
    config.model.conditioning = "bogus"
    _expect_user_error(config, str(tmp_path / "a"), "model.conditioning", "bogus")

    config = tiny_config(tokenizer_path)
    config.batch_size = 12  # 8 devices
    _expect_user_error(config, str(tmp_path / "b"), "batch_size", "12", "8")

    config = tiny_config(tokenizer_path)
    missing = str(tmp_path / "nowhere" / "spm.model")
    config.tokenizer.model_path = missing
    message = _expect_user_error(config, str(tmp_path / "c"), missing)
    assert "tokenizer" in message.lower()


def test_cli_user_error_has_no_traceback(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    env.pop("XLA_FLAGS", None)
    # A bad value, a field that does not exist (refused by ml_collections while the flag is
    # defined) and a config file that does not exist.
    for flag, named in [("--config.model.conditioning=bogus", "conditioning"),
                        ("--config.model.encodr=x", "encoder"),
                        ("--config=configs/nothere.py", "nothere.py")]:
        result = subprocess.run(
            [sys.executable, "-m", "tcjepa_jax.train", "--config=configs/synthetic_tiny.py",
             flag, f"--workdir={tmp_path / 'run'}"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1, result.stderr
        assert "error:" in result.stderr and named in result.stderr, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        assert not os.path.exists(tmp_path / "run" / "checkpoints")


# ---- bf16 compute ---------------------------------------------------------------------------

@pytest.mark.slow  # a third compile of the tiny model; tests/test_models.py checks bf16 dtypes
def test_bf16_compute_keeps_float32_parameters(tokenizer_path, host_batches):
    """bf16 activations, float32 parameters and optimizer state, and a loss close to float32's."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(tokenizer_path, mesh=(("data", 1), ("fsdp", 1)))
        config.model.dtype = dtype
        setup = Setup(config, devices=jax.devices()[:1])
        state = step_lib.create_train_state(setup.models, config, setup.tx, setup.shardings)
        state, metrics = setup.step(state, setup.batch(host_batches[0]))
        losses[dtype] = float(metrics["loss_pred"])
        assert {leaf.dtype for leaf in jax.tree.leaves((state.params, state.ema_params))} == {
            np.dtype("float32")}
    assert np.isfinite(losses["bfloat16"])
    assert losses["bfloat16"] != losses["float32"]  # bf16 really ran
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=0.05)
