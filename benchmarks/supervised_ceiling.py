"""How fast can the study's encoder learn each probe task with labels? A supervised reference
for the self-supervised runs of docs/study.md.

    python benchmarks/supervised_ceiling.py [--config=configs/study_synthetic.py[:ARGS]] \
        [--steps=2000] [--lr=2e-3] [--batch=64] [--config.probe.num_train=8000 ...]

The config's encoder (`model.encoder`, `input.image_size`; the study's recipe by default),
trained end to end from its initialisation with one linear head per image task (count, shape,
colour of the synthetic scenes) on the mean-pooled patch tokens, the same pooled features the
linear probe reads; summed cross-entropies, AdamW (warm-up 50 steps or a tenth of them, cosine), random batches of
the probes' training split (`probe.num_train` images); test accuracy per task on `probe.num_test`
images of the test split at --eval_points steps, read by the linear heads and by the kNN probe
(tcjepa_jax/evaluators/knn.py on the same pooled features, neighbours from the training split).
If labels do not make a task learnable in a given number of steps, a JEPA trained for that many
steps should not be expected to learn it; if an encoder trained with the labels does not lift a
task's kNN accuracy, the kNN probe cannot be expected to show that task for a self-supervised one.
"""

import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tcjepa_jax import host_memory  # noqa: E402
from tcjepa_jax import step as step_lib  # noqa: E402
from tcjepa_jax.evaluators._features import load_split, tasks_of  # noqa: E402
from tcjepa_jax.evaluators.knn import knn_predict  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", os.path.join(REPO, "configs",
                                                                   "study_synthetic.py"),
                                          "Config file (the encoder, images and probe sets).")
_STEPS = flags.DEFINE_integer("steps", 2000, "training steps")
_LR = flags.DEFINE_float("lr", 2e-3, "peak learning rate")
_BATCH = flags.DEFINE_integer("batch", 64, "images per step")
_EVAL_POINTS = flags.DEFINE_integer("eval_points", 4, "test evaluations, evenly spaced")


def init_params(encoder, tasks, classes, image):
    params = {"encoder": encoder.init(jax.random.key(0), image)["params"]}
    width = encoder.apply({"params": params["encoder"]}, image).shape[-1]
    keys = jax.random.split(jax.random.key(1), len(tasks))
    params["heads"] = {t: {"w": 0.01 * jax.random.normal(k, (width, classes[t])),
                           "b": jnp.zeros(classes[t])} for t, k in zip(tasks, keys)}
    return params


def main(argv):
    del argv
    config = _CONFIG.value
    host_memory.configure(config.get("host_malloc", "reuse"))  # as the trainer does
    tasks = list(tasks_of(config))
    train = load_split(config, config.probe.get("train_split", "train"), config.probe.num_train)
    test = load_split(config, config.probe.get("test_split", "test"), config.probe.num_test)
    classes = {t: int(max(train["labels"][t].max(), test["labels"][t].max())) + 1 for t in tasks}
    encoder = step_lib.build_models(config, 64).encoder  # the text side is not used
    params = init_params(encoder, tasks, classes, jnp.asarray(train["image"][:2]))

    def logits(p, images):
        pooled = encoder.apply({"params": p["encoder"]}, images).mean(1)
        return {t: pooled @ p["heads"][t]["w"] + p["heads"][t]["b"] for t in tasks}

    def loss_fn(p, images, labels):
        out = logits(p, images)
        return sum(optax.softmax_cross_entropy_with_integer_labels(out[t], labels[t]).mean()
                   for t in tasks)

    warmup = min(50, max(1, _STEPS.value // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, _LR.value, warmup, _STEPS.value)
    tx = optax.adamw(schedule, weight_decay=0.05)
    opt_state = tx.init(params)

    @jax.jit
    def update(p, o, images, labels):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, labels)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    predict = jax.jit(lambda p, images: {t: v.argmax(-1) for t, v in logits(p, images).items()})
    pool = jax.jit(lambda p, images: encoder.apply({"params": p["encoder"]}, images).mean(1))

    def pooled(p, images):
        return np.concatenate([np.asarray(pool(p, jnp.asarray(images[i:i + 250])))
                               for i in range(0, len(images), 250)])

    def accuracy(p):
        hits = dict.fromkeys(tasks, 0)
        for i in range(0, len(test["image"]), 250):
            out = predict(p, jnp.asarray(test["image"][i:i + 250]))
            for t in tasks:
                hits[t] += int((np.asarray(out[t]) == test["labels"][t][i:i + 250]).sum())
        x_train, x_test = pooled(p, train["image"]), pooled(p, test["image"])
        knn = {t: float(np.mean(knn_predict(x_train, train["labels"][t], x_test, classes[t],
                                            int(config.probe.knn_k),
                                            float(config.probe.knn_temperature))
                                == test["labels"][t])) for t in tasks}
        return (" ".join(f"{t} {hits[t] / len(test['image']):.3f}" for t in tasks) + " | kNN "
                + " ".join(f"{t} {knn[t]:.3f}" for t in tasks))

    print(f"{config.model.encoder} at {config.input.image_size} px, {len(train['image'])} "
          f"training / {len(test['image'])} test images, classes {classes}, batch "
          f"{_BATCH.value}, lr {_LR.value}", flush=True)
    print(f"step 0 (init): {accuracy(params)}", flush=True)
    rng, start = np.random.default_rng(0), time.time()
    every = max(1, _STEPS.value // max(1, _EVAL_POINTS.value))
    for step in range(1, _STEPS.value + 1):
        idx = rng.integers(0, len(train["image"]), _BATCH.value)
        params, opt_state, loss = update(
            params, opt_state, jnp.asarray(train["image"][idx]),
            {t: jnp.asarray(train["labels"][t][idx]) for t in tasks})
        if step % every == 0 or step == _STEPS.value:
            print(f"step {step}: loss {float(loss):.3f} | test {accuracy(params)} | "
                  f"{time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    app.run(main)
