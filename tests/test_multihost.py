"""Multi-host: 2 local processes x 4 CPU devices, joined by jax.distributed with gloo
collectives, train the tiny config, are preempted and resume from their Orbax checkpoint, and
end where a 1-process x 8-device run of the same config ends.

Each host reads its own half of every global batch (records p, p + 2, ... of the shuffled
stream), so the 2-host global batches hold the same examples as the 1-host ones, in another
order: losses and parameters agree to float tolerance.
"""

import json
import os
import signal
import socket
import subprocess
import sys

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
    assert "Resuming from" in outputs[0] and "Resuming from" in outputs[1]
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
        states.append(jax.device_get(checkpointer.restore_state_only(
            test_train.TOTAL_STEPS, setup.abstract_state())))
        checkpointer.close()
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(states[0]),
                                 jax.tree_util.tree_leaves_with_path(states[1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5, err_msg=jax.tree_util.keystr(path))


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
