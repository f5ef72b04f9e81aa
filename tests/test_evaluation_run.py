"""Evaluators and monitors inside real (tiny) runs: periodic and final evaluations with their
JSON files, `python -m tcjepa_jax.evaluate` on a checkpoint, and the collapse warning."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tcjepa_jax import evaluation
from tcjepa_jax import monitors
from tcjepa_jax import train as train_lib
from tcjepa_jax.config_lib import UserError

import test_train


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)


def _train(config, workdir):
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return train_lib.train(config, workdir)
    finally:
        signal.signal(signal.SIGTERM, handler)


def test_periodic_and_final_evaluations_and_the_evaluate_command(tokenizer_path, tmp_path):
    config = test_train.tiny_config(tokenizer_path)
    config.total_steps = 4
    config.probe.enabled = True
    config.probe.every = 2
    config.probe.num_train, config.probe.num_test = 64, 32
    config.probe.attentive_steps = 5
    workdir = str(tmp_path / "run")
    metrics = _train(config, workdir)

    evaluators = ("linear", "knn", "dense", "attentive")
    with open(os.path.join(workdir, "evals", "step_2.json")) as f:
        periodic = json.load(f)
    assert periodic["step"] == 2
    assert {k.split("/")[1] for k in periodic if k.startswith("eval/")} == set(evaluators)
    assert 0 <= periodic["eval/dense/miou"] <= 1
    with open(os.path.join(workdir, "evals", "step_4.json")) as f:
        final = json.load(f)
    assert final["eval/linear/count"] == metrics["eval/linear/count"]
    assert "eval_init/knn/shape" in final
    for name in ("monitor/target_std", "monitor/target_rank", "monitor/pred_std",
                 "monitor/pred_target_cos"):
        assert name in metrics

    # Standalone, on the context encoder of step 3's checkpoint.
    results = evaluation.evaluate_checkpoint(workdir, step=3, encoder="context")
    assert set(results) == set(final) - {"step"}
    assert os.path.exists(os.path.join(workdir, "evals", "step_3.json"))
    with pytest.raises(Exception, match="no checkpoint of step 2"):
        evaluation.evaluate_checkpoint(workdir, step=2)

    # Probe overrides: other settings for this evaluation only, written beside the run's evals.
    with open(os.path.join(workdir, "evals", "step_4.json")) as f:
        own = f.read()
    overrides = {"evaluators": ("linear",), "num_train": 48, "tasks": ("color",)}
    results = evaluation.evaluate_checkpoint(workdir, probe_overrides=overrides)
    assert set(results) == {"eval/linear/color", "eval_init/linear/color"}
    with open(os.path.join(workdir, "evals", "probe_overrides", "step_4.json")) as f:
        written = json.load(f)
    assert written["probe_overrides"]["num_train"] == 48 and written["step"] == 4
    with open(os.path.join(workdir, "evals", "step_4.json")) as f:
        assert f.read() == own
    with pytest.raises(UserError, match="num_trian"):
        evaluation.evaluate_checkpoint(workdir, probe_overrides={"num_trian": 48})
    with pytest.raises(UserError, match="probe.num_train=0"):
        evaluation.evaluate_checkpoint(workdir, probe_overrides={"num_train": 0})


def test_evaluate_command_reports_a_misspelled_probe_field_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tcjepa_jax.evaluate", f"--workdir={tmp_path}",
                           "--probe.num_trian=8000"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert 'Did you mean "num_train"' in proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow  # kept out of the default run (CI time); pytest -m slow
def test_collapse_warning_fires_on_a_forced_collapse_only(tokenizer_path, tmp_path,
                                                          monkeypatch):
    """Without EMA (the target is the online encoder) and with a huge learning rate and
    weight decay, the target features' effective rank falls to about a third within a few
    steps; the same config trained normally keeps it. Warning threshold: half."""
    warnings = []
    monkeypatch.setattr(monitors.logging, "warning", lambda *args: warnings.append(args))

    def run(name, **optim):
        config = test_train.tiny_config(tokenizer_path)
        config.batch_size, config.total_steps = 8, 8
        config.model.conditioning = "none"
        config.monitor.collapse_fraction = 0.5
        config.optim.update(optim)
        warnings.clear()
        _train(config, str(tmp_path / name))
        return [w[2] for w in warnings if "collapse" in w[0]]

    assert run("healthy") == []
    assert "monitor/target_rank" in run("collapse", ema_start=0.0, ema_end=0.0, lr_peak=0.05,
                                        wd_start=50.0, wd_end=50.0)
