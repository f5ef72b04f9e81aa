"""I-JEPA predictor with the TC-JEPA text conditioner (docs/method.md sections 2 and 5).

Per predictor layer: a pre-LN self-attention block over [context tokens, mask tokens], then the
text conditioner: every token cross-attends to each caption's words, and the per-caption results
are max-pooled over the valid captions. The conditioner also returns the map that the sparsity
and consistency penalties act on (models/penalties.py: the paper's rectified cosine O by default).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcjepa_jax.models.layers import (HEADS, Mlp, apply_layers, attend, constrain_tokens, dense,
                                     layer_norm, remat, trunc_normal)
from tcjepa_jax.models.penalties import penalty_map, text_penalties  # noqa: F401 (re-exported)
from tcjepa_jax.models.vit import Block, sincos_2d

Dtype = Any
CONDITIONING = ("all", "first", "caption", "none")


COND_MLP = ("per_caption", "after_pool")
COND_ATTENTION = ("shared", "broadcast")
COND_POOL = ("outputs", "attention")


class TextConditioner(nn.Module):
    """One layer's conditioner.

    q (B,T,W) tokens; text (B,N,S,Dt) word features of N captions; text_mask (B,N,S) bool;
    caption_valid (B,N) bool. Returns (q_out (B,T,W), O (B,N,T,S) float32 or None), O the
    map of `penalty` (loss.penalty, models/penalties.py; "cosine": the paper's).
    mode "words": attend over the words; "caption": one key per caption, the mean valid word
    feature, and no O (caption-level ablation).
    mlp (model.cond_mlp): "per_caption" runs the MLP on every caption's result before the
    max-pool; "after_pool" once on the pooled token (N times less MLP work; not the same
    function). attention (model.cond_attention): "shared" scores the projected queries against
    all N captions' keys in one product and normalises per caption; "broadcast" copies the
    queries once per caption and attends caption by caption. Both compute the same thing.
    pool (model.cond_pool): what the max over captions pools. "outputs": each caption's token
    after the out-projection (and the MLP, per_caption); "attention": the attention outputs
    (B,N,T,H,D), then one out-projection per token (N times less projection work; not the same
    function). "attention" leaves no per-caption token for the MLP, so it needs mlp="after_pool".
    """
    num_heads: int
    mlp_ratio: float = 1.0
    mode: str = "words"
    mlp: str = "per_caption"
    attention: str = "shared"
    penalty: str = "cosine"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    pool: str = "outputs"

    @nn.compact
    def __call__(self, q, text, text_mask, caption_valid):
        if self.mlp not in COND_MLP:
            raise ValueError(f"cond_mlp={self.mlp!r}; expected one of {COND_MLP}.")
        if self.pool not in COND_POOL:
            raise ValueError(f"cond_pool={self.pool!r}; expected one of {COND_POOL}.")
        if self.pool == "attention" and self.mlp != "after_pool":
            raise ValueError("cond_pool='attention' pools before the out-projection, which "
                             "leaves no per-caption token for the MLP: use "
                             "cond_mlp='after_pool'.")
        if self.attention not in COND_ATTENTION:
            raise ValueError(f"cond_attention={self.attention!r}; expected one of "
                             f"{COND_ATTENTION}.")
        b, t, width = q.shape
        n = text.shape[1]
        head_dim = width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        text_mask = text_mask.astype(bool)
        # A caption without a single valid word has nothing to attend to: treat it as missing.
        caption_valid = caption_valid.astype(bool) & text_mask.any(-1)
        if self.mode == "caption":
            m = text_mask[..., None].astype(jnp.float32)
            text = ((text.astype(jnp.float32) * m).sum(2, keepdims=True)
                    / jnp.maximum(m.sum(2, keepdims=True), 1.0))
            text_mask = text_mask.any(-1, keepdims=True)
        s = text.shape[2]

        heads = (self.num_heads, head_dim)
        qp = constrain_tokens(dense(heads, ("embed", "heads", "kv"), name="q", **kw)(
            layer_norm("norm_q", **kw)(q)), HEADS)                              # (B,T,H,D)
        kp = constrain_tokens(dense(heads, ("text_embed", "heads", "kv"), name="k", **kw)(text),
                              HEADS)                                            # (B,N,S,H,D)
        vp = constrain_tokens(dense(heads, ("text_embed", "heads", "kv"), name="v", **kw)(text),
                              HEADS)
        self.sow("intermediates", "q_proj", qp)
        self.sow("intermediates", "k_proj", kp)

        # Softmax over all words of each caption.
        if self.attention == "shared":
            att = attend_captions(qp, kp, vp, text_mask)                        # (B,N,T,H,D)
        else:  # captions folded into the batch, the queries copied once per caption
            qn = jnp.broadcast_to(qp[:, None], (b, n, t) + heads).reshape((b * n, t) + heads)
            att = attend(qn, kp.reshape((b * n, s) + heads), vp.reshape((b * n, s) + heads),
                         key_valid=text_mask.reshape(b * n, s)).reshape((b, n, t) + heads)
        out_proj = dense(width, ("heads", "kv", "embed"), axis=(-2, -1), name="out", **kw)
        mlp = Mlp(int(width * self.mlp_ratio), name="mlp", **kw)
        norm_mlp = layer_norm("norm_mlp", **kw)
        # Max-pool over valid captions; an example without any caption passes q through.
        any_caption = caption_valid.any(1)[:, None, None]
        if self.pool == "attention":
            pooled = jnp.where(caption_valid[:, :, None, None, None], att, -jnp.inf).max(axis=1)
            # Zeros, not -inf, into the projection: its kernel gradient would be -inf * 0.
            pooled = jnp.where(any_caption[..., None], pooled, 0).astype(att.dtype)
            out = jnp.where(any_caption, q + out_proj(constrain_tokens(pooled, HEADS)), q)
        else:
            qc = q[:, None] + out_proj(att)                                    # (B,N,T,W)
            if self.mlp == "per_caption":
                qc = constrain_tokens(qc + mlp(norm_mlp(constrain_tokens(qc))))
            pooled = jnp.where(caption_valid[:, :, None, None], qc, -jnp.inf).max(axis=1)
            out = jnp.where(any_caption, pooled, q)
        if self.mlp == "after_pool":  # on finite values only (-inf would poison the gradients)
            out = constrain_tokens(out)
            out = jnp.where(any_caption, out + mlp(norm_mlp(out)), q)
        out = out.astype(q.dtype)

        if self.mode == "caption":
            return out, None
        return out, penalty_map(self.penalty, qp, kp, text_mask)


def attend_captions(q, k, v, text_mask):
    """Every query against every caption's words, normalised per caption: q (B,T,H,D),
    k/v (B,N,S,H,D), text_mask bool (B,N,S) -> (B,N,T,H,D) in q's dtype.

    The same as `attend` once per caption with the queries copied N times, as one product over
    all N*S words (no copy of the queries, and their gradient needs no sum over copies).
    Softmax in float32; a caption without valid words gets uniform weights (never NaN).
    """
    logits = jnp.einsum("bthd,bnshd->bnhts", q, k).astype(jnp.float32) * q.shape[-1] ** -0.5
    logits = jnp.where(text_mask[:, :, None, None, :], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnhts,bnshd->bnthd", weights, v)


class Predictor(nn.Module):
    enc_width: int
    width: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    conditioning: str = "all"  # "all" | "first" | "caption" | "none"
    cond_mlp_ratio: float = 1.0
    cond_mlp: str = "per_caption"      # COND_MLP: the conditioner's MLP per caption or pooled
    cond_attention: str = "shared"     # COND_ATTENTION: how the per-caption softmax is computed
    cond_pool: str = "outputs"         # COND_POOL: what the max over captions pools
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = "none"  # layers.REMAT_POLICIES
    scan: bool = False   # nn.scan over the layers (see _scanned_layers)
    attention: str = "auto"  # config.model.attention: the blocks' self-attention (attention.py)
    penalty: str = "cosine"  # loss.penalty: the map the penalties act on (penalties.py)

    @nn.compact
    def __call__(self, ctx, ctx_idx, ctx_valid, tgt_idx, tgt_valid, text, text_mask,
                 caption_valid, grid: tuple):
        """ctx (B,Nc,enc_width); ctx_idx/ctx_valid (B,Nc); tgt_idx/tgt_valid (B,K,Nt);
        text (B,N,S,Dt); text_mask (B,N,S); caption_valid (B,N); grid (h, w) patches.
        Returns pred (B,K,Nt,enc_width) float32 and the aux dict of `text_penalties`."""
        if self.conditioning not in CONDITIONING:
            raise ValueError(f"conditioning={self.conditioning!r}; expected one of "
                             f"{CONDITIONING}.")
        b, k, nt = tgt_idx.shape
        nc = ctx.shape[1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        pos = jnp.asarray(sincos_2d(grid[0], grid[1], self.width), self.dtype)

        # The encoder-width side is left unnamed: one kernel cannot use "embed" twice.
        x = dense(self.width, (None, "embed"), name="embed", **kw)(ctx) + pos[ctx_idx]
        mask_token = self.param("mask_token", nn.with_logical_partitioning(
            trunc_normal, ("embed",)), (self.width,), self.param_dtype)
        m = jnp.asarray(mask_token, self.dtype) + pos[tgt_idx]                # (B,K,Nt,W)

        # Fold the K target blocks into the batch: B*K independent sequences.
        x = jnp.repeat(x, k, axis=0)
        x = jnp.concatenate([x, m.reshape(b * k, nt, self.width)], axis=1)
        valid = jnp.concatenate([jnp.repeat(ctx_valid.astype(bool), k, axis=0),
                                 tgt_valid.astype(bool).reshape(b * k, nt)], axis=1)

        if self.scan:
            x, os = self._scanned_layers(x, valid, text, text_mask, caption_valid, kw)
        else:
            x, os = self._layers(x, valid, text, text_mask, caption_valid, b, k, nc, nt, kw)

        x = layer_norm("norm", **kw)(x)
        x = dense(self.enc_width, ("embed", None), name="proj", **kw)(x[:, nc:])
        aux = text_penalties(os, valid.reshape(b, k * (nc + nt)), text_mask.astype(bool),
                             caption_valid.astype(bool), self.penalty)
        return x.reshape(b, k, nt, self.enc_width).astype(jnp.float32), aux

    def _layers(self, x, valid, text, text_mask, caption_valid, b, k, nc, nt, kw):
        """Unrolled: modules block_i and cond_i."""
        block = remat(Block, self.remat)
        cond = remat(TextConditioner, self.remat)
        os = []
        for i in range(self.depth):
            x = block(self.num_heads, self.mlp_ratio, name=f"block_{i}",
                      attention=self.attention, **kw)(x, valid)
            if self.conditioning == "none" or (self.conditioning == "first" and i > 0):
                continue
            # Cross-attention is per token, so the K sequences of an example can share one
            # copy of its text: regroup (B*K, T) tokens as (B, K*T) instead of repeating text.
            mode = "caption" if self.conditioning == "caption" else "words"
            xb, o = cond(self.num_heads, self.cond_mlp_ratio, mode, self.cond_mlp,
                         self.cond_attention, self.penalty, name=f"cond_{i}",
                         pool=self.cond_pool, **kw)(
                x.reshape(b, k * (nc + nt), self.width), text, text_mask, caption_valid)
            x = xb.reshape(b * k, nc + nt, self.width)
            if o is not None:
                os.append(o)
        return x, os

    def _scanned_layers(self, x, valid, text, text_mask, caption_valid, kw):
        """nn.scan over PredictorLayer ("layers", stacked); with conditioning "first", layer 0
        (the conditioned one) is a module of its own, "layer_0", before the scanned rest."""
        mode = {"all": "words", "first": "words", "caption": "caption", "none": None}
        layer_kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                        cond_mode=mode[self.conditioning], cond_mlp_ratio=self.cond_mlp_ratio,
                        cond_mlp=self.cond_mlp, cond_attention=self.cond_attention,
                        cond_pool=self.cond_pool, penalty=self.penalty,
                        attention=self.attention, **kw)
        args = (valid, text, text_mask, caption_valid)
        os, depth = [], self.depth
        if self.conditioning == "first":
            x, o = remat(PredictorLayer, self.remat)(name="layer_0", **layer_kw)(x, *args)
            os, depth, layer_kw = [o], depth - 1, dict(layer_kw, cond_mode=None)
        if depth:
            x, o = apply_layers(PredictorLayer, depth, x, *args, name="layer", scan=True,
                                remat_policy=self.remat, **layer_kw)
            if o is not None:
                os.extend(o[i] for i in range(depth))
        return x, os


class PredictorLayer(nn.Module):
    """One predictor layer for nn.scan: a Block, then the text conditioner (cond_mode "words"
    or "caption"; None: no conditioner). Returns (x, O or None)."""
    num_heads: int
    mlp_ratio: float
    cond_mode: Any
    cond_mlp_ratio: float
    cond_mlp: str = "per_caption"
    cond_attention: str = "shared"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"
    penalty: str = "cosine"
    cond_pool: str = "outputs"

    @nn.compact
    def __call__(self, x, valid, text, text_mask, caption_valid):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Block(self.num_heads, self.mlp_ratio, name="block", attention=self.attention,
                  **kw)(x, valid)
        if self.cond_mode is None:
            return x, None
        bk, t, width = x.shape
        b = text.shape[0]
        xb, o = TextConditioner(self.num_heads, self.cond_mlp_ratio, self.cond_mode,
                                self.cond_mlp, self.cond_attention, self.penalty, name="cond",
                                pool=self.cond_pool, **kw)(
            x.reshape(b, (bk // b) * t, width), text, text_mask, caption_valid)
        return xb.reshape(bk, t, width), o
