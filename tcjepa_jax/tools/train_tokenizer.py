"""Train a SentencePiece tokenizer on captions (T5 conventions: pad 0, eos 1, unk 2).

    python -m tcjepa_jax.tools.train_tokenizer --captions=captions.txt --out=tok --vocab_size=8000
    python -m tcjepa_jax.tools.train_tokenizer --config=configs/imagetext_vit_b16.py --out=tok
    python -m tcjepa_jax.tools.train_tokenizer --synthetic=20000 --out=tok --vocab_size=256

--captions reads one caption per line, or a JSONL caption file ({"id", "captions"} per line, as
make_dataset takes); --config reads the captions of the config's training data (any source,
--num_images records spread over it); --synthetic uses that many synthetic-scene captions.
Writes <out>.model; pass it to training with --config.tokenizer.model_path=<out>.model.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from tcjepa_jax.config_lib import UserError, run_command
from tcjepa_jax.data import decode, pipeline, synthetic
from tcjepa_jax.data.tokenizer import Tokenizer, train_tokenizer

_CAPTIONS = flags.DEFINE_string("captions", None, "Text file (one caption per line) or JSONL.")
_CONFIG = config_flags.DEFINE_config_file("config", None, "Use this config's training captions.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 100_000, "With --config: records to read.")
_SYNTHETIC = flags.DEFINE_integer("synthetic", 0, "Use this many synthetic-scene captions.")
_OUT = flags.DEFINE_string("out", None, "Output prefix; writes <out>.model.", required=True)
_VOCAB = flags.DEFINE_integer("vocab_size", 8000, "Largest vocabulary to train.")


def _lines(path):
    """Sentences of a plain text file, or of a JSONL caption file's "captions" lists."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    yield from decode.clean_captions(json.loads(line).get("captions"))[0]
                    continue
                except (ValueError, AttributeError):
                    pass
            if line:
                yield line


def sentences():
    given = [bool(_CAPTIONS.value), _CONFIG.value is not None, bool(_SYNTHETIC.value)]
    if sum(given) != 1:
        raise UserError("give exactly one of --captions=FILE, --config=CONFIG or --synthetic=N.")
    if _CAPTIONS.value:
        return _lines(_CAPTIONS.value)
    if _SYNTHETIC.value:
        return synthetic.iter_captions(0, _SYNTHETIC.value)
    input_cfg = _CONFIG.value.input
    try:
        source = pipeline.make_source(input_cfg, input_cfg.split)
    except (ValueError, FileNotFoundError) as e:
        raise UserError(str(e)) from e
    return pipeline.source_captions(source, _NUM_IMAGES.value)


def train(out: str, vocab_size: int) -> str:
    try:
        path = train_tokenizer(sentences(), out, vocab_size)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(str(e)) from e
    print(f"wrote {path} ({Tokenizer(path).vocab_size} pieces)")
    return path


def main(argv):
    del argv
    run_command(train, _OUT.value, _VOCAB.value)


if __name__ == "__main__":
    app.run(main)
