"""Optimizer and schedules (docs/method.md), all built from optax.

AdamW with linear warm-up + cosine learning rate, a cosine weight-decay ramp (0.04 -> 0.4) that
skips biases and other 1-D parameters, and the EMA momentum ramp of the target encoder.
"""

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=optim_cfg.lr_start,
        peak_value=optim_cfg.lr_peak,
        warmup_steps=optim_cfg.warmup_steps,
        decay_steps=total_steps,
        end_value=optim_cfg.lr_end,
    )


def weight_decay_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    # I-JEPA's CosineWDSchedule: wd_end + (wd_start - wd_end) * (1 + cos(pi * t)) / 2, which is
    # optax's cosine decay with alpha = wd_end / wd_start (alpha > 1 makes it rise).
    return optax.cosine_decay_schedule(
        init_value=optim_cfg.wd_start,
        decay_steps=total_steps,
        alpha=optim_cfg.wd_end / optim_cfg.wd_start,
    )


def ema_momentum_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    return optax.linear_schedule(optim_cfg.ema_start, optim_cfg.ema_end, total_steps)


def _decay_mask(params):
    """Decay weight matrices only: not biases (the q/k/v biases are 2-D, (heads, head_dim)),
    not LayerNorm scales or other vectors (the I-JEPA rule: 'bias' not in name, ndim > 1)."""
    def decays(path, p):
        names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
        return p.ndim > 1 and "bias" not in str(names[-1] if names else "")
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config) -> optax.GradientTransformation:
    """AdamW on the trained parts; the text encoder is left untouched unless it is trainable.

    The parameter tree is {"encoder", "predictor", "text"?}; "text" exists only when the
    predictor is conditioned on captions.
    """
    optim_cfg = config.optim
    adamw = optax.adamw(
        learning_rate=learning_rate_schedule(optim_cfg, config.total_steps),
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        weight_decay=weight_decay_schedule(optim_cfg, config.total_steps),
        mask=_decay_mask,
        mu_dtype=jnp.dtype(optim_cfg.get("mu_dtype", "float32")),
    )
    if config.model.text_trainable:
        return adamw

    def labels(params):
        return {name: jax.tree.map(lambda _: "frozen" if name == "text" else "train", sub)
                for name, sub in params.items()}

    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels)
