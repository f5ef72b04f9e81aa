"""The cost options of the text side (docs/method.md, section 9): each exact option gives the
default computation's loss and gradients (to float rounding), the inexact ones (cond_mlp
"after_pool", cond_pool "attention") run and change the loss, and the frozen text encoder costs
no backward work.

Tiny models on one CPU device, float32: about 100 s of CPU in all, most of it the six
compilations of the tiny train loss (default, broadcast, packed, after_pool, cond_pool
"attention" unrolled and scanned).
"""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from configs import synthetic_tiny
from tcjepa_jax import nonfinite as nonfinite_lib
from tcjepa_jax import optim, resume
from tcjepa_jax import step as step_lib
from tcjepa_jax.config_checks import check_combinations
from tcjepa_jax.config_fields import check_fields
from tcjepa_jax.models.predictor import TextConditioner, attend_captions
from tcjepa_jax.models.layers import attend
from tcjepa_jax.models.scan_params import scanned_from_unrolled
from tcjepa_jax.models.text import (T5_SIZES, T5Encoder, caption_lengths, pack_captions,
                                    unpack_features)

VOCAB = 64
N, S = 4, 8  # captions per image, tokens per caption


def tiny_config(**model):
    config = synthetic_tiny.get_config("smoke")
    config.batch_size = 3
    config.input.image_size = 32          # a 4x4 grid of 8 px patches
    config.input.num_captions = N
    config.input.max_caption_len = S
    config.masks.min_keep = 4
    config.masks.max_context = 0
    config.model.predictor_width = 24
    config.model.predictor_heads = 2
    config.monitor.enabled = False        # a smaller program to compile
    config.model.update(model)
    return config


def random_batch(models, config, seed=0, max_len=S // 2):
    """Random contents in the pipeline's shapes: captions of 1..max_len tokens (some invalid,
    example 2 without any valid caption), padded slots."""
    rng = np.random.default_rng(seed)
    batch = step_lib.dummy_batch(models, config, config.batch_size)
    b = config.batch_size
    g = models.grid[0] * models.grid[1]
    batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
    batch["text_ids"] = rng.integers(2, VOCAB, batch["text_ids"].shape).astype(np.int32)
    lengths = rng.integers(1, max_len + 1, (b, N, 1))
    batch["text_mask"] = np.arange(S) < lengths
    batch["text_ids"] = np.where(batch["text_mask"], batch["text_ids"], 0).astype(np.int32)
    batch["caption_valid"] = rng.random((b, N)) < 0.75
    batch["caption_valid"][0, 0] = True
    batch["caption_valid"][2] = False
    for key in ("context", "target"):
        idx = batch[f"{key}_idx"]
        batch[f"{key}_idx"] = rng.integers(0, g, idx.shape).astype(np.int32)
        slots = idx.shape[-1]
        batch[f"{key}_valid"] = np.arange(slots) < rng.integers(slots // 2, slots + 1,
                                                                 idx.shape[:-1] + (1,))
    return jax.tree.map(jnp.asarray, batch)


_COMPILED = {}


def loss_and_grads(config, params=None, batch=None):
    """(loss, metrics, grads, params, batch) of step.loss_fn; one compilation per config."""
    models = step_lib.build_models(config, VOCAB)
    params = _init(models, config) if params is None else params
    batch = random_batch(models, config) if batch is None else batch
    key = config.to_json()
    if key not in _COMPILED:
        _COMPILED[key] = jax.jit(jax.value_and_grad(
            lambda p, e, b: step_lib.loss_fn(p, e, b, models, config), has_aux=True))
    (loss, metrics), grads = _COMPILED[key](params, params["encoder"], batch)
    return loss, metrics, grads, params, batch


def _init(models, config):
    return jax.jit(lambda: nn.unbox(step_lib.init_params(models, config, jax.random.key(0))))()


def assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


# ---- The conditioner's attention: shared (default) against broadcast ------------------------

def test_attend_captions_equals_attend_per_caption():
    rng = np.random.default_rng(0)
    b, t, n, s, h, d = 2, 5, 3, 6, 2, 4
    q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, n, s, h, d)), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.arange(s) < rng.integers(0, s + 1, (b, n, 1)))  # some captions empty
    out = attend_captions(q, k, v, mask)
    for i in range(n):
        ref = attend(q, k[:, i], v[:, i], key_valid=mask[:, i])
        np.testing.assert_allclose(out[:, i], ref, rtol=1e-6, atol=1e-6)
    assert np.isfinite(out).all()


def test_shared_attention_equals_broadcast():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(3, 7, 24)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(3, N, S, 16)), jnp.float32)
    mask = jnp.asarray(np.arange(S) < rng.integers(0, S + 1, (3, N, 1)))
    cap = jnp.asarray(rng.random((3, N)) < 0.7).at[2].set(False)
    results = {}
    for attention in ("shared", "broadcast"):
        model = TextConditioner(2, attention=attention)
        params = jax.jit(model.init)(jax.random.key(0), q, text, mask, cap)

        def loss(p, q, model=model):
            out, o = model.apply(p, q, text, mask, cap)
            return (out ** 2).sum() + o.sum(), (out, o)

        results[attention] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
            params, q)
    assert_trees_close(results["shared"], results["broadcast"], rtol=1e-5, atol=1e-5)


# ---- Whole loss: exact options against the default ------------------------------------------

@pytest.fixture(scope="module")
def default_run():
    return loss_and_grads(tiny_config())


@pytest.mark.parametrize("option", [dict(cond_attention="broadcast"), dict(text_pack_rows=2)])
def test_exact_options_give_the_default_loss_and_gradients(default_run, option):
    loss, metrics, grads, params, batch = default_run
    # Captions of at most 4 tokens: two fit in one row of 8, so 2 rows hold the 4 captions.
    assert bool(pack_captions(batch["text_ids"], batch["text_mask"], 2,
                              batch["caption_valid"]).fits)
    loss2, metrics2, grads2, _, _ = loss_and_grads(tiny_config(**option), params, batch)
    np.testing.assert_allclose(loss2, loss, rtol=1e-5)
    assert_trees_close(metrics2, metrics, rtol=1e-4, atol=1e-6)
    assert_trees_close(grads2, grads, rtol=1e-4, atol=1e-6)


def test_packing_falls_back_to_padded_when_captions_do_not_fit(default_run):
    _, _, _, params, _ = default_run
    config = tiny_config()
    models = step_lib.build_models(config, VOCAB)
    batch = random_batch(models, config, seed=3, max_len=S)  # long captions: 2 rows are too few
    assert not bool(pack_captions(batch["text_ids"], batch["text_mask"], 2,
                                  batch["caption_valid"]).fits)
    loss, metrics, grads, _, _ = loss_and_grads(config, params, batch)
    loss2, metrics2, grads2, _, _ = loss_and_grads(tiny_config(text_pack_rows=2), params, batch)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    assert_trees_close(grads2, grads, rtol=1e-5, atol=1e-7)


def test_packed_t5_features_equal_padded_at_valid_words():
    rng = np.random.default_rng(2)
    b = 3
    ids = jnp.asarray(rng.integers(2, VOCAB, (b, N, S)), jnp.int32)
    lengths = rng.integers(0, S + 1, (b, N, 1))
    mask = np.arange(S) < lengths
    mask[0, 1, 1] = False                       # a hole inside a caption stays a hole
    mask, cap = jnp.asarray(mask), jnp.asarray(rng.random((b, N)) < 0.8)
    enc = T5Encoder(vocab_size=VOCAB, **T5_SIZES["tiny"])
    variables = jax.jit(enc.init)(jax.random.key(0), ids, mask)
    apply = jax.jit(enc.apply)
    padded = apply(variables, ids, mask)
    words = np.asarray(mask & cap[..., None] & (caption_lengths(mask, cap) > 0)[..., None])
    for rows in (N - 1, 2):
        packed = pack_captions(ids, mask, rows, cap)
        if not bool(packed.fits):
            continue
        assert int(packed.mask.sum()) == int(words.sum())
        out = unpack_features(apply(variables, packed.ids, packed.mask,
                                    segment_ids=packed.segment), packed, mask)
        np.testing.assert_allclose(np.asarray(out)[words], np.asarray(padded)[words],
                                   rtol=1e-5, atol=1e-5)
        assert not np.asarray(out)[~words].any()  # padding and invalid captions: zeros


def test_pack_captions_first_fit():
    mask = jnp.asarray(np.arange(S) < np.array([[5, 3, 2, 6]])[..., None])
    ids = jnp.where(mask, 7, 0)
    packed = pack_captions(ids, mask, 3)
    # First fit in caption order: 5 -> row 0, 3 -> row 0 (5 + 3 = 8), 2 -> row 1, 6 -> row 1.
    np.testing.assert_array_equal(packed.segment[0], [[1] * 5 + [2] * 3, [3] * 2 + [4] * 6,
                                                      [0] * 8])
    assert bool(packed.fits)
    assert not bool(pack_captions(ids, mask, 1).fits)
    # An invalid caption takes no room.
    packed = pack_captions(ids, mask, 2, jnp.asarray([[True, True, False, True]]))
    np.testing.assert_array_equal(packed.segment[0], [[1] * 5 + [2] * 3, [4] * 6 + [0] * 2])


# ---- The inexact option: the MLP after the max-pool -----------------------------------------

def scale_conditioners(params, factor=10.0):
    """The conditioners' kernels times `factor`: at init their cross-attention adds so little
    to each token that every caption's result is about the same, and with it the MLP before
    and after the max-pool."""
    def scale(path, x):
        names = [str(getattr(k, "key", "")) for k in path]
        return x * factor if "kernel" in names and any(n.startswith("cond_") for n in names) else x
    return jax.tree_util.tree_map_with_path(scale, params)


def test_after_pool_runs_and_changes_the_loss(default_run):
    _, _, grads, params, batch = default_run
    params = scale_conditioners(params)
    loss, _, _, _, _ = loss_and_grads(tiny_config(), params, batch)
    loss2, _, grads2, _, _ = loss_and_grads(tiny_config(cond_mlp="after_pool"), params, batch)
    # The same parameters (the same tree and shapes), another function of them.
    assert jax.tree.structure(grads2) == jax.tree.structure(grads)
    assert np.isfinite(loss2) and abs(float(loss2) - float(loss)) > 1e-3 * float(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads2))


def test_after_pool_passes_tokens_without_captions_through():
    rng = np.random.default_rng(4)
    q = jnp.asarray(rng.normal(size=(2, 5, 24)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(2, N, S, 16)), jnp.float32)
    mask = jnp.ones((2, N, S), bool)
    cap = jnp.asarray([[True, False, True, False], [False] * N])
    model = TextConditioner(2, mlp="after_pool")
    variables = jax.jit(model.init)(jax.random.key(0), q, text, mask, cap)
    out, _ = jax.jit(model.apply)(variables, q, text, mask, cap)
    np.testing.assert_array_equal(out[1], q[1])
    assert not np.allclose(out[0], q[0])


# ---- The inexact option: the max-pool over the captions' attention outputs -------------------

def pool_attention_reference(p, q, text, mask, cap):
    """cond_pool="attention" from its definition, in float64 numpy, one example at a time:
    per caption softmax attention, the max over valid captions per (token, head, channel), one
    out-projection, the MLP after the pool; q unchanged without a valid caption."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(p["params"]))
    q, text = np.asarray(q, np.float64), np.asarray(text, np.float64)
    mask, cap = np.asarray(mask), np.asarray(cap) & np.asarray(mask).any(-1)

    def ln(x, w):
        x = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
        return x * w["scale"] + w["bias"]

    def proj(x, w):  # width -> (heads, head_dim)
        return np.einsum("...i,ihd->...hd", x, w["kernel"]) + w["bias"]

    out = q.copy()
    for b in np.flatnonzero(cap.any(1)):
        qp = proj(ln(q[b], p["norm_q"]), p["q"])                                # (T,H,D)
        att = []
        for n in np.flatnonzero(cap[b]):
            kp, vp = proj(text[b, n, mask[b, n]], p["k"]), proj(text[b, n, mask[b, n]], p["v"])
            logits = np.einsum("thd,shd->hts", qp, kp) / np.sqrt(qp.shape[-1])
            w = np.exp(logits - logits.max(-1, keepdims=True))
            att.append(np.einsum("hts,shd->thd", w / w.sum(-1, keepdims=True), vp))
        x = q[b] + np.einsum("thd,hdw->tw", np.max(att, axis=0), p["out"]["kernel"])
        x = x + p["out"]["bias"]
        hidden = ln(x, p["norm_mlp"]) @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
        hidden = np.asarray(jax.nn.gelu(hidden, approximate=False))
        out[b] = x + hidden @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
    return out


@pytest.mark.parametrize("attention", ["shared", "broadcast"])
def test_pool_attention_matches_its_definition(attention):
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.normal(size=(3, 5, 24)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(3, N, S, 16)), jnp.float32)
    mask = jnp.asarray(np.arange(S) < rng.integers(1, S + 1, (3, N, 1))).at[0, 3].set(False)
    cap = jnp.asarray([[True, True, False, True], [False, True, True, True], [False] * N])
    model = TextConditioner(2, mlp="after_pool", attention=attention, pool="attention")
    variables = jax.jit(model.init)(jax.random.key(0), q, text, mask, cap)
    variables = jax.tree.map(lambda a: a * 10.0 if a.ndim > 1 else a, variables)  # not ~ q
    out, _ = jax.jit(model.apply)(variables, q, text, mask, cap)
    np.testing.assert_allclose(out, pool_attention_reference(variables, q, text, mask, cap),
                               rtol=2e-4, atol=2e-4)
    np.testing.assert_array_equal(out[2], q[2])  # no valid caption: q passes through
    with pytest.raises(ValueError, match="after_pool"):
        TextConditioner(2, pool="attention").init(jax.random.key(0), q, text, mask, cap)


def test_pool_attention_runs_unrolled_and_scanned_and_changes_the_loss(default_run):
    _, _, grads, params, batch = default_run
    params = scale_conditioners(params)
    after_pool = dict(cond_mlp="after_pool")
    loss, _, _, _, _ = loss_and_grads(tiny_config(**after_pool), params, batch)
    option = dict(after_pool, cond_pool="attention")
    loss2, metrics2, grads2, _, _ = loss_and_grads(tiny_config(**option), params, batch)
    assert jax.tree.structure(grads2) == jax.tree.structure(grads)  # the same parameters
    assert np.isfinite(loss2) and abs(float(loss2) - float(loss)) > 1e-3 * float(loss)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads2))
    # nn.scan over PredictorLayer: the same function of the same (stacked) parameters.
    loss3, metrics3, grads3, _, _ = loss_and_grads(
        tiny_config(scan_layers=True, **option), scanned_from_unrolled(params), batch)
    np.testing.assert_allclose(loss3, loss2, rtol=1e-5)
    assert_trees_close(metrics3, metrics2, rtol=1e-4, atol=1e-6)
    assert_trees_close(grads3, scanned_from_unrolled(grads2), rtol=1e-4, atol=1e-6)


def test_pool_attention_needs_the_mlp_after_the_pool():
    config = tiny_config(cond_pool="attention")
    with pytest.raises(ValueError, match="model.cond_mlp='after_pool'"):
        check_combinations(config)
    config.model.cond_mlp = "after_pool"
    check_combinations(config)
    config.model.update(cond_mlp="per_caption", conditioning="none")  # I-JEPA: no conditioner
    check_combinations(config)


# ---- The frozen text encoder: no backward work ------------------------------------------------

def _step_flops(config):
    models = step_lib.build_models(config, VOCAB)
    tx = optim.make_optimizer(config)
    train_step = step_lib.make_train_step(models, config, tx)
    state = jax.eval_shape(lambda: step_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=_init(models, config),
        ema_params=_init(models, config)["encoder"], opt_state=tx.init(_init(models, config)),
        nonfinite=nonfinite_lib.nonfinite_counters()))
    batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                         step_lib.dummy_batch(models, config, config.batch_size))
    return jax.jit(train_step).lower(state, batch).cost_analysis()["flops"]


def test_frozen_text_encoder_has_no_backward_work(default_run):
    config = tiny_config(text="small")  # a text encoder large enough to dominate the difference
    models = step_lib.build_models(config, VOCAB)
    batch = step_lib.dummy_batch(models, config, config.batch_size)
    params = jax.eval_shape(lambda: _init(models, config))
    t5_forward = jax.jit(lambda p, i, m: models.text.apply({"params": p}, i, m)).lower(
        params["text"], batch["text_ids"], batch["text_mask"]).cost_analysis()["flops"]
    frozen = _step_flops(config)
    trainable = _step_flops(tiny_config(text="small", text_trainable=True))
    # The backward of a dense network costs about twice its forward; frozen, there is none.
    assert 1.6 * t5_forward < trainable - frozen < 2.4 * t5_forward
    _, _, grads, _, _ = default_run
    assert not any(np.asarray(g).any() for g in jax.tree.leaves(grads["text"]))


# ---- Config validation ---------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [("cond_mlp", "after_pool"), ("cond_mlp", "per_caption"),
                                         ("cond_attention", "broadcast"),
                                         ("cond_pool", "outputs"), ("cond_pool", "attention"),
                                         ("text_pack_rows", 0), ("text_pack_rows", 3)])
def test_new_fields_accept(field, value):
    config = tiny_config()
    config.model[field] = value
    check_fields(config)


@pytest.mark.parametrize("field,value,match", [
    ("cond_mlp", "sometimes", "model.cond_mlp"), ("cond_mlp", 1, "model.cond_mlp"),
    ("cond_attention", "dense", "model.cond_attention"),
    ("cond_pool", "words", "model.cond_pool"), ("cond_pool", True, "model.cond_pool"),
    ("text_pack_rows", -1, "model.text_pack_rows"),
    ("text_pack_rows", 1.5, "model.text_pack_rows")])
def test_new_fields_reject(field, value, match):
    tree = tiny_config().to_dict()
    tree["model"][field] = value
    with pytest.raises(ValueError, match=match):
        check_fields(ml_collections.ConfigDict(tree))


def test_defaults_are_the_per_caption_model():
    config = tiny_config()
    model = config.model
    assert (model.cond_mlp, model.cond_attention, model.cond_pool, model.text_pack_rows) == (
        "per_caption", "shared", "outputs", 0)
    # Older configs without the fields build the same models.
    tree = config.to_dict()
    for name in ("cond_mlp", "cond_attention", "cond_pool", "text_pack_rows"):
        del tree["model"][name]
    old = ml_collections.ConfigDict(tree)
    assert step_lib.build_models(old, VOCAB).predictor == step_lib.build_models(
        config, VOCAB).predictor
    # ... and resume as the same experiment; changing cond_pool is an experiment change.
    assert resume.config_changes(json.loads(old.to_json()), config)[0] == {}
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.model.cond_pool = "attention"
    assert list(resume.config_changes(json.loads(config.to_json()), changed)[0]) == [
        "model.cond_pool"]
