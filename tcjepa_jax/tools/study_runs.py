"""What the study report reads from a sweep's runs, and the statistics it derives from them.

Per run (ROOT/NAME, NAME from tcjepa_jax.sweeps.run_names of the config's get_sweep):
    final_metrics.json   the run finished; its last logged training metrics and final probes
                         (eval/...), and the same probes on the encoder at init (eval_init/...)
    evals/step_N.json    the probes at every evaluated step (probe.every, and the last step)
    tensorboard/         every logged training scalar with its step and wall time: losses,
                         o_mean/o_frac_pos per layer, monitors, step_time_s

Runs are grouped into arms by their overrides without the seed: the config module's
get_arms(arg) names them ({arm: overrides}); without it an arm is named by its run names with
the seed left out. Time is training time, step x the run's median step_time_s: the median
leaves out the compilation, the intervals slowed by a background evaluation, and a resumed
run's gap, so arms are compared by what their steps cost.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
from typing import NamedTuple

import numpy as np

from tcjepa_jax import paths, sweeps

IMAGE_TASK_EVALUATORS = ("linear", "knn", "attentive")   # their tasks are averaged as <ev>/mean
TRAIN_TAGS = ("loss", "loss_pred", "loss_sparse", "loss_consistency")


class Run(NamedTuple):
    name: str
    arm: str
    seed: int
    overrides: dict
    final: dict        # final_metrics.json's metrics; {} while unfinished
    steps: int         # total_steps reached (final) or planned
    evals: dict        # step -> {probe key: value} (keys without the "eval/" prefix)
    init: dict         # {probe key: value} of the encoder at init
    scalars: dict      # tag -> (steps, values, wall times), numpy arrays

    @property
    def finished(self) -> bool:
        return bool(self.final)


# ---- Loading ---------------------------------------------------------------------------------

def load_config_module(config_arg: str):
    """(module, arg) of `path/to/config.py[:ARGS]` (as launch/sweep.py loads it)."""
    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} does not exist.")
    spec = importlib.util.spec_from_file_location("study_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, arg or ""


def plan(module, arg: str):
    """(base config, {arm: overrides}, [(run name, arm, seed, overrides)])."""
    config = module.get_config(arg)
    points = module.get_sweep(arg)
    names = sweeps.run_names(points)
    if hasattr(module, "get_arms"):
        arms = dict(module.get_arms(arg))
    else:
        arms = {}
        for name, point in zip(names, points):
            rest = {k: v for k, v in point.items() if k != "seed"}
            label = re.sub(r"(^|_)seed=[^_]*", "", name).strip("_") or "base"
            arms.setdefault(label, rest)
    runs = []
    for name, point in zip(names, points):
        rest = {k: v for k, v in point.items() if k != "seed"}
        arm = next((a for a, o in arms.items() if o == rest), name)
        runs.append((name, arm, int(point.get("seed", config.seed)), point))
    return config, arms, runs


def probe_values(results: dict, prefix: str = "eval/") -> dict:
    """{"linear/count": v, ..., "linear/mean": mean over tasks, "grounding/context_lift": ...}
    of results keyed f"{prefix}<evaluator>/<key>"."""
    out = {k[len(prefix):]: float(v) for k, v in results.items()
           if k.startswith(prefix) and isinstance(v, (int, float))}
    for ev in IMAGE_TASK_EVALUATORS:
        tasks = [v for k, v in out.items() if k.startswith(ev + "/") and k != ev + "/mean"]
        if tasks:
            out[ev + "/mean"] = float(np.mean(tasks))
    for kind in ("context", "target"):
        chance = out.get(f"grounding/{kind}_chance")
        if chance:
            out[f"grounding/{kind}_lift"] = out[f"grounding/{kind}"] / chance
    return out


def read_scalars(workdir: str) -> dict:
    """{tag: (steps, values, wall times)} of the TensorBoard events; a step logged twice (a
    resumed run) keeps its latest value."""
    from tensorboardX.proto import event_pb2
    from tcjepa_jax.tools.plot import _records

    latest = {}
    for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "**",
                                              "events.out.tfevents.*"), recursive=True)):
        for record in _records(paths.read_bytes(path)):
            event = event_pb2.Event.FromString(record)
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if not value.HasField("simple_value"):
                    continue
                key = (value.tag, int(event.step))
                if key not in latest or event.wall_time >= latest[key][0]:
                    latest[key] = (event.wall_time, float(value.simple_value))
    out = {}
    for (tag, step), (wall, value) in sorted(latest.items()):
        out.setdefault(tag, []).append((step, value, wall))
    return {tag: tuple(np.asarray(col) for col in zip(*points)) for tag, points in out.items()}


def read_run(root: str, name: str, arm: str, seed: int, overrides: dict, planned: int) -> Run:
    workdir = os.path.join(root, name)
    final_path = os.path.join(workdir, "final_metrics.json")
    final = json.loads(paths.read_bytes(final_path)) if paths.exists(final_path) else {}
    evals = {}
    for path in glob.glob(os.path.join(workdir, "evals", "step_*.json")):
        results = json.loads(paths.read_bytes(path))
        evals[int(results.get("step", re.sub(r"\D", "", os.path.basename(path))))] = \
            probe_values(results)
    scalars = read_scalars(workdir) if os.path.isdir(os.path.join(workdir, "tensorboard")) else {}
    metrics = final.get("metrics", {})
    return Run(name, arm, seed, overrides, metrics, int(final.get("step", planned)),
               dict(sorted(evals.items())), probe_values(metrics, "eval_init/"), scalars)


def load_runs(root: str, config_arg: str):
    """(base config, {arm: overrides}, [Run]) of the study config's sweep under root."""
    module, arg = load_config_module(config_arg)
    config, arms, planned = plan(module, arg)
    runs = [read_run(root, name, arm, seed, point, int(config.total_steps))
            for name, arm, seed, point in planned]
    return module, config, arms, runs


# ---- Per-run statistics ----------------------------------------------------------------------

def seconds_per_step(run: Run) -> float:
    """Median of the logged step_time_s (see the module docstring); NaN if none."""
    values = run.scalars.get("step_time_s", (None, np.zeros(0)))[1]
    return float(np.median(values)) if len(values) else float("nan")


def wall_span(run: Run) -> tuple:
    """(first, last) wall time of the run's logged events (NaN, NaN without logs)."""
    walls = [w for _, _, w in run.scalars.values() if len(w)]
    if not walls:
        return float("nan"), float("nan")
    return float(min(w.min() for w in walls)), float(max(w.max() for w in walls))


def final_probes(run: Run) -> dict:
    """The probes at the run's last step (final_metrics.json)."""
    return probe_values(run.final) if run.finished else {}


def probe_curve(run: Run, key: str) -> tuple:
    """(steps, values) of one probe key over the evaluated steps, step 0 being the encoder at
    init when it was evaluated."""
    points = [(0, run.init[key])] if key in run.init else []
    points += [(s, v[key]) for s, v in run.evals.items() if key in v]
    if not points:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*points)
    return np.asarray(steps, float), np.asarray(values, float)


def probe_at_time(run: Run, key: str, seconds: float) -> float:
    """The probe key interpolated at `seconds` of training (NaN past the run's last
    evaluation or without a time per step)."""
    steps, values = probe_curve(run, key)
    spr = seconds_per_step(run)
    if not len(steps) or not np.isfinite(spr) or seconds > steps[-1] * spr + 1e-9:
        return float("nan")
    return float(np.interp(seconds, steps * spr, values))


def late_mean(run: Run, tag: str, fraction: float = 0.2) -> float:
    """Mean of a training scalar over the last `fraction` of the logged steps (one batch's
    value is noisy); NaN if it was not logged."""
    if tag not in run.scalars:
        return float("nan")
    steps, values, _ = run.scalars[tag]
    return float(values[steps >= steps.max() * (1 - fraction)].mean())


def layer_mean(run: Run, prefix: str, fraction: float = 0.2) -> float:
    """late_mean averaged over the conditioned layers (o_mean/layer0, ...)."""
    tags = [t for t in run.scalars if t.startswith(prefix + "/layer")]
    return float(np.mean([late_mean(run, t, fraction) for t in tags])) if tags else float("nan")


def layer_curve(run: Run, prefix: str) -> tuple:
    """(steps, values averaged over the conditioned layers) of e.g. o_frac_pos."""
    tags = sorted(t for t in run.scalars if t.startswith(prefix + "/layer"))
    if not tags:
        return np.zeros(0), np.zeros(0)
    steps = run.scalars[tags[0]][0]
    return steps, np.mean([run.scalars[t][1][:len(steps)] for t in tags], 0)


# ---- Over seeds ------------------------------------------------------------------------------

def by_arm(runs: list, arms: dict) -> dict:
    """{arm: [finished runs]} in the arms' order."""
    return {arm: [r for r in runs if r.arm == arm and r.finished] for arm in arms}


def stats(values) -> tuple:
    """(mean, std over seeds (ddof 1; 0 for one value), n) of the finite values."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], float)
    if not len(values):
        return float("nan"), float("nan"), 0
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0, len(values)


def paired(runs_a: list, runs_b: list, value) -> tuple:
    """stats of value(a) - value(b) over the seeds both arms have."""
    b = {r.seed: value(r) for r in runs_b}
    return stats([value(r) - b[r.seed] for r in runs_a if r.seed in b])


def mean_curve(runs: list, curve) -> tuple:
    """(x, mean, std) over runs of curve(run) -> (x, y), on the x values all runs share."""
    curves = [curve(r) for r in runs]
    curves = [(x, y) for x, y in curves if len(x)]
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    common = sorted(set.intersection(*(set(np.asarray(x).tolist()) for x, _ in curves)))
    ys = np.asarray([[dict(zip(np.asarray(x).tolist(), y))[c] for c in common] for x, y in curves])
    return np.asarray(common, float), ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else 0 * ys[0]
