"""Grounding: does each patch's cross-attention go to the words that name the object covering it?

The synthetic scenes know which object covers every pixel and which caption words name which
object (data/synthetic.py, SyntheticScenes.grounded). On probe.grounding_images held-out scenes
of the probe's test split, each with its first input.num_captions caption sentences and a mask
drawn as in training (masks.sample_masks, epoch 0), the trained context encoder, text encoder
and predictor run as in the train step; the text conditioner's softmax over the words is
recomputed from the Q and K projections it sows (TextConditioner, "intermediates").

A (token, caption) pair counts when the token is valid, its patch is mostly covered by an
object (majority of its pixels) and the caption names that object. Its score is the attention
mass, averaged over heads and conditioned layers, on the caption's tokens (SentencePiece pieces)
of words naming that object; chance is the share of such tokens among the caption's valid
tokens (end-of-sequence included), which is what uniform attention would give. Reported, as
means over counted pairs, for the context tokens and the mask (target) tokens apart:

    context, context_chance, target, target_chance

I-JEPA (conditioning "none") and caption-level conditioning have no per-word attention: {}.
The evaluator reads the model, not the encoder's features (evaluators/__init__.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tcjepa_jax import masks as masks_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax.data import transforms
from tcjepa_jax.data.sources import make_source
from tcjepa_jax.evaluators._features import eval_input
from tcjepa_jax.models.penalties import attention_weights

CHUNK = 64  # images per forward pass (bounds the attention maps' memory)


def evaluate_model(model, config) -> dict:
    if config.model.conditioning not in ("all", "first"):
        return {}
    data = model.cache.get("grounding")
    if data is None:
        data = model.cache["grounding"] = load(config, model.models, model.tokenizer)
    if "grounding_forward" not in model.cache:  # compiled once per run, not per evaluation
        model.cache["grounding_forward"] = _forward_fn(model.models)
    forward, sums = model.cache["grounding_forward"], np.zeros(6)
    n = len(data["image"])
    for start in range(0, n, CHUNK):
        chunk = {k: v[start:start + CHUNK] for k, v in data.items()}
        pad = CHUNK - len(chunk["image"]) if n > CHUNK else 0
        if pad:  # one program for every chunk; padded images have no valid caption
            chunk = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                     for k, v in chunk.items()}
        sums += np.asarray(forward(model.params, chunk), np.float64)
    ctx_n, tgt_n = max(sums[4], 1.0), max(sums[5], 1.0)
    return {"context": sums[0] / ctx_n, "context_chance": sums[1] / ctx_n,
            "target": sums[2] / tgt_n, "target_chance": sums[3] / tgt_n}


# ---- Held-out scenes with aligned captions -----------------------------------------------------

def load(config, models, tokenizer) -> dict:
    """numpy arrays of probe.grounding_images test scenes: the batch fields of the train step
    plus patch_object (n, H*W) and word_object (n, N, S) (-1: background / no object)."""
    cfg = eval_input(config)
    if cfg.source != "synthetic":
        raise ValueError("the grounding evaluator needs the synthetic scenes (which know what "
                         f"each patch shows and each word names); probe source is {cfg.source!r}.")
    src = make_source(cfg, config.probe.get("test_split", "test"))
    n = int(config.probe.get("grounding_images", 200))
    num_captions, max_len = int(config.input.num_captions), int(config.input.max_caption_len)
    patch = int(config.input.image_size) // models.grid[0]
    out = {k: [] for k in ("image", "text_ids", "text_mask", "caption_valid", "word_object",
                           "patch_object", "context_idx", "context_valid", "target_idx",
                           "target_valid")}
    for index in range(n):
        record = src.grounded(index)
        ids = np.zeros((num_captions, max_len), np.int32)
        objects = np.full((num_captions, max_len), -1, np.int32)
        valid = np.zeros(num_captions, bool)
        for row, words in enumerate(record["caption_words"][:num_captions]):
            ids[row], objects[row] = caption_tokens(tokenizer, words, max_len)
            valid[row] = True
        out["image"].append(transforms.normalize(record["image"]))
        out["text_ids"].append(ids)
        out["text_mask"].append(ids != 0)
        out["caption_valid"].append(valid)
        out["word_object"].append(objects)
        out["patch_object"].append(patch_objects(record["objects"], patch))
        for key, value in masks_lib.sample_masks(models.mask_spec, int(config.seed), index,
                                                 0).items():
            out[key].append(value)
    return {k: np.stack(v) for k, v in out.items()}


def caption_tokens(tokenizer, words: list, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, object of each id) of one caption, as Tokenizer.encode pads and cuts it. Each word
    is tokenized alone and its pieces take its object; SentencePiece splits on spaces first, so
    the pieces are the sentence's own (checked: a caption where they are not names no object)."""
    ids, objects = [], []
    for word, obj in words:
        word_ids, word_mask = tokenizer.encode([word], len(word) + 2)
        pieces = word_ids[0][word_mask[0]][:-1].tolist()  # without the end-of-sequence id
        ids += pieces
        objects += [int(obj)] * len(pieces)
    full, mask = tokenizer.encode([" ".join(w for w, _ in words)], max_len)
    full = full[0]
    kept = min(len(ids), max_len - 1)
    obj = np.full(max_len, -1, np.int32)
    if full[:kept].tolist() == ids[:kept]:
        obj[:kept] = objects[:kept]
    return full, obj


def patch_objects(objects: np.ndarray, patch: int) -> np.ndarray:
    """The object covering most pixels of each patch, row-major (H*W,); -1 = background."""
    h, w = objects.shape[0] // patch, objects.shape[1] // patch
    blocks = objects[:h * patch, :w * patch].reshape(h, patch, w, patch).transpose(0, 2, 1, 3)
    blocks = blocks.reshape(h * w, patch * patch).astype(np.int64) + 1  # background -> 0
    counts = np.stack([(blocks == k).sum(1) for k in range(int(blocks.max()) + 1)], 1)
    return (counts.argmax(1) - 1).astype(np.int32)


# ---- The score ---------------------------------------------------------------------------------

def grounding_sums(weights, token_object, token_valid, is_context, word_object, text_mask,
                   caption_valid):
    """Sums over counted (token, caption) pairs of [mass, chance] for context and target tokens,
    and the two pair counts: (6,). weights (B,N,T,S) (heads and layers averaged); token_object,
    token_valid (B,T); is_context (T,); word_object, text_mask (B,N,S); caption_valid (B,N)."""
    text_mask = text_mask.astype(bool)
    own = ((word_object[:, :, None, :] == token_object[:, None, :, None])
           & text_mask[:, :, None, :])                                          # (B,N,T,S)
    mass = jnp.sum(weights * own, -1)                                           # (B,N,T)
    chance = own.sum(-1) / jnp.maximum(text_mask.sum(-1), 1)[:, :, None]
    counted = (own.any(-1) & caption_valid[:, :, None].astype(bool)
               & (token_valid & (token_object >= 0))[:, None, :])
    ctx = counted & is_context[None, None, :]
    tgt = counted & ~is_context[None, None, :]
    return jnp.stack([jnp.sum(mass * ctx), jnp.sum(chance * ctx), jnp.sum(mass * tgt),
                      jnp.sum(chance * tgt), ctx.sum(), tgt.sum()]).astype(jnp.float32)


def _forward_fn(models):
    from tcjepa_jax.tools.plot import unrolled_predictor
    predictor = models.predictor.clone(scan=False)  # per-layer modules cond_i

    @jax.jit
    def forward(params, batch):
        text = step_lib.text_features(models, params, batch, trainable=False)
        z = models.encoder.apply({"params": params["encoder"]}, batch["image"],
                                 batch["context_idx"], batch["context_valid"])
        _, state = predictor.apply(
            {"params": unrolled_predictor(params["predictor"])}, z, batch["context_idx"],
            batch["context_valid"], batch["target_idx"], batch["target_valid"], text,
            batch["text_mask"], batch["caption_valid"], models.grid, mutable=["intermediates"])
        layers = [v for name, v in state["intermediates"].items() if name.startswith("cond_")]
        weights = sum(attention_weights(layer["q_proj"][0], layer["k_proj"][0],
                                        batch["text_mask"]).mean(2) for layer in layers)
        weights = weights / len(layers)
        # Token order inside the conditioner: per example, the K target blocks one after the
        # other, each its context slots then its target slots (Predictor.__call__).
        b, k, nt = batch["target_idx"].shape
        nc = batch["context_idx"].shape[1]
        ctx = jnp.broadcast_to(batch["context_idx"][:, None], (b, k, nc))
        ctx_valid = jnp.broadcast_to(batch["context_valid"][:, None], (b, k, nc))
        position = jnp.concatenate([ctx, batch["target_idx"]], -1).reshape(b, -1)
        valid = jnp.concatenate([ctx_valid, batch["target_valid"]], -1).reshape(b, -1)
        is_context = jnp.tile(jnp.arange(nc + nt) < nc, k)
        token_object = jnp.take_along_axis(batch["patch_object"], position, 1)
        return grounding_sums(weights, token_object, valid.astype(bool), is_context,
                              batch["word_object"], batch["text_mask"], batch["caption_valid"])

    return forward
