"""TC-JEPA paper run: IN-21k ViT-L/16, 90 epochs (the paper does not state the length) (METHOD.md section 6).

    python -m tcjepa_jax.train --config=configs/in21k_vit_l16.py            # TC-JEPA
    python -m tcjepa_jax.train --config=configs/in21k_vit_l16.py:ijepa      # its I-JEPA baseline
    python -m tcjepa_jax.train --config=configs/in21k_vit_l16.py:runlocal   # the recipe, tiny, on CPU

The full run needs the dataset ("imagenet21k") and a TPU/GPU slice; runlocal trains the same recipe
shrunk to a 64 px synthetic-scene model for 30 steps (about a minute on 2 CPU cores), loss falling.
"""

from configs import common


def get_config(arg: str = ""):
    return common.paper_config(arg, name="in21k_vit_l16", encoder="L/16", dataset="imagenet21k",
                               epochs=90, warmup_epochs=15)
