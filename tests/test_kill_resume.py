"""Exact resume under SIGKILL: a run killed at arbitrary points (after random steps, during an
asynchronous save, during the restore) and restarted with the same command ends with
the same parameters, bit for bit, as a run that was never interrupted.

Every run is `python -m tcjepa_jax.train` in a subprocess with the tiny config of
tests/test_train.py, a checkpoint every step (so a save is nearly always in flight) and one
persistent XLA cache, so only the first process compiles.
"""

import glob
import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from test_train import REPO, tokenizer_path  # noqa: F401 (fixture)
from tcjepa_jax import checkpoint as ckpt_lib

pytestmark = pytest.mark.slow

TOTAL = 12


def _command(workdir, tokenizer):
    return [sys.executable, "-m", "tcjepa_jax.train", "--config=configs/synthetic_tiny.py:smoke",
            f"--workdir={workdir}", f"--config.total_steps={TOTAL}", "--config.batch_size=16",
            "--config.log_every=1", "--config.checkpoint_every=1", "--config.keep_checkpoints=3",
            "--config.input.image_size=32", "--config.input.num_captions=2",
            "--config.input.max_caption_len=8", "--config.masks.min_keep=4",
            "--config.model.predictor_depth=1", "--config.optim.warmup_steps=1",
            "--config.probe.enabled=False", f"--config.tokenizer.model_path={tokenizer}"]


def _env(cache):
    return dict(os.environ, PYTHONUNBUFFERED="1", JAX_COMPILATION_CACHE_DIR=str(cache),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


class Run:
    """A training subprocess whose output lines are collected as they come."""

    def __init__(self, workdir, tokenizer, cache):
        self.lines, self.started = [], time.time()
        self.proc = subprocess.Popen(
            _command(workdir, tokenizer), cwd=REPO, env=_env(cache), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def saw_step(self, step) -> bool:
        return any(f"step {step}/{TOTAL} " in line for line in self.lines)

    def wait_until(self, condition, timeout=300):
        end = time.time() + timeout
        while time.time() < end and self.proc.poll() is None:
            if condition():
                return True
            time.sleep(0.002)
        return False

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(timeout=10)

    def finish(self, timeout=600):
        self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        assert self.proc.returncode == 0, "".join(self.lines[-40:])


def _final_state(workdir):
    import ml_collections
    checkpointer = ckpt_lib.Checkpointer(workdir, ml_collections.ConfigDict(
        {"checkpoint_every": 1, "keep_checkpoints": None}))
    try:
        assert checkpointer.latest_step() == TOTAL
        path = os.path.join(checkpointer.directory, str(TOTAL), "state")
        import orbax.checkpoint as ocp
        with ocp.PyTreeCheckpointer() as reader:
            return jax.device_get(reader.restore(path))
    finally:
        checkpointer.close()


def _latest(workdir):
    steps = [int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
             if os.path.basename(p).isdigit()]
    return max(steps, default=0)


def test_sigkill_anywhere_resumes_bit_identically(tmp_path, tokenizer_path):  # noqa: F811
    cache = tmp_path / "xla_cache"
    reference = str(tmp_path / "reference")
    Run(reference, tokenizer_path, cache).finish()

    killed = str(tmp_path / "killed")
    rng = random.Random(0)
    kills = []  # (kind, where it landed)
    # After random steps, with kills during saves and one during the restore in between.
    plan = [("step", rng.randint(2, 3)), ("save", None), ("step", rng.randint(6, 7)),
            ("restore", rng.uniform(0.0, 0.3)), ("step", rng.randint(9, 10)), ("save", None)]
    for kind, arg in plan:
        before = _latest(killed)
        run = Run(killed, tokenizer_path, cache)
        if kind == "step":
            assert run.wait_until(lambda: run.saw_step(arg)), "".join(run.lines[-40:])
        elif kind == "save":
            pending = os.path.join(killed, "checkpoints", "*.orbax-checkpoint-tmp*")
            assert run.wait_until(lambda: _latest(killed) > before and glob.glob(pending)), (
                "".join(run.lines[-40:]))
        else:  # "Training data: ..." is logged right before the checkpoint is restored
            assert run.wait_until(lambda: any("Training data:" in line for line in run.lines))
            time.sleep(arg)
        if run.proc.poll() is not None:
            pytest.fail(f"the run ended before the {kind} kill:\n" + "".join(run.lines[-40:]))
        run.kill()
        half_written = glob.glob(os.path.join(killed, "checkpoints", "*.orbax-checkpoint-tmp*"))
        restored = any("Resumed from" in line for line in run.lines)
        kills.append((kind, arg, _latest(killed), [os.path.basename(p) for p in half_written],
                      restored))
    print("kills (kind, at, newest checkpoint after the kill, half-written saves, restore "
          "finished before the kill):", kills)
    assert any(k[0] == "save" and k[3] for k in kills), f"no kill landed inside a save: {kills}"
    last = Run(killed, tokenizer_path, cache)
    last.finish()
    assert any("Resumed from" in line for line in last.lines)

    want, got = _final_state(reference), _final_state(killed)
    for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(want)[0],
                                 jax.tree_util.tree_flatten_with_path(got)[0]):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
