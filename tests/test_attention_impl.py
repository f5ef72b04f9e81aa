"""model.attention (models/attention.py): every implementation computes the einsum form's
function, padded keys masked; "auto" picks the kernel by platform; the TPU kernel compiles for a
TPU topology; benchmarks/gpu_mfu.py runs end to end (on CPU, tiny).

A GPU cannot run here: for cuDNN only the selection is tested. Splash runs on CPU in the Pallas
interpreter, the same kernel code as on a TPU (and compiles for one through libtpu).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh

from configs import synthetic_tiny
from tcjepa_jax import sharding as shard_lib, step as step_lib
from tcjepa_jax.config_fields import check_fields
from tcjepa_jax.models import attention as attention_lib
from tcjepa_jax.models.predictor import Predictor
from tcjepa_jax.models.vit import VisionTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _close(a, b, tol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=tol, atol=tol)


def _qkv(b=3, t=20, s=20, h=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.float32) for _ in range(2))
    # Padding at the end, in the middle (the predictor's [context, targets] layout), and an
    # example without a single valid key (uniform weights over every key).
    valid = np.ones((b, s), bool)
    valid[0, 13:] = False
    valid[1, 5:9] = False
    valid[2] = False
    return q, k, v, jnp.asarray(valid)


# ---- Selection -------------------------------------------------------------------------------

def test_selection_by_platform_and_shape():
    def pick(requested, platform, q_len=196, kv_len=196, head_dim=64, dtype=jnp.bfloat16, **kw):
        return attention_lib.resolve(requested, platform, q_len=q_len, kv_len=kv_len,
                                     head_dim=head_dim, dtype=dtype, **kw)

    assert pick("auto", "cpu") == "einsum"
    assert pick("auto", "gpu") == "cudnn"
    assert pick("auto", "gpu", dtype=jnp.float32) == "xla"          # cuDNN: fp16 / bf16 only
    assert pick("auto", "gpu", head_dim=12) == "xla"                # head dim a multiple of 8
    assert pick("auto", "gpu", q_len=171, kv_len=171) == "xla"      # masked: even lengths
    assert pick("auto", "gpu", q_len=171, kv_len=171, mask_ndim=0) == "cudnn"
    assert pick("auto", "gpu", has_bias=True) == "xla"
    assert pick("auto", "gpu", mask_ndim=3) == "xla"                # per-query masks
    assert pick("auto", "tpu") == "xla"                             # 196 would need padding
    assert pick("auto", "tpu", q_len=256, kv_len=256) == "splash"
    assert pick("auto", "tpu", q_len=256, kv_len=256, sharded=False) == "xla"
    assert pick("splash", "tpu") == "splash"                        # pads to 256
    assert pick("splash", "tpu", has_bias=True) == "xla"
    for explicit in ("cudnn", "splash"):                            # elsewhere: xla
        assert pick(explicit, "cpu") == "xla"
    assert pick("cudnn", "tpu") == "xla" and pick("splash", "gpu") == "xla"
    assert pick("einsum", "tpu") == "einsum" and pick("xla", "cpu") == "xla"
    assert pick("auto", "rocm") == "xla"
    with pytest.raises(ValueError, match="model.attention"):
        pick("flash", "cpu")


def test_config_reaches_the_modules(monkeypatch):
    config = synthetic_tiny.get_config()
    assert config.model.attention == "auto"
    config.model.attention = "xla"
    models = step_lib.build_models(config, 64)
    assert models.encoder.attention == "xla" and models.predictor.attention == "xla"
    calls = []
    real = attention_lib.xla_attention
    monkeypatch.setattr(attention_lib, "xla_attention",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    jax.eval_shape(lambda: step_lib.init_params(models, config, jax.random.key(0)))
    assert len(calls) == 4 + config.model.predictor_depth  # encoder blocks + predictor blocks


def test_config_field_checks_and_older_configs():
    config = synthetic_tiny.get_config()
    for value in attention_lib.ATTENTION_IMPLS:
        config.model.attention = value
        check_fields(config)
    tree = config.to_dict()
    tree["model"]["attention"] = "flash"
    with pytest.raises(ValueError, match="model.attention"):
        check_fields(ml_collections.ConfigDict(tree))
    del tree["model"]["attention"]            # a config saved before the field existed
    models = step_lib.build_models(ml_collections.ConfigDict(tree), 64)
    assert models.encoder.attention == "auto" and models.predictor.attention == "auto"


# ---- Same function: xla against einsum, on the real modules ----------------------------------

def _both(module, args, static=()):
    """Outputs and gradients (parameters, first input) of `module` with attention "einsum" and
    "xla", from one initialisation and one compiled program (compiles dominate on a CPU)."""
    params = jax.jit(lambda rng: module.init(rng, *args, *static))(jax.random.key(0))

    def run(impl, p, x):
        def loss(p, x):
            out = module.clone(attention=impl).apply(p, x, *args[1:], *static)
            out, aux = out if isinstance(out, tuple) else (out, {})
            return jnp.sum(jnp.sin(out)) + aux.get("sparse", 0.0), out
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(p, x)

    return jax.jit(lambda p, x: (run("einsum", p, x), run("xla", p, x)))(params, args[0])


def test_xla_matches_einsum_in_the_encoder():
    rng = np.random.default_rng(1)
    images = jnp.asarray(rng.standard_normal((3, 32, 32, 3)), jnp.float32)   # 4x4 patches of 8
    keep_idx = jnp.asarray(np.stack([rng.permutation(16)[:10] for _ in range(3)]), jnp.int32)
    keep_valid = np.ones((3, 10), bool)
    keep_valid[0, 7:] = False
    keep_valid[2] = False                      # cannot come from the masks; kept as defined
    encoder = VisionTransformer(width=48, depth=2, num_heads=3, patch_size=8)
    einsum, xla = _both(encoder, (images, keep_idx, jnp.asarray(keep_valid)))
    _close(xla, einsum)


@pytest.mark.parametrize("scan", [False, True])
def test_xla_matches_einsum_in_the_predictor(scan):
    rng = np.random.default_rng(2)
    b, nc, k, nt, n, s = 2, 9, 2, 5, 2, 6
    ctx = jnp.asarray(rng.standard_normal((b, nc, 48)), jnp.float32)
    ctx_idx = jnp.asarray(rng.integers(0, 16, (b, nc)), jnp.int32)
    ctx_valid = jnp.asarray(np.arange(nc) < np.array([[6], [9]]))
    tgt_idx = jnp.asarray(rng.integers(0, 16, (b, k, nt)), jnp.int32)
    tgt_valid = jnp.asarray(np.arange(nt) < np.array([[[3], [5]], [[1], [4]]]))
    text = jnp.asarray(rng.standard_normal((b, n, s, 32)), jnp.float32)
    text_mask = jnp.asarray(np.arange(s) < np.array([[4, 6], [2, 0]])[..., None])
    caption_valid = jnp.asarray([[True, True], [True, False]])
    # Depth 1 with the conditioner: the block and the text path, unrolled or in nn.scan.
    predictor = Predictor(enc_width=48, width=24, depth=1, num_heads=3, scan=scan)
    args = (ctx, ctx_idx, ctx_valid, tgt_idx, tgt_valid, text, text_mask, caption_valid)
    einsum, xla = _both(predictor, args, static=((4, 4),))
    _close(xla, einsum)


# ---- The kernels' wrappers on CPU --------------------------------------------------------------

def test_xla_and_splash_match_einsum_with_padding():
    q, k, v, valid = _qkv()
    scale = 16 ** -0.5

    def with_grads(fn):
        def loss(q, k, v):
            out = fn(q, k, v)
            return jnp.sum(jnp.sin(out)), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    ref = with_grads(lambda q, k, v: attention_lib.einsum_attention(q, k, v, valid, None, scale))
    np.testing.assert_array_equal(attention_lib.attend(q, k, v, valid, implementation="auto"),
                                  attention_lib.einsum_attention(q, k, v, valid, None, scale))
    _close(with_grads(lambda q, k, v: attention_lib.xla_attention(q, k, v, valid, None, scale)),
           ref)
    splash = with_grads(lambda q, k, v: attention_lib.splash_attention(
        q, k, v, valid, scale, interpret=True))
    _close(splash, ref, tol=1e-4)
    # The fully padded example: the mean of its values, as the einsum form gives.
    np.testing.assert_allclose(splash[0][1][2], np.broadcast_to(v[2].mean(0), (20, 2, 16)),
                               rtol=1e-5, atol=1e-5)


def test_splash_in_a_shard_map_over_the_mesh():
    q, k, v, valid = _qkv(b=8, t=12, s=12, seed=3)
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 1, 2), shard_lib.MESH_AXES)
    rules = synthetic_tiny.get_config().sharding_rules           # batch over data, heads tensor
    ref = attention_lib.einsum_attention(q, k, v, valid, None, 0.25)

    @jax.jit
    def sharded(q, k, v, valid):
        with shard_lib.activation_sharding(mesh, rules):
            return attention_lib.splash_attention(q, k, v, valid, 0.25, interpret=True)

    out = sharded(q, k, v, valid)
    _close(out, ref, tol=1e-5)
    assert "shard_map" in str(jax.make_jaxpr(sharded)(q, k, v, valid))


# ---- TPU: the kernel in the compiled train step ---------------------------------------------

def _aot_worker(*variants):
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.fail('libtpu is not installed: pip install -e ".[test]"')
    done = subprocess.run([sys.executable, "tests/attention_aot_worker.py", *variants],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(variants):]]


def test_tpu_lowering_picks_splash():
    small, big, forced = _aot_worker("auto:64", "auto:128", "splash:64")
    assert small["lowered_kernels"] == 0          # 64 tokens: padding to 128 -> xla
    assert big["lowered_kernels"] > 0             # the target encoder's 256 tokens: splash
    assert forced["lowered_kernels"] > 0


@pytest.mark.slow  # about 25 s on an idle 2-core host, minutes on a loaded one
def test_tpu_train_step_compiles_with_splash():
    (splash,) = _aot_worker("splash:64:compile")
    # Every self-attention of the step is the kernel: encoder blocks in the target pass (fwd)
    # and the context pass (fwd, bwd: dq and dkv), the predictor block (fwd, dq, dkv).
    assert splash["compiled_kernels"] == 4 + 4 * 3 + 1 * 3, splash
    assert splash["flops"] > 0


# ---- benchmarks/gpu_mfu.py ----------------------------------------------------------------

@pytest.mark.slow  # about 30 s: a developer tool, kept out of CI time
def test_gpu_mfu_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "mfu.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + FAST_COMPILE).strip())
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_mfu.py", "--config=configs/synthetic_tiny.py",
         "--batch=2", "--steps=2", "--warmup=1", f"--json={out}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["batch_size"] == 2 and result["step_s"] > 0 and result["images_per_s"] > 0
    assert result["flops_per_step"] > 0 and result["mfu"] is None      # no peak for a CPU
    assert result["attention_here"] == "einsum"
    for line in ("step time", "images/s", "MFU"):
        assert line in done.stdout
