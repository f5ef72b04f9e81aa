"""benchmarks/supervised_ceiling.py end to end on a tiny setting, in its own process: it trains
the study's encoder with labels and reports test accuracy per task. Accuracies are not checked
(4 steps), only that every task is trained and evaluated from the config's probe sets."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_supervised_ceiling_trains_and_reports_every_task():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device is enough
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "supervised_ceiling.py"),
         "--steps=4", "--batch=8", "--eval_points=2", "--config.probe.num_train=40",
         "--config.probe.num_test=30"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "mu/8 at 64 px, 40 training / 30 test images" in out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 0 (init)", "step 2", "step 4"]
    for line in lines:
        accuracies = re.findall(r"(count|shape|color) ([0-9.]+)", line)
        assert [task for task, _ in accuracies] == ["count", "shape", "color"], line
        assert all(0 <= float(value) <= 1 for _, value in accuracies)
    assert re.search(r"step 4: loss [0-9.]+ \|", out)
