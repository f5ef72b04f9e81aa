"""Where the default config lives, and checks that catch user mistakes before any compilation."""

import os
import sys

from tcjepa_jax.data.sources import available_sources
from tcjepa_jax.models.layers import REMAT_POLICIES
from tcjepa_jax.models.predictor import CONDITIONING
from tcjepa_jax.models.text import T5_SIZES
from tcjepa_jax.models.vit import vit_config

# configs/ is installed next to tcjepa_jax/ (see setup.py), so this holds after any install.
DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic_tiny.py")


class UserError(Exception):
    """A mistake the user can fix (config, data, files); reported as one message, no traceback."""


def run_command(fn, *args):
    """Runs a command-line job: user errors end it with one message and exit status 1."""
    from tcjepa_jax.metrics import quiet_library_logs
    quiet_library_logs()
    try:
        return fn(*args)
    except UserError as e:
        sys.exit(f"error: {e}")


def _check(condition: bool, message: str):
    if not condition:
        raise ValueError(message)


def _check_range(name: str, value, low: float, high: float):
    _check(len(value) == 2 and low <= value[0] <= value[1] <= high,
           f"{name}={tuple(value)} must be a (min, max) pair with {low} <= min <= max <= {high}.")


def validate_config(config) -> None:
    _check(config.total_steps > 0, f"total_steps must be positive, got {config.total_steps}.")
    _check(config.batch_size > 0, f"batch_size must be positive, got {config.batch_size}.")
    _check(config.log_every > 0 and config.checkpoint_every > 0,
           "log_every and checkpoint_every must be positive.")
    _check(config.model.conditioning in CONDITIONING,
           f"model.conditioning={config.model.conditioning!r}; choose one of {CONDITIONING}.")
    _check(config.input.source in available_sources(),
           f"input.source={config.input.source!r}; choose one of {available_sources()}.")
    _check(config.input.get("workers", 0) >= 0 and config.input.get("num_threads", 1) >= 0,
           "input.workers and input.num_threads must be >= 0.")
    _check(config.model.get("text_vocab_size", 0) >= 0, "model.text_vocab_size must be >= 0.")
    _check_probe(config)
    if config.model.conditioning != "none" and config.input.source == "tfds":
        _check(bool(config.input.caption_key or config.input.caption_file),
               f"model.conditioning={config.model.conditioning!r} needs captions, but TFDS dataset "
               f"{config.input.tfds_name!r} is read without any: set input.caption_file (a JSONL "
               "caption file, see docs/data.md) or input.caption_key (a caption feature), or train "
               "I-JEPA with model.conditioning='none'.")
    try:
        vit_config(config.model.encoder)
    except ValueError as e:
        raise ValueError(f"model.encoder: {e}") from None
    _check(config.model.text in T5_SIZES,
           f"model.text={config.model.text!r}; choose one of {tuple(T5_SIZES)}.")
    checkpoint = config.model.get("text_checkpoint", "")
    if checkpoint and config.model.conditioning != "none":
        spiece = os.path.join(checkpoint, "spiece.model")
        _check(not config.tokenizer.model_path
               or config.tokenizer.model_path.rstrip("/") == spiece.rstrip("/"),
               f"model.text_checkpoint={checkpoint!r} brings its own tokenizer ({spiece}), but "
               f"tokenizer.model_path={config.tokenizer.model_path!r} names another; set "
               "tokenizer.model_path=\"\" (a T5 reads only the ids of its own tokenizer).")
    width, heads = config.model.predictor_width, config.model.predictor_heads
    _check(width % 4 == 0 and width % heads == 0,
           f"model.predictor_width={width} must be divisible by 4 (2-D sin-cos position "
           f"embedding) and by model.predictor_heads={heads}.")
    for axis, size in config.mesh:
        _check(size == -1 or size >= 1, f"config.mesh axis {axis!r} has size {size}; use >= 1 or -1.")
    _check(config.model.remat in (True, False) + REMAT_POLICIES,
           f"model.remat={config.model.remat!r}; choose one of {REMAT_POLICIES}.")
    _check(config.optim.get("mu_dtype", "float32") in ("float32", "bfloat16"),
           f"optim.mu_dtype={config.optim.get('mu_dtype')!r}; choose 'float32' or 'bfloat16'.")
    _check(config.get("grad_accum", 1) >= 1, "grad_accum must be >= 1.")
    _check(config.model.dtype in ("float32", "bfloat16"),
           f"model.dtype={config.model.dtype!r}; choose 'float32' or 'bfloat16'.")
    _check(config.loss.pred in ("smooth_l1", "l2"),
           f"loss.pred={config.loss.pred!r}; choose 'smooth_l1' or 'l2'.")
    _check(config.loss.sparse_weight >= 0 and config.loss.consistency_weight >= 0,
           "loss.sparse_weight and loss.consistency_weight must be >= 0.")
    _check(config.input.num_captions >= 1 and config.input.max_caption_len >= 2,
           "input.num_captions must be >= 1 and input.max_caption_len >= 2.")
    _check_range("input.crop_scale", config.input.crop_scale, 0.0, 1.0)
    _check(0 <= config.optim.warmup_steps <= config.total_steps,
           f"optim.warmup_steps={config.optim.warmup_steps} must lie in [0, total_steps].")
    _check(config.optim.wd_start > 0, "optim.wd_start must be > 0 (the ramp is multiplicative).")
    _check(0 <= config.optim.ema_start <= config.optim.ema_end <= 1,
           "optim.ema_start <= optim.ema_end must both lie in [0, 1].")


def _check_probe(config) -> None:
    if not config.probe.enabled:
        return
    from tcjepa_jax.evaluators import available_evaluators
    for name in config.probe.get("evaluators", ("linear",)):
        _check(name in available_evaluators(),
               f"probe.evaluators has {name!r}; choose from {available_evaluators()}.")
    _check(config.probe.get("encoder", "target") in ("target", "context"),
           f"probe.encoder={config.probe.get('encoder')!r}; choose 'target' or 'context'.")
    _check(config.probe.get("every", 0) >= 0, "probe.every must be >= 0 (0: only at the end).")
    source = config.probe.get("source", "") or config.input.source
    _check(source in available_sources(),
           f"probe.source={source!r}; choose one of {available_sources()}.")
    if source != "synthetic":
        _check("dense" not in config.probe.get("evaluators", ()),
               f"the dense evaluator needs per-pixel labels, which probe source {source!r} has "
               "not; remove 'dense' from probe.evaluators (or set probe.enabled=False).")
        _check(bool(config.probe.get("label_key", "") or config.input.get("label_key", "")
                    or source == "array_record"),
               f"the evaluators need labels: set probe.label_key for probe source {source!r}, "
               "or probe.enabled=False.")
