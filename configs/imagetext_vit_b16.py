"""TC-JEPA paper run: image-text (CC12M+YFCC15M) ViT-B/16, 50 epochs (docs/method.md).

    python -m tcjepa_jax.train --config=configs/imagetext_vit_b16.py            # TC-JEPA
    python -m tcjepa_jax.train --config=configs/imagetext_vit_b16.py:ijepa      # its I-JEPA baseline
    python -m tcjepa_jax.train --config=configs/imagetext_vit_b16.py:runlocal   # the recipe, tiny, on CPU
    python launch/sweep.py --config=configs/imagetext_vit_b16.py:sweep=conditioning   # an ablation (docs/launch.md)

Data: ArrayRecord shards in data/cc12m and data/yfcc15m, read as one dataset (docs/data.md),
each from a folder of downloaded images plus its caption file:
         python -m tcjepa_jax.tools.make_dataset --images=PATH/TO/cc12m --captions=cc12m.jsonl \
             --out=data/cc12m
         python -m tcjepa_jax.tools.make_dataset --images=PATH/TO/yfcc15m --captions=yfcc15m.jsonl \
             --out=data/yfcc15m
Without the shards, training stops at once with one message saying no shards were found there
(point --config.input.data_dir elsewhere if they live elsewhere, e.g. gs://...).

The full run needs a TPU/GPU slice; runlocal trains the same recipe
shrunk to a 64 px synthetic-scene model for 30 steps (about a minute on 2 CPU cores), loss falling.
"""

from configs import common


def get_config(arg: str = ""):
    return common.paper_config(arg, name="imagetext_vit_b16", encoder="B/16", dataset="cc12m_yfcc15m",
                               epochs=50, warmup_epochs=10)


def get_sweep(arg: str = ""):
    return common.paper_sweep(arg)
