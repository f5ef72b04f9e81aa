"""The study report: a sweep's runs as markdown tables (mean ± std over seeds) and PNG plots.

    python -m tcjepa_jax.tools.study_report --config=configs/study_synthetic.py[:ARGS] \
        [--root=runs/sweeps/<config name>] [--out=docs/study.md] [--images=DIR]

--config is the sweep's own config argument: it says which runs exist (get_sweep), how they
form arms (get_arms) and what they share. Unfinished runs are left out of every statistic and
listed. Plots go to --images (default: images/<out name>/ next to --out). What the tables
contain and how time is measured: tools/study_runs.py. Text between `<!-- keep:NAME -->` and
`<!-- /keep:NAME -->` in an existing --out survives a rewrite (the reading of the results).
"""

from __future__ import annotations

import functools
import os
import re
import sys
import time

import numpy as np

from tcjepa_jax import paths, sweeps
from tcjepa_jax.tools import study_runs as sr

PROBE_COLUMNS = {
    "linear": ("count", "shape", "color", "mean"),
    "knn": ("count", "shape", "color", "mean"),
    "attentive": ("count", "shape", "color", "mean"),
    "dense": ("miou", "pixel_accuracy", "patch_accuracy"),
    "grounding": ("context", "context_chance", "context_lift", "target", "target_chance",
                  "target_lift"),
}
HEADLINE = ("linear/count", "linear/shape", "linear/color", "knn/mean", "attentive/mean",
            "dense/miou")
SCALE_METRICS = ("linear/mean", "knn/mean", "attentive/mean", "dense/miou")
TRAIN_COLUMNS = (("loss_pred", "loss_pred"), ("loss_sparse", "loss_sparse"),
                 ("loss_consistency", "loss_consistency"), ("monitor/target_rank", "target rank"))
REFERENCE_ARM = "i_jepa"
KEEP = re.compile(r"<!-- keep:(\w+) -->\n?(.*?)<!-- /keep:\1 -->", re.S)
TODO = "_To be written: what these results say, and what they do not._\n"


def fmt(mean: float, std: float, n: int, expected: int, digits: int = 3) -> str:
    if not n:
        return "—"
    text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    return text + (f" (n={n})" if n < expected else "")


def table(header: list, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]) + "\n"


class Study:
    """The runs of one sweep, grouped into arms, and what every table needs of them."""

    def __init__(self, root: str, config_arg: str):
        self.root, self.config_arg = root, config_arg
        self.module, self.config, self.arms, self.runs = sr.load_runs(root, config_arg)
        self.by_arm = sr.by_arm(self.runs, self.arms)
        self.seeds = max((sum(r.arm == a for r in self.runs) for a in self.arms), default=0)
        self.effective = {a: sweeps.apply_overrides(self.config, o) for a, o in self.arms.items()}
        self.reference = REFERENCE_ARM if self.by_arm.get(REFERENCE_ARM) else None

    def cell(self, arm: str, value, digits: int = 3) -> str:
        return fmt(*sr.stats([value(r) for r in self.by_arm[arm]]), self.seeds, digits)

    def scale_arms(self) -> dict:
        """{("TC-JEPA" | "I-JEPA", target scale): arm} of the arms that differ from the recipe
        in the conditioning and the target scale at most (the mask-scale curves)."""
        out = {}
        for arm, overrides in self.arms.items():
            cond = self.effective[arm].model.conditioning
            if set(overrides) <= {"model.conditioning", "masks.target_scale"} and cond in (
                    "all", "none"):
                method = "TC-JEPA" if cond == "all" else "I-JEPA"
                out[(method, tuple(self.effective[arm].masks.target_scale))] = arm
        return out if len({s for _, s in out}) > 1 else {}

    def time_budget(self) -> float:
        """Training seconds of the shortest run: every run's curve reaches it (an arm's mean
        would leave its faster seeds without a value there)."""
        costs = [r.steps * sr.seconds_per_step(r) for runs in self.by_arm.values()
                 for r in runs]
        costs = [c for c in costs if np.isfinite(c)]
        return min(costs) if costs else float("nan")


# ---- Sections ----------------------------------------------------------------------------------

def section_setup(study: Study) -> str:
    module, config = study.module, study.config
    # The recipe's fields as this variant sets them (`:long` lays larger probe sets over them).
    recipe = {key: functools.reduce(getattr, key.split("."), config)
              for key in getattr(module, "RECIPE", {})}
    done = [r for r in study.runs if r.finished]
    steps = sorted({r.steps for r in done}) or [config.total_steps]
    evaluated = sorted({s for r in done for s in r.evals})
    probes = (f"probes at steps {', '.join(map(str, evaluated))}" if evaluated else
              f"probes every {config.probe.every} steps and at the end")
    lines = [f"Config `{study.config_arg}`: {len(study.arms)} arms x {study.seeds} seeds, "
             f"{' or '.join(map(str, steps))} steps of batch {config.batch_size} each, "
             f"{probes}; runs under `{study.root}`.\n",
             "Recipe (every arm): " + ", ".join(f"`{k}={sweeps.flag_value(v)}`"
                                                for k, v in recipe.items()) + ".\n"]
    descriptions = getattr(module, "DESCRIPTIONS", {})
    rows = []
    for arm, overrides in study.arms.items():
        done = len(study.by_arm[arm])
        planned = sum(r.arm == arm for r in study.runs)
        rows.append([f"`{arm}`", descriptions.get(arm, ""),
                     " ".join(f"`{k}={sweeps.flag_value(v)}`" for k, v in overrides.items())
                     or "(the recipe)", f"{done}/{planned}"])
    lines.append(table(["arm", "what", "overrides", "finished runs"], rows))
    missing = [r.name for r in study.runs if not r.finished]
    if len(missing) == len(study.runs):
        lines.append(f"No run has finished yet under `{study.root}`.\n")
    elif missing:
        lines.append(f"Unfinished (left out): {', '.join(f'`{m}`' for m in missing)}.\n")
    spans = [sr.wall_span(r) for r in study.runs if r.finished]
    spans = [s for s in spans if np.isfinite(s[0])]
    if spans:
        lines.append(f"Wall time from the first to the last logged event of any run: "
                     f"{(max(e for _, e in spans) - min(s for s, _ in spans)) / 60:.1f} min "
                     f"(the runs' own spans add up to {sum(e - s for s, e in spans) / 60:.1f} "
                     "min).\n")
    return "\n".join(lines)


def section_probes(study: Study) -> str:
    """One table per evaluator: the final probes (equal steps), the encoder at init last."""
    out = []
    present = {k.split("/")[0] for runs in study.by_arm.values() for r in runs
               for k in sr.final_probes(r)}
    for ev, columns in PROBE_COLUMNS.items():
        if ev not in present:
            continue
        rows = [[f"`{arm}`"] + [study.cell(arm, lambda r, k=f"{ev}/{c}": sr.final_probes(r).get(
            k, np.nan)) for c in columns] for arm in study.arms if study.by_arm[arm]]
        init_runs = [r for runs in study.by_arm.values() for r in runs]
        rows.append(["encoder at init"] + [fmt(*sr.stats([r.init.get(f"{ev}/{c}", np.nan)
                                                          for r in init_runs]), 0)
                                           for c in columns])
        out.append(f"**{ev}**\n\n" + table(["arm"] + list(columns), rows))
    return "\n".join(out) or "No finished run has probe results yet.\n"


def section_differences(study: Study, value_of, what: str) -> str:
    ref = study.reference
    if ref is None:
        return ""
    rows = []
    for arm, runs in study.by_arm.items():
        if arm == ref or not runs:
            continue
        rows.append([f"`{arm}`"] + [fmt(*sr.paired(runs, study.by_arm[ref],
                                                    lambda r, k=k: value_of(r, k)), 0)
                                    for k in HEADLINE])
    return (f"Paired by seed, arm minus `{ref}` ({what}); positive favours the arm.\n\n"
            + table(["arm"] + list(HEADLINE), rows)) if rows else ""


def section_equal_time(study: Study) -> str:
    budget = study.time_budget()
    if not np.isfinite(budget):
        return "No step times logged yet.\n"
    rows = []
    for arm, runs in study.by_arm.items():
        if not runs:
            continue
        steps = sr.stats([budget / sr.seconds_per_step(r) for r in runs])[0]
        rows.append([f"`{arm}`", f"{steps:.0f}"] + [
            study.cell(arm, lambda r, k=k: sr.probe_at_time(r, k, budget)) for k in HEADLINE])
    text = (f"Every run's probe-against-time curve (the encoder at init at 0 s, then each "
            f"evaluation at step x its median time per step, linearly interpolated) read at "
            f"{budget:.3g} s, the shortest run's training time.\n\n"
            + table(["arm", "steps in budget"] + list(HEADLINE), rows))
    diff = section_differences(study, lambda r, k: sr.probe_at_time(r, k, budget),
                               f"at {budget:.3g} s")
    return text + ("\n" + diff if diff else "")


def section_training(study: Study) -> str:
    rows = []
    for arm, runs in study.by_arm.items():
        if not runs:
            continue
        row = [f"`{arm}`", study.cell(arm, sr.seconds_per_step, 3),
               study.cell(arm, lambda r: r.steps * sr.seconds_per_step(r), 0)]
        row += [study.cell(arm, lambda r, t=t: sr.late_mean(r, t), 4) for t, _ in TRAIN_COLUMNS]
        row += [study.cell(arm, lambda r: sr.layer_mean(r, "o_frac_pos"), 4),
                study.cell(arm, lambda r: sr.layer_mean(r, "o_mean"), 4)]
        rows.append(row)
    if not rows:
        return "No finished run yet.\n"
    header = (["arm", "s / step", "train s"] + [label for _, label in TRAIN_COLUMNS]
              + ["o_frac_pos", "o_mean"])
    return ("Losses, the target features' effective rank and the O statistics (averaged over "
            "conditioned layers) are means over the last 20% of the logged steps; s / step is "
            "the median logged step time.\n\n" + table(header, rows))


def section_scales(study: Study) -> str:
    arms = study.scale_arms()
    if not arms:
        return "This sweep has no mask-scale arms.\n"
    scales = sorted({s for _, s in arms})
    methods = [m for m in ("TC-JEPA", "I-JEPA") if any(k[0] == m for k in arms)]
    header = ["target scale"] + [f"{m} {k}" for k in SCALE_METRICS for m in methods]
    rows, means = [], {}
    for scale in scales:
        row = [f"{scale[0]}-{scale[1]}"]
        for k in SCALE_METRICS:
            for m in methods:
                arm = arms.get((m, scale))
                if arm is None or not study.by_arm[arm]:
                    row.append("—")
                    continue
                row.append(study.cell(arm, lambda r, k=k: sr.final_probes(r).get(k, np.nan)))
                means.setdefault((m, k), []).append(
                    sr.stats([sr.final_probes(r).get(k, np.nan) for r in study.by_arm[arm]])[0])
        rows.append(row)
    if not means:
        return "No finished mask-scale run yet.\n"
    rows.append(["range (max − min)"] + [
        f"{np.nanmax(means[(m, k)]) - np.nanmin(means[(m, k)]):.3f}" if (m, k) in means else "—"
        for k in SCALE_METRICS for m in methods])
    return ("Final probes against masks.target_scale; the last row is the spread of the means "
            "over scales (the paper predicts a smaller one for TC-JEPA).\n\n"
            + table(header, rows))


def keep_block(name: str, kept: dict, default: str) -> str:
    return f"<!-- keep:{name} -->\n{kept.get(name, default)}<!-- /keep:{name} -->\n"


def write_report(root: str, config_arg: str, out: str, images: str = "") -> str:
    """Writes the markdown (and the plots); returns the markdown."""
    from tcjepa_jax.tools import study_plots
    study = Study(root, config_arg)
    images = images or os.path.join(os.path.dirname(out) or ".", "images",
                                    os.path.splitext(os.path.basename(out))[0])
    written = study_plots.make_all(study, images)
    kept = dict(KEEP.findall(paths.read_bytes(out).decode())) if paths.exists(out) else {}
    base = config_arg.split(":")[0]
    parts = [
        "# Study: does text conditioning help? TC-JEPA against I-JEPA on the synthetic scenes\n",
        keep_block("summary", kept, TODO),
        "## How to run it\n",
        "One sweep, then this report (re-run the sweep after an interruption: finished runs "
        "are skipped, unfinished ones resume from their last checkpoint):\n",
        f"    python launch/sweep.py --config={config_arg} --max_parallel=2\n"
        f"    python -m tcjepa_jax.tools.study_report --config={config_arg} --out={out}\n\n"
        f"The other variants: the same two commands with `--config={base}` (the full study), "
        f"`{base}:quick` or `{base}:long`. "
        "configs/study_synthetic.py holds the recipe, the seeds, the steps and the arms "
        "(and says what each variant cuts); docs/launch.md describes sweeps. Runs go to "
        "`runs/sweeps/<config name>/<run>`; the report reads their `final_metrics.json`, "
        "`evals/step_N.json` and TensorBoard logs (tcjepa_jax/tools/study_runs.py). Time is "
        "training time, step x the run's median step time, so it is measured under whatever "
        "else ran on the machine: `--max_parallel=1` on an idle machine gives the cleanest "
        "equal-time comparison.\n",
        f"*Generated by `python -m tcjepa_jax.tools.study_report --config={config_arg} "
        f"--root={root} --out={out}` on {time.strftime('%Y-%m-%d %H:%M')}.*\n",
        "## Setup\n", section_setup(study),
        "## Probes at equal steps\n",
        f"Mean ± std over seeds at the last step; `(n=k)`: only k of {study.seeds} seeds "
        "finished. Probe definitions: docs/evaluation.md (grounding: `lift` = attention mass "
        "on the own object's words / chance).\n", section_probes(study),
        section_differences(study, lambda r, k: sr.final_probes(r).get(k, np.nan),
                            "at the last step"),
        "## Probes at equal training time\n", section_equal_time(study),
        "## Training statistics\n", section_training(study),
        "## Mask-scale sensitivity\n", section_scales(study),
        "## Plots\n",
        "".join(f"![{name}]({os.path.relpath(path, os.path.dirname(out) or '.')})\n\n"
                for name, path in written) or "No plots (no finished runs).\n",
        "## Reading\n", keep_block("reading", kept, TODO),
    ]
    text = "\n".join(parts)
    paths.write_text(out, text)
    return text


def main(argv=None) -> int:
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="configs/F.py[:ARGS], as for the sweep")
    parser.add_argument("--root", default=None, help="default runs/sweeps/<config name>")
    parser.add_argument("--out", default="docs/study.md")
    parser.add_argument("--images", default="", help="default images/<out name> beside --out")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        module, arg = sr.load_config_module(args.config)
        root = args.root or os.path.join("runs", "sweeps", module.get_config(arg).name)
        write_report(root, args.config, args.out, args.images)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
