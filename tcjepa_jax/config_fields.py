"""What every field of configs/common.py may hold: `FIELDS` (type, range or choices) and
`check_fields`, which checks a config against it.

check_fields reports names not in common.py (with the nearest known name), wrong types and values
out of range, each as one ValueError that names the field, shows its value and says what to
change; also for configs built in Python, which ml_collections lets through in part (a bool where
an int belongs, None, a tuple of the wrong length). A field missing from a config is not checked
(older configs, e.g. restored from a checkpoint, lack the newer fields; the code reads those with
defaults). Checks of fields against each other and against the devices: config_checks.py.
tests/test_config_validation.py feeds every field a wrong type and an out-of-range value, and
fails on a field of common.py without an entry here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
from typing import Any, Callable, Optional

from tcjepa_jax.caption_control import CAPTION_CONTROLS
from tcjepa_jax.data.sources import available_sources
from tcjepa_jax.data.synthetic import BACKGROUNDS, MAX_OBJECT_SCALE, NUM_CLASSES
from tcjepa_jax.data.text_features import MODES as TEXT_FEATURE_MODES
from tcjepa_jax.host_memory import HOST_MALLOC
from tcjepa_jax.models.attention import ATTENTION_IMPLS
from tcjepa_jax.models.layers import REMAT_POLICIES
from tcjepa_jax.models.penalties import PENALTIES
from tcjepa_jax.models.predictor import COND_ATTENTION, COND_MLP, COND_POOL, CONDITIONING
from tcjepa_jax.models.text import T5_SIZES
from tcjepa_jax.models.vit import vit_config
from tcjepa_jax.sharding import BATCH_AXES, MESH_AXES

# The logical axis names the models declare (models/, sharding.py), which sharding_rules maps.
LOGICAL_AXES = ("embed", "text_embed", "mlp", "heads", "kv", "vocab", "patch", "relpos_buckets",
                "layers", "act_batch", "act_len", "act_embed", "act_mlp", "act_heads", "act_kv")
# Image-level tasks of the synthetic scenes ("patch" is accepted and ignored, older configs).
PROBE_TASKS = tuple(NUM_CLASSES) + ("patch",)
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class Field:
    """What one field may hold. kind: int | float | bool | str | pair (two numbers, min <= max)
    | names (a tuple of strings) | mesh | rules."""
    kind: str
    low: Optional[float] = None         # bounds of a number, or of both numbers of a pair
    high: Optional[float] = None
    open_low: bool = False              # low itself is out of range
    open_high: bool = False
    choices: Any = ()                   # allowed strings (str, names), or a function giving them
    nonempty: bool = False              # str, names: "" / () is not allowed
    also: tuple = ()                    # values accepted besides (older configs)
    check: Optional[Callable[[Any], Optional[str]]] = None  # what is wrong beyond type/range
    hint: str = ""                      # why, appended to the message

    def allowed(self) -> tuple:
        return tuple(self.choices() if callable(self.choices) else self.choices)


def _int(low=None, high=None, **kw) -> Field:
    return Field("int", low, high, **kw)


def _num(low=None, high=None, **kw) -> Field:
    return Field("float", low, high, **kw)


def _pair(low=None, high=None, **kw) -> Field:
    return Field("pair", low, high, **kw)


def _choice(choices, **kw) -> Field:
    return Field("str", choices=choices, **kw)


def _evaluators() -> tuple:
    from tcjepa_jax.evaluators import available_evaluators  # lazy, as config_lib does
    return available_evaluators()


def _vit_variant(value) -> Optional[str]:
    try:
        vit_config(value)
    except ValueError:
        return ("must be '<size>/<patch>' with a size of models/vit.py's VIT_SIZES and a positive "
                "integer patch, e.g. 'B/16'")
    return None


_BOOL, _STR, _NONEMPTY = Field("bool"), Field("str"), Field("str", nonempty=True)
_FRACTION = _pair(0, 1, open_low=True)
_SEED = _int(0, 2**32 - 1)

# Every field of configs/common.py get_base_config(), in its order.
FIELDS = {
    "name": _NONEMPTY,
    "seed": _SEED,
    "batch_size": _int(1),
    "grad_accum": _int(1),
    "total_steps": _int(1),
    "log_every": _int(1),
    "checkpoint_every": _int(1),
    "keep_checkpoints": _int(1),
    "keep_period": _int(0, hint="0 keeps no checkpoint for good"),
    "nonfinite.action": _choice(("stop", "skip")),
    "nonfinite.max_skips_in_a_row": _int(1),
    "init_from.workdir": _STR,
    "init_from.step": _int(0, hint="0 takes the latest checkpoint"),
    "init_from.predictor": _BOOL,
    "peak_flops_per_device": _num(0, hint="FLOP/s; 0 takes the chip's from chips.py"),
    "profile.first_step": _int(0),
    "profile.num_steps": _int(0, hint="0 turns profiling off"),
    "profile.python_tracer": _BOOL,
    "host_malloc": _choice(HOST_MALLOC),
    "input.source": _choice(available_sources),
    "input.split": _NONEMPTY,
    "input.data_dir": _STR,
    "input.tfds_name": _STR,
    "input.image_key": _STR,
    "input.caption_key": _STR,
    "input.id_key": _STR,
    "input.label_key": _STR,
    "input.caption_file": _STR,
    "input.skip_uncaptioned": _BOOL,
    "input.caption_control": _choice(CAPTION_CONTROLS),
    "input.image_size": _int(1, hint="pixels, a multiple of the encoder's patch size"),
    "input.crop_scale": _FRACTION,
    "input.num_captions": _int(1),
    "input.max_caption_len": _int(2, hint="tokens per caption: at least one piece and the "
                                          "end-of-sequence id"),
    "input.synthetic_size": _int(1),
    "input.seed": _SEED,
    "input.min_objects": _int(1, 9),
    "input.max_objects": _int(1, 9),
    "input.object_scale": _num(0.25, MAX_OBJECT_SCALE),
    "input.background": _choice(BACKGROUNDS),
    "input.workers": _int(0, hint="0 decodes in the training process"),
    "input.num_threads": _int(0),
    "input.prefetch": _int(0),
    "tokenizer.model_path": _STR,
    "tokenizer.vocab_size": _int(32, 1_000_000, hint="a SentencePiece vocabulary holds every "
                                                     "character of the captions"),
    "masks.num_targets": _int(1),
    "masks.target_scale": _FRACTION,
    "masks.target_aspect": _pair(0, open_low=True),
    "masks.context_scale": _FRACTION,
    "masks.context_aspect": _pair(0, open_low=True),
    "masks.min_keep": _int(1),
    "masks.max_context": _int(0, hint="0: no cap"),
    "masks.max_target": _int(0, hint="0: no cap"),
    "model.encoder": Field("str", check=_vit_variant),
    "model.remat": _choice(REMAT_POLICIES, also=(True, False)),
    "model.scan_layers": _BOOL,
    "model.predictor_width": _int(4),
    "model.predictor_depth": _int(1),
    "model.predictor_heads": _int(1),
    "model.conditioning": _choice(CONDITIONING),
    "model.cond_mlp_ratio": _num(0, open_low=True),
    "model.cond_mlp": _choice(COND_MLP),
    "model.cond_attention": _choice(COND_ATTENTION),
    "model.cond_pool": _choice(COND_POOL, hint="attention needs model.cond_mlp='after_pool'"),
    "model.text_pack_rows": _int(0, hint="rows of packed captions per image; 0: off"),
    "model.text_features": _choice(TEXT_FEATURE_MODES, hint="precomputed reads the T5 features "
                                   "make_dataset --text_checkpoint stored with the records"),
    "model.text": _choice(tuple(T5_SIZES)),
    "model.text_checkpoint": _STR,
    "model.text_trainable": _BOOL,
    "model.text_vocab_size": _int(0, hint="0 takes the tokenizer's size"),
    "model.dtype": _choice(DTYPES),
    "model.attention": _choice(ATTENTION_IMPLS),
    "loss.pred": _choice(("smooth_l1", "l2")),
    "loss.sparse_weight": _num(0),
    "loss.consistency_weight": _num(0),
    "loss.penalty": _choice(PENALTIES),
    "loss.target_norm_eps": _num(0, open_low=True),
    "optim.lr_start": _num(0),
    "optim.lr_peak": _num(0, open_low=True),
    "optim.lr_end": _num(0),
    "optim.warmup_steps": _int(0),
    "optim.b1": _num(0, 1, open_high=True),
    "optim.b2": _num(0, 1, open_high=True),
    "optim.wd_start": _num(0, open_low=True, hint="the weight-decay ramp is multiplicative"),
    "optim.wd_end": _num(0),
    "optim.ema_start": _num(0, 1),
    "optim.ema_end": _num(0, 1),
    "optim.mu_dtype": _choice(DTYPES),
    "mesh": Field("mesh"),
    "mesh_slices": _int(1),
    "sharding_rules": Field("rules"),
    "monitor.enabled": _BOOL,
    "monitor.collapse_fraction": _num(0, 1, open_high=True, hint="0 never warns"),
    "probe.enabled": _BOOL,
    "probe.evaluators": Field("names", choices=_evaluators),
    "probe.every": _int(0, hint="0 evaluates only at the end"),
    "probe.encoder": _choice(("target", "context")),
    "probe.source": _choice(lambda: ("",) + available_sources(), hint="'' reads input.source"),
    "probe.data_dir": _STR,
    "probe.tfds_name": _STR,
    "probe.label_key": _STR,
    "probe.segmentation_key": _STR,
    "probe.segmentation_ignore": _int(),
    "probe.train_split": _NONEMPTY,
    "probe.test_split": _NONEMPTY,
    "probe.num_train": _int(1),
    "probe.num_test": _int(1),
    "probe.tasks": Field("names", choices=PROBE_TASKS, nonempty=True),
    "probe.batch_size": _int(1),
    "probe.knn_k": _int(1),
    "probe.knn_temperature": _num(0, open_low=True),
    "probe.dense_images": _int(1),
    "probe.attentive_steps": _int(1),
    "probe.attentive_lr": _num(0, open_low=True),
    "probe.grounding_images": _int(1),
}
SECTIONS = sorted({name.rsplit(".", 1)[0] for name in FIELDS if "." in name})


# ---- One field -------------------------------------------------------------------------------

def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, numbers.Real) and not isinstance(v, bool)
            and (isinstance(v, numbers.Integral) or math.isfinite(v)))


def _seq(v) -> bool:
    return isinstance(v, (tuple, list))


def _within(field: Field, v) -> bool:
    if field.low is not None and (v < field.low or (field.open_low and v == field.low)):
        return False
    return field.high is None or not (v > field.high or (field.open_high and v == field.high))


def _bounds(field: Field, pair: bool = False) -> str:
    """' >= 1', ' in [0, 1)', or for a pair ' with 0 < min <= max <= 1'."""
    fmt = (lambda b: str(int(b))) if field.kind == "int" else (lambda b: f"{b:g}")
    low = None if field.low is None else fmt(field.low)
    high = None if field.high is None else fmt(field.high)
    lo_op, hi_op = ("<" if field.open_low else "<="), ("<" if field.open_high else "<=")
    if pair:
        return " with " + " ".join(filter(None, (low and f"{low} {lo_op}", "min <= max",
                                                 high and f"{hi_op} {high}")))
    if low is not None and high is not None:
        return f" in {'(' if field.open_low else '['}{low}, {high}{')' if field.open_high else ']'}"
    if low is not None:
        return f" {'>' if field.open_low else '>='} {low}"
    return f" {hi_op} {high}" if high is not None else ""


def describe(field: Field) -> str:
    """What the field must be, e.g. 'an integer >= 1'."""
    choices = ", ".join(repr(c) for c in field.allowed() + field.also)
    text = {
        "int": "an integer" + _bounds(field),
        "float": "a finite number" + _bounds(field),
        "bool": "True or False",
        "str": (f"one of {choices}" if field.choices else
                "a non-empty string" if field.nonempty else "a string"),
        "pair": "a (min, max) pair of numbers" + _bounds(field, pair=True),
        "names": (f"a tuple of distinct names from {choices}"
                  + (", at least one" if field.nonempty else "")),
        "mesh": "a tuple of (axis, size) pairs, e.g. (('data', -1), ('fsdp', 1), ('tensor', 1))",
        "rules": ("a tuple of (logical axis, mesh axes) pairs, e.g. (('embed', 'fsdp'), "
                  "('kv', None))"),
    }[field.kind]
    return text + (f" ({field.hint})" if field.hint else "")


def field_problem(field: Field, value) -> Optional[str]:
    """None if `value` suits `field`, else what it must be."""
    if any(value is a for a in field.also):
        return None
    kind = field.kind
    if kind == "int":
        ok = _is_int(value) and _within(field, value)
    elif kind == "float":
        ok = _is_num(value) and _within(field, value)
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "str":
        ok = (isinstance(value, str) and bool(value or not field.nonempty)
              and (not field.choices or value in field.allowed()))
    elif kind == "pair":
        ok = (_seq(value) and len(value) == 2 and all(_is_num(v) and _within(field, v)
                                                       for v in value) and value[0] <= value[1])
    elif kind == "names":
        ok = (_seq(value) and all(isinstance(v, str) for v in value)
              and len(set(value)) == len(value) and bool(value or not field.nonempty)
              and set(value) <= set(field.allowed()))
    elif kind == "mesh":
        return _mesh_problem(value)
    elif kind == "rules":
        return _rules_problem(value)
    else:
        raise AssertionError(kind)
    if not ok:
        return "must be " + describe(field)
    return field.check(value) if field.check else None


def _mesh_problem(mesh) -> Optional[str]:
    if not (_seq(mesh) and all(_seq(a) and len(a) == 2 and isinstance(a[0], str)
                               and _is_int(a[1]) for a in mesh)):
        return "must be " + describe(FIELDS["mesh"])
    names, sizes = [a for a, _ in mesh], [s for _, s in mesh]
    for name in names:
        if name not in MESH_AXES:
            return (f"has the axis {name!r}; the mesh axes are {MESH_AXES}: 'data' and 'fsdp' "
                    "(the batch is split over both) and optionally 'tensor'")
        if names.count(name) > 1:
            return f"names the axis {name!r} twice; name each axis once"
    for name in BATCH_AXES:
        if name not in names:
            return (f"lacks the axis {name!r}; name both 'data' and 'fsdp' (size 1 when unused) "
                    "and optionally 'tensor'")
    for name, size in zip(names, sizes):
        if size < 1 and size != -1:
            return (f"gives the axis {name!r} size {size}; use a size >= 1, or -1 for the "
                    "remaining devices")
    if sizes.count(-1) > 1:
        return (f"has {sizes.count(-1)} axes of size -1; at most one axis may take the remaining "
                "devices: give the others their sizes")
    return None


def _rules_problem(rules) -> Optional[str]:
    if not (_seq(rules) and all(_seq(r) and len(r) == 2 for r in rules)):
        return "must be " + describe(FIELDS["sharding_rules"])
    for logical, target in rules:
        if logical not in LOGICAL_AXES:
            near = difflib.get_close_matches(str(logical), LOGICAL_AXES, n=1)
            return (f"maps the logical axis {logical!r}, which no model declares"
                    + (f" (did you mean {near[0]!r}?)" if near else "")
                    + f"; the logical axes are {LOGICAL_AXES}")
        axes = (target,) if isinstance(target, str) else () if target is None else target
        if not (_seq(axes) and all(a in MESH_AXES for a in axes) and len(set(axes)) == len(axes)):
            return (f"maps {logical!r} to {target!r}; use None (replicated), one of the mesh axes "
                    f"{MESH_AXES}, or a tuple of distinct ones")
    return None


# ---- Every field -------------------------------------------------------------------------

def _short(value, limit: int = 100) -> str:
    text = repr(tuple(value) if isinstance(value, list) else value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_section(value) -> bool:
    return hasattr(value, "items") and hasattr(value, "keys")


def _unknown(path: str) -> str:
    near = difflib.get_close_matches(path, list(FIELDS) + SECTIONS, n=1, cutoff=0.6)
    return (f"{path}: configs/common.py has no such field"
            + (f" (did you mean {near[0]!r}?)" if near else "")
            + "; correct the name or remove the field.")


def check_fields(config, prefix: str = "") -> None:
    """Every field of `config` is known, of its type and within its range (FIELDS)."""
    for key, value in config.items():
        path = prefix + str(key)
        if path in SECTIONS:
            if not _is_section(value):
                children = [n for n in FIELDS if n.startswith(path + ".")]
                raise ValueError(f"{path}={_short(value)}: must be a group of fields "
                                 f"({', '.join(children[:4])}, ...), not one value; set its "
                                 f"fields, e.g. {children[0]}.")
            check_fields(value, path + ".")
        elif path in FIELDS:
            problem = field_problem(FIELDS[path], value)
            if problem:
                raise ValueError(f"{path}={_short(value)}: {problem}.")
        else:
            raise ValueError(_unknown(path))
