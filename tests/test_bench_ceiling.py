"""benchmarks/supervised_ceiling.py and torch_ceiling.py end to end on a tiny setting, each in its
own process: they train the study's encoder (or timm's ViT, or a CNN) with labels and report test
accuracy per task (the JAX one also the kNN probe's on the same features). Accuracies are not
checked (4 steps), only that every task is trained and evaluated from the config's probe sets."""

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device is enough
    env["JAX_PLATFORMS"] = "cpu"
    return env


@pytest.mark.slow  # about 25 s: a developer tool, kept out of CI time
def test_supervised_ceiling_trains_and_reports_every_task():
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "supervised_ceiling.py"),
         "--steps=4", "--batch=8", "--eval_points=2", "--config.probe.num_train=40",
         "--config.probe.num_test=30"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "mu/8 at 64 px, 40 training / 30 test images" in out
    lines = _check_lines(out, readouts=2)
    assert all(" | kNN count " in line for line in lines)


def _check_lines(out, readouts: int = 1):
    """Every report line has each task's accuracy once per readout (heads, then kNN)."""
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 0 (init)", "step 2", "step 4"]
    for line in lines:
        accuracies = re.findall(r"(count|shape|color) ([0-9.]+)", line)
        assert [task for task, _ in accuracies] == ["count", "shape", "color"] * readouts, line
        assert all(0 <= float(value) <= 1 for _, value in accuracies)
    assert re.search(r"step 4: loss [0-9.]+ \|", out)
    return lines


@pytest.mark.parametrize("model", ["timm", pytest.param("cnn", marks=pytest.mark.slow)])  # CI time
def test_torch_ceiling_trains_and_reports_every_task(model):
    """benchmarks/torch_ceiling.py: the same probe sets and report lines, in PyTorch."""
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "torch_ceiling.py"), f"--model={model}",
         "--steps=4", "--batch=8", "--eval_points=2", "--threads=1",
         "--config.probe.num_train=40", "--config.probe.num_test=30"],
        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    name = "timm ViT mu/8" if model == "timm" else "CNN"
    assert f"{name} at 64 px, 40 training / 30 test images" in out
    _check_lines(out)
