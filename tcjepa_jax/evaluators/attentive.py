"""Attentive probe: a learnt query cross-attends to the frozen patch tokens, then a linear
classifier (the pooling head of the V-JEPA / I-JEPA follow-ups, one per task).

Head: LayerNorm on the tokens, one learnt query, multi-head cross-attention (heads of 64
dimensions, at least one), LayerNorm, linear. Trained with AdamW (lr probe.attentive_lr,
weight decay 0.05) for probe.attentive_steps steps on minibatches of 128 probe-training
images; reported as test accuracy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from tcjepa_jax.evaluators import _probes

BATCH = 128


class AttentivePooler(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, tokens):
        width = tokens.shape[-1]
        heads = max(1, width // 64) if width % max(1, width // 64) == 0 else 1
        query = self.param("query", nn.initializers.normal(0.02), (1, 1, width))
        x = nn.LayerNorm()(tokens)
        pooled = nn.MultiHeadDotProductAttention(num_heads=heads)(
            jnp.broadcast_to(query, (tokens.shape[0], 1, width)), x)[:, 0]
        return nn.Dense(self.num_classes)(nn.LayerNorm()(pooled))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps", "batch"))
def _train(x, y, key, lr, num_classes: int, steps: int, batch: int):
    """The whole probe training as one program: `steps` AdamW steps on random minibatches."""
    model = AttentivePooler(num_classes)
    init_key, data_key = jax.random.split(key)
    params = model.init(init_key, x[:1])
    tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=0.05)

    def loss(p, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

    def body(i, carry):
        p, s = carry
        idx = jax.random.choice(jax.random.fold_in(data_key, i), x.shape[0], (batch,),
                                replace=False)
        updates, s = tx.update(jax.grad(loss)(p, x[idx], y[idx]), s, p)
        return optax.apply_updates(p, updates), s

    params, _ = jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))
    return params


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _predict(params, x, num_classes: int):
    return jnp.argmax(AttentivePooler(num_classes).apply(params, x), -1)


def fit_predict(tokens_train, y_train, tokens_test, num_classes: int, steps: int, lr: float,
                seed: int = 0) -> np.ndarray:
    batch = min(BATCH, len(tokens_train))
    params = _train(jnp.asarray(tokens_train), jnp.asarray(y_train), jax.random.key(seed),
                    lr, num_classes, steps, batch)
    return np.concatenate([np.asarray(_predict(params, tokens_test[i:i + BATCH], num_classes))
                           for i in range(0, len(tokens_test), BATCH)])


def evaluate(features, config) -> dict:
    steps = int(config.probe.get("attentive_steps", 300))
    lr = float(config.probe.get("attentive_lr", 1e-3))
    return _probes.accuracy_per_task(
        features, lambda x, y, x_test, classes: fit_predict(x, y, x_test, classes, steps, lr),
        use="tokens")
