"""Turns a config into the run's mesh, tokenizer and models, checking it first.

Shared by train.py, evaluate.py and the benchmarks. Everything that can fail because of the user
(config, files) fails here with a UserError, before any compilation.
"""

from tcjepa_jax import sharding as shard_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax.config_lib import UserError, validate_config
from tcjepa_jax.data import synthetic
from tcjepa_jax.data.tokenizer import load_or_train_tokenizer


# ---- Setup -----------------------------------------------------------------------------------

def setup(config, workdir: str):
    """Everything that can fail because of the user happens here, before any compilation."""
    try:
        validate_config(config)
        mesh = shard_lib.make_mesh(config)
        if config.batch_size % mesh.size:
            raise ValueError(f"batch_size={config.batch_size} is not divisible by the "
                             f"{mesh.size} devices of the mesh.")
        tokenizer = load_or_train_tokenizer(
            config.tokenizer.model_path or None, workdir, config.tokenizer.vocab_size,
            lambda: synthetic.iter_captions(config.input.seed, 5000, config.input.image_size))
        models = step_lib.build_models(config, tokenizer.vocab_size)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(str(e)) from e
    return mesh, tokenizer, models


