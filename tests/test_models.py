"""Model tests (CPU, float32 unless stated): shapes, masking invariances, and the predictor /
text penalties against independent numpy references."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcjepa_jax.models.predictor import Predictor, TextConditioner
from tcjepa_jax.models.text import T5_SIZES, T5Encoder, relative_position_bucket
from tcjepa_jax.models.vit import VisionTransformer, sincos_2d, vit_config

KEY = jax.random.PRNGKey(0)


def unboxed(variables):
    return nn.meta.unbox(variables)


# ----------------------------------------------------------------------------- ViT


def test_vit_config():
    assert vit_config("B/16") == dict(width=768, depth=12, num_heads=12, mlp_ratio=4.0,
                                      patch_size=16)
    assert vit_config("mu/8")["width"] == 96
    assert vit_config("G/14")["mlp_ratio"] == pytest.approx(48 / 11)
    for bad in ("X/16", "B", "B/x"):
        with pytest.raises(ValueError, match="Unknown ViT variant"):
            vit_config(bad)


def test_sincos_2d_matches_ijepa_formula():
    emb = sincos_2d(2, 3, 8)
    assert emb.shape == (6, 8) and emb.dtype == np.float32
    # Token (row 1, col 2): first half encodes the column, second half the row.
    omega = 1.0 / 10000 ** (np.arange(2) / 2.0)
    col, row = 2 * omega, 1 * omega
    np.testing.assert_allclose(emb[1 * 3 + 2], np.concatenate(
        [np.sin(col), np.cos(col), np.sin(row), np.cos(row)]), rtol=1e-6)


def test_vit_shapes_and_dtypes():
    cfg = vit_config("T/16")
    model = VisionTransformer(**cfg)
    images = jax.random.normal(KEY, (2, 64, 64, 3))
    variables = model.init(KEY, images)
    out = model.apply(variables, images)
    assert out.shape == (2, 16, 192) and out.dtype == jnp.float32
    params = unboxed(variables)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
    assert "pos_embed" not in str(jax.tree_util.tree_structure(params))
    assert variables["params"]["patch_embed"]["kernel"].names == ("patch", "embed")
    # bf16 compute with the same float32 params; the output stays float32.
    keep = jnp.array([[0, 3, 5], [15, 1, 1]])
    bf16 = VisionTransformer(**cfg, dtype=jnp.bfloat16)
    out16 = bf16.apply(variables, images, keep, jnp.array([[1, 1, 1], [1, 1, 0]], bool))
    assert out16.shape == (2, 3, 192) and out16.dtype == jnp.float32
    ref = np.asarray(out[0, jnp.array([0, 3, 5])]).ravel()
    assert np.corrcoef(np.asarray(out16[0]).ravel(), ref)[0, 1] > 0.98


def test_vit_keep_idx_gathers_after_pos_emb():
    # Depth 0: the output is LN(patch_embed + pos), so gathering first must equal gathering
    # the full output (the position embedding was added before dropping patches).
    model = VisionTransformer(width=32, depth=0, num_heads=2, patch_size=8)
    images = jax.random.normal(KEY, (2, 32, 32, 3))
    variables = model.init(KEY, images)
    keep = jnp.array([[5, 0, 9], [2, 2, 15]])
    full = model.apply(variables, images)
    np.testing.assert_allclose(model.apply(variables, images, keep),
                               jnp.take_along_axis(full, keep[..., None], 1), atol=1e-6)


def test_vit_padded_slots_do_not_change_valid_tokens():
    model = VisionTransformer(width=32, depth=2, num_heads=2, patch_size=8)
    images = jax.random.normal(KEY, (1, 32, 32, 3))
    variables = model.init(KEY, images)
    ref = model.apply(variables, images, jnp.array([[4, 7, 1]]))
    for pad in (0, 12):
        out = model.apply(variables, images, jnp.array([[4, 7, 1, pad]]),
                          jnp.array([[1, 1, 1, 0]], bool))
        np.testing.assert_allclose(out[:, :3], ref, atol=1e-5)
    # Without the mask the padded slot is attended to and changes the result.
    out = model.apply(variables, images, jnp.array([[4, 7, 1, 12]]))
    assert not np.allclose(out[:, :3], ref, atol=1e-5)


# ----------------------------------------------------------------------------- T5


def test_t5_relative_position_bucket_matches_hf_formula():
    # num_buckets=32 -> 16 per direction, max_exact=8, log buckets up to max_distance=128:
    # bucket = 16*(rp>0) + (|rp| if |rp|<8 else min(8 + int(log(|rp|/8)/log(16)*8), 15)).
    rp = jnp.array([0, 1, -1, 7, -8, 8, -20, -30, 100, -200])
    expected = [0, 17, 1, 23, 8, 24, 10, 11, 31, 15]
    assert relative_position_bucket(rp).tolist() == expected


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_t5_shapes_and_padding(dtype):
    model = T5Encoder(vocab_size=50, **T5_SIZES["tiny"], dtype=dtype)
    ids = jax.random.randint(KEY, (2, 3, 7), 1, 50)
    mask = jnp.arange(7)[None, None] < jnp.array([[7, 4, 1], [2, 5, 3]])[..., None]
    variables = model.init(KEY, ids, mask)
    out = model.apply(variables, ids, mask)
    assert out.shape == (2, 3, 7, 64) and out.dtype == jnp.float32
    assert variables["params"]["relative_attention_bias"].value.shape == (32, 2)
    assert set(variables["params"]["block_1"]["mlp"]) == {"wi_0", "wi_1", "wo"}
    # Padded ids do not change the valid outputs ...
    out2 = model.apply(variables, jnp.where(mask, ids, 0), mask)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(jnp.where(mask[..., None], out - out2, 0), 0, atol=tol)
    # ... and, since the bias is relative, equal running on the unpadded sequence.
    if dtype == jnp.float32:
        short = model.apply(variables, ids[0, 1, :4][None], jnp.ones((1, 4), bool))
        np.testing.assert_allclose(out[0, 1, :4], short[0], atol=1e-5)


# ----------------------------------------------------------------------------- predictor


def make_inputs(b=2, k=2, nc=5, nt=3, n=3, s=4, enc=16, dt=8, grid=(4, 4), seed=0):
    rng = np.random.default_rng(seed)
    g = grid[0] * grid[1]
    return dict(
        ctx=jnp.asarray(rng.normal(size=(b, nc, enc)), jnp.float32),
        ctx_idx=jnp.asarray(rng.integers(0, g, (b, nc))),
        ctx_valid=jnp.asarray(np.arange(nc)[None] < np.where(np.arange(b) == 0, nc,
                                                               nc - 2)[:, None]),
        tgt_idx=jnp.asarray(rng.integers(0, g, (b, k, nt))),
        tgt_valid=jnp.asarray(np.arange(nt) < np.maximum(1, nt - np.arange(b * k) % nt).reshape(
            b, k, 1)),
        text=jnp.asarray(rng.normal(size=(b, n, s, dt)), jnp.float32),
        text_mask=jnp.asarray(np.arange(s) < rng.integers(1, s + 1, (b, n, 1))),
        caption_valid=jnp.asarray(np.arange(n)[None] < np.where(np.arange(b) == 0, 2,
                                                                  1)[:, None]),
        grid=grid)


def small_predictor(conditioning, **kw):
    return Predictor(enc_width=16, width=24, depth=2, num_heads=2, conditioning=conditioning,
                     **kw)


def perturb_padding(x, seed=1):
    """Change everything the model must ignore: padded ctx/tgt slots, padded words, missing
    captions."""
    rng = np.random.default_rng(seed)
    x = dict(x)
    noise = lambda a: jnp.asarray(rng.normal(size=a.shape) * 5, a.dtype)
    x["ctx"] = jnp.where(x["ctx_valid"][..., None], x["ctx"], noise(x["ctx"]))
    x["ctx_idx"] = jnp.where(x["ctx_valid"], x["ctx_idx"], 15 - x["ctx_idx"])
    x["tgt_idx"] = jnp.where(x["tgt_valid"], x["tgt_idx"], 15 - x["tgt_idx"])
    word_ok = x["text_mask"] & x["caption_valid"][..., None]
    x["text"] = jnp.where(word_ok[..., None], x["text"], noise(x["text"]))
    return x


def ln(x, p):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


def ref_block(x, p, heads):
    """Plain numpy pre-LN block on valid tokens only (no masking needed)."""
    a = p["attn"]
    y = ln(x, p["norm1"])
    q, k, v = (np.einsum("tw,whd->thd", y, a[n]["kernel"]) + a[n]["bias"]
               for n in ("query", "key", "value"))
    logits = np.einsum("thd,shd->hts", q, k) / math.sqrt(q.shape[-1])
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w = w / w.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", w, v)
    x = x + np.einsum("thd,hdw->tw", o, a["out"]["kernel"]) + a["out"]["bias"]
    m = p["mlp"]
    h = np.asarray(jax.nn.gelu(ln(x, p["norm2"]) @ m["fc1"]["kernel"] + m["fc1"]["bias"],
                               approximate=False))
    return x + h @ m["fc2"]["kernel"] + m["fc2"]["bias"]


def test_predictor_none_equals_numpy_ijepa_reference():
    inp = make_inputs()
    model = small_predictor("none")
    variables = model.init(KEY, **inp)
    pred, aux = model.apply(variables, **perturb_padding(inp))
    p = jax.tree_util.tree_map(np.asarray, unboxed(variables)["params"])
    pos = sincos_2d(4, 4, 24)
    ctx, cidx, cval = (np.asarray(inp[n]) for n in ("ctx", "ctx_idx", "ctx_valid"))
    tidx, tval = np.asarray(inp["tgt_idx"]), np.asarray(inp["tgt_valid"])
    b, k, nt = tidx.shape
    for bi in range(b):
        z = ctx[bi][cval[bi]] @ p["embed"]["kernel"] + p["embed"]["bias"] + pos[cidx[bi][cval[bi]]]
        for ki in range(k):
            tgt = tidx[bi, ki][tval[bi, ki]]
            x = np.concatenate([z, p["mask_token"] + pos[tgt]])
            for i in range(2):
                x = ref_block(x, p[f"block_{i}"], heads=2)
            x = ln(x, p["norm"]) @ p["proj"]["kernel"] + p["proj"]["bias"]
            np.testing.assert_allclose(pred[bi, ki][tval[bi, ki]], x[len(z):], atol=2e-5)
    assert pred.shape == (2, 2, 3, 16) and pred.dtype == jnp.float32
    assert float(aux["sparse"]) == 0.0 and float(aux["consistency"]) == 0.0
    assert aux["o_mean"].shape == (0,)


def o_numpy(q, k, text_mask):
    """Rectified cosine between (B,T,H,D) queries and (B,N,S,H,D) keys -> (B,N,T,S)."""
    q = q.reshape(q.shape[0], q.shape[1], -1)
    k = k.reshape(*k.shape[:3], -1)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    k = k / np.linalg.norm(k, axis=-1, keepdims=True)
    o = np.maximum(np.einsum("btd,bnsd->bnts", q, k), 0)
    return o * text_mask[:, :, None, :]


def test_text_conditioner_masking_and_o():
    rng = np.random.default_rng(0)
    inp = make_inputs()
    q = jnp.asarray(rng.normal(size=(2, 6, 24)), jnp.float32)
    # Example 1 has no valid caption at all: it must pass q through unchanged.
    cap = jnp.array([[True, True, False], [False, False, False]])
    args = (inp["text"], inp["text_mask"], cap)
    model = TextConditioner(num_heads=2)
    variables = model.init(KEY, q, *args)
    (out, o), state = model.apply(variables, q, *args, mutable=["intermediates"])
    assert out.shape == q.shape and o.shape == (2, 3, 6, 4)
    np.testing.assert_array_equal(out[1], q[1])
    assert not np.allclose(out[0], q[0])
    qp, kp = state["intermediates"]["q_proj"][0], state["intermediates"]["k_proj"][0]
    np.testing.assert_allclose(o, o_numpy(np.asarray(qp), np.asarray(kp),
                                          np.asarray(inp["text_mask"])), atol=1e-6)
    # Padded words and missing captions do not matter.
    pert = perturb_padding(dict(inp, caption_valid=cap))
    out2, o2 = model.apply(variables, q, pert["text"], inp["text_mask"], cap)
    np.testing.assert_allclose(out2, out, atol=1e-6)
    np.testing.assert_allclose(o2[cap], o[cap], atol=1e-6)


def penalties_numpy(os, token_valid, text_mask, caption_valid):
    o = np.stack(os)  # (L,B,N,T,S)
    sparse, cons, pairs = 0.0, 0.0, 0
    for b in range(o.shape[1]):
        for n in range(o.shape[2]):
            for t in range(o.shape[3]):
                if not (caption_valid[b, n] and token_valid[b, t]):
                    continue
                ol = o[:, b, n, t]  # (L,S)
                pairs += 1
                sparse += ol.sum(-1).mean()
                cons += np.abs(ol - ol.mean(0)).sum(-1).mean()
    word = (caption_valid[:, :, None, None] & token_valid[:, None, :, None]
            & text_mask[:, :, None, :])
    return sparse / pairs, cons / pairs, [ol[word].mean() for ol in o], \
        [(ol[word] > 0).mean() for ol in o]


def test_predictor_penalties_equal_numpy():
    inp = make_inputs()
    model = small_predictor("all")
    variables = model.init(KEY, **inp)
    (pred, aux), state = model.apply(variables, **inp, mutable=["intermediates"])
    inter = state["intermediates"]
    tm = np.asarray(inp["text_mask"])
    os = [o_numpy(np.asarray(inter[f"cond_{i}"]["q_proj"][0]),
                  np.asarray(inter[f"cond_{i}"]["k_proj"][0]), tm) for i in range(2)]
    # Token validity of the (B, K*(Nc+Nt)) layout: per target block, ctx slots then tgt slots.
    cv, tv = np.asarray(inp["ctx_valid"]), np.asarray(inp["tgt_valid"])
    token_valid = np.stack([np.concatenate([np.concatenate([cv[b], tv[b, k]])
                                            for k in range(2)]) for b in range(2)])
    sparse, cons, o_mean, o_frac = penalties_numpy(os, token_valid, tm,
                                                   np.asarray(inp["caption_valid"]))
    assert cons > 0
    np.testing.assert_allclose(aux["sparse"], sparse, rtol=1e-5)
    np.testing.assert_allclose(aux["consistency"], cons, rtol=1e-5)
    np.testing.assert_allclose(aux["o_mean"], o_mean, rtol=1e-5)
    np.testing.assert_allclose(aux["o_frac_pos"], o_frac, rtol=1e-5)
    # Padding everywhere (slots, words, missing captions) changes neither outputs nor penalties.
    pred2, aux2 = model.apply(variables, **perturb_padding(inp))
    np.testing.assert_allclose(jnp.where(inp["tgt_valid"][..., None], pred - pred2, 0), 0,
                               atol=1e-5)
    for name in aux:
        np.testing.assert_allclose(aux2[name], aux[name], rtol=1e-5)


def test_predictor_first_and_caption_modes():
    inp = make_inputs()
    first = small_predictor("first")
    variables = first.init(KEY, **inp)
    assert "cond_0" in variables["params"] and "cond_1" not in variables["params"]
    _, aux = first.apply(variables, **inp)
    assert aux["o_mean"].shape == (1,) and aux["o_frac_pos"].shape == (1,)
    assert float(aux["sparse"]) > 0 and float(aux["consistency"]) == 0.0

    cap = small_predictor("caption")
    variables = cap.init(KEY, **inp)
    pred, aux = cap.apply(variables, **inp)
    assert float(aux["sparse"]) == 0.0 and float(aux["consistency"]) == 0.0
    pred2, _ = cap.apply(variables, **perturb_padding(inp))
    np.testing.assert_allclose(jnp.where(inp["tgt_valid"][..., None], pred - pred2, 0), 0,
                               atol=1e-5)
    with pytest.raises(ValueError, match="conditioning"):
        small_predictor("sometimes").init(KEY, **inp)


@pytest.mark.slow  # CI time; bf16 training is covered by test_train (slow) and the aot tests
def test_predictor_t_scale_bf16_dtypes():
    inp = make_inputs(b=2, k=2, nc=6, nt=3, n=2, s=4, enc=192, dt=64)
    model = Predictor(enc_width=192, width=192, depth=2, num_heads=3, dtype=jnp.bfloat16)
    variables = model.init(KEY, **inp)
    pred, aux = model.apply(variables, **inp)
    assert pred.shape == (2, 2, 3, 192) and pred.dtype == jnp.float32
    assert aux["sparse"].dtype == jnp.float32 and aux["o_mean"].shape == (2,)
    assert variables["params"]["mask_token"].names == ("embed",)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves((pred, aux)))


@pytest.mark.slow  # the B/16 smoke test (CI time); mu- and tiny-sized models cover the math
def test_b16_forward_backward_finite():
    cfg = vit_config("B/16")
    enc = VisionTransformer(**cfg)
    pred = Predictor(enc_width=768, width=384, depth=2, num_heads=12)
    images = jax.random.normal(KEY, (1, 48, 48, 3))  # 3x3 patch grid
    inp = make_inputs(b=1, k=2, nc=4, nt=2, n=2, s=3, enc=768, dt=64, grid=(3, 3))
    ve = enc.init(KEY, images, inp["ctx_idx"], inp["ctx_valid"])
    vp = pred.init(KEY, **dict(inp, ctx=jnp.zeros((1, 4, 768))))

    def loss(params):
        z = enc.apply(params[0], images, inp["ctx_idx"], inp["ctx_valid"])
        out, aux = pred.apply(params[1], **dict(inp, ctx=z))
        return jnp.mean(out ** 2) + 0.1 * aux["sparse"] + 0.5 * aux["consistency"]

    grads = jax.jit(jax.grad(loss))((ve, vp))
    leaves = jax.tree_util.tree_leaves(unboxed(grads))
    assert all(np.isfinite(g).all() for g in leaves)
    assert any(np.abs(g).max() > 0 for g in leaves)
