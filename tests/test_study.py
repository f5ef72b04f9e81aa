"""The study (configs/study_synthetic.py, docs/study.md): its sweep, resuming it, the grounding
evaluator against hand-built cases, and the report on a directory of real tiny runs."""

import json
import os
import shutil
import signal
import sys

import numpy as np
import pytest

from configs import study_synthetic
from tcjepa_jax import evaluation, evaluators, sweeps
from tcjepa_jax import train as train_lib
from tcjepa_jax.data import synthetic
from tcjepa_jax.data.tokenizer import Tokenizer
from tcjepa_jax.evaluators import grounding
from tcjepa_jax.models.penalties import PENALTIES
from tcjepa_jax.tools import study_report, study_runs

import test_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "launch"))
import sweep as sweep_lib  # noqa: E402  (launch/sweep.py)

QUICK = "configs/study_synthetic.py:quick"
LONG = "configs/study_synthetic.py:long"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return test_train.tokenizer_path.__wrapped__(tmp_path_factory)


# ---- The sweep ---------------------------------------------------------------------------------

def test_quick_study_validates_and_expands_to_the_expected_runs():
    name, runs = sweep_lib.plan(QUICK, [])  # applies and validates every run's overrides
    assert name == "study_synthetic_quick"
    seeds = study_synthetic.QUICK["seeds"]
    assert [n for n, _ in runs] == [f"{arm}seed={s}" for arm in
                                    ("", "conditioning=none_", "caption_control=shuffled_")
                                    for s in seeds]
    assert runs[len(seeds)][1] == {"model.conditioning": "none", "seed": seeds[0]}
    assert runs[-1][1] == {"input.caption_control": "shuffled", "seed": seeds[-1]}
    config = study_synthetic.get_config("quick")
    assert config.total_steps == study_synthetic.QUICK["steps"]
    assert config.probe.every * study_synthetic.PROBE_POINTS == config.total_steps
    assert set(config.probe.evaluators) == {"linear", "knn", "dense", "attentive", "grounding"}


def test_long_study_is_the_main_arms_and_control_at_2000_steps_with_large_probes():
    name, runs = sweep_lib.plan("configs/study_synthetic.py:long", [])
    assert name == "study_synthetic_long"
    assert len(runs) == 3 * len(study_synthetic.SEEDS)
    config = study_synthetic.get_config("long")
    # What docs/study.md's 2000-step table ran (there as --config.* flags and a re-probe).
    assert (config.total_steps, config.optim.warmup_steps, config.checkpoint_every) == (
        2000, 200, 1000)
    assert (config.probe.num_train, config.probe.num_test, config.probe.attentive_steps,
            config.probe.dense_images) == (8000, 2000, 400, 1000)
    # The study's own runs keep the recipe's probe sets; presets combine with groups either way.
    assert study_synthetic.get_config("").probe.num_train == study_synthetic.RECIPE[
        "probe.num_train"]
    assert study_synthetic.get_arms("groups=main,long") == study_synthetic.get_arms(
        "long,groups=main")


def test_report_setup_shows_the_recipe_as_the_variant_sets_it(tmp_path):
    # `:long` lays larger probe sets over the recipe; the report must show those, not RECIPE's.
    setup = study_report.section_setup(study_report.Study(str(tmp_path), LONG))
    for key, value in study_synthetic.LONG_PROBES.items():
        assert f"`{key}={value}`" in setup
    assert f"`probe.num_train={study_synthetic.RECIPE['probe.num_train']}`" not in setup


def test_full_study_has_every_arm_over_three_seeds():
    name, runs = sweep_lib.plan("configs/study_synthetic.py", [])
    arms = study_synthetic.get_arms()
    assert len(runs) == len(arms) * len(study_synthetic.SEEDS) and len(study_synthetic.SEEDS) >= 3
    overrides = list(arms.values())
    for point in ({"model.conditioning": "none"}, {"model.conditioning": "first"},
                  {"model.conditioning": "caption"}, {"loss.pred": "l2"},
                  {"loss.sparse_weight": 0.0, "loss.consistency_weight": 0.0},
                  {"input.caption_control": "shuffled"}):
        assert point in overrides
    assert {o["loss.penalty"] for o in overrides if "loss.penalty" in o} == set(PENALTIES) - {
        "cosine"}
    for cond in ("all", "none"):  # >= 4 target scales per method, the default one included
        scales = {tuple(o.get("masks.target_scale", study_synthetic.DEFAULT_SCALE))
                  for o in overrides if o.get("model.conditioning", "all") == cond
                  and set(o) <= {"model.conditioning", "masks.target_scale"}}
        assert len(scales) >= 4, (cond, scales)
    assert sweep_lib.plan("configs/study_synthetic.py:groups=main,seeds=1", [])[1] == [
        ("seed=0", {"seed": 0}), ("conditioning=none_seed=0", {"model.conditioning": "none",
                                                               "seed": 0})]
    with pytest.raises(ValueError, match="unknown arm groups"):
        study_synthetic.get_sweep("groups=main+nothing")


def test_rerunning_the_sweep_starts_only_the_unfinished_runs(tmp_path, capsys):
    root = tmp_path / "runs"
    names = [n for n, _ in sweep_lib.plan(QUICK, [])[1]]
    for name in names[:2]:
        os.makedirs(root / name)
        (root / name / "final_metrics.json").write_text(json.dumps({"step": 1, "metrics": {}}))
    assert sweep_lib.main([f"--config={QUICK}", f"--root={root}", "--dry-run"]) == 0
    out = capsys.readouterr().out
    for name in names[:2]:
        assert f"[{name}] finished already: skipped" in out
    started = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(started) == len(names) - 2
    assert all(f"--workdir={root / n}" in "".join(started) for n in names[2:])


# ---- Grounding ---------------------------------------------------------------------------------

def test_grounding_sums_on_known_attention():
    # One caption of 4 words: two name object 0, one object 1, one nothing. Token 0 (context)
    # covers object 0, token 1 (target) object 1, token 2 (target) the background, token 3
    # (context) object 2, which the caption does not name: only tokens 0 and 1 count.
    weights = np.array([[[[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1],
                          [0.25] * 4, [0.25] * 4]]], np.float32)          # (1, 1, 4, 4)
    sums = np.asarray(grounding.grounding_sums(
        weights, token_object=np.array([[0, 1, -1, 2]]), token_valid=np.ones((1, 4), bool),
        is_context=np.array([True, False, False, True]),
        word_object=np.array([[[0, 0, 1, -1]]]), text_mask=np.ones((1, 1, 4), bool),
        caption_valid=np.ones((1, 1), bool)))
    np.testing.assert_allclose(sums, [0.8, 0.5, 0.7, 0.25, 1, 1], rtol=1e-6)


def test_patch_objects_and_aligned_caption_tokens(tokenizer_path):
    objects = np.full((4, 4), -1, np.int8)
    objects[:2, :2] = 0
    objects[2:, 2:] = 1
    objects[0, 3] = 1  # one pixel of object 1 in a background patch: the majority wins
    assert grounding.patch_objects(objects, 2).tolist() == [0, -1, -1, 1]

    tokenizer = Tokenizer(tokenizer_path)
    scenes = synthetic.SyntheticScenes(32, split="test")
    scene, record = scenes.grounded(5), scenes[5]
    assert set(scene) - set(record) == {"objects", "caption_words"}  # training reads neither
    assert all(np.array_equal(scene[k], record[k]) for k in record)
    for caption, words in zip(scene["captions"], scene["caption_words"]):
        assert " ".join(w for w, _ in words) == caption
        for word, obj in words:
            assert (obj >= 0) == (word.strip(",.:") in synthetic.SIZES + synthetic.COLORS
                                  + synthetic.SHAPES)
            assert obj < scene["label_count"] and (obj < 0 or (scene["objects"] == obj).any())
        ids, objs = grounding.caption_tokens(tokenizer, words, 64)
        assert ids.tolist() == tokenizer.encode([caption], 64)[0][0].tolist()
        for k in set(objs.tolist()) - {-1}:  # object k's pieces decode to its words
            decoded = tokenizer.decode(ids[objs == k]).replace(",", "").replace(".", "")
            assert decoded == " ".join(w.strip(",.") for w, o in words if o == k)


def test_grounding_reports_nothing_without_word_attention():
    for conditioning in ("none", "caption"):
        config = study_synthetic.get_config("quick")
        config.model.conditioning = conditioning
        assert grounding.evaluate_model(evaluators.Model(None, {}, None, {}), config) == {}


# ---- The report ---------------------------------------------------------------------------------

STUDY_CONFIG = """
import ml_collections
from configs import study_synthetic

RECIPE = {{"model.predictor_depth": 1}}
ARMS = {{"tc_jepa": {{}}, "i_jepa": {{"model.conditioning": "none"}},
        "tc_scale_0.2-0.3": {{"masks.target_scale": (0.2, 0.3)}},
        "i_scale_0.2-0.3": {{"model.conditioning": "none", "masks.target_scale": (0.2, 0.3)}}}}
DESCRIPTIONS = study_synthetic.DESCRIPTIONS

def get_config(arg=""):
    config = ml_collections.ConfigDict({config!r})
    config.name = "tiny_study"
    return config

def get_arms(arg=""):
    return ARMS

def get_sweep(arg=""):
    return [dict(point, seed=s) for point in ARMS.values() for s in (0, 1)]
"""
# What a sweep's runs are called (sweeps.run_names of STUDY_CONFIG's get_sweep).
TC, IJ = ("seed=0", "seed=1"), ("conditioning=none_seed=0", "conditioning=none_seed=1")
TC_SCALE, IJ_SCALE = "target_scale=0.2-0.3_seed=0", "conditioning=none_target_scale=0.2-0.3_seed=0"


def _tiny_study_config(tokenizer_path):
    config = test_train.tiny_config(tokenizer_path, mesh=(("data", -1), ("fsdp", 1)))
    config.total_steps, config.log_every, config.checkpoint_every = 4, 1, 4
    config.probe.enabled, config.probe.every = True, 2
    config.probe.evaluators = study_synthetic.get_config().probe.evaluators
    config.probe.num_train, config.probe.num_test = 48, 24
    config.probe.knn_k, config.probe.attentive_steps = 5, 3
    config.probe.dense_images, config.probe.grounding_images = 8, 6
    return config


def _write_study_config(tmp_path, tokenizer_path) -> str:
    path = tmp_path / "tiny_study.py"
    path.write_text(STUDY_CONFIG.format(config=_tiny_study_config(tokenizer_path).to_dict()))
    return str(path)


def _probes(step: int, shift: float, conditioned: bool, prefix: str = "eval") -> dict:
    """What the evaluators log, as simple functions of the step."""
    out = {f"{prefix}/{ev}/{task}": 0.3 + 0.05 * step + shift
           for ev in ("linear", "knn", "attentive") for task in ("count", "shape", "color")}
    out.update({f"{prefix}/dense/miou": 0.2 + 0.01 * step, f"{prefix}/dense/pixel_accuracy": 0.8,
                f"{prefix}/dense/patch_accuracy": 0.85})
    if conditioned:
        out.update({f"{prefix}/grounding/context": 0.4, f"{prefix}/grounding/context_chance": 0.2,
                    f"{prefix}/grounding/target": 0.3, f"{prefix}/grounding/target_chance": 0.3})
    return out


def _fake_run(workdir, conditioned: bool, shift: float, steps: int = 4, step_time=None):
    """A finished run's files as train.py writes them: TensorBoard scalars, evals/step_N.json
    every 2 steps, final_metrics.json. TC-JEPA steps take 0.5 s, I-JEPA's 0.3 s (or
    `step_time`)."""
    from tensorboardX import SummaryWriter
    writer = SummaryWriter(str(workdir / "tensorboard"))
    scalars = {}
    for step in range(1, steps + 1):
        scalars = {"loss": 1.0 / step, "loss_pred": 1.0 / step, "loss_sparse": 0.1 / step,
                   "loss_consistency": 0.0, "monitor/target_rank": 10.0 + shift}
        if conditioned:
            scalars.update({"o_frac_pos/layer0": 0.5 / step, "o_mean/layer0": 0.1 / step})
        if step > 1:
            scalars["step_time_s"] = step_time or (0.5 if conditioned else 0.3)
        for key, value in scalars.items():
            writer.add_scalar(key, value, step, walltime=1000.0 + step)
    writer.close()
    os.makedirs(workdir / "evals")
    for step in range(2, steps + 1, 2):
        (workdir / "evals" / f"step_{step}.json").write_text(
            json.dumps({"step": step, **_probes(step, shift, conditioned)}))
    final = {**scalars, **_probes(steps, shift, conditioned),
             **_probes(0, 0.0, conditioned, prefix="eval_init")}
    (workdir / "final_metrics.json").write_text(json.dumps({"step": steps, "metrics": final}))


def test_report_turns_runs_into_tables_and_plots(tokenizer_path, tmp_path):
    config = _write_study_config(tmp_path, tokenizer_path)
    root = tmp_path / "runs"
    for name, conditioned, shift in ((TC[0], True, 0.0), (TC[1], True, 0.02),
                                     (IJ[0], False, -0.01), (IJ[1], False, -0.03),
                                     (TC_SCALE, True, 0.1), (IJ_SCALE, False, -0.1)):
        _fake_run(root / name, conditioned, shift)
    out = tmp_path / "docs" / "study.md"
    out.parent.mkdir()
    out.write_text("<!-- keep:reading -->\nOur reading.\n<!-- /keep:reading -->\n")
    assert study_report.main([f"--config={config}", f"--root={root}", f"--out={out}"]) == 0
    text = out.read_text()
    lines = text.splitlines()

    def row(prefix):
        return next(line for line in lines if line.startswith(prefix))

    for arm in ("tc_jepa", "i_jepa", "tc_scale_0.2-0.3", "i_scale_0.2-0.3"):
        assert f"| `{arm}` |" in text
    for heading in ("Probes at equal steps", "Probes at equal training time", "Paired by seed",
                    "Training statistics", "Mask-scale sensitivity"):
        assert heading in text
    assert "Our reading." in text and "<!-- keep:summary -->" in text  # kept / new blocks
    # Its commands rerun this very study (the sweep it read), not another variant.
    assert f"python launch/sweep.py --config={config} --max_parallel=2" in text
    assert f"study_report --config={config} --out={out}" in text
    assert "Unfinished (left out): `target_scale=0.2-0.3_seed=1`" in text
    # linear/count at step 4: 0.5 + shift, mean ± std over two seeds; one seed: "(n=1)".
    assert row("| `tc_jepa` | 0.510 ± 0.014 | 0.510 ± 0.014 | 0.510 ± 0.014 |")
    assert row("| `tc_scale_0.2-0.3` | 0.600 (n=1) |")
    assert row("| `tc_jepa` | 0.030 ± 0.028 |")  # paired by seed against i_jepa
    # Equal time: I-JEPA's 4 steps of 0.3 s are the budget; TC-JEPA's curve (0.4 at 1.0 s,
    # 0.5 at 2.0 s) read at 1.2 s gives 0.42 + shift, after 2.4 steps.
    assert "read at 1.2 s" in text
    assert row("| `tc_jepa` | 2 | 0.430 ± 0.014 |") and row("| `i_jepa` | 4 | 0.480 ± 0.014 |")
    assert row("| `tc_jepa` | 0.500 ± 0.000 | 2 ± 0 |")  # s / step, train s
    assert "grounding" in text and row("| `tc_jepa` | 0.400 ± 0.000 | 0.200 ± 0.000 | 2.000")
    assert row("| range (max − min) |")
    for name in ("probes_vs_steps", "probes_vs_time", "losses", "o_statistics", "mask_scales"):
        path = out.parent / "images" / "study" / f"{name}.png"
        assert path.stat().st_size > 10_000, path
        assert f"(images/study/{name}.png)" in text


def test_equal_time_budget_is_the_shortest_run_so_every_seed_reaches_it(tokenizer_path,
                                                                         tmp_path):
    """Seeds of one arm can differ in speed: the budget is the fastest-finishing run's training
    time (here I-JEPA seed 1: 4 steps x 0.25 s), not an arm's mean, so no seed's curve ends
    before it and every cell keeps all its seeds."""
    config = _write_study_config(tmp_path, tokenizer_path)
    root = tmp_path / "runs"
    for name, conditioned, step_time in ((TC[0], True, 0.5), (TC[1], True, 0.45),
                                         (IJ[0], False, 0.3), (IJ[1], False, 0.25)):
        _fake_run(root / name, conditioned, 0.0, step_time=step_time)
    study = study_report.Study(str(root), config)
    assert study.time_budget() == pytest.approx(1.0)
    text = study_report.section_equal_time(study)
    assert "read at 1 s" in text
    # I-JEPA at 1.0 s: seed 1 at its last evaluation (0.5); seed 0 between its evaluations at
    # 0.6 s (0.4) and 1.2 s (0.5), 0.467. TC-JEPA: seed 0 at its step 2 (0.4); seed 1 between
    # 0.9 s (0.4) and 1.8 s (0.5), 0.411.
    table = text.split("Paired by seed")[0]
    assert "| `i_jepa` | 4 | 0.483 ± 0.024 |" in table
    assert "| `tc_jepa` | 2 | 0.406 ± 0.008 |" in table
    assert "(n=" not in text


@pytest.mark.slow  # a real training with every evaluator: about a minute of CPU
def test_report_reads_a_real_tiny_run(tokenizer_path, tmp_path):
    config = _write_study_config(tmp_path, tokenizer_path)
    module, _ = study_runs.load_config_module(config)
    root = tmp_path / "runs"
    handler = signal.getsignal(signal.SIGTERM)
    try:
        train_lib.train(sweeps.apply_overrides(module.get_config(), {"seed": 0}),
                        str(root / TC[0]))
    finally:
        signal.signal(signal.SIGTERM, handler)
    shutil.copytree(root / TC[0], root / TC[1])
    run = study_runs.read_run(str(root), TC[0], "tc_jepa", 0, {}, 4)
    assert sorted(run.evals) == [2, 4] and np.isfinite(study_runs.seconds_per_step(run))
    assert 0 < run.evals[4]["grounding/context_chance"] < 1
    assert run.init["grounding/context_lift"] == pytest.approx(1.0, abs=0.05)  # random init
    assert {"loss_pred", "loss_sparse", "o_frac_pos/layer0", "step_time_s"} <= set(run.scalars)
    out = tmp_path / "study.md"
    assert study_report.main([f"--config={config}", f"--root={root}", f"--out={out}"]) == 0
    assert "| `tc_jepa` | 0." in out.read_text()
    # From the checkpoint, the model evaluator gets the trained model too.
    results = evaluation.evaluate_checkpoint(str(root / TC[0]))
    assert results["eval/grounding/context"] == pytest.approx(run.evals[4]["grounding/context"])
