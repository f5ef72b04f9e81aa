"""TC-JEPA paper run: image-text (CC12M+YFCC15M) ViT-L/14, 50 epochs (METHOD.md section 6).

    python -m tcjepa_jax.train --config=configs/imagetext_vit_l14.py            # TC-JEPA
    python -m tcjepa_jax.train --config=configs/imagetext_vit_l14.py:ijepa      # its I-JEPA baseline
    python -m tcjepa_jax.train --config=configs/imagetext_vit_l14.py:runlocal   # the recipe, tiny, on CPU

The full run needs the dataset ("cc12m_yfcc15m") and a TPU/GPU slice; runlocal trains the same recipe
shrunk to a 64 px synthetic-scene model for 30 steps (about a minute on 2 CPU cores), loss falling.
"""

from configs import common


def get_config(arg: str = ""):
    return common.paper_config(arg, name="imagetext_vit_l14", encoder="L/14", dataset="cc12m_yfcc15m",
                               epochs=50, warmup_epochs=10)
