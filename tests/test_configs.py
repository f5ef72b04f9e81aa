"""Every config loads, passes validation and builds its models (shapes only, nothing compiled)."""

import importlib

import jax
import pytest

from configs import common
from tcjepa_jax import step as step_lib
from tcjepa_jax.config_lib import UserError, validate_config
from tcjepa_jax.experiment import setup
from tcjepa_jax.models.vit import vit_config

PAPER = ["in1k_vit_b16", "in1k_vit_l16", "in1k_vit_h14", "in21k_vit_l16",
         "imagetext_vit_b16", "imagetext_vit_l14"]
CASES = ([("synthetic_tiny", a) for a in ("", "ijepa", "smoke")]
         + [(name, a) for name in PAPER for a in ("", "ijepa", "runlocal", "ijepa,runlocal")])


@pytest.mark.parametrize("name,arg", CASES)
def test_config_is_valid_and_builds(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    validate_config(config)
    assert config.model.conditioning == ("none" if "ijepa" in arg else "all")
    models = step_lib.build_models(config, vocab_size=256)
    assert (models.text is None) == ("ijepa" in arg)
    params = jax.eval_shape(lambda: step_lib.init_params(models, config, jax.random.key(0)))
    assert set(params) == ({"encoder", "predictor"} | (set() if "ijepa" in arg else {"text"}))


@pytest.mark.parametrize("name", PAPER)
def test_paper_recipe(name):
    config = importlib.import_module(f"configs.{name}").get_config("")
    size = config.model.encoder.split("/")[0]
    assert config.batch_size == 2048 and config.input.image_size == 224
    assert config.model.predictor_width == 384
    assert config.model.predictor_depth == common.PREDICTOR_DEPTH[size]
    assert config.model.predictor_heads == vit_config(config.model.encoder)["num_heads"]
    assert config.optim.lr_peak == 1e-3 and config.optim.lr_end == 1e-6
    assert (config.optim.wd_start, config.optim.wd_end) == (0.04, 0.4)
    assert (config.optim.ema_start, config.optim.ema_end) == (0.996, 1.0)
    assert (config.loss.sparse_weight, config.loss.consistency_weight) == (0.1, 0.5)
    assert config.optim.warmup_steps < config.total_steps


@pytest.mark.parametrize("name", PAPER)
def test_paper_config_without_its_data_is_one_clear_error(name, tmp_path, monkeypatch):
    """Without the prepared data, setup stops before building anything and says what to run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    config = importlib.import_module(f"configs.{name}").get_config("")
    with pytest.raises(UserError, match="make_dataset|not prepared") as error:
        setup(config, str(tmp_path / "run"))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run" / "tokenizer.model").exists()


def test_unknown_config_argument_is_an_error():
    with pytest.raises(ValueError, match="unknown config arguments"):
        importlib.import_module("configs.in1k_vit_b16").get_config("runlcoal")


@pytest.mark.parametrize("field,value,message", [
    ("model.encoder", "B/x", "model.encoder"),
    ("model.text", "xl2", "model.text"),
    ("model.predictor_width", 90, "model.predictor_width"),
    ("input.source", "imagenet", "input.source"),
    ("input.crop_scale", (0.5, 0.2), "input.crop_scale"),
    ("loss.pred", "l1", "loss.pred"),
    ("input.source", "array_record", "probe.enabled"),
])
def test_validation_names_the_field(field, value, message):
    config = importlib.import_module("configs.synthetic_tiny").get_config("")
    section, key = field.split(".")
    config[section][key] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)
