"""Write ArrayRecord shards of captioned images (tcjepa_jax.data.records) for training.

    python -m tcjepa_jax.tools.make_dataset --images=DIR --captions=captions.jsonl --out=OUT
    python -m tcjepa_jax.tools.make_dataset --images=imagenet/train --label_from=dirname \\
        --captions=in1k_captions.jsonl --out=OUT
    python -m tcjepa_jax.tools.make_dataset --tfds=coco_captions --tfds_split=train \\
        --id_key=image/id --caption_key=captions/text --out=OUT
    # ... and the frozen T5's features of every caption (model.text_features="precomputed")
    python -m tcjepa_jax.tools.make_dataset --images=DIR --captions=captions.jsonl --out=OUT \\
        --text_checkpoint=t5-v1_1-base --text=base --max_caption_len=64

Inputs: --images, every non-hidden file under a folder (id = its path relative to the folder,
with "/"), captions from --captions, a JSONL file of {"id": ..., "captions": [...]} lines (an id
also matches a file's name, with or without its extension); or --tfds, a TFDS dataset prepared
in the array_record format, captions from the --caption_key feature or from --captions (given
both, the file is used and the feature ignored).

Every item is validated: its image fully decoded (data/decode.py), its caption sentences cleaned.
Shards store the ORIGINAL image bytes and the cleaned sentences. Items that cannot be used are
skipped and counted by kind, and the summary explains each kind. Item i goes to shard
i // shard_size; shards are written in parallel, each atomically, so a run that was interrupted
resumes where it stopped when started again with the same arguments. DIR ends with manifest.json:
counts by kind, caption statistics and the arguments.

--text_checkpoint also stores with each record the word features that frozen T5 encoder gives
each caption sentence (tokenized with its spiece.model and cut to --max_caption_len tokens, as
the training pipeline does), in --text_features_dtype; manifest.json records which T5 made them,
and training with model.text_features="precomputed" refuses a config that names another
(data/text_features.py, tools/text_writer.py). T5 runs in this process, on its accelerators if
it has any.

The work is done by dataset_writer.py (orchestration), dataset_inputs.py (folder and TFDS
inputs), shard_writer.py (the worker processes) and dataset_dir.py (resume, overwrite, manifest).
"""

import os
import sys

# TFDS imports TensorFlow for catalog datasets; it computes nothing here, so silence its start-up
# messages (the oneDNN notice is printed unless oneDNN is off).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags, logging  # pylint: disable=wrong-import-position

from tcjepa_jax.tools import dataset_writer  # pylint: disable=wrong-import-position
from tcjepa_jax.tools.dataset_inputs import InputError  # pylint: disable=wrong-import-position

flags.DEFINE_string("images", None, "Folder of image files (recursive; hidden files skipped).")
flags.DEFINE_enum("label_from", None, ["dirname"], "With --images: label = index of the parent "
                  "folder's name among the sorted parent folder names (ImageNet-style folders).")
flags.DEFINE_string("tfds", None, "TFDS dataset name, prepared in the array_record format.")
flags.DEFINE_string("tfds_split", "train", "TFDS split, e.g. train or train[:10%].")
flags.DEFINE_string("tfds_data_dir", "", "TFDS data_dir; default: TFDS's own.")
flags.DEFINE_string("image_key", "image", "TFDS image feature.")
flags.DEFINE_string("id_key", "", "TFDS feature with the image id or file name (file_name for "
                    "imagenet2012, image/id for coco_captions; \"/\" walks nested features); "
                    "default: the example's index in the split.")
flags.DEFINE_string("label_key", "", "TFDS integer label feature; default: no labels.")
flags.DEFINE_string("caption_key", "", "TFDS feature holding the captions, e.g. captions/text; "
                    "ignored when --captions is given.")
flags.DEFINE_string("captions", None, 'JSONL caption file: {"id": ..., "captions": [...]} lines.')
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_integer("shard_size", 1000, "Input items per shard.")
flags.DEFINE_integer("workers", dataset_writer.default_workers(), "Shards written in parallel.")
flags.DEFINE_bool("overwrite", False, "Delete make_dataset's previous output in --out first.")
flags.DEFINE_string("text_checkpoint", None, "A Hugging Face T5 v1.1 folder (as "
                    "model.text_checkpoint): store its encoder's features of every caption.")
flags.DEFINE_string("text", "base", "With --text_checkpoint: its size, as model.text.")
flags.DEFINE_integer("max_caption_len", 64, "With --text_checkpoint: S, tokens per caption, as "
                     "input.max_caption_len.")
flags.DEFINE_enum("text_features_dtype", "bfloat16", ["bfloat16", "float32"],
                  "With --text_checkpoint: the stored features' dtype.")

FLAGS = flags.FLAGS
_ARGS = ("images", "label_from", "tfds", "captions", "shard_size", "workers", "overwrite")
_TEXT_ARGS = ("text", "max_caption_len", "text_features_dtype")


def main(argv):
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}; flags are --name=value")
    if not FLAGS["verbosity"].present:  # the tool prints what matters; TFDS logs a lot at INFO
        logging.set_verbosity(logging.ERROR)
    kwargs = {name: FLAGS[name].value for name in _ARGS}
    # TFDS flags count as given only when set, so that they can be refused with --images.
    kwargs.update({name: FLAGS[name].value for name in dataset_writer.TFDS_DEFAULTS
                   if FLAGS[name].present})
    text_flags = [f"--{name}" for name in _TEXT_ARGS if FLAGS[name].present]
    if FLAGS.text_checkpoint:
        kwargs.update(text_checkpoint=FLAGS.text_checkpoint,
                      **{name: FLAGS[name].value for name in _TEXT_ARGS})
    elif text_flags:
        sys.exit(f"error: {', '.join(text_flags)} go with --text_checkpoint=DIR (the T5 whose "
                 "features to store)")
    try:
        dataset_writer.write_dataset(FLAGS.out, **kwargs)
    except InputError as e:
        sys.exit(f"error: {e}")
    except OSError as e:  # e.g. a full disk; complete shards are kept
        sys.exit(f"error: {e}\n(run the same command again to resume)")
    except KeyboardInterrupt:
        sys.exit("\ninterrupted; run the same command again to resume")


def run():
    app.run(main)


if __name__ == "__main__":
    run()
