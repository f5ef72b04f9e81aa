"""T5 v1.1 encoder (encoder only): returns per-token word features for the text conditioner.

v1.1 architecture: no biases, RMSNorm (eps 1e-6) before each sub-layer, gated-GELU FFN,
unscaled dot-product attention (T5 folds 1/sqrt(d) into the init of q), and a learned
relative position bias that the first layer computes once and every layer reuses.

Parameter names follow HF's T5EncoderModel where that is convenient for importing weights:
  shared                       <- shared / encoder.embed_tokens
  relative_attention_bias      <- block.0.layer.0.SelfAttention.relative_attention_bias
  block_{i}/attention_norm     <- block.i.layer.0.layer_norm
  block_{i}/attention/{q,k,v}  <- block.i.layer.0.SelfAttention.{q,k,v}  (kernel reshaped to
                                  (width, heads, head_dim); HF stores (heads*head_dim, width))
  block_{i}/attention/o        <- ...SelfAttention.o  (kernel (heads, head_dim, width))
  block_{i}/mlp_norm           <- block.i.layer.1.layer_norm
  block_{i}/mlp/{wi_0,wi_1,wo} <- block.i.layer.1.DenseReluDense.{wi_0,wi_1,wo}
  final_layer_norm             <- encoder.final_layer_norm
"""
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tcjepa_jax.models.layers import HEADS, apply_layers, attend, constrain_tokens, dense

Dtype = Any

T5_SIZES = {
    "tiny": dict(width=64, depth=2, num_heads=2, head_dim=32, mlp_dim=128),
    "small": dict(width=512, depth=8, num_heads=6, head_dim=64, mlp_dim=1024),
    "base": dict(width=768, depth=12, num_heads=12, head_dim=64, mlp_dim=2048),
    "large": dict(width=1024, depth=24, num_heads=16, head_dim=64, mlp_dim=2816),
    "xl": dict(width=2048, depth=24, num_heads=32, head_dim=64, mlp_dim=5120),
}


def relative_position_bucket(relative_position, num_buckets=32, max_distance=128):
    """HF T5 `_relative_position_bucket` with bidirectional=True.

    relative_position = key position - query position. Half the buckets are for keys after the
    query; within each half, small distances get exact buckets and larger ones log-spaced
    buckets up to max_distance (beyond it everything shares the last bucket).
    """
    num_buckets //= 2
    buckets = (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
    max_exact = num_buckets // 2
    # Clip to 1 inside the log only to avoid log(0); those positions use the exact branch.
    large = max_exact + (
        jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact)
        / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(distance < max_exact, distance, large)


class RMSNorm(nn.Module):
    """T5LayerNorm: scale only, no mean subtraction, statistics in float32."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    eps: float = 1e-6

    @nn.compact
    def __call__(self, x):
        scale = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones,
                                                                  ("text_embed",)),
                           (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


def _normal(std):
    return nn.initializers.normal(stddev=std)


class T5Attention(nn.Module):
    num_heads: int
    head_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, position_bias):
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        heads, names = (self.num_heads, self.head_dim), ("text_embed", "heads", "kv")
        # HF T5 init (factor 1): q std (d*d_kv)^-1/2 stands in for the missing 1/sqrt(d_kv).
        q = constrain_tokens(dense(heads, names, kernel_init=_normal(
            (width * self.head_dim) ** -0.5), name="q", **kw)(x), HEADS)
        k = constrain_tokens(dense(heads, names, kernel_init=_normal(width ** -0.5), name="k",
                                   **kw)(x), HEADS)
        v = constrain_tokens(dense(heads, names, kernel_init=_normal(width ** -0.5), name="v",
                                   **kw)(x), HEADS)
        y = constrain_tokens(attend(q, k, v, key_valid=mask, bias=position_bias, scale=1.0), HEADS)
        return dense(width, ("heads", "kv", "text_embed"), axis=(-2, -1), kernel_init=_normal(
            (self.num_heads * self.head_dim) ** -0.5), name="o", **kw)(y)


class T5Mlp(nn.Module):
    """Gated-GELU FFN: wo(gelu(wi_0 x) * wi_1 x), GELU = HF "gelu_new" (tanh form)."""
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=False)
        wi = lambda n: dense(self.mlp_dim, ("text_embed", "mlp"),
                             kernel_init=_normal(width ** -0.5), name=n, **kw)(x)
        y = constrain_tokens(nn.gelu(wi("wi_0"), approximate=True) * wi("wi_1"), ("act_mlp",))
        return dense(width, ("mlp", "text_embed"), kernel_init=_normal(self.mlp_dim ** -0.5),
                     name="wo", **kw)(y)


class T5Block(nn.Module):
    num_heads: int
    head_dim: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask, position_bias):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain_tokens(x)
        y = RMSNorm(name="attention_norm", **kw)(x)
        x = x + T5Attention(self.num_heads, self.head_dim, name="attention", **kw)(
            y, mask, position_bias)
        y = RMSNorm(name="mlp_norm", **kw)(x)
        return x + T5Mlp(self.mlp_dim, name="mlp", **kw)(y)


class T5Encoder(nn.Module):
    vocab_size: int
    width: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_dim: int
    num_buckets: int = 32
    max_distance: int = 128
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scan: bool = False  # nn.scan over the blocks (parameters "blocks", stacked)

    @nn.compact
    def __call__(self, ids, mask, segment_ids=None):
        """ids int32 (..., S), mask bool (..., S) -> float32 (..., S, width).
        Padded tokens are masked as keys (their own outputs are meaningless). segment_ids
        (..., S) int, for rows of packed captions (pack_captions): a token attends only to the
        valid tokens of its own segment."""
        lead, seq = ids.shape[:-1], ids.shape[-1]
        ids, mask = ids.reshape(-1, seq), mask.reshape(-1, seq).astype(bool)
        if segment_ids is not None:
            seg = segment_ids.reshape(-1, seq)
            mask = mask[:, None, :] & (seg[:, :, None] == seg[:, None, :])  # (rows, query, key)
        x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                     embedding_init=nn.with_logical_partitioning(
                         _normal(1.0), ("vocab", "text_embed")), name="shared")(ids)

        # Relative position bias, computed once and shared by all layers as in T5.
        pos = jnp.arange(seq)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.num_buckets,
                                           self.max_distance)  # (query, key)
        table = self.param("relative_attention_bias", nn.with_logical_partitioning(
            _normal(self.width ** -0.5), ("relpos_buckets", "heads")),
            (self.num_buckets, self.num_heads), self.param_dtype)
        bias = jnp.asarray(table, jnp.float32)[buckets].transpose(2, 0, 1)[None]  # (1,H,S,S)

        x, _ = apply_layers(T5Block, self.depth, x, mask, bias, name="block", scan=self.scan,
                            num_heads=self.num_heads, head_dim=self.head_dim,
                            mlp_dim=self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype)
        x = RMSNorm(jnp.float32, self.param_dtype, name="final_layer_norm")(x)
        return x.reshape(*lead, seq, self.width)


# ---- Packed captions (model.text_pack_rows) -----------------------------------------------

class PackedCaptions(NamedTuple):
    ids: jax.Array        # (B, R, S) int32: the captions' tokens, whole, side by side
    mask: jax.Array       # (B, R, S) bool: the original text_mask of each placed token
    segment: jax.Array    # (B, R, S) int32: 1 + the caption a slot holds, 0 for empty slots
    dest: jax.Array       # (B, N, S) int32: flat slot (row * S + column) of every placed token,
                          #   R * S for tokens not placed (padding, invalid or unplaced captions)
    fits: jax.Array       # () bool: every valid caption found room


def caption_lengths(mask, caption_valid=None):
    """(B, N) int32: 1 + the last valid position of each caption (0: none, or invalid)."""
    s = mask.shape[-1]
    last = jnp.max(jnp.where(mask, jnp.arange(1, s + 1), 0), axis=-1)
    return last if caption_valid is None else jnp.where(caption_valid, last, 0)


def pack_captions(ids, mask, rows: int, caption_valid=None) -> PackedCaptions:
    """Packs the N captions of each example into `rows` rows of S tokens, first fit in caption
    order, each caption whole and contiguous (from its first slot to its last valid token, so
    the distance between any two of its tokens, and with it T5's relative position bias, is
    the one in its own padded row). ids, mask (B, N, S); caption_valid (B, N) leaves invalid
    captions out. `fits` is False when some caption found no row with room (the packed rows
    then lack it: use the padded computation for that batch)."""
    ids, mask = jnp.asarray(ids), jnp.asarray(mask).astype(bool)
    b, n, s = ids.shape
    length = caption_lengths(mask, caption_valid)                          # (B, N)
    fill = jnp.zeros((b, rows), jnp.int32)
    row, offset, placed = [], [], []
    for i in range(n):  # first fit; N is small and static
        room = fill + length[:, i, None] <= s                              # (B, R)
        r = jnp.argmax(room, axis=-1)
        ok = room.any(-1) & (length[:, i] > 0)
        take = jnp.where(ok, length[:, i], 0)
        offset.append(jnp.take_along_axis(fill, r[:, None], axis=1)[:, 0])
        fill = fill + jax.nn.one_hot(r, rows, dtype=jnp.int32) * take[:, None]
        row.append(r)
        placed.append(ok)
    row, offset, placed = (jnp.stack(a, axis=1) for a in (row, offset, placed))  # (B, N)
    fits = jnp.all(placed | (length == 0))
    col = jnp.arange(s)
    inside = placed[..., None] & (col < length[..., None])                 # (B, N, S)
    dest = jnp.where(inside, (row * s + offset)[..., None] + col, rows * s)
    seg = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32)[None, :, None], (b, n, s))

    # Per example (vmap: a scatter batched over the examples, which sharding splits cleanly).
    def scatter(x):
        one = lambda d, v: jnp.zeros((rows * s,), jnp.int32).at[d.reshape(-1)].set(
            v.reshape(-1).astype(jnp.int32), mode="drop")
        return jax.vmap(one)(dest, x).reshape(b, rows, s)

    return PackedCaptions(scatter(ids), scatter(mask & inside).astype(bool), scatter(seg),
                          dest, fits)


def unpack_features(features, packed: PackedCaptions, mask):
    """Packed-row features (B, R, S, D) -> the padded layout (B, N, S, D); zeros at tokens that
    were not placed and at padding."""
    b, r, s, d = features.shape
    index = jnp.minimum(packed.dest, r * s - 1).reshape(b, -1)
    out = jax.vmap(lambda f, i: f[i])(features.reshape(b, r * s, d), index)
    out = out.reshape(packed.dest.shape + (d,))
    keep = (packed.dest < r * s) & jnp.asarray(mask).astype(bool)
    return jnp.where(keep[..., None], out, 0.0).astype(features.dtype)
