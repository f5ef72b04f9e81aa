"""Multi-host: 2 local processes x 4 CPU devices, joined by jax.distributed with gloo
collectives, train the tiny config, are preempted and resume from their Orbax checkpoint, and
end where a 1-process x 8-device run of the same config ends.

Each host reads its own half of every global batch (records p, p + 2, ... of the shuffled
stream), so the 2-host global batches hold the same examples as the 1-host ones, in another
order: losses and parameters agree to float tolerance.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax import distributed
from tcjepa_jax import train as train_lib

import test_train

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _launch(num_processes, tokenizer, workdir, stop_at, out_dir):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [test_train.REPO, env.get("PYTHONPATH")]))
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), str(num_processes),
         str(port), tokenizer, workdir, str(stop_at), os.path.join(out_dir, f"{i}.json")],
        env=env, cwd=test_train.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(num_processes)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            p.kill()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    results = []
    for i in range(num_processes):
        with open(os.path.join(out_dir, f"{i}.json")) as f:
            results.append(json.load(f))
    return results, outputs


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow
def test_two_hosts_match_one_host(tokenizer_path, tmp_path):
    config = test_train.tiny_config(tokenizer_path)
    reference_dir = str(tmp_path / "one_host")
    handler = signal.getsignal(signal.SIGTERM)
    try:
        reference = train_lib.train(config, reference_dir)
    finally:
        signal.signal(signal.SIGTERM, handler)

    workdir = str(tmp_path / "two_hosts")
    _, outputs = _launch(2, tokenizer_path, workdir, 3, str(tmp_path))   # preempted at step 3
    assert "Preempted: saved step 3" in outputs[0]
    results, outputs = _launch(2, tokenizer_path, workdir, 0, str(tmp_path))  # resumed
    assert "Resumed from" in outputs[0] and "Resumed from" in outputs[1]
    assert "Process 1 of 2; 4 local and 8 global devices" in outputs[1]
    # Process 0 alone writes TensorBoard; both report the same, global loss.
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert results[0]["loss"] == results[1]["loss"]
    np.testing.assert_allclose(results[0]["loss"], float(reference["loss"]), rtol=1e-4)

    setup = test_train.Setup(config)
    states = []
    for directory in (reference_dir, workdir):
        checkpointer = ckpt_lib.Checkpointer(directory, config)
        assert checkpointer.latest_step() == test_train.TOTAL_STEPS
        states.append(jax.device_get(checkpointer.restore(
            test_train.TOTAL_STEPS, setup.abstract_state())))
        checkpointer.close()
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(states[0]),
                                 jax.tree_util.tree_leaves_with_path(states[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigterm_to_one_host_saves_the_same_step_on_all(tokenizer_path, tmp_path):
    """A scheduler may signal one host first. JAX's preemption service makes every host stop
    at the same step: all save it and exit 0 (none trains on alone, none waits forever)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [test_train.REPO, env.get("PYTHONPATH")]))
    workdir = str(tmp_path / "run")
    procs = [subprocess.Popen(
        [sys.executable, os.path.join(HERE, "multihost_worker.py"), str(i), "2", str(port),
         tokenizer_path, workdir, "-1", str(tmp_path / f"{i}.json")],
        env=env, cwd=test_train.REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True) for i in range(2)]
    lines = [[], []]
    readers = [threading.Thread(target=lambda i=i: lines[i].extend(procs[i].stdout), daemon=True)
               for i in range(2)]
    for r in readers:
        r.start()
    try:
        deadline = time.time() + 400
        while not any("step 3/" in line for line in list(lines[1])) and time.time() < deadline:
            assert all(p.poll() is None for p in procs), "".join(lines[0][-40:] + lines[1][-40:])
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGTERM)          # host 1 only
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            p.kill()
    for r in readers:
        r.join(timeout=10)
    saved = []
    for i, p in enumerate(procs):
        out = "".join(lines[i])
        assert p.returncode == 0, out[-4000:]
        saved.append(re.search(r"Preempted: saved step (\d+)", out).group(1))
    assert saved[0] == saved[1]
    assert os.path.isdir(os.path.join(workdir, "checkpoints", saved[0]))


def test_cluster_detection_and_flag_errors():
    assert not distributed.cluster_detected({})
    assert not distributed.cluster_detected({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"})
    assert distributed.cluster_detected({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"})
    assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"})
    assert distributed.cluster_detected({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    with pytest.raises(ValueError, match="num_processes"):
        distributed.initialize("localhost:1234", 0, 0)
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize("localhost:1234", 2, 2)


def test_environment_variables_name_the_processes(monkeypatch):
    """JAX reads JAX_COORDINATOR_ADDRESS itself but not JAX_NUM_PROCESSES / JAX_PROCESS_ID:
    initialize passes them on (docs/scaling.md promises all three work)."""
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args: calls.append(args))
    monkeypatch.setattr(jax.config, "update", lambda *args: None)
    for name, value in (("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234"), ("JAX_NUM_PROCESSES", "4"),
                        ("JAX_PROCESS_ID", "3")):
        monkeypatch.setenv(name, value)
    assert distributed.initialize()
    assert calls == [("10.0.0.1:1234", 4, 3)]
    monkeypatch.setenv("JAX_PROCESS_ID", "4")
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize()
