"""TC-JEPA paper run: IN-21k ViT-L/16, 90 epochs (the paper does not state the length) (docs/method.md).

    python -m tcjepa_jax.train --config=configs/in21k_vit_l16.py            # TC-JEPA
    python -m tcjepa_jax.train --config=configs/in21k_vit_l16.py:ijepa      # its I-JEPA baseline
    python -m tcjepa_jax.train --config=configs/in21k_vit_l16.py:runlocal   # the recipe, tiny, on CPU
    python launch/sweep.py --config=configs/in21k_vit_l16.py:sweep=conditioning   # an ablation (docs/launch.md)

Data: ArrayRecord shards in data/imagenet21k (docs/data.md), from a folder of class
subfolders (labels from the folder names) and a caption file:
         python -m tcjepa_jax.tools.make_dataset --images=PATH/TO/imagenet21k/train \
             --label_from=dirname --captions=data/captions/imagenet21k.jsonl --out=data/imagenet21k
Without the shards, training stops at once with one message saying no shards were found there
(point --config.input.data_dir elsewhere if they live elsewhere, e.g. gs://...).

The full run needs a TPU/GPU slice; runlocal trains the same recipe
shrunk to a 64 px synthetic-scene model for 30 steps (about a minute on 2 CPU cores), loss falling.
"""

from configs import common


def get_config(arg: str = ""):
    return common.paper_config(arg, name="in21k_vit_l16", encoder="L/16", dataset="imagenet21k",
                               epochs=90, warmup_epochs=15)


def get_sweep(arg: str = ""):
    return common.paper_sweep(arg)
