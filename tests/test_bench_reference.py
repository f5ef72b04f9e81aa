"""benchmarks/reference_ijepa.py end to end on a tiny setting, in its own process.

Ours always runs; the reference half needs a checkout of facebookresearch/ijepa named by the
environment variable TCJEPA_IJEPA_DIR (the test never downloads it). Timings are not checked.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "reference_ijepa.py")
# An 80 px image in 8 px patches: a 10x10 grid, the smallest the reference's mask sampler takes.
TINY = ["--model=mu", "--image_size=80", "--patch=8", "--batch=2", "--steps=1", "--warmup=0",
        "--pred_width=48", "--pred_depth=1", "--peak_size=256", "--threads=1"]


def run_benchmark(*flags):
    # conftest.py gives this process 8 fake devices through XLA_FLAGS; the benchmark must see
    # one device, so its environment replaces XLA_FLAGS (and drops the thread settings).
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NPROC", "OMP_NUM_THREADS")}
    env["JAX_PLATFORMS"] = "cpu"
    # Timings are not checked: compile with less optimisation (a third less time).
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    proc = subprocess.run([sys.executable, SCRIPT, *TINY, *flags], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow
def test_ours_only_without_a_checkout():
    out = run_benchmark()
    assert "reference skipped: no --ijepa_dir" in out
    assert "ours, I-JEPA mode" in out and "ours, TC-JEPA mode" in out
    assert "TC-JEPA / I-JEPA (ours): step time x" in out
    # The TC-JEPA row without T5 in the step: features in the batch, fewer FLOPs than with T5.
    assert "ours, TC-JEPA precomputed" in out and "ours, TC-JEPA lean" in out
    ratios = {line.split(" / I-JEPA")[0]: float(line.split("matmul FLOPs x")[1].split(",")[0])
              for line in out.splitlines() if " / I-JEPA (ours)" in line}
    assert ratios["TC-JEPA lean"] < ratios["TC-JEPA precomputed"] < ratios["TC-JEPA"]
    # Without the reference the caps are the exact bounds (0).
    assert "masks.max_context=0, masks.max_target=0" in out


@pytest.mark.skipif(not os.environ.get("TCJEPA_IJEPA_DIR"),
                    reason="set TCJEPA_IJEPA_DIR to a checkout of facebookresearch/ijepa")
def test_against_the_reference():
    out = run_benchmark(f"--ijepa_dir={os.environ['TCJEPA_IJEPA_DIR']}", "--no_tc")
    assert "reference I-JEPA (PyTorch)" in out and "ours, I-JEPA mode" in out
    assert "ours I-JEPA / reference: images/s x" in out
    # Our caps come from the reference's mean lengths, so the token counts agree within 10%.
    ratios = out.split("tokens per image ctx x")[1].split()
    assert abs(float(ratios[0]) - 1) <= 0.1 and abs(float(ratios[2].lstrip("x")) - 1) <= 0.1
