"""Checks of config fields against each other and against the devices, before anything is
built or compiled (each field alone: config_fields.py).

    check_fields        (config_fields.py) every field against FIELDS: names, types, ranges
    check_combinations  fields against each other: the mask settings against the patch grid,
                        schedules against total_steps, probes against their data, ...
    check_devices       the mesh and the batch against the devices and hosts (experiment.setup)

Each raises one ValueError that names the field, shows its value and says what to change.
"""

from __future__ import annotations

import math

from tcjepa_jax import masks as mask_lib
from tcjepa_jax.config_fields import _evaluators, _is_section
from tcjepa_jax.models.vit import vit_config
from tcjepa_jax.sharding import MESH_AXES

# ---- Fields against each other -----------------------------------------------------------

_MISSING = object()


def _get(config, path: str, default=_MISSING):
    node = config
    for part in path.split("."):
        if not _is_section(node) or part not in node:
            if default is _MISSING:
                raise KeyError(path)
            return default
        node = node[part]
    return node


def _fail(message: str):
    raise ValueError(message)


def check_combinations(config) -> None:
    """Fields against each other; run after check_fields (types and ranges hold)."""
    get = lambda path, default=_MISSING: _get(config, path, default)  # noqa: E731
    total = get("total_steps")
    if get("optim.warmup_steps") > total:
        _fail(f"optim.warmup_steps={get('optim.warmup_steps')} is more than "
              f"total_steps={total}; set optim.warmup_steps <= total_steps.")
    if get("optim.ema_start") > get("optim.ema_end"):
        _fail(f"optim.ema_start={get('optim.ema_start')} is above "
              f"optim.ema_end={get('optim.ema_end')} (the EMA momentum ramps up); set "
              "optim.ema_start <= optim.ema_end.")
    width, heads = get("model.predictor_width"), get("model.predictor_heads")
    if width % 4 or width % heads:
        _fail(f"model.predictor_width={width} must be divisible by 4 (2-D sin-cos position "
              f"embedding) and by model.predictor_heads={heads}.")
    every, period = get("checkpoint_every"), get("keep_period", 0)
    if period % every:
        _fail(f"keep_period={period} is not a multiple of checkpoint_every={every}: checkpoints "
              f"are written only at multiples of {every}, so only every "
              f"{math.lcm(period, every)}th step's would be kept; set keep_period to a multiple "
              f"of {every} (0: none).")
    first, num = get("profile.first_step", 0), get("profile.num_steps", 0)
    if num and not 1 <= first <= total:
        _fail(f"profile.first_step={first} with profile.num_steps={num}: steps run from 1 to "
              f"total_steps={total}, so no trace would be written; set profile.first_step in "
              "[1, total_steps] (or profile.num_steps=0).")
    lo, hi = get("input.min_objects", 1), get("input.max_objects", 4)
    if lo > hi:
        _fail(f"input.min_objects={lo} is above input.max_objects={hi}; set "
              "input.min_objects <= input.max_objects.")
    init_step, predictor = get("init_from.step", 0), get("init_from.predictor", False)
    if (init_step or predictor) and not get("init_from.workdir", ""):
        _fail(f"init_from.step={init_step}, init_from.predictor={predictor} but init_from.workdir "
              "is empty; set init_from.workdir to the run to start from, or leave "
              "init_from.step=0 and init_from.predictor=False.")
    _check_text(config, get)
    _check_grid_and_masks(config, get)
    _check_probe_data(config, get)


def _check_text(config, get) -> None:
    conditioning = get("model.conditioning")
    if conditioning == "none":
        return
    mlp = get("model.cond_mlp", "per_caption")
    if get("model.cond_pool", "outputs") == "attention" and mlp != "after_pool":
        _fail(f"model.cond_pool='attention' max-pools the captions' attention outputs before the "
              f"out-projection, so no per-caption token is left for model.cond_mlp={mlp!r}; set "
              "model.cond_mlp='after_pool' (the MLP once on the pooled token), or "
              "model.cond_pool='outputs'.")
    if get("input.source") == "tfds" and not (get("input.caption_key", "")
                                              or get("input.caption_file", "")):
        _fail(f"model.conditioning={conditioning!r} needs captions, but TFDS dataset "
              f"{get('input.tfds_name', '')!r} is read without any: set input.caption_file (a "
              "JSONL caption file, see docs/data.md) or input.caption_key (a caption feature), or "
              "train I-JEPA with model.conditioning='none'.")
    checkpoint, model_path = get("model.text_checkpoint", ""), get("tokenizer.model_path")
    if checkpoint:
        spiece = checkpoint.rstrip("/") + "/spiece.model"
        if model_path and model_path.rstrip("/") != spiece:
            _fail(f"model.text_checkpoint={checkpoint!r} brings its own tokenizer ({spiece}), "
                  f"but tokenizer.model_path={model_path!r} names another; set "
                  "tokenizer.model_path=\"\" (a T5 reads only the ids of its own tokenizer).")
    if get("model.text_features", "compute") == "precomputed":
        _check_precomputed_text(get)


def _check_precomputed_text(get) -> None:
    """What precomputed features (data/text_features.py) need: the records that carry them,
    their own captions, and the name of the T5 that made them (checked against the data)."""
    why = ("model.text_features='precomputed' reads the T5 features make_dataset "
           "--text_checkpoint stored with the records")
    other = "or set model.text_features='compute' (T5 in the step)."
    if get("input.source") != "array_record":
        _fail(f"{why}, but input.source={get('input.source')!r} has none: use "
              f"input.source='array_record' with shards written that way (docs/data.md), {other}")
    if get("input.caption_file", ""):
        _fail(f"{why}, which are the features of the records' own captions, but "
              f"input.caption_file={get('input.caption_file')!r} replaces those: set "
              f"input.caption_file='' (write the shards with that caption file instead), {other}")
    if not get("model.text_checkpoint", ""):
        _fail(f"{why}, and the run checks that they come from this config's T5: set "
              "model.text_checkpoint to the folder given to make_dataset --text_checkpoint (or "
              f"a copy of it), {other}")
    if get("model.text_trainable", False):
        _fail(f"{why}: features of a frozen T5, but model.text_trainable=True trains it; set "
              f"model.text_trainable=False, {other}")


def _check_grid_and_masks(config, get) -> None:
    encoder, size = get("model.encoder"), get("input.image_size")
    patch = vit_config(encoder)["patch_size"]
    if size % patch:
        _fail(f"input.image_size={size} is not a multiple of the patch size {patch} of "
              f"model.encoder={encoder!r}; use a multiple of {patch}, e.g. "
              f"{max(patch, round(size / patch) * patch)}.")
    probe_source = get("probe.source", "") or get("input.source")
    synthetic_probe = get("probe.enabled") and probe_source == "synthetic"
    if size < 16 and (get("input.source") == "synthetic" or synthetic_probe):
        _fail(f"input.image_size={size}: the synthetic scenes are drawn at 16 px or more; set "
              "input.image_size >= 16.")
    side = size // patch
    grid, patches = (side, side), side * side
    where = f"the {side}x{side} patch grid (input.image_size={size} / patch {patch})"
    masks = get("masks")
    keep = masks["min_keep"]
    if keep > patches:
        _fail(f"masks.min_keep={keep} is more than the {patches} patches of {where}; set "
              f"masks.min_keep <= {patches}.")
    scale, aspect = tuple(masks["target_scale"]), tuple(masks["target_aspect"])
    largest = mask_lib._area_bound(scale[1], aspect, grid, largest=True)
    if patches - largest < keep:
        _fail(f"masks.target_scale={scale}: with masks.target_aspect={aspect} a target block can "
              f"cover {largest} of the {patches} patches of {where}, leaving fewer than "
              f"masks.min_keep={keep} for the context; lower the larger target scale (or "
              "masks.min_keep).")
    cap = masks.get("max_context", 0)
    if 0 < cap < keep:
        _fail(f"masks.max_context={cap} is below masks.min_keep={keep}; set 0 (no cap) or at "
              f"least {keep}.")
    context = tuple(masks["context_scale"])
    room = min(mask_lib._area_bound(context[1], tuple(masks["context_aspect"]), grid, largest=True),
               patches - mask_lib._area_bound(scale[0], aspect, grid, largest=False))
    if room < keep:
        _fail(f"masks.context_scale={context}: a context block holds at most {room} patches of "
              f"{where} once a target block is removed, fewer than masks.min_keep={keep}; raise "
              "masks.context_scale or lower masks.min_keep or masks.target_scale.")
    try:  # anything else masks.py refuses
        mask_lib.MaskSpec.from_config(masks, grid)
    except ValueError as e:
        _fail(f"masks on {where}: {e}.")


def _check_probe_data(config, get) -> None:
    if not get("probe.enabled"):
        return
    names = tuple(get("probe.evaluators"))
    if not names:
        _fail("probe.evaluators=(): names no evaluator; name some of "
              f"{_evaluators()}, or set probe.enabled=False.")
    num_train, k = get("probe.num_train"), get("probe.knn_k", 20)
    if "knn" in names and k > num_train:
        _fail(f"probe.knn_k={k} is more than probe.num_train={num_train} (the kNN evaluator's "
              f"neighbours are probe-training images); set probe.knn_k <= {num_train}.")
    source = get("probe.source", "") or get("input.source")
    mask_key = get("probe.segmentation_key", "")
    if mask_key and source != "tfds":
        _fail(f"probe.segmentation_key={mask_key!r} names a TFDS feature, but the probe source is "
              f"{source!r}; set probe.source='tfds' (with probe.tfds_name) or "
              "probe.segmentation_key=''.")
    if source != "synthetic" and "grounding" in names:
        _fail(f"the grounding evaluator needs the synthetic scenes (which know what each patch "
              f"shows and each word names); probe source is {source!r}: remove 'grounding' "
              "from probe.evaluators.")
    if source != "synthetic":
        if "dense" in names and not mask_key:
            _fail(f"the dense evaluator needs per-pixel labels, which probe source {source!r} has "
                  "not: for a TFDS segmentation set, set probe.segmentation_key to its mask "
                  "feature; otherwise remove 'dense' from probe.evaluators (or set "
                  "probe.enabled=False).")
        image_level = [n for n in names if n != "dense"]
        if image_level and not (get("probe.label_key", "") or get("input.label_key", "")
                                or source == "array_record"):
            _fail(f"the evaluators {image_level} need image labels: set probe.label_key for probe "
                  f"source {source!r}, keep only 'dense' in probe.evaluators (with "
                  "probe.segmentation_key), or set probe.enabled=False.")
    if source == "synthetic":
        images = get("input.synthetic_size", 1_000_000)
        for field in ("probe.num_train", "probe.num_test"):
            if get(field) > images:
                _fail(f"{field}={get(field)} is more than the {images} synthetic images of a "
                      "split (input.synthetic_size); lower it or raise input.synthetic_size.")


# ---- Against the devices (experiment.setup) ----------------------------------------------

def check_devices(config, num_devices: int, num_processes: int = 1) -> dict:
    """The mesh over `num_devices` devices and the batch over its batch shards and the hosts;
    returns the mesh shape {axis: size}. Run after validate_config."""
    mesh = tuple(tuple(a) for a in config.mesh)
    sizes = [s for _, s in mesh]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and num_devices % fixed:
        _fail(f"mesh={mesh}: the fixed axis sizes multiply to {fixed}, which does not divide the "
              f"{num_devices} devices; choose sizes whose product divides {num_devices}.")
    if -1 not in sizes and fixed != num_devices:
        _fail(f"mesh={mesh} needs {fixed} devices (the product of its sizes), but the run has "
              f"{num_devices}; make the sizes multiply to {num_devices}, or set one axis to -1 "
              "(the remaining devices).")
    shape = {axis: 1 for axis in MESH_AXES}
    shape.update({a: (num_devices // fixed if s == -1 else s) for a, s in mesh})
    slices = _get(config, "mesh_slices", 1)
    if shape["data"] % slices:
        _fail(f"mesh_slices={slices} must divide the data axis ({shape['data']} devices with "
              f"mesh={mesh}); set mesh_slices to a divisor of {shape['data']}, or make the data "
              f"axis a multiple of {slices}.")
    batch, shards = config.batch_size, shape["data"] * shape["fsdp"]
    if batch % shards or batch % num_processes:
        _fail(f"batch_size={batch} must divide over the {shards} batch shards of the mesh "
              f"(data x fsdp = {shape['data']} x {shape['fsdp']}) and the {num_processes} hosts; "
              f"choose a multiple of {math.lcm(shards, num_processes)}.")
    accum = _get(config, "grad_accum", 1)
    if (batch // shards) % accum:
        _fail(f"grad_accum={accum}: each batch shard's {batch // shards} examples "
              f"(batch_size={batch} over {shards} shards) must split into {accum} equal "
              f"micro-batches; choose grad_accum >= 1 dividing {batch // shards}.")
    return shape
