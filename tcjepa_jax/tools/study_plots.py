"""The study report's figures (matplotlib, headless): curves are means over an arm's seeds with
a ±1 std band; the mask-scale arms have their own figure, every other arm is on the curves."""

from __future__ import annotations

import math
import os

import numpy as np
from matplotlib.figure import Figure

from tcjepa_jax.tools import study_runs as sr
from tcjepa_jax.tools.plot_figures import save

PROBE_PANELS = ("linear/count", "linear/shape", "linear/color", "knn/mean", "attentive/mean",
                "dense/miou", "grounding/context_lift", "grounding/target_lift")
LOSS_PANELS = ("loss", "loss_pred", "loss_sparse", "loss_consistency")


def _grid(n: int, title: str):
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.8), layout="constrained")
    fig.suptitle(title, fontsize=10)
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.axis("off")
    return fig, axes[:n]


def _band(ax, x, mean, std, label, color):
    if not len(x):
        return False
    ax.plot(x, mean, label=label, color=color, linewidth=1.3, marker="o" if len(x) < 12 else None,
            markersize=3)
    if np.any(std):
        ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.15, linewidth=0)
    return True


def _finish(ax, title, xlabel):
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)


def _legend(fig, axes):
    handles = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(5, len(handles)), fontsize=7)


def curve_arms(study) -> dict:
    """{arm: runs} of the arms drawn on the curves (not the mask-scale variants)."""
    scale_only = {a for a, o in study.arms.items() if "masks.target_scale" in o}
    return {a: runs for a, runs in study.by_arm.items() if runs and a not in scale_only}


def probes_figure(study, time_axis: bool) -> Figure:
    arms = curve_arms(study)
    budget = study.time_budget() if time_axis else float("nan")
    what = "training time (s: step x median s/step)" if time_axis else "step"
    fig, axes = _grid(len(PROBE_PANELS), f"Probes against {what}; step 0 is the encoder at init")
    for ax, key in zip(axes, PROBE_PANELS):
        for i, (arm, runs) in enumerate(arms.items()):
            x, mean, std = sr.mean_curve(runs, lambda r: sr.probe_curve(r, key))
            if time_axis:
                x = x * np.mean([sr.seconds_per_step(r) for r in runs])
            _band(ax, x, mean, std, arm, f"C{i % 10}")
        if np.isfinite(budget):
            ax.axvline(budget, color="k", linestyle=":", linewidth=1)
        _finish(ax, key, "seconds" if time_axis else "step")
    _legend(fig, axes)
    return fig


def losses_figure(study) -> Figure:
    arms = curve_arms(study)
    fig, axes = _grid(len(LOSS_PANELS), "Loss parts against the step")
    for ax, tag in zip(axes, LOSS_PANELS):
        for i, (arm, runs) in enumerate(arms.items()):
            x, mean, std = sr.mean_curve(runs, lambda r: r.scalars.get(tag, (np.zeros(0),) * 2)[:2])
            _band(ax, x, mean, std, arm, f"C{i % 10}")
        if tag == "loss_pred":
            ax.set_yscale("log")
        _finish(ax, tag, "step")
    _legend(fig, axes)
    return fig


def o_figure(study) -> Figure:
    arms = curve_arms(study)
    panels = (("o_frac_pos", "fraction of O > 0 (mean over layers)"),
              ("o_mean", "mean of O (mean over layers)"),
              ("grounding/context_lift", "grounding, context tokens (1 = chance)"),
              ("grounding/target_lift", "grounding, mask tokens (1 = chance)"))
    fig, axes = _grid(len(panels), "O statistics and grounding against the step")
    for ax, (key, title) in zip(axes, panels):
        for i, (arm, runs) in enumerate(arms.items()):
            if key.startswith("grounding/"):
                curve = lambda r, key=key: sr.probe_curve(r, key)  # noqa: E731
            else:
                curve = lambda r, key=key: sr.layer_curve(r, key)  # noqa: E731
            _band(ax, *sr.mean_curve(runs, curve), arm, f"C{i % 10}")
        if key.startswith("grounding/"):
            ax.axhline(1.0, color="k", linestyle=":", linewidth=1)
        _finish(ax, title, "step")
    _legend(fig, axes)
    return fig


def scales_figure(study, metrics) -> Figure:
    arms = study.scale_arms()
    fig, axes = _grid(len(metrics), "Final probes against the target block scale (mean ± std)")
    for ax, key in zip(axes, metrics):
        for i, method in enumerate(("TC-JEPA", "I-JEPA")):
            points = sorted((s, a) for (m, s), a in arms.items() if m == method)
            xs, means, stds = [], [], []
            for scale, arm in points:
                mean, std, n = sr.stats([sr.final_probes(r).get(key, np.nan)
                                         for r in study.by_arm[arm]])
                if n:
                    xs.append(sum(scale) / 2)
                    means.append(mean)
                    stds.append(std)
            if xs:
                ax.errorbar(xs, means, yerr=stds, label=method, color=f"C{i}", marker="o",
                            markersize=4, capsize=3, linewidth=1.3)
        _finish(ax, key, "target scale (middle of the range)")
    _legend(fig, axes)
    return fig


def make_all(study, folder: str) -> list:
    """[(title, path)] of the PNGs written into folder."""
    if not any(study.by_arm.values()):
        return []
    from tcjepa_jax.tools.study_report import SCALE_METRICS
    figures = [("Probes against steps", "probes_vs_steps.png", probes_figure(study, False)),
               ("Probes against training time", "probes_vs_time.png", probes_figure(study, True)),
               ("Loss parts", "losses.png", losses_figure(study)),
               ("O statistics and grounding", "o_statistics.png", o_figure(study))]
    if study.scale_arms():
        figures.append(("Mask-scale sensitivity", "mask_scales.png",
                        scales_figure(study, SCALE_METRICS)))
    return [(title, save(fig, os.path.join(folder, name))) for title, name, fig in figures]
