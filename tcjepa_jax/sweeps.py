"""Sweeps: a config file's `get_sweep(arg)` lists runs as dicts of config overrides.

    # in configs/F.py
    from tcjepa_jax import sweeps

    def get_sweep(arg):
        return sweeps.product(
            sweeps.axis("model.conditioning", ["all", "first", "caption", "none"]),
            sweeps.zip_(sweeps.axis("loss.sparse_weight", [0.0, 0.1]),
                        sweeps.axis("loss.consistency_weight", [0.0, 0.5])),
            sweeps.axis("seed", [0, 1, 2]))

Keys are config fields without the leading "config." (as big_vision's `get_hyper` sweeps
are). `python launch/sweep.py --config=configs/F.py[:ARGS]` expands the list into runs; this
module holds what it needs that is not about launching: the axis helpers, run names, the
command-line form of an override, and the check that every override names a real field and
gives a valid config, made before anything is launched.
"""

import hashlib
import itertools
import re

import ml_collections

from tcjepa_jax.config_lib import validate_config


# ---- Building sweeps -------------------------------------------------------------------------

def axis(key: str, values) -> list:
    """One field taking each value in turn: [{key: v0}, {key: v1}, ...]."""
    return [{key: value} for value in values]


def product(*sweeps) -> list:
    """Every combination: the first sweep varies slowest."""
    return [_merge(points) for points in itertools.product(*sweeps)]


def zip_(*sweeps) -> list:
    """Points taken together: the i-th run merges the i-th point of every sweep."""
    lengths = {len(s) for s in sweeps}
    if len(lengths) > 1:
        raise ValueError(f"sweeps.zip_ needs sweeps of one length; got lengths {sorted(lengths)}.")
    return [_merge(points) for points in zip(*sweeps)]


def chain(*sweeps) -> list:
    """One sweep after another (e.g. an ablation grid plus a baseline)."""
    return [dict(point) for s in sweeps for point in s]


def _merge(points) -> dict:
    merged = {}
    for point in points:
        for key, value in point.items():
            if key in merged and merged[key] != value:
                raise ValueError(f"sweep axes set {key} twice ({merged[key]!r} and {value!r}).")
            merged[key] = value
    return merged


# ---- Names and command lines -----------------------------------------------------------------

def flag_value(value) -> str:
    """A value as ml_collections' config flags parse it: strings as they are, the rest as
    Python literals (tuples, numbers, booleans)."""
    return value if isinstance(value, str) else repr(value)


def override_flags(overrides: dict) -> list:
    return [f"--config.{key}={flag_value(value)}" for key, value in overrides.items()]


def run_names(points: list) -> list:
    """A short, stable, unique name per run, derived from its overrides only (not its position
    in the list), so re-running a sweep finds the same workdirs: `conditioning=first_seed=1`.
    Fields are named by their last component unless two fields of the sweep share it; names
    longer than 80 characters end in a hash of the overrides."""
    keys = {k for point in points for k in point}
    short = {k: k.rsplit(".", 1)[-1] for k in keys}
    clashes = {s for s in short.values() if list(short.values()).count(s) > 1}
    names = []
    for point in points:
        parts = [f"{short[k] if short[k] not in clashes else k}={_slug(flag_value(v))}"
                 for k, v in point.items()]
        name = "_".join(parts) or "base"
        if len(name) > 80:
            digest = hashlib.sha1(repr(sorted(point.items())).encode()).hexdigest()[:8]
            name = name[:71] + "-" + digest
        names.append(name)
    seen = {}
    for i, name in enumerate(names):
        if name in seen:
            raise ValueError(f"sweep runs {seen[name]} and {i} have the same overrides "
                             f"({points[i]}); every run must differ.")
        seen[name] = i
    return names


def _slug(text: str) -> str:
    text = re.sub(r"[()\[\] ]", "", text).replace(",", "-")
    return re.sub(r"[^A-Za-z0-9_.=+-]", "", text)


# ---- Checking a sweep before anything runs ---------------------------------------------------

def apply_overrides(config: ml_collections.ConfigDict, overrides: dict):
    """A copy of `config` with the overrides set; ValueError naming an unknown field (with the
    nearest existing names) or a value of the wrong type."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for i, part in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                raise ValueError(_unknown(key, ".".join(parents[:i + 1]), config))
            node = node[part]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise ValueError(_unknown(key, key, config))
        try:
            setattr(node, leaf, value)
        except TypeError as e:
            raise ValueError(f"sweep override {key}={value!r}: {e}") from None
    return config


def check_sweep(config: ml_collections.ConfigDict, points: list) -> list:
    """Applies and validates every run's overrides; returns the run configs, or raises
    ValueError naming the first bad run."""
    configs = []
    for i, point in enumerate(points):
        if not isinstance(point, dict):
            raise ValueError(f"get_sweep must return a list of dicts; item {i} is {point!r}.")
        run_config = apply_overrides(config, point)
        try:
            validate_config(run_config)
        except ValueError as e:
            raise ValueError(f"sweep run {i} ({point}): {e}") from None
        configs.append(run_config)
    return configs


def _unknown(key: str, missing: str, config) -> str:
    import difflib
    fields = _field_names(config)
    near = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(near)}?" if near else ""
    return f"sweep override {key!r}: the config has no field {missing!r}.{hint}"


def _field_names(config, prefix: str = "") -> list:
    names = []
    for key, value in config.items():
        name = prefix + key
        names.append(name)
        if isinstance(value, ml_collections.ConfigDict):
            names.extend(_field_names(value, name + "."))
    return names
