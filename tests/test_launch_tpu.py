"""launch/tpu.py: the gcloud commands it prints (--dry-run), the preemption loop with a fake
gcloud, and the shell it runs on the workers (with a fake trainer). No network, no gcloud."""

import io
import os
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import tpu  # noqa: E402

SLICE = ["--name=h14", "--project=my-proj", "--zone=us-east5-a"]
TRAIN = ["--workdir=gs://my-bucket/h14", "--config=configs/in1k_vit_h14.py"]


def dry(*argv):
    """(exit status, printed commands as argv lists, comment lines) of a --dry-run."""
    out = io.StringIO()
    rc = tpu.main([argv[0], "--dry-run", *argv[1:]], out=out)
    lines = out.getvalue().splitlines()
    return (rc, [shlex.split(line[2:]) for line in lines if line.startswith("$ ")],
            [line for line in lines if line.startswith("#")])


def remote(cmd):
    """The --command=... of a gcloud ssh argv."""
    return next(a for a in cmd if a.startswith("--command="))[len("--command="):]


def label(cmd) -> str:
    if cmd[0] != "gcloud":
        return "wheel" if "wheel" in cmd else cmd[0]
    verb = cmd[4]
    if verb == "describe" and any(a.startswith("--format=") for a in cmd):
        return "state"
    if verb == "ssh":
        script = remote(cmd)
        return ("install" if "pip install" in script else "train" if "tcjepa_jax.train" in script
                else "follow" if "tail" in script else "ssh")
    return verb


@pytest.mark.parametrize("spec, type_, chips, hosts", [
    ("v5p:4x4x4", "v5p-128", 64, 16), ("v6e:4x4", "v6e-16", 16, 4), ("v4:2x2x2", "v4-16", 8, 2),
    ("v5e:2x4", "v5litepod-8", 8, 1), ("v5e:4x4", "v5litepod-16", 16, 4),
    ("v5p-8", "v5p-8", 4, 1), ("v4-32", "v4-32", 16, 4), ("v5litepod-16", "v5litepod-16", 16, 4),
    ("v5e-4", "v5litepod-4", 4, 1), ("v6e-8", "v6e-8", 8, 1), ("v6e:16x16", "v6e-256", 256, 64)])
def test_accelerator_types(spec, type_, chips, hosts):
    assert tpu.parse_tpu(spec) == dict(generation=tpu.parse_tpu(spec)["generation"], chips=chips,
                                       hosts=hosts, type=type_)


@pytest.mark.parametrize("spec", ["v3-8", "v7:2x2", "v5p-7", "v6e-12", "v5p:1x1x2", "v5p:4",
                                  "tpu", "", "v4:2x2x2x2"])
def test_bad_accelerator_types(spec):
    with pytest.raises(tpu.LaunchError):
        tpu.parse_tpu(spec)


def test_create_tpu_vm_spot_and_queued_reserved():
    rc, cmds, notes = dry("create", *SLICE, "--tpu=v5p:4x4x4", "--spot")
    assert rc == 0 and [label(c) for c in cmds] == ["create", "state"]
    assert cmds[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "h14", "--zone=us-east5-a",
                       "--project=my-proj", "--accelerator-type=v5p-128",
                       "--version=v2-alpha-tpuv5", "--spot"]
    assert cmds[1][3:6] == ["tpu-vm", "describe", "h14"] and cmds[1][-1] == "--format=value(state)"
    assert "64 chips" in notes[0] and "$107.52/hour" in notes[0]  # 64 x 1.68 spot

    rc, cmds, notes = dry("create", *SLICE, "--tpu=v6e:4x4", "--queued", "--reserved",
                          "--valid_until_duration=6h", "--runtime_version=my-image",
                          "--price_per_chip_hour=2")
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "h14",
                       "--zone=us-east5-a", "--project=my-proj", "--node-id=h14",
                       "--accelerator-type=v6e-16", "--runtime-version=my-image", "--reserved",
                       "--valid-until-duration=6h"]
    assert cmds[1][3:5] == ["queued-resources", "describe"]
    assert cmds[1][-1] == "--format=value(state.state)"
    assert "$32.00/hour" in notes[0]
    assert dry("create", *SLICE, "--tpu=v4:2x2x2")[1][0][-1] == "--version=tpu-ubuntu2204-base"


def test_install_wheel_git_and_uploads(tmp_path, monkeypatch):
    rc, cmds, _ = dry("install", *SLICE)
    wheel = tpu.wheel_name()
    assert rc == 0 and [label(c) for c in cmds] == ["wheel", "scp", "install"]
    assert cmds[0][1:5] == ["-m", "pip", "wheel", "--no-deps"] and cmds[0][-1] == tpu.REPO
    assert cmds[1][5].endswith("/" + wheel) and cmds[1][6] == "h14:/tmp/"
    assert "--worker=all" in cmds[1] and "--zone=us-east5-a" in cmds[1]
    script = remote(cmds[2])
    assert "--worker=all" in cmds[2] and "--project=my-proj" in cmds[2]
    assert f'pip install -q "/tmp/{wheel}[tpu]"' in script
    assert f"pip install -q --force-reinstall --no-deps /tmp/{wheel}" in script
    assert "uv venv -q --seed --python 3.11 tcjepa/venv" in script and "tcjepa/configs" in script
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "captions").mkdir(parents=True)
    (tmp_path / "data" / "captions" / "in1k.jsonl").write_text("{}\n")
    rc, cmds, _ = dry("install", *SLICE, "--from_git=https://github.com/me/tcjepa_jax@v0.1",
                      "--upload=data/captions/in1k.jsonl")
    assert [label(c) for c in cmds] == ["install", "scp"]
    script = remote(cmds[0])
    assert 'pip install -q "tcjepa_jax[tpu] @ git+https://github.com/me/tcjepa_jax@v0.1"' in script
    assert "--force-reinstall --no-deps \"tcjepa_jax @ git+https" in script
    assert "mkdir -p tcjepa tcjepa/data/captions" in script
    assert cmds[1][5:7] == ["data/captions/in1k.jsonl", "h14:tcjepa/data/captions/"]


def test_train_command():
    rc, cmds, notes = dry("train", *SLICE, "--tpu=v5p:4x4x4", *TRAIN, "--",
                          "--config.input.data_dir=gs://my-bucket/data", "--config.batch_size=1024")
    assert rc == 0 and len(cmds) == 1 and "--worker=all" in cmds[0]
    script = remote(cmds[0])
    assert ("nohup venv/bin/python -m tcjepa_jax.train --config=configs/in1k_vit_h14.py "
            "--workdir=gs://my-bucket/h14 --config.input.data_dir=gs://my-bucket/data "
            "--config.batch_size=1024 &") in script
    assert "> ../tcjepa_h14.log 2>&1 < /dev/null &" in script and "unset JAX_PLATFORMS" in script
    assert "JAX_PLATFORMS=cpu" not in script
    assert "JAX_COORDINATOR_ADDRESS" in script  # multi-host: 16 hosts join through JAX
    assert "logs --name=h14" in notes[-1]
    single = remote(dry("train", *SLICE, "--tpu=v5p-8", *TRAIN)[1][0])
    assert "JAX_COORDINATOR_ADDRESS" not in single and "delete" not in single
    self_delete = remote(dry("train", *SLICE, "--tpu=v5p-8", "--queued", "--delete_at_end",
                             *TRAIN)[1][0])
    assert "gcloud compute tpus queued-resources delete h14" in self_delete


def test_logs_status_stop_delete():
    cmds = dry("logs", *SLICE)[1]
    assert "--worker=0" in cmds[0] and "tail -n +1 -F" in remote(cmds[0])
    assert "tcjepa_h14.log" in remote(cmds[0])
    assert dry("status", *SLICE)[1] == [["gcloud", "compute", "tpus", "tpu-vm", "describe", "h14",
                                        "--zone=us-east5-a", "--project=my-proj"]]
    assert "kill -TERM" in remote(dry("stop", *SLICE)[1][0])
    assert dry("delete", *SLICE)[1][0][3:] == ["tpu-vm", "delete", "h14", "--zone=us-east5-a",
                                              "--project=my-proj", "--quiet"]
    assert dry("delete", *SLICE, "--queued")[1][0][3:] == [
        "queued-resources", "delete", "h14", "--zone=us-east5-a", "--project=my-proj", "--force",
        "--quiet"]


def test_run_dry_run_sequence():
    rc, cmds, _ = dry("run", *SLICE, "--tpu=v5p:4x4x4", *TRAIN, "--", "--config.seed=1")
    assert rc == 0
    assert [label(c) for c in cmds] == ["create", "state", "wheel", "scp", "install", "train",
                                        "follow"]
    _, cmds, notes = dry("run", *SLICE, "--tpu=v5p:4x4x4", *TRAIN, "--recreate_on_preemption",
                         "--delete_at_end")
    assert [label(c) for c in cmds] == [
        "create", "state", "wheel", "scp", "install", "train", "follow",
        "delete", "create", "state", "wheel", "scp", "install", "train", "follow", "delete"]
    assert any("preempted" in n for n in notes)
    _, cmds, _ = dry("run", *SLICE, "--tpu=v5p-8", *TRAIN, "--no_follow")
    assert label(cmds[-1]) == "train"


class FakeGcloud:
    """Answers state polls from `states` (None = not found) and follows from `follows`."""

    def __init__(self, states, follows):
        self.states, self.follows, self.calls = list(states), list(follows), []

    def __call__(self, argv, capture):
        self.calls.append(label(argv))
        if self.calls[-1] == "state":
            state = self.states.pop(0)
            return (1, "") if state is None else (0, state + "\n")
        if self.calls[-1] == "follow":
            return self.follows.pop(0), ""
        return 0, ""


def test_recreate_on_preemption():
    fake, out = FakeGcloud([None, "READY", "PREEMPTED", "READY"], [255, 0]), io.StringIO()
    rc = tpu.main(["run", *SLICE, "--tpu=v5p:4x4x4", "--spot", *TRAIN, "--recreate_on_preemption"],
                  execute=fake, sleep=lambda s: None, out=out)
    assert rc == 0
    assert fake.calls == ["state", "create", "state", "wheel", "scp", "install", "train", "follow",
                          "state", "delete", "create", "state", "wheel", "scp", "install",
                          "train", "follow"]
    assert "PREEMPTED: deleting it and creating it again" in out.getvalue()


def test_preemption_without_recreate_and_failures():
    fake = FakeGcloud(["READY", "PREEMPTED"], [255])
    assert tpu.main(["run", *SLICE, "--tpu=v5p-8", *TRAIN], execute=fake,
                    sleep=lambda s: None, out=io.StringIO()) == 1
    assert fake.calls[-2:] == ["follow", "state"]  # existed: no create; then stops, no delete
    # training fails on a healthy slice: its status comes back, the slice is deleted at the end
    fake = FakeGcloud(["READY", "READY", "READY"], [3])
    assert tpu.main(["run", *SLICE, "--tpu=v5p-8", *TRAIN, "--delete_at_end"], execute=fake,
                    sleep=lambda s: None, out=io.StringIO()) == 3
    assert fake.calls[-4:] == ["follow", "state", "state", "delete"]


def test_errors(capsys, monkeypatch):
    def error(*argv):
        assert tpu.main(list(argv)) == 1
        return capsys.readouterr().err
    assert "share no disk" in error("train", *SLICE, "--tpu=v5p:4x4x4", "--dry-run",
                                    "--workdir=/tmp/h14", "--config=configs/in1k_vit_h14.py")
    assert "--tpu" in error("run", *SLICE, *TRAIN, "--dry-run")
    assert "v7" in error("create", *SLICE, "--tpu=v7:2x2", "--dry-run")
    assert "--name" in error("create", "--name=H_14", "--project=p", "--zone=z", "--tpu=v5p-8")
    assert "exclude" in error("create", *SLICE, "--tpu=v5p-8", "--spot", "--reserved")
    assert "--workdir" in error("run", *SLICE, "--tpu=v5p-8", "--config=configs/in1k_vit_h14.py")
    assert "before --" in error("run", *SLICE, "--tpu=v5p-8", *TRAIN, "--", "--config=x.py")
    assert "no training flags" in error("delete", *SLICE, "--", "--config.seed=1")
    assert "does not exist" in error("train", *SLICE, "--tpu=v5p-8", "--workdir=gs://b/x",
                                     "--config=configs/nope.py")
    with pytest.raises(SystemExit):  # argparse: --zone is required
        tpu.main(["delete", "--name=h14", "--project=p"])
    capsys.readouterr()
    monkeypatch.setenv("PATH", "/nonexistent")  # no gcloud: one clear line, nothing run
    assert "gcloud not found on PATH" in error("delete", *SLICE)
    fail = lambda argv, capture: (2, "")  # noqa: E731
    assert tpu.main(["delete", *SLICE], execute=fail) == 1
    assert "exit status 2 from: gcloud compute tpus tpu-vm delete h14" in capsys.readouterr().err


def test_script_dry_run():
    proc = subprocess.run(
        [sys.executable, "launch/tpu.py", "run", "--dry-run", *SLICE, "--tpu=v5p:4x4x4", *TRAIN,
         "--", "--config.input.data_dir=gs://my-bucket/data"],
        cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PATH="/nonexistent"),
        timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "$ gcloud compute tpus tpu-vm create h14" in proc.stdout
    assert "--accelerator-type=v5p-128" in proc.stdout and "--worker=0" in proc.stdout


def test_worker_shell(tmp_path):
    """The train / logs / stop scripts, run by bash in a fake home with a fake trainer and a fake
    metadata server (curl): detached start, exit status, SIGTERM, the coordinator address."""
    bin_ = tmp_path / "bin"
    (tmp_path / "tcjepa" / "venv" / "bin").mkdir(parents=True)
    bin_.mkdir()
    trainer = tmp_path / "tcjepa" / "venv" / "bin" / "python"
    trainer.write_text("#!/bin/bash\ntrap 'kill $!; echo \"Preempted: saved step 3, exiting.\"; "
                       "exit 0' TERM\n"
                       'echo "args $* coordinator=$JAX_COORDINATOR_ADDRESS"\n'
                       "if [ -n \"$SLOW\" ]; then sleep 20 & wait; fi\nexit ${RC:-0}\n")
    curl = bin_ / "curl"
    curl.write_text("#!/bin/bash\ncase \"$*\" in *worker-network-endpoints*) "
                    "echo w-0:0:10.0.0.2,w-1:1:10.0.0.3;; *) echo 1;; esac\n")
    for f in (trainer, curl):
        f.chmod(0o755)

    def sh(cmd, **env):
        e = dict(os.environ, HOME=str(tmp_path), PATH=f"{bin_}:{os.environ['PATH']}", **env)
        return subprocess.run(["bash", "-c", remote(cmd)], cwd=tmp_path, env=e, timeout=30,
                              capture_output=True, text=True)

    args, slice_, _ = tpu.parse(["train", *SLICE, "--tpu=v4-16", *TRAIN, "--", "--config.seed=2"])
    assert sh(tpu.train_cmd(args, slice_, ["--config.seed=2"]), RC="3").returncode == 0
    follow = sh(tpu.follow_cmd(args))
    assert follow.returncode == 3
    assert "--config.seed=2 coordinator=10.0.0.2:8476" in follow.stdout
    assert sh(tpu.train_cmd(args, slice_, []), SLOW="1").returncode == 0
    again = sh(tpu.train_cmd(args, slice_, []))
    assert again.returncode == 1 and "already running" in again.stderr
    assert sh(tpu.stop_cmd(args)).returncode == 0
    assert sh(tpu.follow_cmd(args)).returncode == tpu.EXIT_PREEMPTED
