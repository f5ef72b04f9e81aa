"""The small-scale study: TC-JEPA against I-JEPA, the paper's ablations, a shuffled-caption
control, mask-scale sensitivity and the penalty variants, over seeds, on the synthetic scenes.

    python launch/sweep.py --config=configs/study_synthetic.py:quick --max_parallel=2
    python -m tcjepa_jax.tools.study_report --config=configs/study_synthetic.py:quick \
        --out=docs/study.md

Without `:quick` the full study (SEEDS x every arm of GROUPS). Every run trains the same recipe
(RECIPE below, set once for every arm: no arm is tuned on its own) and evaluates its target
encoder with the linear, kNN, dense and attentive probes and its predictor's grounding
PROBE_POINTS times, evenly spaced, so the report can compare arms at equal steps and at equal
training time. Re-running the sweep command skips finished runs and resumes unfinished ones.
docs/study.md (written by the report) has the results; this file decides what runs.

Arguments (comma separated): `quick` (QUICK: fewer seeds and arms, 12 minutes on 2 CPU
cores, measured); `long` (LONG: the main arms and the control at 2000 steps with larger probe
sets); `groups=a+b` runs only those arm groups (e.g. `groups=main+penalties`);
`seeds=N` the first N seeds.
"""

from configs import common
from configs import synthetic_tiny
from tcjepa_jax import sweeps
from tcjepa_jax.models.penalties import PENALTIES

# ---- The recipe: one place to change the study's scale ---------------------------------------
# Fields set on top of configs/synthetic_tiny.py for every run of every arm.
RECIPE = {
    "batch_size": 32,
    "input.image_size": 64,
    "input.num_captions": 2,
    "input.max_caption_len": 24,
    "model.encoder": "mu/8",
    "model.predictor_width": 96,
    "model.predictor_depth": 2,
    "model.predictor_heads": 3,
    "model.text": "tiny",
    "optim.lr_peak": 3e-3,
    "optim.lr_start": 3e-4,
    "optim.ema_start": 0.99,
    "probe.num_train": 1000,
    "probe.num_test": 500,
    "probe.dense_images": 300,
    "probe.attentive_steps": 100,
    "probe.grounding_images": 100,
}
# Sized so the full study (15 arms x 3 seeds = 45 runs, two at a time) fits in about 90 minutes
# on 2 CPU cores: measured with two runs at a time, a TC-JEPA run takes about 6 minutes at 200
# steps (startup and compile 0.6, 1.4 s per step, evaluations 0.7), an I-JEPA run 3.5; so 150
# steps. docs/study.md has the study's measured wall time.
STEPS = 150             # training steps of every run
PROBE_POINTS = 2        # evaluations per run (the last at the end): probe-vs-time curves
SEEDS = (0, 1, 2)
GROUPS = ("main", "ablations", "control", "mask_scales", "penalties")

# `:quick`: what the 12-minute variant cuts. Two seeds instead of three, and only TC-JEPA,
# I-JEPA and the shuffled-caption control (no ablations, mask scales, penalties).
QUICK = {"seeds": (0, 1), "steps": STEPS, "groups": ("main", "control")}

# `:long`: the main arms and the control at 2000 steps (about 13x the study's), with probe sets
# large enough to resolve differences of 0.01-0.02 (the study's, sized for 150-step runs, have a
# standard error near 0.02). 9 runs, 95 minutes two at a time on 2 CPU cores (measured;
# docs/study_long.md has their results). More arms: `long,groups=main+control+ablations`.
LONG = {"seeds": SEEDS, "steps": 2000, "groups": ("main", "control")}
LONG_PROBES = {"probe.num_train": 8000, "probe.num_test": 2000, "probe.attentive_steps": 400,
               "probe.dense_images": 1000}

DEFAULT_SCALE = (0.15, 0.2)  # masks.target_scale of the main arms (the I-JEPA default)


def _group_arms() -> dict:
    """{group: {arm name: overrides on top of the recipe}}; arm names are the report's labels."""
    scales = [s for s in common.MASK_SCALES if tuple(s) != DEFAULT_SCALE]
    return {
        "main": {"tc_jepa": {}, "i_jepa": {"model.conditioning": "none"}},
        "ablations": {
            "first_layer": {"model.conditioning": "first"},
            "caption_level": {"model.conditioning": "caption"},
            "no_penalties": {"loss.sparse_weight": 0.0, "loss.consistency_weight": 0.0},
            "l2_loss": {"loss.pred": "l2"},
        },
        "control": {"shuffled_captions": {"input.caption_control": "shuffled"}},
        # With the main arms (DEFAULT_SCALE) these make the mask-scale curves of both methods.
        "mask_scales": {
            **{f"tc_scale_{s[0]}-{s[1]}": {"masks.target_scale": tuple(s)} for s in scales},
            **{f"i_scale_{s[0]}-{s[1]}": {"model.conditioning": "none",
                                          "masks.target_scale": tuple(s)} for s in scales},
        },
        # The variants that keep the sparsity penalty alive (models/penalties.py).
        "penalties": {f"penalty_{p}": {"loss.penalty": p} for p in PENALTIES if p != "cosine"},
    }


DESCRIPTIONS = {
    "tc_jepa": "TC-JEPA (conditioning in every predictor layer, the paper's penalties)",
    "i_jepa": "I-JEPA (model.conditioning=none)",
    "first_layer": "conditioning in the first predictor layer only",
    "caption_level": "caption-level conditioning (mean word feature, no penalties)",
    "no_penalties": "lambda = beta = 0",
    "l2_loss": "per-patch L2 prediction loss instead of smooth-L1",
    "shuffled_captions": "control: each image gets another image's captions",
    **{f"penalty_{p}": f"the {p} penalty instead of the paper's rectified cosine"
       for p in PENALTIES if p != "cosine"},
    **{f"{m}_scale_{s[0]}-{s[1]}": f"{name}, target blocks of scale {s[0]}-{s[1]}"
       for m, name in (("tc", "TC-JEPA"), ("i", "I-JEPA")) for s in common.MASK_SCALES},
}


def _parse(arg) -> dict:
    """{"steps", "seeds", "groups"} of the config argument."""
    plan = {"steps": STEPS, "seeds": SEEDS, "groups": GROUPS, "variant": "", "probes": {}}
    words = [w for w in (arg or "").split(",") if w]
    # The presets first, so that `groups=` and `seeds=` refine them in any order.
    for word in sorted(words, key=lambda w: w not in ("quick", "long")):
        key, _, value = word.partition("=")
        if word == "quick":
            plan.update(QUICK, variant="quick")
        elif word == "long":
            plan.update(LONG, variant="long", probes=LONG_PROBES)
        elif key == "groups" and value:
            plan["groups"] = tuple(value.split("+"))
        elif key == "seeds" and value.isdigit() and int(value) > 0:
            plan["seeds"] = tuple(range(int(value)))
        else:
            raise ValueError(f"unknown config argument {word!r}; use quick or long, groups=a+b "
                             f"(of {'+'.join(GROUPS)}) and/or seeds=N.")
    unknown = set(plan["groups"]) - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown arm groups {sorted(unknown)}; choose from {GROUPS}.")
    return plan


def get_config(arg: str = ""):
    plan = _parse(arg)
    config = synthetic_tiny.get_config()
    config.name = "study_synthetic" + (f"_{plan['variant']}" if plan["variant"] else "")
    config = sweeps.apply_overrides(config, {**RECIPE, **plan["probes"]})
    config.total_steps = plan["steps"]
    config.optim.warmup_steps = plan["steps"] // 10
    config.log_every = max(1, plan["steps"] // 60)    # enough points for the loss curves
    config.checkpoint_every = plan["steps"] // 2
    config.keep_checkpoints = 1                       # runs are many; the last one suffices
    config.probe.every = max(1, plan["steps"] // PROBE_POINTS)
    config.probe.evaluators = ("linear", "knn", "dense", "attentive", "grounding")
    return config


def get_arms(arg: str = "") -> dict:
    """{arm name: overrides} of the groups the argument selects, in report order."""
    groups = _group_arms()
    return {name: point for group in _parse(arg)["groups"] for name, point in groups[group].items()}


def get_sweep(arg: str = "") -> list:
    seeds = _parse(arg)["seeds"]
    return [dict(point, seed=seed) for point in get_arms(arg).values() for seed in seeds]
