"""The embedded default: TC-JEPA on captioned synthetic scenes, a few minutes on a laptop CPU.

    python -m tcjepa_jax.train                      # this config, into runs/synthetic_tiny
    python -m tcjepa_jax.train --config=configs/synthetic_tiny.py:ijepa   # the I-JEPA baseline

A 64 px scene is an 8x8 grid of 8 px patches; the encoder is a 4-layer, 96-wide ViT, the
predictor 2 layers with the text conditioner in both, and the text encoder a 2-layer T5 on a
SentencePiece vocabulary trained on the captions at start-up. 600 steps of batch 32.
Expect the loss to fall steadily and, at the end, linear-probe accuracies of the trained target
encoder above those of the same encoder at initialisation (see README.md for measured numbers).
Arguments (comma separated): `ijepa` turns conditioning off; `smoke` runs 20 steps.
"""

from configs import common


def get_config(arg: str = ""):
    args = set(filter(None, (arg or "").split(",")))
    if args - {"ijepa", "smoke"}:
        raise ValueError(f"unknown config arguments {sorted(args - {'ijepa', 'smoke'})}; "
                         "use ijepa and/or smoke.")
    config = common.get_base_config()
    config.name = "synthetic_tiny" + ("_ijepa" if "ijepa" in args else "")

    # Small batches and many steps: on a CPU the number of updates, not the batch, limits how
    # far a few minutes of training get.
    config.batch_size = 32
    config.total_steps = 20 if "smoke" in args else 600
    config.log_every = 5 if "smoke" in args else 50
    config.checkpoint_every = 200

    config.input.image_size = 64
    config.input.num_captions = 2       # each conditioned caption costs a conditioner pass
    config.input.max_caption_len = 24
    config.tokenizer.vocab_size = 256
    # The exact bound is 55 of the 64 patches; contexts longer than 40 (about 3%) are
    # subsampled, which saves a quarter of the encoder's and predictor's work.
    config.masks.max_context = 40

    config.model.encoder = "mu/8"
    config.model.predictor_width = 96
    config.model.predictor_depth = 2
    config.model.predictor_heads = 3
    config.model.text = "tiny"
    config.model.dtype = "float32"  # bf16 is slower than f32 on most CPUs
    config.model.conditioning = "none" if "ijepa" in args else "all"

    # A short run: a higher peak (3e-3 learned about twice as fast as 1e-3 here) and a faster
    # EMA start than the paper's 0.996, so the target encoder follows within the run.
    config.optim.warmup_steps = config.total_steps // 10
    config.optim.lr_start = 3e-4
    config.optim.lr_peak = 3e-3
    config.optim.ema_start = 0.99

    config.probe.num_train = 2000
    config.probe.num_test = 1000
    config.probe.tasks = ("count", "shape", "color")
    config.probe.every = 0 if "smoke" in args else 300   # one evaluation half-way, one at the end
    return config
