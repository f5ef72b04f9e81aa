"""The penalty variants (loss.penalty, models/penalties.py) against numpy references, their
gradient where the paper's cosine penalty has none, and the shuffled-caption control
(input.caption_control, caption_control.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import synthetic_tiny
from tcjepa_jax import caption_control
from tcjepa_jax import nonfinite as nonfinite_lib
from tcjepa_jax import optim
from tcjepa_jax import sharding as shard_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax.models.penalties import PENALTIES, STD_EPS, penalty_map, text_penalties
from tcjepa_jax.models.predictor import Predictor, TextConditioner
from tcjepa_jax.models import scan_params

B, T, N, S, H, D = 2, 5, 4, 6, 2, 3


def random_masks(rng):
    """Caption lengths 0 (no valid word), 1 and up to S; invalid captions; invalid tokens."""
    lengths = rng.integers(2, S + 1, (B, N))
    lengths[0, 1], lengths[1, 2] = 0, 1
    text_mask = np.arange(S) < lengths[..., None]
    caption_valid = np.ones((B, N), bool)
    caption_valid[0, 3] = caption_valid[1, 0] = False
    token_valid = np.ones((B, T), bool)
    token_valid[0, -1] = token_valid[1, :2] = False
    return text_mask, caption_valid, token_valid


# ---- numpy references -------------------------------------------------------------------

def ref_map(penalty, q, k, text_mask):
    """q (B,T,H,D), k (B,N,S,H,D) -> (B,N,T,S), one (token, caption) pair at a time."""
    (nb, nt), (nn_, ns), d = q.shape[:2], k.shape[1:3], q.shape[-1]
    out = np.zeros((nb, nn_, nt, ns))
    for b in range(nb):
        for n in range(nn_):
            w = np.flatnonzero(text_mask[b, n])
            if not len(w):
                continue
            for t in range(nt):
                qv, kv = q[b, t].ravel(), k[b, n, w].reshape(len(w), -1)
                cos = kv @ qv / np.linalg.norm(kv, axis=1) / np.linalg.norm(qv)
                if penalty == "cosine":
                    m = np.maximum(cos, 0)
                elif penalty == "standardized":
                    d = cos - cos.mean()
                    m = np.maximum(d / np.sqrt((d ** 2).mean() + STD_EPS), 0) / len(w)
                else:
                    logits = np.einsum("hd,shd->hs", q[b, t], k[b, n, w]) / math.sqrt(d)
                    a = np.exp(logits - logits.max(1, keepdims=True))
                    m = (a / a.sum(1, keepdims=True)).mean(0)
                out[b, n, t, w] = m
    return out


def ref_penalties(penalty, maps, token_valid, text_mask, caption_valid):
    o = np.stack(maps)  # (L,B,N,T,S)
    sparse, cons, pairs, values, active = 0.0, 0.0, 0, [[] for _ in o], [[] for _ in o]
    for b in range(o.shape[1]):
        for n in range(o.shape[2]):
            w = np.flatnonzero(text_mask[b, n])
            if not (caption_valid[b, n] and len(w)):
                continue
            for t in range(o.shape[3]):
                if not token_valid[b, t]:
                    continue
                ol = o[:, b, n, t][:, w]  # (L, words)
                pairs += 1
                if penalty == "attention":
                    def h(p):  # normalised entropy
                        return (-(p * np.log(p)).sum(-1) / np.log(len(w)) if len(w) > 1
                                else 0 * p.sum(-1))
                    sparse += h(ol).mean()
                    cons += h(ol.mean(0)) - h(ol).mean()
                else:
                    sparse += ol.sum(1).mean()
                    cons += np.abs(ol - ol.mean(0)).sum(1).mean()
                for layer in range(len(o)):
                    values[layer] += list(ol[layer])
                    base = 1 / len(w) if penalty == "attention" else 0
                    active[layer] += list(ol[layer] > base)
    return (sparse / pairs, cons / pairs, [np.mean(v) for v in values],
            [np.mean(a) for a in active])


def random_qk(seed, layers=2):
    rng = np.random.default_rng(seed)
    qs = [rng.normal(size=(B, T, H, D)).astype(np.float32) for _ in range(layers)]
    ks = [rng.normal(size=(B, N, S, H, D)).astype(np.float32) for _ in range(layers)]
    return qs, ks


@pytest.mark.parametrize("penalty", PENALTIES)
def test_penalty_equals_numpy(penalty):
    rng = np.random.default_rng(0)
    text_mask, caption_valid, token_valid = random_masks(rng)
    qs, ks = random_qk(1)
    maps = [penalty_map(penalty, jnp.asarray(q), jnp.asarray(k), jnp.asarray(text_mask))
            for q, k in zip(qs, ks)]
    refs = [ref_map(penalty, q, k, text_mask) for q, k in zip(qs, ks)]
    for got, ref in zip(maps, refs):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    aux = text_penalties(maps, jnp.asarray(token_valid), jnp.asarray(text_mask),
                         jnp.asarray(caption_valid), penalty)
    sparse, cons, o_mean, o_frac = ref_penalties(penalty, refs, token_valid, text_mask,
                                                 caption_valid)
    assert sparse > 0 and cons > 0
    np.testing.assert_allclose(aux["sparse"], sparse, rtol=1e-5)
    np.testing.assert_allclose(aux["consistency"], cons, rtol=1e-5)
    np.testing.assert_allclose(aux["o_mean"], o_mean, rtol=1e-5)
    np.testing.assert_allclose(aux["o_frac_pos"], o_frac, rtol=1e-5)


def test_attention_map_ignores_a_shared_key_component():
    """A component shared by every key of an example adds the same amount to each of a
    query's logits, so the attention map, unlike O, does not move (the dead zone's route)."""
    rng = np.random.default_rng(2)
    text_mask = jnp.asarray(random_masks(rng)[0])
    q, k = (jnp.asarray(a[0]) for a in random_qk(3, layers=1))
    shift = jnp.asarray(rng.normal(size=(B, 1, 1, H, D)) * 3, jnp.float32)
    a = penalty_map("attention", q, k, text_mask)
    np.testing.assert_allclose(penalty_map("attention", q, k + shift, text_mask), a,
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a.sum(-1)[np.asarray(text_mask).any(-1)], 1.0, rtol=1e-5)
    assert not np.allclose(penalty_map("cosine", q, k + shift, text_mask),
                           penalty_map("cosine", q, k, text_mask))


# ---- The dead zone ------------------------------------------------------------------------

def all_negative_qk(seed, layers=2):
    """Queries along u and keys along -u (all heads concatenated), plus noise: every cosine
    negative, as the trained projections end up (docs/method.md, section 8)."""
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(H, D))
    u /= np.linalg.norm(u)
    qs = [(3 * u + 0.3 * rng.normal(size=(B, T, H, D))).astype(np.float32)
          for _ in range(layers)]
    ks = [(-3 * u + 0.3 * rng.normal(size=(B, N, S, H, D))).astype(np.float32)
          for _ in range(layers)]
    return qs, ks


@pytest.mark.parametrize("penalty", PENALTIES)
def test_gradient_where_the_cosine_penalty_has_none(penalty):
    rng = np.random.default_rng(4)
    text_mask, caption_valid, token_valid = (jnp.asarray(a) for a in random_masks(rng))
    qs, ks = all_negative_qk(5)
    cos = [penalty_map("cosine", q, k, text_mask) for q, k in zip(qs, ks)]
    assert all(float(o.max()) == 0.0 for o in cos)  # the paper's O is dead everywhere

    def term(qs, ks, name):
        maps = [penalty_map(penalty, q, k, text_mask) for q, k in zip(qs, ks)]
        return text_penalties(maps, token_valid, text_mask, caption_valid, penalty)[name]

    for name in ("sparse", "consistency"):
        gq, gk = jax.grad(term, argnums=(0, 1))(qs, ks, name)
        norms = [float(jnp.linalg.norm(g)) for g in gq + gk]
        if penalty == "cosine":
            assert float(term(qs, ks, name)) == 0.0 and max(norms) == 0.0
        else:
            assert float(term(qs, ks, name)) > 0 and min(norms) > 0, (name, norms)


@pytest.mark.parametrize("penalty", PENALTIES)
def test_conditioner_parameters_get_a_gradient_in_the_dead_zone(penalty):
    """The conditioner with biases b_Q = c u, b_K = -c u (the direction the trained
    projections share): the penalty's gradient on the q / k kernels is zero only for cosine."""
    rng = np.random.default_rng(6)
    text_mask, caption_valid, token_valid = (jnp.asarray(a) for a in random_masks(rng))
    q = jnp.asarray(rng.normal(size=(B, T, H * 4)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(B, N, S, 8)), jnp.float32)
    model = TextConditioner(H, penalty=penalty)
    params = nn.unbox(model.init(jax.random.key(0), q, text, text_mask, caption_valid))
    u = rng.normal(size=(H, 4))
    u = jnp.asarray(u / np.linalg.norm(u), jnp.float32)
    params["params"]["q"]["bias"] = 5.0 * u
    params["params"]["k"]["bias"] = -5.0 * u

    def sparse(p):
        _, o = model.apply(p, q, text, text_mask, caption_valid)
        return text_penalties([o], token_valid, text_mask, caption_valid, penalty)["sparse"]

    cos = TextConditioner(H).apply(params, q, text, text_mask, caption_valid)[1]
    assert float(cos.max()) == 0.0
    g = jax.grad(sparse)(params)["params"]
    norms = [float(jnp.linalg.norm(g[m]["kernel"])) for m in ("q", "k")]
    assert (max(norms) == 0.0) if penalty == "cosine" else (min(norms) > 0), norms


# ---- Through the predictor: shared / broadcast attention, unrolled / scanned layers ---------

def predictor_inputs(seed=7):
    rng = np.random.default_rng(seed)
    b, k, nc, nt, n, s = 2, 2, 5, 3, 3, 5
    lengths = rng.integers(1, s + 1, (b, n, 1))
    caption_valid = np.array([[True, True, False], [True, False, True]])
    return dict(
        ctx=jnp.asarray(rng.normal(size=(b, nc, 16)), jnp.float32),
        ctx_idx=jnp.asarray(rng.integers(0, 16, (b, nc))),
        ctx_valid=jnp.asarray(np.arange(nc) < np.array([[nc], [nc - 2]])),
        tgt_idx=jnp.asarray(rng.integers(0, 16, (b, k, nt))),
        tgt_valid=jnp.asarray(np.arange(nt) < rng.integers(1, nt + 1, (b, k, 1))),
        text=jnp.asarray(rng.normal(size=(b, n, s, 8)), jnp.float32),
        text_mask=jnp.asarray(np.arange(s) < lengths),
        caption_valid=jnp.asarray(caption_valid), grid=(4, 4))


@pytest.mark.parametrize("penalty", PENALTIES)
def test_predictor_paths_agree(penalty):
    inp = predictor_inputs()
    kw = dict(enc_width=16, width=24, depth=3, num_heads=2, penalty=penalty)
    model = Predictor(**kw)
    variables = nn.unbox(model.init(jax.random.key(0), **inp))
    (_, aux), state = model.apply(variables, **inp, mutable=["intermediates"])
    inter = state["intermediates"]
    tm = np.asarray(inp["text_mask"])
    refs = [ref_map(penalty, np.asarray(inter[f"cond_{i}"]["q_proj"][0]),
                    np.asarray(inter[f"cond_{i}"]["k_proj"][0]), tm) for i in range(3)]
    # Token validity of the (B, K*(Nc+Nt)) layout: per target block, ctx slots then tgt slots.
    cv, tv = np.asarray(inp["ctx_valid"]), np.asarray(inp["tgt_valid"])
    token_valid = np.stack([np.concatenate([np.concatenate([cv[b], tv[b, k]])
                                            for k in range(2)]) for b in range(2)])
    sparse, cons, _, _ = ref_penalties(penalty, refs, token_valid, tm,
                                       np.asarray(inp["caption_valid"]))
    np.testing.assert_allclose(aux["sparse"], sparse, rtol=1e-5)
    # Attention at initialisation is nearly uniform in every layer: its JS divergence (about
    # 1e-6) is a difference of entropies near 1, exact only to float32 rounding.
    np.testing.assert_allclose(aux["consistency"], cons, rtol=1e-5, atol=1e-7)
    _, broadcast = Predictor(**kw, cond_attention="broadcast").apply(variables, **inp)
    _, scanned = Predictor(**kw, scan=True).apply(
        {"params": scan_params._predictor(variables["params"])},
        **inp)
    for other in (broadcast, scanned):
        for name in aux:
            np.testing.assert_allclose(other[name], aux[name], rtol=1e-5, atol=1e-7)


# ---- The shuffled-caption control ---------------------------------------------------------

VOCAB = 64


def tiny_config(conditioning="all", control="shuffled"):
    config = synthetic_tiny.get_config("smoke")
    config.batch_size = 8
    config.input.image_size = 32
    config.input.num_captions = 2
    config.input.max_caption_len = 6
    config.input.caption_control = control
    config.masks.min_keep = 4
    config.masks.max_context = 0
    config.model.predictor_width = 24
    config.model.predictor_heads = 2
    config.model.conditioning = conditioning
    config.monitor.enabled = False
    return config


def tiny_batch(models, config):
    """Every image's captions are its own: token ids that encode the image index."""
    rng = np.random.default_rng(0)
    batch = step_lib.dummy_batch(models, config, config.batch_size)
    batch["image"] = rng.normal(size=batch["image"].shape).astype(np.float32)
    b, n, s = batch["text_ids"].shape
    batch["text_ids"] = (2 + (np.arange(b)[:, None, None] * 7 + np.arange(n * s).reshape(n, s))
                         % (VOCAB - 2)).astype(np.int32)
    batch["text_mask"] = np.arange(s) < rng.integers(2, s + 1, (b, n, 1))
    batch["caption_valid"] = rng.random((b, n)) < 0.8
    g = models.grid[0] * models.grid[1]
    for key in ("context", "target"):
        batch[f"{key}_idx"] = rng.integers(0, g, batch[f"{key}_idx"].shape).astype(np.int32)
    return batch


class RecordingPredictor:
    """Wraps the predictor: records (text, text_mask, caption_valid) as the step passes them."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def apply(self, variables, *args, **kwargs):
        jax.debug.callback(lambda *a: self.seen.append([np.asarray(x) for x in a]), *args[5:8])
        return self.inner.apply(variables, *args, **kwargs)


def run_step(config, batch, mesh):
    models = step_lib.build_models(config, VOCAB)
    recorder = RecordingPredictor(models.predictor)
    models = models._replace(predictor=recorder)
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models._replace(predictor=recorder.inner), config, tx,
                                         mesh)
    state = step_lib.create_train_state(models._replace(predictor=recorder.inner), config, tx,
                                        shardings)
    step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh),
                                   shardings, mesh)
    own = step_lib.text_features(models, state.params, jax.tree.map(jnp.asarray, batch), False)
    own = np.asarray(own)  # before the step, which donates the state
    global_batch = shard_lib.make_global_batch(batch, shard_lib.batch_sharding(mesh))
    _, metrics = step(state, global_batch)
    jax.block_until_ready(metrics)
    return recorder.seen, own, metrics


def test_shuffled_captions_come_from_another_image():
    config = tiny_config()
    mesh = shard_lib.make_mesh(config)  # the batch split over the 8 devices
    assert mesh.shape["data"] == 8
    models = step_lib.build_models(config, VOCAB)
    batch = tiny_batch(models, config)
    seen, own, _ = run_step(config, batch, mesh)
    assert seen, "the predictor was not called"
    text, text_mask, caption_valid = seen[0]
    b = config.batch_size
    for i in range(b):
        j = (i - 1) % b  # the image whose captions image i reads
        np.testing.assert_allclose(text[i], own[j], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(text_mask[i], batch["text_mask"][j])
        np.testing.assert_array_equal(caption_valid[i], batch["caption_valid"][j])
        assert not np.allclose(text[i], own[i])  # not its own
    # The permutation is a derangement and a bijection: every image's captions are read once.
    order = [int(np.argmin([np.abs(text[i] - own[j]).max() for j in range(b)]))
             for i in range(b)]
    assert sorted(order) == list(range(b)) and all(o != i for i, o in enumerate(order))
    # "own" hands the step's batch through untouched.
    assert caption_control.apply(batch, tiny_config(control="own"), True) is batch


def test_shuffled_control_is_a_no_op_in_ijepa_mode():
    """Without conditioning the step is the same program with either setting."""
    texts = {}
    for control in ("own", "shuffled"):
        config = tiny_config("none", control)
        models = step_lib.build_models(config, VOCAB)
        tx = optim.make_optimizer(config)
        params = jax.eval_shape(lambda: nn.unbox(step_lib.init_params(
            models, config, jax.random.key(0))))
        state = jax.eval_shape(lambda: step_lib.TrainState(
            step=jnp.zeros((), jnp.int32), params=params, ema_params=params["encoder"],
            opt_state=tx.init(params), nonfinite=nonfinite_lib.nonfinite_counters()))
        batch = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                             step_lib.dummy_batch(models, config, config.batch_size))
        texts[control] = str(jax.make_jaxpr(step_lib.make_train_step(models, config, tx))(
            state, batch))
    assert texts["own"] == texts["shuffled"]


def test_caption_control_config_errors():
    config = tiny_config()
    config.batch_size = 1
    with pytest.raises(ValueError, match="batch of at least 2"):
        step_lib.build_models(config, VOCAB)
    config = tiny_config(control="others")
    with pytest.raises(ValueError, match="caption_control"):
        caption_control.check(config)
