"""Building blocks shared by the ViT, the predictor and the text conditioner.

Every parameter carries logical axis names (see `nn.with_logical_partitioning`) so a config can
map them to mesh axes. Compute runs in `dtype`; LayerNorm statistics and softmax run in float32.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcjepa_jax.models.attention import attend  # noqa: F401  (the core; models import it here)
from tcjepa_jax.sharding import constrain

Dtype = Any

# I-JEPA initialisation: truncated normal(0.02) for every weight matrix, zeros for biases.
trunc_normal = nn.initializers.truncated_normal(stddev=0.02)
zeros = nn.initializers.zeros
ones = nn.initializers.ones


def dense(features, kernel_names: Sequence[Optional[str]], *, axis=-1, use_bias=True,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          kernel_init=trunc_normal, name=None) -> nn.DenseGeneral:
    """A DenseGeneral whose kernel (and bias) carry logical axis names.

    `kernel_names` names every kernel axis (input axes first); the bias gets the output names.
    """
    out_ndim = 1 if isinstance(features, int) else len(features)
    return nn.DenseGeneral(
        features, axis=axis, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(kernel_init, tuple(kernel_names)),
        bias_init=nn.with_logical_partitioning(zeros, tuple(kernel_names[-out_ndim:])),
        name=name)


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype, axis_name="embed") -> nn.LayerNorm:
    # flax's LayerNorm reduces in float32 even for bf16 inputs, and is measurably faster on
    # CPU XLA than a hand-written one; eps 1e-6 as in I-JEPA / big_vision.
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(ones, (axis_name,)),
                        bias_init=nn.with_logical_partitioning(zeros, (axis_name,)))


def constrain_tokens(x, feature_axes=("act_embed",)):
    """Pins an activation (batch, positions..., features...) to the mesh by the logical names
    act_batch / act_len / feature_axes (a no-op outside sharding.activation_sharding)."""
    positions = x.ndim - 1 - len(feature_axes)  # e.g. captions and words: only one is act_len
    lead = ("act_batch",) + ("act_len",) * min(positions, 1) + (None,) * max(positions - 1, 0)
    return constrain(x, lead + tuple(feature_axes))


HEADS = ("act_heads", "act_kv")


# config.model.remat: what a block keeps for the backward pass; the rest is recomputed.
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")


def remat(module_cls, policy):
    """`module_cls`, or it wrapped in nn.remat with the named jax.checkpoint_policies policy.

    "full" saves nothing (recomputes the whole block); "dots_saveable" keeps every matmul
    output; "dots_with_no_batch_dims_saveable" keeps the weight matmuls' outputs but not the
    attention scores. True / False mean "full" / "none" (older configs)."""
    if policy is True:
        policy = "full"
    if policy in (False, None, "none"):
        return module_cls
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat={policy!r}; choose one of {REMAT_POLICIES}.")
    if policy == "full":
        return nn.remat(module_cls)
    return nn.remat(module_cls, policy=getattr(jax.checkpoint_policies, policy))


class _ScanStep(nn.Module):
    """Adapts a layer (x, *args) -> x to nn.scan's (carry, *args) -> (carry, output)."""
    layer_cls: Any
    layer_kwargs: dict

    @nn.compact
    def __call__(self, x, *args):
        out = self.layer_cls(name="layer", **self.layer_kwargs)(x, *args)
        return out if isinstance(out, tuple) else (out, None)


def apply_layers(layer_cls, depth: int, x, *args, name: str, scan: bool = False,
                 remat_policy="none", **layer_kwargs):
    """Applies `depth` layers of `layer_cls(**layer_kwargs)` to x, each taking (x, *args).

    Unscanned (the default), the layers are modules f"{name}_{i}"; with `scan`, one nn.scan
    module f"{name}s" whose parameters are stacked on a leading axis named "layers": one layer
    is traced and compiled instead of `depth` (compile time, program size). A layer may return
    (x, y); the ys are then returned stacked, (depth, ...), next to x.
    """
    if not scan:
        cls, ys = remat(layer_cls, remat_policy), []
        for i in range(depth):
            out = cls(name=f"{name}_{i}", **layer_kwargs)(x, *args)
            x, y = out if isinstance(out, tuple) else (out, None)
            ys.append(y)
        stacked = None if not ys or ys[0] is None else jax.tree.map(lambda *a: jnp.stack(a), *ys)
        return x, stacked
    step = nn.scan(remat(_ScanStep, remat_policy), variable_axes={"params": 0},
                   split_rngs={"params": True}, in_axes=nn.broadcast, length=depth,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    return step(layer_cls, layer_kwargs, name=f"{name}s")(x, *args)


class Mlp(nn.Module):
    """Two-layer GELU MLP (exact GELU, as PyTorch's nn.GELU in I-JEPA, for weight export)."""
    hidden: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
                  name="fc1")(x)
        x = nn.gelu(constrain_tokens(x, ("act_mlp",)), approximate=False)
        return dense(width, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                     name="fc2")(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with qkv bias; padded keys are masked via `valid` (B,N).
    `attention`: config.model.attention, the core's implementation (models/attention.py)."""
    num_heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, valid=None):
        width = x.shape[-1]
        head_dim = width // self.num_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (constrain_tokens(dense((self.num_heads, head_dim), ("embed", "heads", "kv"),
                                          name=n, **kw)(x), HEADS)
                   for n in ("query", "key", "value"))
        out = constrain_tokens(attend(q, k, v, key_valid=valid, implementation=self.attention),
                               HEADS)
        return dense(width, ("heads", "kv", "embed"), axis=(-2, -1), name="out", **kw)(out)
