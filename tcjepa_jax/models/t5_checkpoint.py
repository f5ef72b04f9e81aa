"""A pretrained T5 v1.1 encoder in Hugging Face's layout -> our T5Encoder's parameters.

`model.text_checkpoint` names a folder as `huggingface-cli download google/t5-v1_1-base` (or
`save_pretrained`) writes it: config.json, the weights (model.safetensors, sharded safetensors
with model.safetensors.index.json, or pytorch_model.bin[.index.json]) and spiece.model. Only the
encoder's tensors are read (models/text.py names the mapping); the decoder and lm_head are
ignored. The checkpoint must be the architecture models/text.py computes (v1.1: gated GELU, no
biases, RMSNorm eps 1e-6, relative position buckets shared from layer 0) and of the size
`model.text` names in T5_SIZES; anything else is a ValueError naming what differs.

`check_checkpoint` (experiment.setup, before any compilation) reads config.json, the tensors'
names and shapes and the tokenizer; `load_text_params` (step.create_train_state) the values.
"""

import io
import json
import os

import numpy as np

from tcjepa_jax import paths
from tcjepa_jax.data.tokenizer import Tokenizer
from tcjepa_jax.models.text import T5_SIZES, T5Encoder

# config.json field -> T5_SIZES key.
SIZE_FIELDS = {"d_model": "width", "num_layers": "depth", "num_heads": "num_heads",
               "d_kv": "head_dim", "d_ff": "mlp_dim"}
# Fixed in models/text.py: the relative position buckets (T5Encoder's defaults), the RMSNorm eps.
FIXED_FIELDS = {"relative_attention_num_buckets": T5Encoder.num_buckets,
                "relative_attention_max_distance": T5Encoder.max_distance,
                "layer_norm_epsilon": 1e-6}
# HF T5Config defaults for fields an older config.json may leave out.
HF_DEFAULTS = {"relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
               "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu"}
# "gated-gelu" is HF's name for v1.1's gated tanh-GELU (dense_act_fn "gelu_new").
GATED_GELU = ("gated-gelu", "gated-gelu_new", "gated-gelu_pytorch_tanh")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
SPIECE = "spiece.model"


def _err(path, message):
    return ValueError(f"model.text_checkpoint={path!r}: {message}")


def read_config(path: str) -> dict:
    """config.json with HF's defaults filled in, checked against models/text.py's architecture."""
    file = os.path.join(path, "config.json")
    if not paths.exists(file):
        raise _err(path, "no config.json there; point it at a Hugging Face T5 v1.1 folder (e.g. "
                   "`huggingface-cli download google/t5-v1_1-base --local-dir DIR`).")
    try:
        cfg = {**HF_DEFAULTS, **json.loads(paths.read_bytes(file))}
    except ValueError as e:
        raise _err(path, f"config.json is not JSON ({e}).") from None
    if cfg.get("model_type", "t5") not in ("t5", "mt5"):
        raise _err(path, f"model_type={cfg.get('model_type')!r}; only T5 v1.1 ('t5') and mT5 "
                   "('mt5') encoders have our architecture (umT5 has a position bias per layer).")
    if cfg["feed_forward_proj"] not in GATED_GELU:
        raise _err(path, f"feed_forward_proj={cfg['feed_forward_proj']!r}, but our T5 encoder is "
                   "v1.1's gated GELU ('gated-gelu'); the original T5 ('relu', e.g. t5-base) is "
                   "not supported: use a T5 v1.1 checkpoint such as google/t5-v1_1-base.")
    missing = [f for f in ("vocab_size", *SIZE_FIELDS) if f not in cfg]
    if missing:
        raise _err(path, f"config.json lacks {', '.join(missing)}.")
    return cfg


def check_size(path: str, cfg: dict, text: str) -> None:
    """The checkpoint must be T5_SIZES[text], with our fixed buckets and eps."""
    want = {f: T5_SIZES.get(text, {}).get(k) for f, k in SIZE_FIELDS.items()}
    bad = [f"{f}={cfg[f]} (model.text={text!r} has {w})" for f, w in want.items() if cfg[f] != w]
    bad += [f"{f}={cfg[f]} (ours: {w})" for f, w in FIXED_FIELDS.items()
            if not np.isclose(float(cfg[f]), w, rtol=1e-6, atol=0)]
    if not bad:
        return
    match = [n for n, s in T5_SIZES.items() if all(cfg[f] == s[k] for f, k in SIZE_FIELDS.items())]
    if any(f in b for b in bad for f in FIXED_FIELDS):
        hint = "models/text.py fixes these, so this checkpoint cannot be loaded."
    elif match:
        hint = f"set --config.model.text={match[0]}, which matches."
    else:
        hint = ("no T5_SIZES entry (models/text.py) matches "
                + ", ".join(f"{f}={cfg[f]}" for f in SIZE_FIELDS) + "; add one.")
    raise _err(path, f"config.json does not match: {'; '.join(bad)}; {hint}")


def _expected_shapes(cfg: dict) -> dict:
    """HF tensor name -> shape, for every encoder tensor we read (torch Linear: (out, in))."""
    d, inner, ff = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]
    shapes = {"encoder.final_layer_norm.weight": (d,),
              "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                  (cfg["relative_attention_num_buckets"], cfg["num_heads"])}
    for i in range(cfg["num_layers"]):
        p = f"encoder.block.{i}.layer."
        shapes.update({f"{p}0.SelfAttention.{n}.weight": (inner, d) for n in "qkv"})
        shapes.update({f"{p}0.SelfAttention.o.weight": (d, inner),
                       f"{p}0.layer_norm.weight": (d,), f"{p}1.layer_norm.weight": (d,),
                       f"{p}1.DenseReluDense.wi_0.weight": (ff, d),
                       f"{p}1.DenseReluDense.wi_1.weight": (ff, d),
                       f"{p}1.DenseReluDense.wo.weight": (d, ff)})
    return shapes


EMBEDDING = ("encoder.embed_tokens.weight", "shared.weight")  # the first one present is read


class _Weights:
    """The tensors of a checkpoint's weight files: names and shapes at once, values on demand."""

    def __init__(self, path: str):
        self.path = path
        name = next((n for n in WEIGHT_FILES if paths.exists(os.path.join(path, n))), None)
        if name is None:
            raise _err(path, f"no weights there; expected one of {', '.join(WEIGHT_FILES)} "
                       "(convert other formats with transformers' save_pretrained).")
        self.safetensors = name.startswith("model.safetensors")
        if name.endswith(".index.json"):
            try:
                weight_map = json.loads(paths.read_bytes(os.path.join(path, name)))["weight_map"]
            except (ValueError, KeyError) as e:
                raise _err(path, f"{name} has no readable weight_map ({e}).") from None
        else:
            weight_map = None
        self.files = sorted(set(weight_map.values())) if weight_map else [name]
        self._opened = {}
        self.shapes = {}
        for file in self.files:
            for key, shape in self._open(file)[1].items():
                self.shapes[key] = shape
        self.file_of = weight_map or {k: name for k in self.shapes}

    def _open(self, file):
        """(reader, {name: shape}); reader(name) -> np.ndarray."""
        if file in self._opened:
            return self._opened[file]
        full = os.path.join(self.path, file)
        local = not paths.is_url(full)
        try:
            if self.safetensors:
                import safetensors
                import safetensors.numpy
                if local:  # memory-mapped: only the tensors asked for are read
                    handle = safetensors.safe_open(full, framework="numpy")
                    shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
                    reader = handle.get_tensor
                else:
                    tensors = safetensors.numpy.load(paths.read_bytes(full))
                    shapes, reader = {k: v.shape for k, v in tensors.items()}, tensors.__getitem__
            else:
                import torch
                source = full if local else io.BytesIO(paths.read_bytes(full))
                try:
                    state = torch.load(source, map_location="cpu", weights_only=True,
                                       mmap=local)
                except RuntimeError:  # mmap needs the zip format of torch >= 1.6
                    if not local:
                        raise
                    state = torch.load(full, map_location="cpu", weights_only=True)
                shapes = {k: tuple(v.shape) for k, v in state.items()}
                reader = lambda k: state[k].float().numpy()
        except Exception as e:  # each library raises its own kinds for a bad or truncated file
            raise _err(self.path, f"cannot read {file} ({type(e).__name__}: {e}).") from None
        self._opened[file] = (reader, shapes)
        return self._opened[file]

    def read(self, key) -> np.ndarray:  # a copy: never a view of a memory-mapped file
        return np.array(self._open(self.file_of[key])[0](key), np.float32, copy=True)


def _check_tensors(weights: _Weights, cfg: dict) -> str:
    """Every encoder tensor present with its shape; returns the embedding's name."""
    expected = _expected_shapes(cfg)
    embedding = next((n for n in EMBEDDING if n in weights.shapes), None)
    if embedding is None:
        raise _err(weights.path, f"the weights have neither {' nor '.join(EMBEDDING)}.")
    expected[embedding] = (cfg["vocab_size"], cfg["d_model"])
    missing = [k for k in expected if k not in weights.shapes]
    wrong = [f"{k} {weights.shapes[k]} (config.json implies {s})" for k, s in expected.items()
             if k in weights.shapes and tuple(weights.shapes[k]) != s]
    if missing or wrong:
        parts = ([f"missing {len(missing)} tensors, e.g. {', '.join(missing[:3])}"] if missing
                 else []) + ([f"shapes differ: {'; '.join(wrong[:3])}"] if wrong else [])
        raise _err(weights.path, "the weights are not a T5 v1.1 encoder of its config.json: "
                   + "; ".join(parts) + ".")
    return embedding


def check_checkpoint(path: str, text: str, text_vocab_size: int = 0):
    """Everything that can be wrong with the folder, before any compilation (experiment.setup).

    Returns (Tokenizer of its spiece.model, rows of the embedding table = config.json's
    vocab_size). Reads names and shapes of the weights, not their values."""
    cfg = read_config(path)
    check_size(path, cfg, text)
    _check_tensors(_Weights(path), cfg)
    vocab = int(cfg["vocab_size"])
    if text_vocab_size and text_vocab_size != vocab:
        raise _err(path, f"its embedding table has vocab_size={vocab} rows, but "
                   f"model.text_vocab_size={text_vocab_size}; set it to 0 (or {vocab}).")
    spiece = os.path.join(path, SPIECE)
    if not paths.exists(spiece):
        raise _err(path, f"no {SPIECE} there (the T5 tokenizer; it comes with every T5 "
                   "checkpoint on the Hugging Face Hub).")
    tokenizer = Tokenizer(spiece)
    if tokenizer.vocab_size > vocab:
        raise _err(path, f"{SPIECE} has {tokenizer.vocab_size} pieces but the embedding table "
                   f"only {vocab} rows.")
    return tokenizer, vocab


def load_text_params(path: str, text: str, scan: bool = False) -> dict:
    """The encoder's weights as our T5Encoder's parameter tree (float32 numpy, unboxed);
    `scan`: the layers stacked as model.scan_layers lays them out (models/scan_params.py)."""
    cfg = read_config(path)
    check_size(path, cfg, text)
    weights = _Weights(path)
    embedding = _check_tensors(weights, cfg)
    heads, head_dim, width = cfg["num_heads"], cfg["d_kv"], cfg["d_model"]
    get = weights.read

    def block(i):
        p = f"encoder.block.{i}.layer."
        attn = {n: {"kernel": get(f"{p}0.SelfAttention.{n}.weight").T.reshape(
            width, heads, head_dim)} for n in "qkv"}
        attn["o"] = {"kernel": get(f"{p}0.SelfAttention.o.weight").T.reshape(
            heads, head_dim, width)}
        mlp = {n: {"kernel": get(f"{p}1.DenseReluDense.{n}.weight").T}
               for n in ("wi_0", "wi_1", "wo")}
        return {"attention_norm": {"weight": get(f"{p}0.layer_norm.weight")},
                "attention": attn,
                "mlp_norm": {"weight": get(f"{p}1.layer_norm.weight")},
                "mlp": mlp}

    params = {"shared": {"embedding": get(embedding)},
              "relative_attention_bias": get(
                  "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
              "final_layer_norm": {"weight": get("encoder.final_layer_norm.weight")}}
    blocks = [block(i) for i in range(cfg["num_layers"])]
    if scan:
        stack = lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else {
            k: stack(*(x[k] for x in xs)) for k in xs[0]}
        params["blocks"] = {"layer": stack(*blocks)}
    else:
        params.update({f"block_{i}": b for i, b in enumerate(blocks)})
    return params
