"""TC-JEPA paper run: IN-1k ViT-H/14, 300 epochs (docs/method.md).

    python -m tcjepa_jax.train --config=configs/in1k_vit_h14.py            # TC-JEPA
    python -m tcjepa_jax.train --config=configs/in1k_vit_h14.py:ijepa      # its I-JEPA baseline
    python -m tcjepa_jax.train --config=configs/in1k_vit_h14.py:runlocal   # the recipe, tiny, on CPU
    python launch/sweep.py --config=configs/in1k_vit_h14.py:sweep=conditioning   # an ablation (docs/launch.md)

Data: ImageNet-1k from TFDS (ArrayRecord format) plus a caption file (docs/data.md):
  1. Prepare the TFDS dataset once (ImageNet needs its manual download in the manual_dir):
         tfds build imagenet2012 --file_format=array_record --manual_dir=PATH/TO/IMAGENET_TARS
  2. Put the captions at data/captions/imagenet2012_train.jsonl, one line per image:
         {"id": "n01440764_10026.JPEG", "captions": ["a fish held by a man.", ...]}
     (ids are TFDS's `file_name` feature; the paper's captions are machine-generated, ~8 each).
  Or bake the captions into ArrayRecord shards and train from those:
         python -m tcjepa_jax.tools.make_dataset --tfds=imagenet2012 --id_key=file_name \
             --label_key=label --captions=data/captions/imagenet2012_train.jsonl --out=data/in1k
         python -m tcjepa_jax.train --config=configs/in1k_vit_h14.py \
             --config.input.source=array_record --config.input.data_dir=data/in1k
Without the data, training stops at once with one message naming what is missing (the TFDS
dataset not prepared, or the caption file not found); `:ijepa` needs no caption file.

The full run needs a TPU/GPU slice; runlocal trains the same recipe
shrunk to a 64 px synthetic-scene model for 30 steps (about a minute on 2 CPU cores), loss falling.
"""

from configs import common


def get_config(arg: str = ""):
    return common.paper_config(arg, name="in1k_vit_h14", encoder="H/14", dataset="imagenet2012",
                               epochs=300, warmup_epochs=15)


def get_sweep(arg: str = ""):
    return common.paper_sweep(arg)
