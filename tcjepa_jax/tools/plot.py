"""Pictures of a run: its training masks, the patch-word maps O of its predictor, its curves.

    python -m tcjepa_jax.tools.plot --workdir=runs/synthetic_tiny [--step=N] [--out=DIR]

Writes into --out (default workdir/plots):
    masks.png    the first --num_images examples of the training stream (step 0's batch), built
                 from the config saved with the checkpoint by the training pipeline itself, so
                 the context and target blocks are exactly the ones training used
    o_map.png    for one of those images and one of its captions, O (docs/method.md section 3)
                 of every word (columns) at every conditioned predictor layer (rows), from the
                 checkpoint's parameters (--step, default the latest); skipped, with a message,
                 when the run has no O (conditioning "none" or "caption")
    o_cosine.png with --cosine: the same for cos(Q, K) before the rectification (O = max(0, cos)
                 is all 0 once the penalties have pushed every cosine below 0, docs/method.md
                 section 8)
    curves.png   losses, O statistics, health monitors and evaluator results (eval/..., with
                 the encoder at initialisation, eval_init/..., dashed) against the step, from the
                 TensorBoard event files under workdir/tensorboard and workdir/evals/step_N.json

--figures picks a subset (e.g. --figures=curves needs no checkpoint). Everything runs on the CPU.
The O maps come from the predictor's own projections (TextConditioner sows Q and K into the
"intermediates" collection; O is their rectified cosine), on the image's training mask: the
predictor only ever sees context and mask tokens, so a patch in neither is grey.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct
from typing import NamedTuple

import numpy as np

from tcjepa_jax import paths
from tcjepa_jax.config_lib import UserError, run_command

FIGURES = ("masks", "o_map", "curves")


# ---- The run: config, models, a batch, parameters ---------------------------------------------

class Run(NamedTuple):
    config: object       # the config saved with the checkpoint
    step: int            # the checkpoint's step
    experiment: object   # experiment.Experiment (mesh, tokenizer, models, source)
    batch: dict          # numpy, num_images examples of the training stream


def _checkpointer(workdir: str):
    from tcjepa_jax import checkpoint as ckpt_lib
    if not paths.exists(os.path.join(workdir, "checkpoints")):
        raise UserError(f"no checkpoint under {os.path.join(workdir, 'checkpoints')}; train first "
                        f"(python -m tcjepa_jax.train --workdir={workdir}) or plot only the "
                        "curves (--figures=curves).")
    return ckpt_lib.reader(workdir)


def load_run(workdir: str, step=None, num_images: int = 8) -> Run:
    """The saved config of a checkpoint (the latest or `step`) and a batch of its training data."""
    import jax
    import ml_collections
    from tcjepa_jax.data import pipeline
    from tcjepa_jax.experiment import setup

    checkpointer = _checkpointer(workdir)
    try:
        from tcjepa_jax.checkpoint import existing_step
        step = existing_step(checkpointer.manager, checkpointer.directory, step)
        config = ml_collections.ConfigDict(checkpointer.restore_config(step))
    finally:
        checkpointer.close()
    if (config.model.conditioning != "none" and not config.model.get("text_checkpoint")
            and not config.tokenizer.model_path
            and not paths.exists(os.path.join(workdir, "tokenizer.model"))):
        raise UserError(f"the run's tokenizer {os.path.join(workdir, 'tokenizer.model')} is "
                        "missing; without it the captions cannot be read as in training.")
    # This process only: one mesh axis over the local devices, no accumulation, no workers.
    local = ml_collections.ConfigDict(config.to_dict())
    local.mesh, local.mesh_slices, local.grad_accum = (("data", -1), ("fsdp", 1),
                                                       ("tensor", 1)), 1, 1
    local.batch_size = jax.device_count() * -(-num_images // jax.device_count())
    local.input.workers = 0
    exp = setup(local, workdir, with_data=True)
    data_config = ml_collections.ConfigDict(local.to_dict())
    data_config.batch_size = num_images
    try:
        batch = next(pipeline.make_train_iterator(data_config, exp.tokenizer,
                                                  exp.models.mask_spec, source=exp.source))
    except (ValueError, OSError) as e:
        raise UserError(f"reading the training data: {e}") from e
    return Run(local, step, exp, {k: np.asarray(v) for k, v in batch.items()})


def restore_params(workdir: str, run: Run) -> dict:
    """The checkpoint's trained parameters {"encoder", "predictor", "text"?} (no EMA, no
    optimizer state), as host arrays."""
    import jax
    from tcjepa_jax import checkpoint as ckpt_lib
    from tcjepa_jax import optim
    from tcjepa_jax import step as step_lib

    config, models = run.config, run.experiment.models
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, run.experiment.mesh)
    abstract = ckpt_lib.abstract_like(jax.eval_shape(
        lambda: step_lib.create_train_state(models, config, tx, shardings)), shardings)
    checkpointer = _checkpointer(workdir)
    try:
        params = checkpointer.restore_items(run.step, {"params": abstract.params})["params"]
    finally:
        checkpointer.close()
    return jax.device_get(params)


def unrolled_predictor(tree: dict) -> dict:
    """Predictor parameters in the unrolled layout (block_i, cond_i): the inverse of
    models/scan_params.scanned_from_unrolled's predictor part; unrolled trees pass through."""
    import jax
    if "layers" not in tree and "layer_0" not in tree:
        return tree
    out = {k: v for k, v in tree.items() if k not in ("layers", "layer_0")}
    layers = [tree["layer_0"]] if "layer_0" in tree else []
    if "layers" in tree:
        stacked = tree["layers"]["layer"]
        depth = jax.tree.leaves(stacked)[0].shape[0]
        layers += [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(depth)]
    for i, layer in enumerate(layers):
        out[f"block_{i}"] = layer["block"]
        if "cond" in layer:
            out[f"cond_{i}"] = layer["cond"]
    return out


# ---- O -----------------------------------------------------------------------------------------

class OMaps(NamedTuple):
    cos: np.ndarray         # (L, N, T, S) cos(Q, K) of one image; O = max(cos, 0) * text_mask
    layers: list            # predictor layer index of each conditioned layer
    aux: dict               # the predictor's own statistics for this image (o_mean, ...)


def compute_o(run: Run, params: dict, index: int) -> OMaps:
    """cos(Q_i, K_s) of every predictor token i and word s at every conditioned layer, for
    example `index` of run.batch, from the Q and K projections TextConditioner sows."""
    import jax
    import jax.numpy as jnp
    from tcjepa_jax import step as step_lib

    models = run.experiment.models
    batch = {k: jnp.asarray(v[index:index + 1]) for k, v in run.batch.items()}
    predictor = models.predictor.clone(scan=False)  # per-layer modules cond_i, unrolled params

    @jax.jit
    def forward(params, batch):
        text = step_lib.text_features(models, params, batch, trainable=False)
        z = models.encoder.apply({"params": params["encoder"]}, batch["image"],
                                 batch["context_idx"], batch["context_valid"])
        (_, aux), state = predictor.apply(
            {"params": unrolled_predictor(params["predictor"])}, z, batch["context_idx"],
            batch["context_valid"], batch["target_idx"], batch["target_valid"], text,
            batch["text_mask"], batch["caption_valid"], models.grid, mutable=["intermediates"])
        inter = state["intermediates"]
        names = [n for n in inter if n.startswith("cond_")]
        cos = {}
        for name in names:
            q = inter[name]["q_proj"][0].astype(jnp.float32)   # (1, T, H, D)
            k = inter[name]["k_proj"][0].astype(jnp.float32)   # (1, N, S, H, D)
            q = q.reshape(q.shape[:2] + (-1,))
            k = k.reshape(k.shape[:3] + (-1,))
            q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-6)
            k = k / jnp.maximum(jnp.linalg.norm(k, axis=-1, keepdims=True), 1e-6)
            cos[name] = jnp.einsum("btd,bnsd->bnts", q, k)[0]
        return cos, aux

    cos, aux = forward(params, batch)
    layers = sorted(int(name[5:]) for name in cos)
    return OMaps(np.stack([np.asarray(cos[f"cond_{i}"]) for i in layers]), layers,
                 {k: np.asarray(v) for k, v in aux.items()})


# ---- TensorBoard -------------------------------------------------------------------------------

def _records(data: bytes):
    """The payloads of a TFRecord file (length, crc, payload, crc); a cut last record is
    dropped (the file may still be being written)."""
    pos = 0
    while pos + 12 <= len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        pos += 12
        if pos + length + 4 > len(data):
            return
        yield data[pos:pos + length]
        pos += length + 4


def read_scalars(workdir: str) -> dict:
    """{tag: (steps, values)} of every scalar in workdir/tensorboard (tensorboardX's event
    protobufs, no TensorFlow); a step logged twice (a resumed run) keeps the latest value."""
    from etils import epath
    from tensorboardX.proto import event_pb2

    logdir = os.path.join(workdir, "tensorboard")
    if paths.is_url(logdir):
        files = sorted(str(p) for p in epath.Path(logdir).glob("**/events.out.tfevents.*"))
    else:
        files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"),
                                 recursive=True))
    if not files:
        raise UserError(f"no TensorBoard logs (events.out.tfevents.*) under {logdir}.")
    latest = {}
    for path in files:
        for record in _records(paths.read_bytes(path)):
            event = event_pb2.Event.FromString(record)
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    x = value.simple_value
                elif value.HasField("tensor") and (value.tensor.float_val
                                                   or value.tensor.double_val):
                    x = (list(value.tensor.float_val) or list(value.tensor.double_val))[0]
                else:
                    continue
                key = (value.tag, int(event.step))
                if key not in latest or event.wall_time >= latest[key][0]:
                    latest[key] = (event.wall_time, float(x))
    return _by_tag({key: v for key, (_, v) in latest.items()})


def read_evals(workdir: str) -> dict:
    """{tag: (steps, values)} of workdir/evals/step_N.json."""
    from etils import epath
    folder = epath.Path(os.path.join(workdir, "evals"))
    found = {}
    if folder.exists():
        for path in folder.glob("step_*.json"):
            if not re.fullmatch(r"step_\d+\.json", path.name):
                continue
            results = json.loads(path.read_text())
            step = int(results.pop("step", path.name[5:-5]))
            found.update({(k, step): float(v) for k, v in results.items()
                          if isinstance(v, (int, float))})
    return _by_tag(found)


def _by_tag(points: dict) -> dict:
    out = {}
    for (tag, step), value in sorted(points.items()):
        out.setdefault(tag, ([], []))
        out[tag][0].append(step)
        out[tag][1].append(value)
    return {tag: (np.asarray(s), np.asarray(v)) for tag, (s, v) in out.items()}


# ---- The command ------------------------------------------------------------------------------

def make_plots(workdir: str, step=None, out=None, figures=FIGURES, num_images: int = 8,
               image: int = 0, caption: int = 0, cosine: bool = False,
               max_words: int = 16) -> dict:
    """Writes the figures; returns {name: path} of those written (see the module docstring)."""
    from tcjepa_jax.tools import plot_figures as figs

    unknown = set(figures) - set(FIGURES)
    if unknown:
        raise UserError(f"unknown figures {sorted(unknown)}; choose from {FIGURES}.")
    if not 0 <= image < num_images:
        raise UserError(f"--image={image} must be in [0, --num_images={num_images}).")
    out = out or os.path.join(workdir, "plots")
    written, run = {}, None

    def save(name, fig):
        written[name] = figs.save(fig, os.path.join(out, f"{name}.png"))
        print(f"wrote {written[name]}")

    if "masks" in figures or "o_map" in figures:
        run = load_run(workdir, step, num_images)
    if "masks" in figures:
        save("masks", figs.masks_figure(run))
    if "o_map" in figures:
        conditioning = run.config.model.conditioning
        if conditioning in ("none", "caption"):
            why = "I-JEPA, no captions" if conditioning == "none" else "one key per caption"
            print(f"o_map skipped: conditioning={conditioning!r} has no patch-word map O "
                  f"({why}).")
        else:
            valid = run.batch["caption_valid"][image] & run.batch["text_mask"][image].any(-1)
            if not 0 <= caption < valid.size:
                raise UserError(f"--caption={caption} must be in [0, {valid.size}) "
                                "(input.num_captions).")
            if not valid.any():
                raise UserError(f"training image {image} has no valid caption; pick another "
                                "with --image.")
            if not valid[caption]:
                caption = int(np.flatnonzero(valid)[0])
            o = compute_o(run, restore_params(workdir, run), image)
            save("o_map", figs.o_figure(run, o, image, caption, "o", max_words))
            if cosine:
                save("o_cosine", figs.o_figure(run, o, image, caption, "cos", max_words))
    if "curves" in figures:
        scalars = read_scalars(workdir)
        scalars.update({k: v for k, v in read_evals(workdir).items() if k not in scalars})
        save("curves", figs.curves_figure(scalars, workdir))
    return written


def main(argv):
    from absl import flags
    del argv
    f = flags.FLAGS
    run_command(make_plots, f.workdir, f.step, f.out, tuple(f.figures), f.num_images, f.image,
                f.caption, f.cosine, f.max_words)


def run():
    import jax
    from absl import app, flags
    if not os.environ.get("JAX_PLATFORMS"):  # never take an accelerator (a run may hold it)
        jax.config.update("jax_platforms", "cpu")
    # Defined here, not at import: train.py defines --workdir too, and both may be imported.
    flags.DEFINE_string("workdir", None, "Run directory (checkpoints/, tensorboard/).",
                        required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step of the O maps (default: the latest).")
    flags.DEFINE_string("out", None, "Output folder (default: workdir/plots).")
    flags.DEFINE_list("figures", list(FIGURES), "Which figures: masks, o_map, curves.")
    flags.DEFINE_integer("num_images", 8, "Training images in masks.png.")
    flags.DEFINE_integer("image", 0, "Which of those images o_map.png shows.")
    flags.DEFINE_integer("caption", 0, "Which of its captions (the first valid one if invalid).")
    flags.DEFINE_bool("cosine", False, "Also o_cosine.png: cos(Q, K) before the rectification.")
    flags.DEFINE_integer("max_words", 16, "At most this many words (columns) in o_map.png.")
    app.run(main)


if __name__ == "__main__":
    run()
