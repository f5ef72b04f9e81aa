"""SentencePiece tokenizer with T5 conventions: pad=0, eos=1, unk=2, no bos; eos appended."""

from __future__ import annotations

import itertools
import os
import re
import tempfile
from typing import Callable, Iterable

import numpy as np
import sentencepiece as spm

from tcjepa_jax import paths

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


class Tokenizer:
    """Wraps a SentencePiece model. Picklable (carries the serialized model)."""

    def __init__(self, model_path: str):
        if not paths.exists(model_path):
            raise FileNotFoundError(f"SentencePiece model not found: {model_path}")
        self.model_path = model_path
        self._load(paths.read_bytes(model_path))

    def _load(self, proto: bytes) -> None:
        self._proto = proto
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except Exception as e:  # sentencepiece raises RuntimeError or OSError on a bad proto
            raise ValueError(f"{self.model_path} is not a SentencePiece model ({e}).") from None
        if (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id()) != (PAD_ID, EOS_ID, UNK_ID):
            raise ValueError(
                    f"Tokenizer {self.model_path} does not follow T5 conventions (pad=0, eos=1, unk=2); got "
                    f"pad={self._sp.pad_id()}, eos={self._sp.eos_id()}, unk={self._sp.unk_id()}. "
                    "Use T5's spiece.model, or train one on your captions with "
                    "`python -m tcjepa_jax.tools.train_tokenizer` (it follows these conventions).")

    def __getstate__(self):
        return {"model_path": self.model_path, "proto": self._proto}

    def __setstate__(self, state):
        self.model_path = state["model_path"]
        self._load(state["proto"])

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def encode(self, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Returns ids int32 (n, max_len) and mask bool (n, max_len).

        Each text becomes its pieces followed by eos; longer ones are cut to max_len - 1 pieces plus
        eos. The empty string encodes to just [eos] (so no row is fully masked).
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        ids = np.zeros((len(texts), max_len), np.int32)
        for row, text in enumerate(texts):  # one call per text: the batched call spawns threads
            pieces = self._sp.encode(text)
            pieces = pieces[: max_len - 1] + [EOS_ID]
            ids[row, : len(pieces)] = pieces
        return ids, ids != PAD_ID

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if EOS_ID in ids:
            ids = ids[: ids.index(EOS_ID)]
        return self._sp.decode([i for i in ids if i != PAD_ID])


def train_tokenizer(sentences: Iterable[str], model_prefix: str, vocab_size: int,
                                        model_type: str = "unigram", strict: bool = False) -> str:
    """Trains a SentencePiece model; writes `model_prefix`.model/.vocab atomically; returns the path.

    `vocab_size` is an upper bound unless `strict`: a small corpus (the synthetic captions have
    ~60 distinct words) supports fewer pieces, and the model then has fewer; read the real size from
    `Tokenizer.vocab_size`. With `strict=True` a too-large vocab_size raises a ValueError instead.
    """
    out_dir = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".spm-", dir=out_dir)
    tmp_prefix = os.path.join(tmp_dir, "m")
    try:
        try:
            spm.SentencePieceTrainer.train(
                    sentence_iterator=iter(sentences), model_prefix=tmp_prefix, vocab_size=vocab_size,
                    model_type=model_type, pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
                    character_coverage=1.0, num_threads=1, minloglevel=2, hard_vocab_limit=strict,
            )
        except RuntimeError as e:
            m = re.search(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", str(e))
            if m:
                raise ValueError(
                        f"Tokenizer vocab_size={vocab_size} is too large for this caption corpus: it supports "
                        f"at most {m.group(2)} pieces. Use a smaller vocab_size, more varied captions, or "
                        "strict=False to accept a smaller vocabulary.") from None
            raise
        for ext in (".model", ".vocab"):
            os.replace(tmp_prefix + ext, model_prefix + ext)
    finally:
        for name in os.listdir(tmp_dir):
            os.remove(os.path.join(tmp_dir, name))
        os.rmdir(tmp_dir)
    return model_prefix + ".model"


def load_or_train_tokenizer(model_path: str | None, workdir: str, vocab_size: int,
                                                        sentences_fn: Callable[[], Iterable[str]]) -> Tokenizer:
    """Loads `model_path`; or, if None, trains into `workdir`/tokenizer.model unless it is there."""
    if model_path:
        if not paths.exists(model_path):
            raise FileNotFoundError(
                    f"tokenizer.model_path={model_path!r} does not exist. Train one with "
                    "`python -m tcjepa_jax.tools.train_tokenizer`, or set tokenizer.model_path=\"\" "
                    "to train one on the training captions into the workdir.")
        return Tokenizer(model_path)
    path = os.path.join(workdir, "tokenizer.model")
    if not paths.exists(path):
        sentences = iter(sentences_fn())
        first = next(sentences, None)
        if first is None:
            raise ValueError("The training data has no captions to train a tokenizer on; set "
                             "tokenizer.model_path, or give the data captions (input.caption_file).")
        if paths.is_url(workdir):  # SentencePiece writes local files: train here, then upload
            with tempfile.TemporaryDirectory() as tmp:
                local = train_tokenizer(itertools.chain([first], sentences),
                                        os.path.join(tmp, "tokenizer"), vocab_size)
                paths.copy_local_file(local, path)
        else:
            train_tokenizer(itertools.chain([first], sentences), os.path.join(workdir, "tokenizer"),
                            vocab_size)
    return Tokenizer(path)
