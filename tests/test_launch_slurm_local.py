"""launch/slurm.py and launch/slurm.sbatch (no SLURM needed) and launch/local.sh.

- the script slurm.py writes for both layouts (one process per GPU / per node), its --dry-run
  from the command line, the refusal of a node-local workdir, and a submission to a fake sbatch;
- the written script run by bash under a fake srun / scancel / scontrol and a fake python: the
  trainer's flags arrive intact in every task, each task gets its GPUs, and SIGUSR1 (the time
  limit) becomes SIGTERM to the trainer and then a requeue;
- local.sh with a fake python (devices per process, coordinator flags, logs, a failing process,
  Ctrl-C) and with the real trainer: 2 processes x 4 CPU devices train 4 steps of a tiny config.
"""

import importlib.util
import io
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_PY = os.path.join(REPO, "launch", "slurm.py")
LOCAL_SH = os.path.join(REPO, "launch", "local.sh")
CONFIG = os.path.join(REPO, "configs", "synthetic_tiny.py")


def _load_slurm():
    spec = importlib.util.spec_from_file_location("launch_slurm", SLURM_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


slurm = _load_slurm()


def _clean_env(**extra):
    """The environment without conftest.py's CPU settings (as a user's shell would be)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "VIRTUAL_ENV")}
    env.update(extra)
    return env


def _default_signals():
    # A test run started in the background of a non-interactive shell (nohup, CI runners)
    # inherits SIGINT ignored, and bash cannot trap a signal ignored on entry: give the child
    # the default handlers, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _start(command, **kwargs):
    """Popen in a session of its own, so _stop can end every process it started."""
    return subprocess.Popen(command, start_new_session=True, text=True,
                            preexec_fn=_default_signals, **kwargs)


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _run(command, timeout=60, **kwargs):
    proc = _start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        _stop(proc)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _sbatch_options(script):
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def _train_argv(script):
    """The trainer's argv as bash would see it, from the script's TRAIN=(...) line."""
    [line] = [line for line in script.splitlines() if line.startswith("TRAIN=(")]
    return shlex.split(line[len("TRAIN=("):-1])


# ---- slurm.py: the script ------------------------------------------------------------------

def test_dry_run_one_process_per_gpu(tmp_path):
    mesh = '--config.mesh=(("data", -1), ("fsdp", 1))'
    result = subprocess.run(
        [sys.executable, SLURM_PY, "--config=configs/synthetic_tiny.py:smoke",
         "--workdir=/shared/runs/tiny", "--nodes=2", "--gpus_per_node=4", "--partition=gpu",
         "--time=12:00:00", "--setup=source /shared/venv/bin/activate", "--dry-run",
         "--", "--config.batch_size=64", mesh],
        cwd=REPO, env=_clean_env(JAX_PLATFORMS="cpu", TMPDIR=str(tmp_path)), capture_output=True,
        text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    script = result.stdout
    [written] = os.listdir(tmp_path)   # the dry run's copy of the script
    assert f"script written to {tmp_path / written}; not submitted" in result.stderr
    assert (tmp_path / written).read_text() == script
    assert _sbatch_options(script) == [
        "--job-name=tiny", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
        "--cpus-per-task=8", "--time=12:00:00", "--partition=gpu", f"--chdir={REPO}",
        "--output=/shared/runs/tiny/slurm/tiny-%j.log", "--open-mode=append",
        "--signal=B:USR1@300"]   # no --account line: none given
    assert _train_argv(script) == [
        "python", "-m", "tcjepa_jax.train", f"--config={CONFIG}:smoke",
        "--workdir=/shared/runs/tiny", "--config.batch_size=64", mesh]
    srun = 'srun --kill-on-bad-exit=1 --cpus-per-task=8 bash -c "$TASK" task "${TRAIN[@]}" &'
    assert f"\n{srun}\n" in script
    assert "export JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" in script
    # The submitting shell's JAX_PLATFORMS=cpu is dropped, not passed on to the GPU nodes.
    assert "\nunset JAX_PLATFORMS\n" in script
    assert not [line for line in script.splitlines()
                if "JAX_PLATFORMS=" in line and not line.startswith("#")]
    assert "\nsource /shared/venv/bin/activate\n" in script
    assert "{{" not in script


def test_one_process_per_node_and_options():
    job = slurm.Job(config=CONFIG, workdir="/shared/runs/big", nodes=8, gpus_per_node=4,
                    per="node", account="proj42", requeue=True, name="big-run",
                    sbatch_options=("--exclusive",), chdir=REPO)
    slurm.check(job)
    script = slurm.build_script(job)
    options = _sbatch_options(script)
    for option in ("--nodes=8", "--ntasks-per-node=1", "--gpus-per-node=4", "--cpus-per-task=32",
                   "--account=proj42", "--job-name=big-run", "--exclusive", "--requeue"):
        assert option in options
    assert not any(o.startswith(("--time", "--partition")) for o in options)
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script
    assert "JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID" not in script
    assert "REQUEUE=1" in script
    assert _train_argv(script)[3:] == [f"--config={CONFIG}", "--workdir=/shared/runs/big"]


def test_local_workdir_and_flag_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where a dry run writes the script
    base = ["--config=configs/synthetic_tiny.py", "--nodes=1", "--gpus_per_node=8", "--dry-run"]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert slurm.main(base + ["--workdir=/tmp/run"]) == 1
        assert "shared storage" in capsys.readouterr().err
        assert slurm.main(base + ["--workdir=/tmp/run", "--allow_local_workdir"]) == 0
        assert "--workdir=/tmp/run" in capsys.readouterr().out
        assert slurm.main(base + ["--workdir=/shared/x", "--time=soon"]) == 1
        assert "--time" in capsys.readouterr().err
        assert slurm.main(["--config=configs/nope.py"] + base[1:] + ["--workdir=/shared/x"]) == 1
        assert "no file" in capsys.readouterr().err
        # --config.KEY=VALUE before `--` are overrides too.
        job, _ = slurm.parse(base + ["--workdir=/shared/x", "--config.seed=3"])
        assert job.overrides == ("--config.seed=3",)
    finally:
        os.chdir(cwd)


def test_submit_with_fake_sbatch(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\necho "$@" > {tmp_path}/sbatch_args\necho "4242;cluster"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(REPO)
    workdir = tmp_path / "shared" / "run1"
    out = io.StringIO()
    submission = slurm.launch([f"--config={CONFIG}", f"--workdir={workdir}", "--nodes=2",
                               "--gpus_per_node=8", "--allow_local_workdir", "--setup="], out=out)
    script_path = str(workdir / "slurm" / "run1.sbatch")
    assert submission.job_id == "4242" and submission.script_path == script_path
    assert (tmp_path / "sbatch_args").read_text().split() == ["--parsable", script_path]
    printed = out.getvalue()
    assert f"$ sbatch --parsable {script_path}\n" in printed and "Submitted job 4242" in printed
    assert _sbatch_options(open(script_path).read())[:3] == [
        "--job-name=run1", "--nodes=2", "--ntasks-per-node=8"]


# ---- The script itself under a fake SLURM ----------------------------------------------------

_FAKE_SRUN = """#!/bin/bash
# srun on one node: runs the command after the options once per task.
while [[ $1 == --* ]]; do echo "$1" >> "$FAKE_DIR/srun_options"; shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" &
  pids+=($!)
  echo $! >> "$FAKE_DIR/task_pids"
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""
_FAKE_SCANCEL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/scancel_args"
kill -TERM $(cat "$FAKE_DIR/task_pids")
"""
_FAKE_SCONTROL = """#!/bin/bash
echo "$@" >> "$FAKE_DIR/scontrol_args"
"""
_FAKE_PYTHON = """#!{python}
# python -m tcjepa_jax.train under test: records what it got; with FAKE_WAIT, waits for SIGTERM.
import json, os, signal, sys, time
fake = os.environ["FAKE_DIR"]
if sys.argv[1] == "-c":
    exec(sys.argv[2])
    sys.exit(0)
args = sys.argv[3:]
proc = os.environ.get("SLURM_PROCID") or [a for a in args if a.startswith("--process_id=")][0][13:]
keys = ("JAX_PLATFORMS", "XLA_FLAGS", "JAX_LOCAL_DEVICE_IDS", "PYTHONUNBUFFERED")
with open(os.path.join(fake, f"task_{{proc}}.json"), "w") as f:
    json.dump(dict(argv=sys.argv[1:], env={{k: os.environ.get(k) for k in keys}}), f)
print(f"task {{proc}} started", flush=True)
mode = os.environ.get("FAKE_MODE", "")
if mode == "fail1" and proc == "1":
    print("boom: something went wrong", flush=True)
    sys.exit(3)
if mode in ("wait", "fail1"):
    signal.signal(signal.SIGTERM, lambda *_: (print(f"task {{proc}}: checkpoint saved", flush=True),
                                              sys.exit(0)))
    open(os.path.join(fake, f"ready_{{proc}}"), "w").close()
    time.sleep(600)
    sys.exit(4)
"""


def _fake_bin(tmp_path):
    fake = tmp_path / "fake"
    bin_dir = fake / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("srun", _FAKE_SRUN), ("scancel", _FAKE_SCANCEL),
                       ("scontrol", _FAKE_SCONTROL),
                       ("python", _FAKE_PYTHON.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return fake, bin_dir


def _wait_for(paths, timeout=120):
    deadline = time.time() + timeout
    while not all(os.path.exists(p) for p in paths):
        assert time.time() < deadline, f"timed out waiting for {paths}"
        time.sleep(0.1)


@pytest.mark.parametrize("per", ["gpu", "node"])
def test_script_runs_under_fake_slurm(tmp_path, per):
    fake, bin_dir = _fake_bin(tmp_path)
    workdir = tmp_path / "work"
    overrides = ("--config.batch_size=64", '--config.mesh=(("data", -1), ("fsdp", 1))',
                 "--config.name=it's")
    job = slurm.Job(config=f"{CONFIG}:smoke", workdir=str(workdir), nodes=1, gpus_per_node=2,
                    per=per, overrides=overrides, requeue=True, chdir=REPO)
    script_path = tmp_path / "job.sbatch"
    script_path.write_text(slurm.build_script(job))
    env = _clean_env(JAX_PLATFORMS="cpu", FAKE_DIR=str(fake), FAKE_MODE="wait",
                     PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="77",
                     SLURM_JOB_NODELIST="node1", CUDA_VISIBLE_DEVICES="0,1",
                     SLURM_NTASKS=str(job.tasks_per_node))
    proc = _start(["bash", str(script_path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                  stderr=subprocess.STDOUT)
    try:
        _wait_for([fake / f"ready_{i}" for i in range(job.tasks_per_node)])
        proc.send_signal(signal.SIGUSR1)   # what SLURM sends signal_seconds before the limit
        output = proc.communicate(timeout=120)[0]
    finally:
        _stop(proc)
    assert proc.returncode == 0, output
    assert "time limit near" in output and "task 0: checkpoint saved" in output
    assert (fake / "scancel_args").read_text().split() == ["--signal=TERM", "77"]
    assert (fake / "scontrol_args").read_text().split() == ["requeue", "77"]
    assert "--kill-on-bad-exit=1" in (fake / "srun_options").read_text()

    expected_ids = {"gpu": ["0", "1"], "node": ["0,1"]}[per]
    for i, ids in enumerate(expected_ids):
        task = json.loads((fake / f"task_{i}.json").read_text())
        assert task["argv"] == ["-m", "tcjepa_jax.train", f"--config={CONFIG}:smoke",
                                f"--workdir={workdir}", *overrides]
        assert task["env"]["JAX_LOCAL_DEVICE_IDS"] == ids
        assert task["env"]["JAX_PLATFORMS"] is None
    if per == "gpu":  # process 1's output goes to its own file, not the job log
        log = (workdir / "slurm" / "logs" / "77" / "process_1.log").read_text()
        assert "task 1: checkpoint saved" in log and "task 1" not in output


# ---- local.sh ----------------------------------------------------------------------------------

def _local_env(fake, bin_dir, mode="", **extra):
    return _clean_env(PYTHON=str(bin_dir / "python"), FAKE_DIR=str(fake), FAKE_MODE=mode,
                      **extra)


def test_local_sh_starts_joined_processes(tmp_path):
    fake, bin_dir = _fake_bin(tmp_path)
    workdir = tmp_path / "run"
    env = _local_env(fake, bin_dir, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_foo",
                     TCJEPA_LOCAL_DEVICES="12", TCJEPA_PORT="12345")
    result = _run([LOCAL_SH, "3", "--config=configs/synthetic_tiny.py", "--workdir", str(workdir)],
                  cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr
    assert "task 0 started" in result.stdout and "task 1" not in result.stdout
    for i in range(3):
        task = json.loads((fake / f"task_{i}.json").read_text())
        assert task["argv"] == ["-m", "tcjepa_jax.train", "--config=configs/synthetic_tiny.py",
                                "--workdir", str(workdir), "--coordinator_address=localhost:12345",
                                "--num_processes=3", f"--process_id={i}"]
        assert task["env"]["JAX_PLATFORMS"] == "cpu"
        assert task["env"]["XLA_FLAGS"] == "--xla_foo --xla_force_host_platform_device_count=4"
        if i:
            log = (workdir / "local_logs" / f"process_{i}.log").read_text()
            assert log == f"task {i} started\n"

    # No --workdir: the logs go to a temporary directory. 5 processes cannot share 12 devices.
    no_workdir = _run([LOCAL_SH, "3"], env=dict(env, TMPDIR=str(tmp_path)), cwd=tmp_path)
    assert no_workdir.returncode == 0, no_workdir.stderr
    [logdir] = [p for p in os.listdir(tmp_path) if p.startswith("tcjepa-local-logs.")]
    assert sorted(os.listdir(tmp_path / logdir)) == ["process_1.log", "process_2.log"]
    uneven = _run([LOCAL_SH, "5"], env=env)
    assert uneven.returncode == 2 and "evenly" in uneven.stderr


def test_local_sh_failure_stops_the_others(tmp_path):
    fake, bin_dir = _fake_bin(tmp_path)
    start = time.time()
    result = _run([LOCAL_SH, "2", f"--workdir={tmp_path / 'run'}"], cwd=REPO,
                  env=_local_env(fake, bin_dir, "fail1"), timeout=300)
    assert result.returncode == 3
    assert "process 1 exited with status 3" in result.stderr
    assert "boom: something went wrong" in result.stderr  # the tail of process 1's log
    # Process 0 (waiting 600 s) was killed; generous for a loaded 2-core machine.
    assert time.time() - start < 120


def test_local_sh_ctrl_c_stops_every_process_with_a_checkpoint(tmp_path):
    fake, bin_dir = _fake_bin(tmp_path)
    workdir = tmp_path / "run"
    proc = _start([LOCAL_SH, "2", f"--workdir={workdir}"], cwd=REPO,
                  env=_local_env(fake, bin_dir, "wait"), stdout=subprocess.PIPE,
                  stderr=subprocess.PIPE)
    try:
        _wait_for([fake / "ready_0", fake / "ready_1"])
        proc.send_signal(signal.SIGINT)   # Ctrl-C
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        _stop(proc)
    assert proc.returncode == 130, stderr
    assert "task 0: checkpoint saved" in stdout
    assert "task 1: checkpoint saved" in (workdir / "local_logs" / "process_1.log").read_text()


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    import test_train  # here, not at the top: the launcher tests above need no JAX
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)


@pytest.mark.slow  # two processes training; tests/test_multihost.py covers the two-host step
def test_local_sh_trains_two_processes(tokenizer_path, tmp_path):
    """2 processes x 4 CPU devices, 4 steps of a tiny config: 50 to 90 s on 2 busy cores, most of
    it start-up and the two processes compiling the step at once."""
    workdir = tmp_path / "run"
    flags = [
        "--config=configs/synthetic_tiny.py:smoke", f"--workdir={workdir}",
        "--config.total_steps=4", "--config.log_every=2", "--config.checkpoint_every=4",
        "--config.batch_size=16", "--config.input.image_size=32",
        "--config.input.max_caption_len=8", "--config.masks.min_keep=4",
        "--config.model.predictor_depth=1", "--config.optim.warmup_steps=1",
        "--config.probe.enabled=False", f"--config.tokenizer.model_path={tokenizer_path}"]
    env = _clean_env(PYTHON=sys.executable, TCJEPA_LOCAL_DEVICES="8")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    result = _run([LOCAL_SH, "2", *flags], cwd=REPO, env=env, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Process 0 of 2; 4 local and 8 global devices" in output
    assert "step 4/4 | loss" in output
    assert "4" in os.listdir(workdir / "checkpoints")
    log1 = (workdir / "local_logs" / "process_1.log").read_text()
    assert "Process 1 of 2; 4 local and 8 global devices" in log1
