"""Train a SentencePiece tokenizer on captions (T5 conventions: pad 0, eos 1, unk 2).

    python -m tcjepa_jax.tools.train_tokenizer --captions=captions.txt --out=tok --vocab_size=8000
    python -m tcjepa_jax.tools.train_tokenizer --synthetic=20000 --out=tok --vocab_size=256

--captions reads one caption per line; --synthetic uses that many synthetic-scene captions.
Writes <out>.model; pass it to training with --config.tokenizer.model_path=<out>.model.
"""

import sys

from absl import app, flags

from tcjepa_jax.data import synthetic
from tcjepa_jax.data.tokenizer import Tokenizer, train_tokenizer

_CAPTIONS = flags.DEFINE_string("captions", None, "Text file, one caption per line.")
_SYNTHETIC = flags.DEFINE_integer("synthetic", 0, "Use this many synthetic-scene captions.")
_OUT = flags.DEFINE_string("out", None, "Output prefix; writes <out>.model.", required=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "Largest vocabulary to train.")


def _lines(path):
    with open(path, encoding="utf-8") as f:
        yield from (line.strip() for line in f if line.strip())


def main(argv):
    del argv
    if bool(_CAPTIONS.value) == bool(_SYNTHETIC.value):
        sys.exit("error: give exactly one of --captions=FILE or --synthetic=N.")
    sentences = (_lines(_CAPTIONS.value) if _CAPTIONS.value
                 else synthetic.iter_captions(0, _SYNTHETIC.value))
    try:
        path = train_tokenizer(sentences, _OUT.value, _VOCAB.value)
    except (OSError, ValueError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces)")


if __name__ == "__main__":
    app.run(main)
