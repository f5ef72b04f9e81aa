"""Training metrics: step time, images/s, TFLOP/s per device, MFU, and a profiler trace window."""

import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tcjepa_jax import chips
from tcjepa_jax import flops as flops_lib
from tcjepa_jax import optim
from tcjepa_jax import sharding as shard_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax.metrics import Profiler, Progress

import test_train  # the tiny config and the compile cache its programs live in


def test_progress_reports_throughput_and_mfu():
    progress = Progress(total_steps=100, batch_size=32, flops_per_step=2e9, start_step=0,
                        peak_flops_per_device=1e11)
    assert progress.update(1, now=10.0) == {}  # the first step includes compilation
    out = progress.update(11, now=12.0)        # 10 steps in 2 s
    assert out["step_time_s"] == pytest.approx(0.2)
    assert out["images_per_s"] == pytest.approx(160.0)
    assert out["tflops_per_s_per_device"] == pytest.approx(0.01)
    assert out["mfu"] == pytest.approx(0.1)    # 1e10 FLOP/s of a 1e11 peak
    assert out["eta_s"] == pytest.approx(89 * 0.2)
    no_peak = Progress(100, 32, 2e9, 0)
    no_peak.update(1, now=0.0)
    assert "mfu" not in no_peak.update(2, now=1.0)


def test_peak_from_chip_table_or_config():
    class Device:
        device_kind = "TPU v5p"
    assert chips.peak_flops({}, Device()) == pytest.approx(459e12, rel=0.01)
    assert chips.peak_flops({"peak_flops_per_device": 5e10}, Device()) == 5e10

    class Cpu:
        device_kind = "cpu"
    assert chips.peak_flops({}, Cpu()) is None


def test_profiler_python_tracer_is_off_unless_asked(tmp_path):
    """jax's Python tracer hooks every thread (a suspect in a crash inside the trace window):
    the trace is taken without it unless profile.python_tracer says otherwise."""
    config = test_train.synthetic_tiny.get_config("smoke")
    config.profile.first_step, config.profile.num_steps = 2, 1
    assert Profiler(config, str(tmp_path)).options.python_tracer_level == 0
    config.profile.python_tracer = True
    assert Profiler(config, str(tmp_path)).options.python_tracer_level == 1


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)


def test_training_logs_mfu_and_writes_a_profile(tokenizer_path, tmp_path):
    """The trainer's command line, in a process of its own: the profiler's tracer can crash a
    process into which earlier tests loaded PyTorch (seen in the full suite, after
    tests/test_export.py; not reproduced with torch alone)."""
    config = test_train.tiny_config(tokenizer_path)
    flags = [f"--config.{k}={v}" for k, v in (
        ("batch_size", config.batch_size), ("total_steps", 4), ("log_every", 1),
        ("checkpoint_every", 4), ("input.image_size", 32), ("input.num_captions", 2),
        ("input.max_caption_len", 8), ("masks.min_keep", 4), ("model.predictor_depth", 1),
        ("optim.warmup_steps", 1), ("probe.enabled", False),
        ("tokenizer.model_path", tokenizer_path), ("mesh", config.mesh),
        ("peak_flops_per_device", 1e10),   # a CPU is not in the chip table: give its peak
        ("profile.first_step", 2), ("profile.num_steps", 2))]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=test_train._CACHE_DIR)
    run = subprocess.run([sys.executable, "-m", "tcjepa_jax.train",
                          "--config=configs/synthetic_tiny.py:smoke",
                          f"--workdir={tmp_path / 'run'}", *flags],
                         cwd=test_train.REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    with open(tmp_path / "run" / "final_metrics.json") as f:
        metrics = json.load(f)["metrics"]
    assert 0 < metrics["mfu"] < 1 and metrics["step_time_s"] > 0
    assert np.isclose(metrics["mfu"], metrics["tflops_per_s_per_device"] * 1e12 / 1e10)
    traces = glob.glob(os.path.join(tmp_path, "run", "tensorboard", "plugins", "profile", "*",
                                    "*.xplane.pb"))
    assert traces, os.listdir(tmp_path / "run" / "tensorboard")


def test_flops_of_scanned_and_accumulated_steps_are_counted_unrolled(tokenizer_path):
    """XLA counts a loop body once; the count from the unrolled step must match the compiled
    unrolled step's own count, whatever scan_layers and grad_accum say."""
    config = test_train.tiny_config(tokenizer_path)
    config.model.text_vocab_size = 512
    config.mesh = (("data", 1), ("fsdp", 1), ("tensor", 1))
    models = step_lib.build_models(config, 512)
    mesh = shard_lib.make_mesh(config, devices=jax.devices()[:1])
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    state, batch = flops_lib.abstract_inputs(models, config, tx, shardings, mesh)
    step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh),
                                   shardings, mesh)
    reference = step_lib.compiled_flops(step.lower(state, batch).compile())

    looped = config.copy_and_resolve_references()
    looped.model.scan_layers, looped.grad_accum = True, 2
    assert flops_lib.needs_unrolled_count(looped) and not flops_lib.needs_unrolled_count(config)
    counted = flops_lib.unrolled_step_flops(looped, 512, {"data": 1, "fsdp": 1, "tensor": 1})
    assert counted == pytest.approx(reference, rel=0.05)
    # One device of a 4-way data mesh does a quarter of the work; tensor=2 halves it again.
    quarter = flops_lib.unrolled_step_flops(looped, 512, {"data": 4, "fsdp": 1, "tensor": 2})
    assert quarter == pytest.approx(reference / 8, rel=0.1)
