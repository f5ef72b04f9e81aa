"""TC-JEPA paper run: IN-1k ViT-B/16, 600 epochs (METHOD.md section 6).

    python -m tcjepa_jax.train --config=configs/in1k_vit_b16.py            # TC-JEPA
    python -m tcjepa_jax.train --config=configs/in1k_vit_b16.py:ijepa      # its I-JEPA baseline
    python -m tcjepa_jax.train --config=configs/in1k_vit_b16.py:runlocal   # the recipe, tiny, on CPU

The full run needs the dataset ("imagenet2012") and a TPU/GPU slice; runlocal trains the same recipe
shrunk to a 64 px synthetic-scene model for 30 steps (about a minute on 2 CPU cores), loss falling.
"""

from configs import common


def get_config(arg: str = ""):
    return common.paper_config(arg, name="in1k_vit_b16", encoder="B/16", dataset="imagenet2012",
                               epochs=600, warmup_epochs=15)
