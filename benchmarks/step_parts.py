"""The components of a train step as separately jitted functions, for benchmarks/step.py.

make_parts cuts the step of a config into its components (Part: a function and its arguments),
built from the real model objects (step.build_models) and the step's parameter subtrees, with
the step's real shapes; PART_NOTES says what each one includes. The arguments are arrays (the
measured breakdown: synthetic_batch, random_state, random_maker, and time_calls to time them)
or ShapeDtypeStructs (the paper table, lowered only). benchmarks/step.py compiles, runs or
lowers them and prints the tables.
"""

import copy
import inspect
import os
import statistics
import sys
import time
from typing import Callable, NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from tcjepa_jax import monitors, nonfinite as nonfinite_lib, optim  # noqa: E402
from tcjepa_jax import step as step_lib  # noqa: E402
from tcjepa_jax.masks import sample_masks  # noqa: E402
from tcjepa_jax.models.layers import remat as remat_lib  # noqa: E402
from tcjepa_jax.models.predictor import TextConditioner, text_penalties  # noqa: E402

# What each part's number includes (printed under the tables, and in docs/performance.md).
PART_NOTES = {
    "target encoder": "f̄ on every patch of the image (EMA params, no gradient), the loss's "
                      "parameter-free LayerNorm and the gather of the target tokens",
    "context encoder": "f on the context slots: patch embedding of the whole image, gather, "
                       "blocks, final LN; backward to its parameters (not to the image)",
    "text encoder": "step.text_features: the T5 encoder on every caption slot (N x S tokens "
                    "per image; with model.text_pack_rows on the packed rows, plus the packing "
                    "and unpacking); backward only with model.text_trainable; absent with "
                    "model.text_features=precomputed",
    "predictor": "the predictor with conditioning 'none' and the step's parameters: input "
                 "Dense + position embedding, mask tokens, the K-fold repeat, every "
                 "self-attention/MLP block, final LN and output Dense; backward to its parameters "
                 "and to the context encoder's output",
    "text conditioner": "every conditioned layer's TextConditioner (with the model's "
                        "cond_mlp / cond_pool / cond_attention variant), chained: LN, q/k/v "
                        "projections (k/v of the text per layer), cross-attention per caption, "
                        "out projection + MLP per caption (by default), max-pool, and the O "
                        "map; backward to "
                        "its parameters, its token input (and the text if trainable) through "
                        "both its output and O",
    "loss + penalties": "prediction loss, L_sparse, L_consistency and the O statistics; "
                        "backward to the predictions and the O maps",
    "health monitors": "monitors.health_metrics (covariances, eigvalsh, cosines; no gradient)",
    "optimizer + EMA": "gradient norm and finiteness check, AdamW update (optax, the frozen text "
                       "set to zero), apply_updates and the EMA of the target encoder, under the "
                       "step's lax.cond; state donated as in the step",
}


# ---- Components ------------------------------------------------------------------------------

class Part(NamedTuple):
    name: str
    passes: str                 # "fwd", "fwd+bwd" or "update"
    fn: Callable
    args: tuple
    donate: tuple = ()
    carry: Optional[Callable] = None  # (args, outputs) -> the next call's args (donated state)


def unrolled(config):
    """A copy of `config` with the layers unrolled and one micro-batch: the parts need the
    per-layer parameter subtrees (block_i, cond_i), and XLA counts a loop body once."""
    local = copy.deepcopy(config)
    with local.unlocked():
        local.model.scan_layers = False
        local.grad_accum = 1
    return local


def conditioned_layers(config) -> list:
    """The predictor layers followed by a text conditioner (Predictor._layers)."""
    cond, depth = config.model.conditioning, config.model.predictor_depth
    return {"all": list(range(depth)), "caption": list(range(depth)), "first": [0],
            "none": []}[cond]


def token_valid(context_valid, target_valid):
    """(B, K*(Nc+Nt)) validity of every predictor token slot, as Predictor.__call__ builds it."""
    b, k, nt = target_valid.shape
    ctx = jnp.repeat(context_valid.astype(bool), k, axis=0)
    valid = jnp.concatenate([ctx, target_valid.astype(bool).reshape(b * k, nt)], axis=1)
    return valid.reshape(b, -1)


def make_parts(models: step_lib.Models, config, tx, params, ema_params, opt_state, batch,
               act: Callable) -> list:
    """The step's components as Parts. params / ema_params / opt_state / batch are arrays or
    ShapeDtypeStructs; act(shape, dtype) makes an activation or cotangent of that shape
    (random values, or a ShapeDtypeStruct). `config` must have unrolled layers."""
    trainable = bool(config.model.text_trainable)
    grid = models.grid
    b, k, nt = batch["target_idx"].shape
    nc = batch["context_idx"].shape[1]
    n, s = batch["text_ids"].shape[1:]
    pred_width = config.model.predictor_width
    dtype = models.predictor.dtype
    f32 = jnp.float32
    parts = []

    # Target encoder: forward only, as target_features + gather_tokens in loss_fn.
    def target(ema, image, target_idx):
        h, raw = step_lib.target_features(models, ema, image, with_raw=True)
        return step_lib.gather_tokens(h, target_idx), raw

    parts.append(Part("target encoder", "fwd", target,
                      (ema_params, batch["image"], batch["target_idx"])))
    targets_shape, raw_shape = jax.eval_shape(target, *parts[-1].args)

    # Context encoder: forward and backward to its parameters.
    def context(enc, image, idx, valid, dz):
        z, vjp = jax.vjp(lambda p: models.encoder.apply({"params": p}, image, idx, valid), enc)
        return z, vjp(dz)[0]

    z_shape = jax.eval_shape(lambda *a: models.encoder.apply({"params": a[0]}, *a[1:]),
                             params["encoder"], batch["image"], batch["context_idx"],
                             batch["context_valid"])
    parts.append(Part("context encoder", "fwd+bwd", context,
                      (params["encoder"], batch["image"], batch["context_idx"],
                       batch["context_valid"], act(z_shape.shape, z_shape.dtype))))

    # Text encoder: forward; forward and backward when trained. Through step.text_features,
    # so whatever the step does with the captions (model.text_pack_rows) is what is counted.
    # None with model.text_features="precomputed": the batch brings the features.
    layers = conditioned_layers(config)
    if models.text is not None and not getattr(models, "text_precomputed", False):
        text_kwargs = {}
        if "pack_rows" in inspect.signature(step_lib.text_features).parameters:
            text_kwargs["pack_rows"] = int(config.model.get("text_pack_rows", 0))

        def text_fwd(tp, ids, mask, caption_valid):
            return step_lib.text_features(
                models, {"text": tp}, {"text_ids": ids, "text_mask": mask,
                                       "caption_valid": caption_valid}, trainable, **text_kwargs)

        text_args = (params["text"], batch["text_ids"], batch["text_mask"],
                     batch["caption_valid"])
        t_shape = jax.eval_shape(text_fwd, *text_args)
        if trainable:
            def text_fwd_bwd(tp, ids, mask, caption_valid, dt):
                t, vjp = jax.vjp(lambda p: text_fwd(p, ids, mask, caption_valid), tp)
                return t, vjp(dt)[0]
            parts.append(Part("text encoder", "fwd+bwd", text_fwd_bwd,
                              text_args + (act(t_shape.shape, t_shape.dtype),)))
        else:
            parts.append(Part("text encoder", "fwd", text_fwd, text_args))

    # Predictor without its conditioners: the same module with conditioning "none" and the
    # step's parameters minus cond_*; the blocks' FLOPs do not depend on the values they see.
    plain = models.predictor.clone(conditioning="none")
    plain_params = {key: v for key, v in params["predictor"].items()
                    if not key.startswith("cond_")}

    def predictor(pp, z, ci, cv, ti, tv, text_mask, caption_valid, dpred):
        no_text = jnp.zeros((b, n, s, 1), f32)

        def f(p, z):
            return plain.apply({"params": p}, z, ci, cv, ti, tv, no_text, text_mask,
                               caption_valid, grid)[0]
        pred, vjp = jax.vjp(f, pp, z)
        return pred, vjp(dpred)

    pred_shape = jax.ShapeDtypeStruct((b, k, nt, models.encoder.width), f32)
    parts.append(Part("predictor", "fwd+bwd", predictor,
                      (plain_params, act(z_shape.shape, z_shape.dtype), batch["context_idx"],
                       batch["context_valid"], batch["target_idx"], batch["target_valid"],
                       batch["text_mask"], batch["caption_valid"],
                       act(pred_shape.shape, pred_shape.dtype))))

    # Text conditioners of every conditioned layer, chained on the (B, K*(Nc+Nt), W) tokens.
    tokens = (b, k * (nc + nt), pred_width)
    o_shapes = []
    if layers:
        mode = "caption" if config.model.conditioning == "caption" else "words"
        # As Predictor._layers builds them (the variant options only where the model has them).
        variant = {field: getattr(models.predictor, attr) for attr, field in
                   (("cond_mlp", "mlp"), ("cond_attention", "attention"), ("cond_pool", "pool"))
                   if hasattr(models.predictor, attr)}
        cond = remat_lib(TextConditioner, config.model.remat)(
            models.predictor.num_heads, models.predictor.cond_mlp_ratio, mode, dtype=dtype,
            **variant)
        cond_params = {f"cond_{i}": params["predictor"][f"cond_{i}"] for i in layers}

        def cond_forward(cp, x, text, text_mask, caption_valid):
            os = []
            for i in layers:
                x, o = cond.apply({"params": cp[f"cond_{i}"]}, x, text, text_mask,
                                  caption_valid)
                if o is not None:
                    os.append(o)
            return x, os

        text_shape = (b, n, s, models.text.width)
        _, o_shapes = jax.eval_shape(cond_forward, cond_params, act(tokens, dtype),
                                     act(text_shape, f32), batch["text_mask"],
                                     batch["caption_valid"])

        def conditioner(cp, x, text, text_mask, caption_valid, dx, dos):
            if trainable:
                out, vjp = jax.vjp(lambda p, x, t: cond_forward(p, x, t, text_mask,
                                                                caption_valid), cp, x, text)
            else:
                out, vjp = jax.vjp(lambda p, x: cond_forward(p, x, text, text_mask,
                                                             caption_valid), cp, x)
            return out, vjp((dx, dos))

        parts.append(Part(f"text conditioner ({len(layers)} layer{'s' * (len(layers) > 1)})",
                          "fwd+bwd", conditioner,
                          (cond_params, act(tokens, dtype), act(text_shape, f32),
                           batch["text_mask"], batch["caption_valid"], act(tokens, dtype),
                           [act(o.shape, o.dtype) for o in o_shapes])))

    # Loss and penalties: forward, and backward to the predictions and the O maps.
    def loss(pred, targets, target_valid, os, ctx_valid, text_mask, caption_valid):
        valid = token_valid(ctx_valid, target_valid)

        def f(pred, os):
            loss_pred = step_lib.prediction_loss(pred, targets, target_valid, config.loss.pred)
            aux = text_penalties(os, valid, text_mask.astype(bool), caption_valid.astype(bool))
            total = (loss_pred + config.loss.sparse_weight * aux["sparse"]
                     + config.loss.consistency_weight * aux["consistency"])
            return total, aux
        return jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(pred, os)

    parts.append(Part("loss + penalties", "fwd+bwd", loss,
                      (act(pred_shape.shape, f32), act(targets_shape.shape, f32),
                       batch["target_valid"], [act(o.shape, o.dtype) for o in o_shapes],
                       batch["context_valid"], batch["text_mask"], batch["caption_valid"])))

    if config.get("monitor", {}).get("enabled", True):
        parts.append(Part("health monitors", "fwd", monitors.health_metrics,
                          (act(raw_shape.shape, raw_shape.dtype), act(pred_shape.shape, f32),
                           act(targets_shape.shape, f32), batch["target_valid"])))

    # Optimizer + EMA: the update closure of make_train_step (copied: the step exposes no hook).
    momentum = optim.ema_momentum_schedule(config.optim, config.total_steps)

    def update(params, ema, opt_state, grads, step, loss_value):
        trained = {key: v for key, v in grads.items() if key != "text" or trainable}
        ok, grad_norm = nonfinite_lib.finite_update(loss_value, trained)
        m = momentum(step)

        def apply(operands):
            grads, params, ema, opt_state = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            ema = jax.tree.map(lambda e, p: m * e + (1.0 - m) * p, ema, params["encoder"])
            return params, ema, opt_state

        params, ema, opt_state = jax.lax.cond(ok, apply, lambda o: o[1:],
                                              (grads, params, ema, opt_state))
        return params, ema, opt_state, grad_norm

    grads = jax.tree.map(lambda p: act(p.shape, p.dtype), params)
    parts.append(Part("optimizer + EMA", "update", update,
                      (params, ema_params, opt_state, grads, act((), jnp.int32), act((), f32)),
                      donate=(0, 1, 2), carry=lambda a, out: tuple(out[:3]) + tuple(a[3:])))
    return parts



# ---- Inputs and timing (the measured breakdown) ----------------------------------------------

def text_vocab(config) -> int:
    return int(config.model.get("text_vocab_size", 0)) or int(config.tokenizer.vocab_size)


def synthetic_batch(models, config, vocab: int, seed: int = 0) -> dict:
    """A batch of the pipeline's shapes: random images and words, real mask draws
    (masks.sample_masks), captions of random lengths. Values do not change the work done."""
    rng = np.random.default_rng(seed)
    size = config.batch_size
    batch = step_lib.dummy_batch(models, config, size)
    batch["image"] = rng.standard_normal(batch["image"].shape).astype(np.float32)
    masks = [sample_masks(models.mask_spec, config.seed, i, 0) for i in range(size)]
    for key in masks[0]:
        batch[key] = np.stack([m[key] for m in masks])
    n, s = batch["text_ids"].shape[1:]
    lengths = rng.integers(max(1, s // 4), s + 1, (size, n))
    batch["text_mask"] = np.arange(s) < lengths[..., None]
    batch["text_ids"] = np.where(batch["text_mask"], rng.integers(2, max(3, vocab), (size, n, s)),
                                 0).astype(np.int32)
    return batch


def copy_tree(tree):
    """A copy in new device buffers (through the host: an eager jnp.copy compiles a program
    per shape, seconds on a busy 2-core host)."""
    return jax.tree.map(lambda x: jnp.asarray(np.array(x)), tree)


def random_maker(seed: int, scale: float = 1.0):
    """act(shape, dtype): random normal floats (zeros otherwise) made on the host."""
    rng = np.random.default_rng(seed)

    def act(shape, dtype):
        if jnp.issubdtype(dtype, jnp.floating):
            return jnp.asarray((scale * rng.standard_normal(shape)).astype(np.float32), dtype)
        return jnp.zeros(shape, dtype)
    return act


def random_state(models, config, tx, shardings) -> step_lib.TrainState:
    """A TrainState of the step's shapes, shardings and dtypes: random normal(0.02) parameters
    and EMA, zero optimizer state and counters. Made on the host: the real initialiser compiles
    a program of the whole model (tens of seconds on a busy CPU), and neither the FLOPs nor the
    time of a step depends on these values (breakdown checks that the update branch ran)."""
    shapes = jax.eval_shape(lambda: step_lib.create_train_state(models, config, tx, shardings))
    weights = random_maker(seed=0, scale=0.02)

    def fill(tree, make):
        return jax.tree.map(lambda s, sharding: jax.device_put(make(s.shape, s.dtype), sharding),
                            tree, jax.tree.map(lambda s: s.sharding, tree))

    zeros = lambda shape, dtype: np.zeros(shape, dtype)  # noqa: E731
    params = fill(shapes.params, weights)
    return step_lib.TrainState(
        step=fill(shapes.step, zeros), params=params, ema_params=copy_tree(params["encoder"]),
        opt_state=fill(shapes.opt_state, zeros), nonfinite=fill(shapes.nonfinite, zeros))


def time_calls(compiled, args, repeats: int, carry=None) -> float:
    """Median seconds of `repeats` calls after one warm-up call; with `carry` each call's
    outputs (donated state) feed the next call's arguments."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        if i:
            times.append(time.perf_counter() - t0)
        if carry is not None:
            args = carry(args, out)
    return statistics.median(times)
