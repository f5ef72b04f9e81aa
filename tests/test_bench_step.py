"""benchmarks/step.py end to end on the tiny config: the per-component breakdown (compiled and
run) and the paper-scale FLOPs table (lowered only), each in its own subprocess, both at once.

Nothing about time is asserted beyond "measured": only that every component is there with
positive FLOPs, and that the parts add up to about the whole step.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/synthetic_tiny.py", "--config.batch_size=2"]
COMPONENTS = ["target encoder", "context encoder", "text encoder", "predictor",
              "text conditioner (2 layers)", "loss + penalties", "health monitors",
              "optimizer + EMA"]
IJEPA_COMPONENTS = [c for c in COMPONENTS if not c.startswith("text ")]


def _start(tmp_path, name, flags):
    out = tmp_path / f"{name}.json"
    cmd = [sys.executable, "benchmarks/step.py", *TINY, "--nocompare", f"--json={out}", *flags]
    # Cheaper CPU compiles (LLVM optimisation off): the FLOPs are XLA's HLO counts, the same
    # either way, and no time is asserted.
    xla_flags = os.environ.get("XLA_FLAGS", "") + (" --xla_backend_optimization_level=0"
                                                   " --xla_llvm_disable_expensive_passes=true")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags.strip())
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, out


def _finish(proc, out):
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stdout, json.loads(out.read_text())


def _check_sum(parts, whole, low=0.8, high=1.25):
    total = sum(p["flops"] for p in parts)
    assert low * whole["flops"] <= total <= high * whole["flops"], (total, whole["flops"])


@pytest.mark.slow  # about 50 s of two processes' compiles: a developer tool, kept out of CI time
def test_breakdown_and_paper_tables(tmp_path):
    measured = _start(tmp_path, "breakdown", ["--repeats=1"])
    paper = _start(tmp_path, "paper", ["--paper", "--paper_configs=configs/synthetic_tiny.py",
                                       "--paper_batch=2"])

    stdout, report = _finish(*measured)
    result = report["breakdown"]
    assert [p["name"] for p in result["parts"]] == COMPONENTS
    for row in result["parts"] + [result["whole"]]:
        assert row["flops"] > 0, row
        assert row["seconds"] > 0, row
        assert row["name"] in stdout
    assert "sum of the parts" in stdout and "whole train step" in stdout
    _check_sum(result["parts"], result["whole"])
    passes = {p["name"]: p["passes"] for p in result["parts"]}
    assert passes["context encoder"] == "fwd+bwd" and passes["target encoder"] == "fwd"
    assert passes["text encoder"] == "fwd"  # frozen in this config

    stdout, report = _finish(*paper)
    assert "paper" in report and "breakdown" not in report  # --paper alone: only its table
    (table,) = report["paper"]
    tc, ij = table["tc"], table["ijepa"]
    assert [p["name"] for p in tc["parts"]] == COMPONENTS
    assert [p["name"] for p in ij["parts"]] == IJEPA_COMPONENTS
    for row in tc["parts"] + ij["parts"] + [tc["whole"], ij["whole"]]:
        assert row["flops"] > 0, row
    _check_sum(tc["parts"], tc["whole"])
    _check_sum(ij["parts"], ij["whole"])
    assert ij["whole"]["flops"] < tc["whole"]["flops"]
    assert "TC/I" in stdout and "Paper-scale FLOPs" in stdout
    # The parts the two modes share have the same shapes, so the same FLOPs.
    ij_flops = {p["name"]: p["flops"] for p in ij["parts"]}
    for name in ("target encoder", "context encoder", "predictor"):
        assert next(p["flops"] for p in tc["parts"] if p["name"] == name) == ij_flops[name]
