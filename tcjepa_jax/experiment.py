"""Turns a config into the run's mesh, data source, tokenizer and models, checking it first.

Shared by train.py, evaluate.py, the tools and the benchmarks. Everything that can fail because
of the user (config, data paths, tokenizer files) fails here with a UserError, before any
compilation.
"""

from typing import Any, NamedTuple

import jax
from jax.experimental import multihost_utils

from tcjepa_jax import config_checks
from tcjepa_jax import sharding as shard_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax.config_lib import UserError, validate_config
from tcjepa_jax.data import pipeline
from tcjepa_jax.data import text_features
from tcjepa_jax.data.tokenizer import Tokenizer, load_or_train_tokenizer
from tcjepa_jax.models import t5_checkpoint

# Images whose captions train a tokenizer when tokenizer.model_path is empty.
TOKENIZER_CORPUS_IMAGES = 5000


class Experiment(NamedTuple):
    mesh: Any
    tokenizer: Any              # Tokenizer; None in I-JEPA mode (no text is read)
    models: step_lib.Models
    source: Any                 # the training data source; None when setup(with_data=False)


# ---- Setup -----------------------------------------------------------------------------------

def setup(config, workdir: str, with_data: bool = True) -> Experiment:
    """Everything that can fail because of the user happens here, before any compilation."""
    try:
        validate_config(config)
        config_checks.check_devices(config, jax.device_count(), jax.process_count())
        mesh = shard_lib.make_mesh(config)
        source = None
        if with_data:
            source = pipeline.make_source(config.input, config.input.split)
            if not len(source):
                raise ValueError(f"The training data {source!r} has no records.")

        def corpus():
            src = source or pipeline.make_source(config.input, config.input.split)
            return pipeline.source_captions(src, TOKENIZER_CORPUS_IMAGES)

        tokenizer, vocab = None, 0  # I-JEPA (conditioning "none") reads no text
        if config.model.conditioning != "none" and config.model.get("text_checkpoint"):
            # A pretrained T5 (models/t5_checkpoint.py): its spiece.model, its vocabulary.
            tokenizer, vocab = t5_checkpoint.check_checkpoint(
                config.model.text_checkpoint, config.model.text,
                int(config.model.get("text_vocab_size", 0)))
            if with_data and text_features.precomputed(config):  # made by this T5 setup?
                text_features.check_dataset(config)
        elif config.model.conditioning != "none":
            tokenizer = _shared_tokenizer(config, workdir, corpus)
            vocab = text_vocab_size(config, tokenizer)
        models = step_lib.build_models(config, vocab)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UserError(str(e)) from e
    return Experiment(mesh, tokenizer, models, source)


def _shared_tokenizer(config, workdir: str, corpus) -> Tokenizer:
    """Process 0 trains the workdir's tokenizer if there is none; the other hosts wait for it and
    then read the same file, so none reads a half-written model (with a workdir no other host
    sees, each trains its own: training is deterministic, so they agree)."""
    def load():
        return load_or_train_tokenizer(config.tokenizer.model_path or None, workdir,
                                       config.tokenizer.vocab_size, corpus)
    if jax.process_count() == 1:
        return load()
    tokenizer = load() if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("tcjepa_jax: the workdir's tokenizer is written")
    return tokenizer or load()


def text_vocab_size(config, tokenizer: Tokenizer) -> int:
    """Rows of the text encoder's embedding table: model.text_vocab_size, or the tokenizer's."""
    rows = int(config.model.get("text_vocab_size", 0)) or tokenizer.vocab_size
    if tokenizer.vocab_size > rows:
        raise ValueError(
            f"The tokenizer {tokenizer.model_path} has {tokenizer.vocab_size} pieces but the text "
            f"encoder's embedding table has model.text_vocab_size={rows} rows, so some ids would "
            "have no embedding. Set model.text_vocab_size to at least the tokenizer's size (0 uses "
            "exactly its size; a pretrained T5 has 32128), or use a tokenizer with fewer pieces.")
    return rows
