"""The TC-JEPA model bundle, its train state and the pure train step (docs/method.md).

Everything here is a pure function of (params, inputs); `train.py` owns the loop, the mesh and
the I/O. The parameter tree is {"encoder", "predictor", "text"}; "text" exists only when the
predictor is conditioned on captions and T5 runs in the step, so I-JEPA mode and runs on
precomputed text features (model.text_features) carry no text encoder at all.
"""

from typing import Any, NamedTuple, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from tcjepa_jax import caption_control
from tcjepa_jax import monitors
from tcjepa_jax import nonfinite as nonfinite_lib
from tcjepa_jax import optim
from tcjepa_jax import sharding as shard_lib
from tcjepa_jax.masks import MaskSpec
from tcjepa_jax.models import t5_checkpoint
from tcjepa_jax.models import text as text_lib
from tcjepa_jax.models.predictor import Predictor
from tcjepa_jax.models.text import T5_SIZES, T5Encoder
from tcjepa_jax.models.vit import VisionTransformer, vit_config


# ---- Models ----------------------------------------------------------------------------------

class Models(NamedTuple):
    encoder: VisionTransformer          # context encoder f; the target encoder f̄ shares it
    predictor: Predictor
    text: Optional[T5Encoder]           # None in I-JEPA mode (conditioning == "none")
    grid: tuple                         # patch grid (H, W)
    mask_spec: MaskSpec
    text_precomputed: bool = False      # model.text_features: T5's output comes in the batch


def build_models(config, vocab_size: int) -> Models:
    dtype = jnp.dtype(config.model.dtype)
    enc = vit_config(config.model.encoder)
    image_size = config.input.image_size
    if image_size % enc["patch_size"]:
        raise ValueError(f"input.image_size={image_size} is not a multiple of the patch size "
                         f"{enc['patch_size']} of model.encoder={config.model.encoder!r}.")
    grid = (image_size // enc["patch_size"],) * 2
    scan = bool(config.model.get("scan_layers", False))
    # The self-attention kernel is picked per call at trace time (models/attention.py).
    attention = config.model.get("attention", "auto")
    encoder = VisionTransformer(**enc, dtype=dtype, remat=config.model.remat, scan=scan,
                                attention=attention)
    predictor = Predictor(
        enc_width=enc["width"],
        width=config.model.predictor_width,
        depth=config.model.predictor_depth,
        num_heads=config.model.predictor_heads,
        conditioning=config.model.conditioning,
        cond_mlp_ratio=config.model.cond_mlp_ratio,
        cond_mlp=config.model.get("cond_mlp", "per_caption"),
        cond_attention=config.model.get("cond_attention", "shared"),
        cond_pool=config.model.get("cond_pool", "outputs"),
        penalty=config.loss.get("penalty", "cosine"),
        dtype=dtype,
        remat=config.model.remat,
        scan=scan,
        attention=attention,
    )
    text = None
    if config.model.conditioning != "none":
        text = T5Encoder(vocab_size=vocab_size, **T5_SIZES[config.model.text], dtype=dtype,
                         scan=scan)
    mask_spec = MaskSpec.from_config(config.masks, grid)
    caption_control.check(config)
    precomputed = text is not None and config.model.get("text_features") == "precomputed"
    return Models(encoder, predictor, text, grid, mask_spec, precomputed)


def dummy_batch(models: Models, config, batch_size: int = 1) -> dict:
    """A batch of the pipeline's shapes and dtypes (see data/pipeline.py)."""
    size, spec = config.input.image_size, models.mask_spec
    n, s = config.input.num_captions, config.input.max_caption_len
    batch = {
        "image": np.zeros((batch_size, size, size, 3), np.float32),
        "text_ids": np.zeros((batch_size, n, s), np.int32),
        "text_mask": np.ones((batch_size, n, s), bool),
        "caption_valid": np.ones((batch_size, n), bool),
        "context_idx": np.zeros((batch_size, spec.num_context_slots), np.int32),
        "context_valid": np.ones((batch_size, spec.num_context_slots), bool),
        "target_idx": np.zeros((batch_size, spec.num_targets, spec.num_target_slots), np.int32),
        "target_valid": np.ones((batch_size, spec.num_targets, spec.num_target_slots), bool),
    }
    if models.text_precomputed:  # as stored by make_dataset's default --text_features_dtype
        batch["text_features"] = np.zeros((batch_size, n, s, models.text.width), jnp.bfloat16)
    return batch


def init_params(models: Models, config, rng) -> dict:
    """Parameters, still boxed with their logical axis names (nn.Partitioned)."""
    batch = jax.tree.map(jnp.asarray, dummy_batch(models, config))
    rng_enc, rng_pred, rng_text = jax.random.split(rng, 3)
    params = {"encoder": models.encoder.init(
        rng_enc, batch["image"], batch["context_idx"], batch["context_valid"])["params"]}
    ctx = jnp.zeros(batch["context_idx"].shape + (models.encoder.width,))
    text = _text_features_shape(models, batch)
    if models.text is not None and not models.text_precomputed:
        params["text"] = models.text.init(rng_text, batch["text_ids"], batch["text_mask"])["params"]
    params["predictor"] = models.predictor.init(
        rng_pred, ctx, batch["context_idx"], batch["context_valid"], batch["target_idx"],
        batch["target_valid"], text, batch["text_mask"], batch["caption_valid"], models.grid,
    )["params"]
    return params


def _text_features_shape(models, batch):
    width = models.text.width if models.text is not None else 1
    return jnp.zeros(batch["text_ids"].shape + (width,))


# ---- Train state -----------------------------------------------------------------------------

@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any               # {"encoder", "predictor", "text"?}
    ema_params: Any           # target encoder f̄: EMA of params["encoder"]
    opt_state: Any
    nonfinite: Any            # nonfinite.NONFINITE_COUNTERS: int32 scalars, see make_train_step


def state_shardings(models: Models, config, tx, mesh):
    """Shardings of every TrainState leaf, from the parameters' logical axis names."""
    boxed = jax.eval_shape(lambda: init_params(models, config, jax.random.key(0)))
    params = shard_lib.param_shardings(boxed, mesh, config.sharding_rules)
    # Optimizer statistics inherit the logical names of their parameters (optax maps over the
    # nn.Partitioned boxes), so one rule set lays out parameters and moments alike.
    opt_state = shard_lib.param_shardings(jax.eval_shape(tx.init, boxed), mesh,
                                          config.sharding_rules)
    replicated = shard_lib.replicated(mesh)
    return TrainState(step=replicated, params=params, ema_params=params["encoder"],
                      opt_state=opt_state,
                      nonfinite={name: replicated for name in nonfinite_lib.NONFINITE_COUNTERS})


def create_train_state(models: Models, config, tx, shardings: TrainState) -> TrainState:
    """Initialise directly into the sharded layout (no host-side copy of the full model)."""

    def init(rng, text):
        params = nn.unbox(init_params(models, config, rng))
        if text is not None:  # model.text_checkpoint: pretrained T5 weights, not the random init
            params["text"] = text
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          ema_params=params["encoder"], opt_state=tx.init(params),
                          nonfinite=nonfinite_lib.nonfinite_counters())

    rng, text = init_rng(config), None
    # Read as arguments (not constants) straight into their shardings; skipped under
    # jax.eval_shape (a traced rng), whose shapes are the same either way.
    if ("text" in shardings.params and config.model.get("text_checkpoint")
            and not isinstance(rng, jax.core.Tracer)):
        text = jax.tree.map(
            lambda a, s: jax.make_array_from_callback(a.shape, s, lambda i: a[i]),
            t5_checkpoint.load_text_params(config.model.text_checkpoint, config.model.text,
                                           bool(config.model.get("scan_layers", False))),
            shardings.params["text"])
    return jax.jit(init, out_shardings=shardings, donate_argnums=1)(rng, text)


def init_rng(config):
    """The key every run initialises its parameters from (the probes' "random init" too)."""
    return jax.random.fold_in(jax.random.key(config.seed), 0)


# ---- Loss ------------------------------------------------------------------------------------

def gather_tokens(tokens, idx):
    """tokens (B, N, D), idx (B, K, T) -> (B, K, T, D)."""
    return jnp.take_along_axis(tokens[:, None], idx[..., None], axis=2)


def prediction_loss(pred, target, valid, kind: str):
    """Mean over valid target tokens; smooth-L1 (beta=1) or the per-patch L2 norm."""
    if kind == "smooth_l1":
        per_token = optax.huber_loss(pred, target, delta=1.0).mean(-1)
    elif kind == "l2":
        per_token = jnp.sqrt(jnp.sum(jnp.square(pred - target), -1) + 1e-12)
    else:
        raise ValueError(f"loss.pred must be 'smooth_l1' or 'l2', got {kind!r}.")
    valid = valid.astype(jnp.float32)
    return jnp.sum(per_token * valid) / jnp.maximum(valid.sum(), 1.0)


def target_features(models: Models, ema_params, images, with_raw: bool = False,
                    eps: float = 1e-5):
    """h = LayerNorm_noparams(f̄(full image)), with no gradient (and f̄'s output itself).
    eps (loss.target_norm_eps): the reference's F.layer_norm default, 1e-5."""
    raw = jax.lax.stop_gradient(models.encoder.apply({"params": ema_params}, images))
    h = raw.astype(jnp.float32)
    h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + eps)
    return (h, raw) if with_raw else h


def text_features(models: Models, params, batch, trainable: bool, pack_rows: int = 0):
    """T5 word features (B, N, S, Dt), float32. A frozen encoder (not `trainable`) runs on
    stop-gradient parameters, so autodiff builds no tangent or backward work for it at all.

    pack_rows > 0 (model.text_pack_rows): the valid captions of each example are packed whole
    into that many rows of S tokens (text.pack_captions) and T5 runs on those rows, so it
    computes pack_rows * S tokens per example instead of N * S. Exact: the features of every
    valid word of a valid caption are those of the padded computation (up to float rounding);
    padding words and invalid captions get zeros (nothing reads them). A batch in which some
    example's captions do not fit runs the padded computation instead (a lax.cond: the same
    result, at the padded cost, for that step).
    """
    if models.text is None:  # I-JEPA mode: the predictor ignores text; keep the shapes static.
        return _text_features_shape(models, batch)
    if models.text_precomputed:  # stored by make_dataset (data/text_features.py)
        return batch["text_features"].astype(jnp.float32)
    text_params = params["text"] if trainable else jax.lax.stop_gradient(params["text"])
    ids, mask = batch["text_ids"], batch["text_mask"]

    def padded():
        return models.text.apply({"params": text_params}, ids, mask)

    if pack_rows and pack_rows < ids.shape[1]:
        packed = text_lib.pack_captions(ids, mask, pack_rows, batch["caption_valid"])

        def packed_rows():
            t = models.text.apply({"params": text_params}, packed.ids, packed.mask,
                                  segment_ids=packed.segment)
            return text_lib.unpack_features(t, packed, mask)

        t = jax.lax.cond(packed.fits, packed_rows, padded)
    else:
        t = padded()
    return t if trainable else jax.lax.stop_gradient(t)


def loss_fn(params, ema_params, batch, models: Models, config):
    h, raw_target = target_features(models, ema_params, batch["image"], with_raw=True,
                                    eps=config.loss.get("target_norm_eps", 1e-5))
    targets = gather_tokens(h, batch["target_idx"])
    text = text_features(models, params, batch, config.model.text_trainable,
                         int(config.model.get("text_pack_rows", 0)))
    z = models.encoder.apply({"params": params["encoder"]}, batch["image"],
                             batch["context_idx"], batch["context_valid"])
    pred, aux = models.predictor.apply(
        {"params": params["predictor"]}, z, batch["context_idx"], batch["context_valid"],
        batch["target_idx"], batch["target_valid"], text, batch["text_mask"],
        batch["caption_valid"], models.grid)
    loss_pred = prediction_loss(pred.astype(jnp.float32), targets, batch["target_valid"],
                                config.loss.pred)
    loss = (loss_pred + config.loss.sparse_weight * aux["sparse"]
            + config.loss.consistency_weight * aux["consistency"])
    metrics = {"loss": loss, "loss_pred": loss_pred, "loss_sparse": aux["sparse"],
               "loss_consistency": aux["consistency"]}
    for name in ("o_mean", "o_frac_pos"):
        for layer, value in enumerate(jnp.atleast_1d(aux[name])):
            metrics[f"{name}/layer{layer}"] = value
    if config.get("monitor", {}).get("enabled", True):
        metrics.update(monitors.health_metrics(raw_target, pred, targets, batch["target_valid"]))
    return loss, metrics


# ---- Train step ------------------------------------------------------------------------------

def loss_counts(batch, conditioning: str) -> dict:
    """Per example, the number of terms each loss averages over (see loss_fn / text_penalties):
    valid target tokens (L_pred), valid (token, caption) pairs (L_sparse, L_consistency) and
    valid (token, caption, word) triples (the O statistics). Gradient accumulation weights each
    micro-batch's means by its share of these, so k micro-batches make exactly one batch."""
    target = batch["target_valid"].sum((1, 2)).astype(jnp.float32)               # (B,)
    k = batch["target_valid"].shape[1]
    tokens = k * batch["context_valid"].sum(1).astype(jnp.float32) + target
    text_mask = batch["text_mask"].astype(bool)
    captions = batch["caption_valid"].astype(bool) & text_mask.any(-1)             # (B, N)
    if conditioning == "caption":  # one "word" per caption: the mean word feature
        words = captions.sum(1).astype(jnp.float32)
    else:
        words = (text_mask.sum(-1) * captions).sum(1).astype(jnp.float32)
    return {"pred": target, "pair": captions.sum(1) * tokens, "word": words * tokens}


def _weighted(metrics: dict, share: dict) -> dict:
    """Metrics of one micro-batch, scaled by its share of the batch's terms."""
    def weight(name):
        if name.startswith("o_"):
            return share["word"]
        return share["pair"] if name in ("loss_sparse", "loss_consistency") else share["pred"]
    return {name: value * weight(name) for name, value in metrics.items()}


def make_train_step(models: Models, config, tx, mesh=None):
    """The pure train step. `mesh` (optional) pins activations to the layout config.sharding_rules
    gives their act_* names, and the gradient-accumulation micro-batches to the batch axes;
    without it XLA propagates the parameters' and the batch's shardings on its own.

    A step whose loss or gradients are not finite (NaN or Inf; nonfinite.finite_update) changes
    nothing but the step counter and state.nonfinite (nonfinite.count_nonfinite): params,
    ema_params and opt_state (Adam's moments and its own count, so optax's learning-rate and
    weight-decay schedules do not advance on it) are returned as they came in. What the run
    does then (stop, or skip and go on) is train.py's, from the counters, at its next metrics
    fetch or checkpoint save."""
    action, max_skips = nonfinite_lib.nonfinite_options(config)
    limit = 1 if action == "stop" else max_skips  # non-finite steps in a row that end the run
    lr = optim.learning_rate_schedule(config.optim, config.total_steps)
    wd = optim.weight_decay_schedule(config.optim, config.total_steps)
    momentum = optim.ema_momentum_schedule(config.optim, config.total_steps)
    accum = int(config.get("grad_accum", 1))
    micro_sharding = None if mesh is None else NamedSharding(mesh, P(shard_lib.BATCH_AXES))

    def grads_and_metrics(params, ema_params, batch):
        if accum == 1:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (_, metrics), grads = grad_fn(params, ema_params, batch, models, config)
            return grads, metrics
        # Micro-batch i takes rows i, i + k, i + 2k, ...: with the batch split into contiguous
        # blocks over the devices, every device holds an equal part of every micro-batch.
        counts = loss_counts(batch, config.model.conditioning)
        totals = {name: jnp.maximum(c.sum(), 1.0) for name, c in counts.items()}

        def split(x):
            x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:])
            if micro_sharding is not None:
                x = jax.lax.with_sharding_constraint(x, micro_sharding)
            return jnp.moveaxis(x, 1, 0)

        def micro_step(grads, micro):
            mb, mb_counts = micro
            share = {name: mb_counts[name].sum() / totals[name] for name in totals}

            def weighted_loss(p):
                _, metrics = loss_fn(p, ema_params, mb, models, config)
                metrics = _weighted(metrics, share)
                loss = (metrics["loss_pred"] + config.loss.sparse_weight * metrics["loss_sparse"]
                        + config.loss.consistency_weight * metrics["loss_consistency"])
                return loss, dict(metrics, loss=loss)

            (_, metrics), g = jax.value_and_grad(weighted_loss, has_aux=True)(params)
            return jax.tree.map(jnp.add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, params)
        grads, metrics = jax.lax.scan(micro_step, zeros, jax.tree.map(split, (batch, counts)))
        return grads, jax.tree.map(lambda m: m.sum(0), metrics)

    def train_step(state: TrainState, batch: dict):
        batch = caption_control.apply(batch, config, models.text is not None)
        if mesh is None:
            grads, metrics = grads_and_metrics(state.params, state.ema_params, batch)
        else:  # activations follow config.sharding_rules' act_* names
            with shard_lib.activation_sharding(mesh, config.sharding_rules):
                grads, metrics = grads_and_metrics(state.params, state.ema_params, batch)
        trained = {k: v for k, v in grads.items() if k != "text" or config.model.text_trainable}
        ok, grad_norm = nonfinite_lib.finite_update(metrics["loss"], trained)
        m = momentum(state.step)

        def update(operands):
            grads, params, ema_params, opt_state = operands
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            ema_params = jax.tree.map(lambda e, p: m * e + (1.0 - m) * p,
                                      ema_params, params["encoder"])
            return params, ema_params, opt_state

        # A cond rather than a select of new and old values (jnp.where): the update runs in
        # place as without the guard (the same ops, so bit-identical results), where a select
        # keeps new and old optimizer moments alive together (about a third more temporary
        # memory than the state per device, measured on CPU).
        params, ema_params, opt_state = jax.lax.cond(
            ok, update, lambda operands: operands[1:],
            (grads, state.params, state.ema_params, state.opt_state))
        metrics.update(grad_norm=grad_norm, lr=lr(state.step),
                       weight_decay=wd(state.step), ema_momentum=m)
        new_state = TrainState(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state,
            nonfinite=nonfinite_lib.count_nonfinite(state.nonfinite, ok, state.step + 1, limit))
        return new_state, metrics

    return train_step


def compiled_flops(compiled) -> float:
    """FLOPs of one call of a compiled program on one device (XLA's cost analysis, which counts
    a loop body once: tcjepa_jax/flops.py counts scanned steps)."""
    cost = compiled.cost_analysis() or {}
    return float(cost.get("flops", 0.0)) if isinstance(cost, dict) else 0.0


def jit_train_step(train_step, shardings: TrainState, mesh):
    """Our pjit: explicit in/out shardings, the state donated so it is updated in place."""
    batch = shard_lib.batch_sharding(mesh)
    return jax.jit(train_step, in_shardings=(shardings, batch),
                   out_shardings=(shardings, shard_lib.replicated(mesh)), donate_argnums=0)
