"""The shuffled-caption control (input.caption_control, docs/method.md section 8).

"own" (default): every image is conditioned on its own captions. "shuffled": on the captions of
another image of the same batch, so that a gain of TC-JEPA over I-JEPA can be split into what
the captions say about *this* image and what any text (more parameters, a regulariser, a
different optimisation path) does. The step rolls every caption array of the batch by one
along the batch axis: image i reads the captions of image i - 1 (image 0 those of the last). The
pipeline shuffles images into batches, so the partner is a random image, different every step;
and a roll is a derangement for any batch of two or more, which a random permutation is not.
It runs inside the jitted step on the global batch, so it works under any batch sharding (XLA
moves the rows between devices) and before gradient accumulation splits the batch, so each
micro-batch's loss weights (step.loss_counts) count the captions its images actually read.
"""
import jax.numpy as jnp

CAPTION_CONTROLS = ("own", "shuffled")
# Everything in a batch that describes the captions (text_features: precomputed T5 output).
CAPTION_KEYS = ("text_ids", "text_mask", "caption_valid", "text_features")


def caption_control(config) -> str:
    return config.input.get("caption_control", "own")


def check(config) -> None:
    """The config errors of the control, before any compilation."""
    control = caption_control(config)
    if control not in CAPTION_CONTROLS:
        raise ValueError(f"input.caption_control={control!r}; expected one of "
                         f"{CAPTION_CONTROLS}.")
    if control == "shuffled" and config.batch_size < 2:
        raise ValueError(f"input.caption_control='shuffled' needs another image's captions, but "
                         f"batch_size={config.batch_size}; use a batch of at least 2 images.")


def apply(batch: dict, config, conditioned: bool) -> dict:
    """The batch as the model reads it. `conditioned`: the model reads text at all (in I-JEPA
    mode the batch passes unchanged, so the control adds nothing to that step)."""
    if not conditioned or caption_control(config) == "own":
        return batch
    return {key: jnp.roll(value, 1, axis=0) if key in CAPTION_KEYS else value
            for key, value in batch.items()}
