"""Every field of configs/common.py is checked before anything is built or compiled.

The property test walks every field of the base config and of configs/synthetic_tiny.py, gives it
values of the wrong type and values out of range (both derived from the field's entry in
config_fields.FIELDS, which every field must have), and checks that experiment.setup, the entry
point of train.py, evaluate.py and the tools, refuses each with a one-line UserError that starts
with the field's dotted name, before it builds a model, reads data or compiles anything.
"""

import importlib
import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import pytest

from configs import common
from tcjepa_jax import config_checks, experiment, sweeps
from tcjepa_jax import step as step_lib
from tcjepa_jax.config_fields import FIELDS
from tcjepa_jax.config_lib import UserError, validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"base": common.get_base_config,
           "synthetic_tiny": lambda: importlib.import_module("configs.synthetic_tiny").get_config()}


def leaves(config, prefix=""):
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key


def with_value(config, path, value) -> ml_collections.ConfigDict:
    """A copy of `config` with `path` set to `value` as a config built in Python can hold it
    (a fresh ConfigDict, so ml_collections' type locking of the original does not intervene)."""
    tree = config.to_dict()
    *parents, leaf = path.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[leaf] = value
    return ml_collections.ConfigDict(tree)


# ---- Bad values, derived from the field's kind and its entry --------------------------------

WRONG_TYPE = {
    "int": ["7", 1.5, True, None, (1,)],
    "float": ["0.5", True, None, (0.5,)],
    "bool": [1, "True", None],
    "str": [3, None, ("a",)],
    "pair": [0.5, "0.1,0.2", (0.5,), (0.1, 0.2, 0.3), ("0.1", "0.2"), (True, 1), None],
    "names": ["linear", (1,), None],
    "mesh": ["data", (("data",),), (("data", "2"), ("fsdp", 1)), (("data", 1.5), ("fsdp", 1)),
             None],
    "rules": ["embed", (("embed",),), ((1, "fsdp"),), None],
}


def out_of_range(field) -> list:
    """Values of the right type that the field's entry does not allow."""
    kind, values = field.kind, []
    if kind in ("int", "float"):
        if field.low is not None:
            values.append(field.low if field.open_low else field.low - 1)
        if field.high is not None:
            values.append(field.high if field.open_high else field.high + 1)
        if kind == "int":
            return [int(v) for v in values]
        return [float(v) for v in values] + [math.nan, math.inf]
    if kind == "str":
        return ([""] if field.nonempty else []) + (
            ["no-such-choice"] if field.choices or field.check else [])
    if kind == "pair":
        base = 0.0 if field.low is None else float(field.low)
        values = [(base + 0.5, base + 0.25), (math.nan, base + 0.5)]   # min > max; not finite
        if field.low is not None:
            values.append((field.low if field.open_low else field.low - 1, base + 0.5))
        if field.high is not None:
            values.append((base + 0.5, field.high if field.open_high else field.high + 1))
        return values
    if kind == "names":
        first = field.allowed()[0]
        return ([("no-such-name",), (first, first)] + ([()] if field.nonempty else []))
    if kind == "mesh":
        return [(("data", -1), ("fsdp", -1), ("tensor", 1)),      # two axes of size -1
                (("data", 0), ("fsdp", 1)), (("data", -2), ("fsdp", 1)),
                (("data", -1), ("model", 1)),                      # unknown axis name
                (("data", -1), ("data", 1), ("fsdp", 1)),          # an axis twice
                (("data", -1),)]                                   # no fsdp axis
    if kind == "rules":
        return [(("embedd", "fsdp"),), (("embed", "fsdpp"),), (("embed", ("fsdp", "fsdp")),)]
    return values  # bool: only its type can be wrong


@pytest.fixture
def nothing_built(monkeypatch):
    """Fails the test if setup gets past the checks: no model, data, tokenizer or jit."""
    def refuse(*args, **kwargs):
        raise AssertionError("setup went past the config checks (built, read or compiled)")
    monkeypatch.setattr(step_lib, "build_models", refuse)
    monkeypatch.setattr(experiment, "_shared_tokenizer", refuse)
    monkeypatch.setattr(experiment.pipeline, "make_source", refuse)
    monkeypatch.setattr(jax, "jit", refuse)


def refused(config, tmp_path) -> str:
    """The message of the UserError that experiment.setup stops `config` with."""
    with pytest.raises(UserError) as info:
        experiment.setup(config, str(tmp_path), with_data=False)
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value.__cause__, ValueError), message
    return message


# ---- The property test ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_has_a_check(name):
    """A field added to common.py without an entry in config_fields.FIELDS fails here."""
    fields = set(leaves(CONFIGS[name]()))
    assert fields - set(FIELDS) == set(), "add these fields to config_fields.FIELDS"
    assert set(FIELDS) - fields == set(), "these FIELDS entries are no longer in common.py"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_defaults_pass(name):
    config = CONFIGS[name]()
    validate_config(config)
    assert config_checks.check_devices(config, 8)["data"] == 8


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_refuses_wrong_types_and_ranges(name, field, nothing_built, tmp_path):
    config, spec = CONFIGS[name](), FIELDS[field]
    for value in WRONG_TYPE[spec.kind] + out_of_range(spec):
        message = refused(with_value(config, field, value), tmp_path)
        assert message.startswith(f"{field}="), (value, message)


# ---- Combinations and names ----------------------------------------------------------------

def _tiny(**overrides):
    config = CONFIGS["synthetic_tiny"]()
    for path, value in overrides.items():
        config = with_value(config, path, value)
    return config


@pytest.mark.parametrize("overrides,start,needle", [
    ({"mesh": (("data", 2), ("fsdp", 2), ("tensor", 1))}, "mesh=", "needs 4 devices"),
    ({"mesh": (("data", -1), ("fsdp", 3), ("tensor", 1))}, "mesh=", "does not divide the 8"),
    ({"mesh": (("data", -1), ("fsdp", -1), ("tensor", 1))}, "mesh=", "at most one axis"),
    ({"mesh": (("data", -1), ("model", 1))}, "mesh=", "'model'"),
    ({"mesh_slices": 3}, "mesh_slices=3", "divide the data axis (8"),
    ({"batch_size": 12}, "batch_size=12", "choose a multiple of 8"),
    ({"grad_accum": 3}, "grad_accum=3", "dividing 4"),
    ({"input.image_size": 60}, "input.image_size=60", "multiple of 8, e.g. 64"),
    ({"masks.target_scale": (0.9, 1.0)}, "masks.target_scale=", "fewer than masks.min_keep"),
    ({"masks.min_keep": 65}, "masks.min_keep=65", "64 patches of the 8x8"),
    ({"masks.max_context": 5}, "masks.max_context=5", "min_keep=10"),
    ({"masks.context_scale": (0.1, 0.1)}, "masks.context_scale=", "at most 9 patches"),
    ({"optim.warmup_steps": 601}, "optim.warmup_steps=601", "total_steps=600"),
    ({"optim.ema_start": 1.0, "optim.ema_end": 0.99}, "optim.ema_start=1.0", "ema_end"),
    ({"model.predictor_width": 100}, "model.predictor_width=100", "predictor_heads=3"),
    ({"keep_period": 300}, "keep_period=300", "multiple of 200"),
    ({"profile.num_steps": 2}, "profile.first_step=0", "profile.first_step in [1,"),
    ({"init_from.predictor": True}, "init_from.step=0", "init_from.workdir"),
    ({"probe.knn_k": 2001}, "probe.knn_k=2001", "probe.num_train=2000"),
    ({"input.synthetic_size": 1500}, "probe.num_train=2000", "input.synthetic_size"),
    ({"probe.evaluators": ()}, "probe.evaluators=()", "probe.enabled=False"),
])
def test_combinations_are_named(overrides, start, needle, nothing_built, tmp_path):
    message = refused(_tiny(**overrides), tmp_path)
    assert message.startswith(start) and needle in message, message


def test_unknown_fields_are_named_with_a_suggestion(nothing_built, tmp_path):
    config = CONFIGS["synthetic_tiny"]()
    config.unlock()
    config.modle = ml_collections.ConfigDict({"encoder": "B/16"})
    assert refused(config, tmp_path).startswith("modle: configs/common.py has no such field "
                                                "(did you mean 'model'?)")
    config = CONFIGS["synthetic_tiny"]()
    config.model.encodr = "B/16"
    assert "(did you mean 'model.encoder'?)" in refused(config, tmp_path)
    config = with_value(CONFIGS["synthetic_tiny"](), "masks", 0.2)  # a section set to one value
    assert refused(config, tmp_path).startswith("masks=0.2: must be a group of fields")


@pytest.mark.parametrize("field,value", [
    ("seed", True),                            # a bool where an int belongs
    ("input.crop_scale", [0.1, 0.2, 0.3]),     # a list for a tuple, of the wrong length
    ("optim.lr_peak", None),
    ("optim.lr_peak", True),                   # cast to 1.0: allowed (a number in range)
])
def test_what_ml_collections_lets_through_is_caught(field, value):
    """Assignments to a typed ConfigDict field that ml_collections accepts (casting or not)."""
    config = CONFIGS["synthetic_tiny"]()
    *parents, leaf = field.split(".")
    node = config
    for part in parents:
        node = node[part]
    setattr(node, leaf, value)
    if isinstance(node[leaf], float):  # ml_collections made it a float
        validate_config(config)
    else:
        with pytest.raises(ValueError, match=f"^{field}="):
            validate_config(config)


def test_configs_restored_from_json_pass():
    """A config restored from a checkpoint (JSON: lists for tuples, no newer fields) passes."""
    tree = CONFIGS["synthetic_tiny"]().to_dict()
    tree = ml_collections.ConfigDict(json.loads(ml_collections.ConfigDict(tree).to_json()))
    del tree["nonfinite"], tree["keep_period"], tree.probe["segmentation_key"]
    assert isinstance(tree.mesh, list) and isinstance(tree.sharding_rules[0], list)
    validate_config(tree)
    config_checks.check_devices(tree, 8)


@pytest.mark.parametrize("module", ["imagetext_vit_b16", "imagetext_vit_l14", "in1k_vit_b16",
                                    "in1k_vit_h14", "in1k_vit_l16", "in21k_vit_l16"])
def test_every_paper_config_and_sweep_member_passes(module):
    """(Not the ijepa argument with sweeps that turn conditioning on: the ImageNet-1k I-JEPA
    configs read no captions, which validate_config refuses for a conditioned run.)"""
    configs = importlib.import_module(f"configs.{module}")
    for arg in ("", "ijepa", "runlocal", "ijepa,runlocal"):
        for sweep in sorted(common.PAPER_SWEEPS):
            if arg == "ijepa" and sweep in ("conditioning", "mask_scales"):
                continue
            arg_sweep = ",".join(filter(None, (arg, f"sweep={sweep}")))
            for config in sweeps.check_sweep(configs.get_config(arg_sweep),
                                             configs.get_sweep(arg_sweep)):
                config_checks.check_devices(config, 8)


# ---- From the command line -------------------------------------------------------------

@pytest.mark.parametrize("flag,expected", [
    ("--config.masks.target_scale=(0.3,0.1)",
     "error: masks.target_scale=(0.3, 0.1): must be a (min, max) pair of numbers with "
     "0 < min <= max <= 1."),
    ("--config.mesh=(('data',3),('fsdp',1),('tensor',1))",
     "error: mesh=(('data', 3), ('fsdp', 1), ('tensor', 1)) needs 3 devices"),
])
def test_train_command_line_prints_one_line(flag, expected, tmp_path):
    """python -m tcjepa_jax.train with a bad override: exit status 1, one line, no traceback."""
    run = subprocess.run([sys.executable, "-m", "tcjepa_jax.train", f"--workdir={tmp_path}",
                          flag], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(expected), run.stderr[-2000:]
    assert not os.path.exists(tmp_path / "checkpoints")
