"""Parameter-tree helpers shared by the export formats: one canonical (unrolled) layout and
flat "a/b/c" key names.

Checkpoints of `model.scan_layers=True` runs hold each layer stack as one module with a leading
"layers" axis (see tcjepa_jax/models/scan_params.py, which goes unrolled -> scanned); the
exporters first bring every tree to the unrolled layout, so an export does not depend on how the
run was compiled.
"""

import re

import numpy as np

from tcjepa_jax.models import scan_params

def _unstack(tree, depth: int) -> list:
    """A tree whose leaves have a leading axis of `depth` -> `depth` trees."""
    return [_map(lambda x, i=i: np.asarray(x)[i], tree) for i in range(depth)]


def _map(fn, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    return fn(tree)


def _depth(tree) -> int:
    while isinstance(tree, dict):
        tree = next(iter(tree.values()))
    return int(np.shape(tree)[0])


def unroll_blocks(tree: dict) -> dict:
    """Encoder or text tree: {"blocks": {"layer": stacked}} -> {"block_0", "block_1", ...}."""
    if "blocks" not in tree:
        return dict(tree)
    out = {k: v for k, v in tree.items() if k != "blocks"}
    stacked = tree["blocks"]["layer"]
    for i, layer in enumerate(_unstack(stacked, _depth(stacked))):
        out[f"block_{i}"] = layer
    return out


def unroll_predictor(tree: dict) -> dict:
    """Predictor tree, scanned ("layer_0"? + "layers"/"layer"/{block, cond?}) -> unrolled
    ("block_i", "cond_i"); an unrolled tree is returned as it is."""
    if "layers" not in tree and "layer_0" not in tree:
        return dict(tree)
    out = {k: v for k, v in tree.items() if k not in ("layers", "layer_0")}
    layers = [tree["layer_0"]] if "layer_0" in tree else []
    if "layers" in tree:
        stacked = tree["layers"]["layer"]
        layers += _unstack(stacked, _depth(stacked))
    for i, layer in enumerate(layers):
        out[f"block_{i}"] = layer["block"]
        if "cond" in layer:
            out[f"cond_{i}"] = layer["cond"]
    return out


def unrolled(params: dict) -> dict:
    """{"encoder", "predictor"?, "text"?} in either layout -> unrolled, numpy leaves."""
    out = {}
    for name, tree in params.items():
        if name == "predictor":
            out[name] = unroll_predictor(tree)
        else:
            out[name] = unroll_blocks(tree)
    return _map(np.asarray, out)


def scanned(params: dict, conditioning: str = None) -> dict:
    """Unrolled {"encoder", "predictor"?, "text"?} -> the scan_layers layout (numpy leaves).

    `conditioning` (config.model.conditioning) settles the one case the tree alone cannot: a
    one-layer predictor conditioned "first" keeps its layer apart ("layer_0", as
    Predictor._scanned_layers builds it)."""
    full = dict(params)
    full.setdefault("predictor", {})
    out = scan_params.scanned_from_unrolled(full, conditioning or "")
    if "predictor" not in params:
        out.pop("predictor")
    return _map(np.asarray, out)


def is_scanned(tree: dict) -> bool:
    return "blocks" in tree or "layers" in tree or "layer_0" in tree


def layer_count(tree: dict, prefix: str = "block") -> int:
    """Number of "<prefix>_i" modules in an unrolled tree."""
    return sum(1 for k in tree if re.fullmatch(rf"{prefix}_\d+", k))


# ---- Flat names ------------------------------------------------------------------------------

def flatten(tree: dict, prefix: str = "") -> dict:
    """{"a": {"b": x}} -> {"<prefix>/a/b": x} (no leading "/" without a prefix)."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict) -> dict:
    tree = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
