"""Vision Transformer encoder of I-JEPA: no [cls] token, fixed 2-D sin-cos position embedding,
pre-LN blocks (qkv bias, LN eps 1e-6, MLP ratio 4), final LayerNorm.

The context encoder sees only the kept patches (`keep_idx`); the position embedding is added
before dropping patches, so every kept token knows where it came from.
"""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from tcjepa_jax.models.layers import (Mlp, SelfAttention, apply_layers, constrain_tokens, dense,
                                     layer_norm)

Dtype = Any

# width, depth, heads. "mu" is a micro model for CPU runs; "Ti" is an alias of "T".
VIT_SIZES = {
    "mu": (96, 4, 3),
    "Ti": (192, 12, 3),
    "T": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
    "G": (1408, 40, 16),
}
_MLP_RATIO = {"G": 48 / 11}  # ViT-G/14 (6144 hidden); everything else 4.


def vit_config(variant: str) -> dict:
    """"B/16" -> dict(width=768, depth=12, num_heads=12, mlp_ratio=4.0, patch_size=16)."""
    name, _, patch = variant.partition("/")
    if name not in VIT_SIZES or not patch.isdigit() or int(patch) <= 0:
        raise ValueError(f"Unknown ViT variant {variant!r}: expected '<size>/<patch>' with size "
                         f"in {sorted(VIT_SIZES)} and a positive integer patch, e.g. 'B/16'.")
    width, depth, heads = VIT_SIZES[name]
    return dict(width=width, depth=depth, num_heads=heads,
                mlp_ratio=_MLP_RATIO.get(name, 4.0), patch_size=int(patch))


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(grid_h: int, grid_w: int, dim: int) -> np.ndarray:
    """(grid_h*grid_w, dim) float32 fixed position embedding, row-major over the grid.

    MAE / I-JEPA formula: half the channels encode the row (h), half the column (w), each as
    [sin, cos] at geometrically spaced frequencies.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}.")
    gh, gw = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    # I-JEPA builds meshgrid(w, h) and uses grid[0] (= w) first; keep that channel order.
    emb = np.concatenate([_sincos_1d(dim // 2, gw), _sincos_1d(dim // 2, gh)], axis=1)
    return emb.astype(np.float32)


class Block(nn.Module):
    """Pre-LN transformer block; `valid` (B,N) bool masks padded tokens out as keys."""
    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # config.model.attention (models/attention.py)

    @nn.compact
    def __call__(self, x, valid=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = constrain_tokens(x)
        y = layer_norm("norm1", **kw)(x)
        x = x + SelfAttention(self.num_heads, name="attn", attention=self.attention,
                              **kw)(y, valid)
        y = layer_norm("norm2", **kw)(x)
        return constrain_tokens(x + Mlp(int(x.shape[-1] * self.mlp_ratio), name="mlp", **kw)(y))


def patchify(images, patch_size: int):
    """(B,H,W,C) -> (B, (H/p)*(W/p), p*p*C), flattened in (row, col, channel) order so the
    Dense kernel reshapes to a Conv kernel (p,p,C,D) for export."""
    b, h, w, c = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {p}.")
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class VisionTransformer(nn.Module):
    width: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: Any = "none"  # layers.REMAT_POLICIES: recompute blocks in the backward pass
    scan: bool = False   # nn.scan over the blocks (parameters "blocks", stacked)
    attention: str = "auto"  # config.model.attention: the self-attention's implementation

    @nn.compact
    def __call__(self, images, keep_idx=None, keep_valid=None):
        """images (B,H,W,3) float; keep_idx (B,Nk) int patch indices (row-major) to keep;
        keep_valid (B,Nk) bool, False for padded slots. Returns float32 (B, Nk or N, width)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        gh, gw = images.shape[1] // self.patch_size, images.shape[2] // self.patch_size
        x = dense(self.width, ("patch", "embed"), name="patch_embed", **kw)(
            patchify(images, self.patch_size))
        x = x + jnp.asarray(sincos_2d(gh, gw, self.width), self.dtype)[None]
        if keep_idx is not None:
            x = jnp.take_along_axis(x, keep_idx[..., None], axis=1)
        x, _ = apply_layers(Block, self.depth, x, keep_valid, name="block", scan=self.scan,
                            remat_policy=self.remat, num_heads=self.num_heads,
                            mlp_ratio=self.mlp_ratio, attention=self.attention, **kw)
        # Final LN in float32: its output feeds the predictor and the loss targets.
        return layer_norm("norm", jnp.float32, self.param_dtype)(x)
