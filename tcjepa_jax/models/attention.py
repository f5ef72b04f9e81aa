"""The attention core, softmax(q k^T * scale + bias, masked) v, in four implementations.

`config.model.attention` picks one for the self-attention of the ViT and the predictor
(models/vit.py Block); the text encoder and the conditioner's cross-attention keep "einsum".

    einsum  two einsums and a float32 softmax in jnp (on CPU XLA no slower than xla)
    xla     jax.nn.dot_product_attention(implementation="xla"): the same math, written by JAX
    cudnn   jax.nn.dot_product_attention(implementation="cudnn"): cuDNN's fused flash attention
    splash  the Pallas TPU splash-attention kernel (jax.experimental.pallas.ops.tpu), in a
            shard_map over the batch and head axes when a mesh pins the activations
    auto    einsum on CPU; cudnn on GPU; splash on TPU when no padding to its 128 blocks is
            needed; xla wherever the chosen kernel does not apply

A kernel "applies" when it supports the call (`kernel_applies`); "cudnn" and "splash" name the
kernel to use where it applies, and fall back to xla elsewhere (another platform, a bias, a
per-query mask, an unsupported dtype or shape), so one config serves every shape of the model
and the host-CPU FLOP counts of tcjepa_jax/flops.py. The platform is the one of the mesh that
pins the activations (so an AOT compile for a TPU topology on a CPU host picks splash), else
that of jax.devices().

Padded keys: every implementation masks them. A query without a single valid key gets uniform
weights over all keys (the einsum form's finfo.min mask does that, and xla's large negative
number too); cudnn and splash reproduce it explicitly, as their masked softmax is not defined
there. The models never produce such a row (masks keep >= min_keep context patches).
"""
import functools

import jax
import jax.numpy as jnp

from tcjepa_jax import sharding as shard_lib

ATTENTION_IMPLS = ("auto", "einsum", "xla", "cudnn", "splash")
# Splash tiles sequences in blocks of the TPU's 128 lanes (a multiple of 128 with segment ids).
SPLASH_LANES = 128
SPLASH_MAX_BLOCK = 512


def _activation_context():
    # (mesh, rules) of sharding.activation_sharding while a step is traced under it, else None.
    return shard_lib._ACTIVATIONS.get()  # pylint: disable=W0212


def current_platform() -> str:
    context = _activation_context()
    if context is not None:
        return context[0].devices.flat[0].platform
    return jax.devices()[0].platform


def kernel_applies(kernel: str, platform: str, *, q_len: int, kv_len: int, head_dim: int,
                   dtype, mask_ndim: int = 2, has_bias: bool = False) -> bool:
    """Whether `kernel` ("cudnn" or "splash") supports one call; mask_ndim 0 = no mask."""
    if has_bias or mask_ndim not in (0, 2):
        return False
    if kernel == "cudnn":
        # jax's cuDNN path: fp16/bf16, head dim a multiple of 8 up to 128 (256 from Hopper on:
        # not assumed), and even lengths when a mask (a bias to cuDNN) is trained through.
        even = mask_ndim == 0 or (q_len % 2 == 0 and kv_len % 2 == 0)
        return (platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                and head_dim % 8 == 0 and head_dim <= 128 and even)
    if kernel == "splash":
        return platform == "tpu" and head_dim % 8 == 0
    raise ValueError(f"unknown attention kernel {kernel!r}")


def resolve(requested: str, platform: str, *, q_len: int, kv_len: int, head_dim: int, dtype,
            mask_ndim: int = 2, has_bias: bool = False, sharded: bool = True) -> str:
    """The implementation one call runs: "einsum", "xla", "cudnn" or "splash".

    `sharded`: splash can be wrapped in a shard_map (a mesh pins the activations) or runs on a
    single device; "auto" does not pick it otherwise (XLA could only replicate the kernel).
    """
    if requested not in ATTENTION_IMPLS:
        raise ValueError(f"model.attention={requested!r}; choose one of {ATTENTION_IMPLS}.")
    if requested in ("einsum", "xla"):
        return requested
    if requested == "auto" and platform == "cpu":
        return "einsum"
    kernel = requested if requested != "auto" else {"gpu": "cudnn", "tpu": "splash"}.get(platform)
    shape = dict(q_len=q_len, kv_len=kv_len, head_dim=head_dim, dtype=dtype,
                 mask_ndim=mask_ndim, has_bias=has_bias)
    if kernel is None or not kernel_applies(kernel, platform, **shape):
        return "xla"
    if kernel == "splash" and requested == "auto" and not (
            sharded and q_len % SPLASH_LANES == 0 and kv_len % SPLASH_LANES == 0):
        return "xla"  # padding to 128 would cost more than the kernel saves (not measured)
    return kernel


def attend(q, k, v, key_valid=None, bias=None, scale=None, implementation: str = "einsum"):
    """Multi-head attention core. q (B,T,H,D), k/v (B,S,H,D), key_valid bool (B,S) (or (B,T,S):
    per query), bias broadcastable to (B,H,T,S). Returns (B,T,H,D) in q's dtype. `scale`
    defaults to 1/sqrt(D); softmax in float32. `implementation`: one of ATTENTION_IMPLS."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    impl = implementation
    if impl not in ("einsum", "xla"):
        impl = resolve(impl, current_platform(), q_len=q.shape[1], kv_len=k.shape[1],
                       head_dim=q.shape[-1], dtype=q.dtype,
                       mask_ndim=0 if key_valid is None else key_valid.ndim,
                       has_bias=bias is not None,
                       sharded=_activation_context() is not None or jax.device_count() == 1)
    if impl == "einsum":
        return einsum_attention(q, k, v, key_valid, bias, scale)
    if impl == "xla":
        return xla_attention(q, k, v, key_valid, bias, scale)
    if impl == "cudnn":
        return cudnn_attention(q, k, v, key_valid, scale)
    return splash_attention(q, k, v, key_valid, scale)


# ---- Implementations -------------------------------------------------------------------------

def einsum_attention(q, k, v, key_valid=None, bias=None, scale=1.0):
    # No slower on CPU XLA than jax.nn.dot_product_attention (equal on the default step,
    # ViT-T/16 fwd+bwd at 224 px 522 vs 548 ms CPU time; docs/performance.md).
    logits = jnp.einsum("bthd,bshd->bhts", q, k).astype(jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if key_valid is not None:
        # finfo.min rather than -inf: a row with no valid key becomes uniform, never NaN.
        logits = jnp.where(_logits_mask(key_valid), logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", weights, v)


def _logits_mask(key_valid):
    """(B,S) or (B,T,S) -> broadcastable to (B,H,T,S)."""
    return key_valid[:, None, None, :] if key_valid.ndim == 2 else key_valid[:, None]


def xla_attention(q, k, v, key_valid=None, bias=None, scale=1.0):
    mask = None if key_valid is None else _logits_mask(key_valid.astype(bool))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale,
                                        implementation="xla")


def _guard_empty_rows(key_valid):
    """Examples without a valid key attend to all keys (a defined softmax for the kernels),
    and are then given the uniform average of the values, as the einsum form does."""
    any_valid = key_valid.any(-1)                                     # (B,)
    return any_valid, key_valid | ~any_valid[:, None]


def _uniform_where_empty(out, v, any_valid):
    mean = v.astype(jnp.float32).mean(1, keepdims=True).astype(out.dtype)   # (B,1,H,D)
    return jnp.where(any_valid[:, None, None, None], out, mean)


def cudnn_attention(q, k, v, key_valid=None, scale=1.0):
    if key_valid is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    any_valid, kv_valid = _guard_empty_rows(key_valid.astype(bool))
    b, t, s = q.shape[0], q.shape[1], k.shape[1]
    # jax hands a boolean mask to cuDNN as a bias of shape (B, 1, T, S): it needs T and S.
    mask = jnp.broadcast_to(kv_valid[:, None, None, :], (b, 1, t, s))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
    return _uniform_where_empty(out, v, any_valid)


# ---- Splash (TPU) ----------------------------------------------------------------------------

def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _splash_block(length: int) -> int:
    """The largest block of 512, 256 or 128 that tiles `length` (a multiple of 128)."""
    return next(b for b in (SPLASH_MAX_BLOCK, 256, SPLASH_LANES) if length % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
    bq, bkv = _splash_block(q_len), _splash_block(kv_len)
    blocks = kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                                   block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                                   block_q_dq=bq, block_kv_dq=bkv)
    # No static structure (every query may see every key): padding is masked by segment ids.
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask((q_len, kv_len))] * heads)
    return kernel_lib.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
                                      interpret=interpret)


def splash_attention(q, k, v, key_valid=None, scale=1.0, interpret: bool = False):
    """Splash attention on (B,T,H,D) inputs: lengths padded to multiples of 128, padded and
    invalid keys masked by segment ids (a query sees the keys of its own id: queries 1, valid
    keys 1, the rest 0). Under sharding.activation_sharding it runs in a shard_map over the
    act_batch and act_heads mesh axes (the kernel is one device's program; XLA cannot
    partition it). `interpret` runs the kernel in the Pallas interpreter (tests on CPU)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel
    b, t, h, _ = q.shape
    s = k.shape[1]
    tp, sp = _round_up(t, SPLASH_LANES), _round_up(s, SPLASH_LANES)
    key_valid = jnp.ones((b, s), bool) if key_valid is None else key_valid.astype(bool)
    any_valid, kv_valid = _guard_empty_rows(key_valid)

    def to_heads_major(x, length):  # (B,L,H,D) -> (B,H,Lp,D), zero padded
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    # Splash applies no scale of its own; scale in float32, then back to the compute dtype.
    qh = to_heads_major((q.astype(jnp.float32) * scale).astype(q.dtype), tp)
    kh, vh = to_heads_major(k, sp), to_heads_major(v, sp)
    q_ids = jnp.ones((b, tp), jnp.int32)
    kv_ids = jnp.pad(kv_valid, ((0, 0), (0, sp - s))).astype(jnp.int32)

    def run(qh, kh, vh, q_ids, kv_ids):
        kernel = _splash_kernel(qh.shape[1], tp, sp, interpret)
        ids = splash_attention_kernel.SegmentIds(q=q_ids, kv=kv_ids)
        return jax.vmap(kernel)(qh, kh, vh, segment_ids=ids)

    context = _activation_context()
    if context is not None:
        mesh, rules = context
        # The layout constrain() gives these names: batch and heads split, lengths whole.
        names = ("act_batch", "act_heads", None, None)
        spec = shard_lib._mesh_spec(names, qh.shape, mesh, rules)  # pylint: disable=W0212
        ids_spec = jax.sharding.PartitionSpec(spec[0], None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, ids_spec, ids_spec),
                            out_specs=spec, check_vma=False)
    out = run(qh, kh, vh, q_ids, kv_ids).transpose(0, 2, 1, 3)[:, :t]
    return _uniform_where_empty(out, v, any_valid)


def attention_platform_summary(requested: str, platform: str) -> str:
    """One line for logs: what `requested` means on `platform`."""
    if requested in ("einsum", "xla"):
        return requested
    if requested == "auto" and platform == "cpu":
        return "einsum"
    kernel = requested if requested != "auto" else {"gpu": "cudnn", "tpu": "splash"}.get(platform)
    return f"{kernel} where it applies, else xla" if kernel else "xla"

