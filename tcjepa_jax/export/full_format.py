"""Every trained module in one safetensors file, and back (`save_full`, `load_full`).

Keys are "<group>/<Flax parameter path>" in the unrolled layout (layer i of a stack is the
module "block_i" / "cond_i", whatever `model.scan_layers` was), float32, with the Flax shapes
unchanged:

  context_encoder   the context encoder f, TrainState.params["encoder"]
                    e.g. context_encoder/block_0/attn/query/kernel
  target_encoder    the target encoder f̄ (EMA), TrainState.ema_params
                    e.g. target_encoder/norm/scale
  predictor         the predictor and its text conditioners, params["predictor"]
                    e.g. predictor/cond_0/k/kernel
  text_encoder      the T5 encoder, params["text"] (absent in I-JEPA runs)
                    e.g. text_encoder/shared/embedding

The run config travels as JSON twice: in the safetensors metadata ("config") and in
FILE.config.json beside the file (FILE without its .safetensors suffix). `load_full` rebuilds
the parameter trees in the config's layout, leaf for leaf equal to what was saved.
"""

import json
import os

import ml_collections
import numpy as np

from tcjepa_jax import paths
from tcjepa_jax.export import layout

FORMAT = "tcjepa-full"
VERSION = 1
# group name in the file -> (TrainState field, key inside it or None)
GROUPS = {
    "context_encoder": ("params", "encoder"),
    "target_encoder": ("ema_params", None),
    "predictor": ("params", "predictor"),
    "text_encoder": ("params", "text"),
}


def sidecar(path: str, suffix: str) -> str:
    """FILE.safetensors -> FILE<suffix> (FILE<suffix> for any other name)."""
    root, ext = os.path.splitext(path)
    return (root if ext == ".safetensors" else path) + suffix


def flatten_state(params: dict, ema_params: dict) -> dict:
    """TrainState.params and .ema_params (either layout) -> {key: float32 array}."""
    trees = layout.unrolled(dict(params))
    trees["ema"] = layout.unrolled({"encoder": ema_params})["encoder"]
    flat = {}
    for group, (field, key) in GROUPS.items():
        tree = trees["ema"] if field == "ema_params" else trees.get(key)
        if tree is not None:
            flat.update(layout.flatten(tree, group))
    return {k: _float32(v, k) for k, v in flat.items()}


def _float32(x, name):
    x = np.asarray(x)
    if x.dtype.kind in "biuc":  # floats (bfloat16 included) only
        raise ValueError(f"parameter {name} has dtype {x.dtype}, expected a float.")
    return np.ascontiguousarray(x, np.float32)


def save_full(path: str, params: dict, ema_params: dict, config, step=None) -> list:
    """Writes FILE (safetensors) and FILE.config.json; returns the paths written."""
    from safetensors.numpy import save

    config_json = config.to_json() if hasattr(config, "to_json") else json.dumps(config)
    flat = flatten_state(params, ema_params)
    meta = {"format": FORMAT, "version": str(VERSION), "config": config_json,
            "step": "" if step is None else str(int(step)),
            "groups": ",".join(g for g in GROUPS if any(k.startswith(g + "/") for k in flat))}
    write_bytes(path, save(flat, metadata=meta))
    side = sidecar(path, ".config.json")
    write_bytes(side, (json.dumps({
        "format": FORMAT, "version": VERSION, "step": step, "config": json.loads(config_json),
        "keys": {k: list(v.shape) for k, v in sorted(flat.items())}}, indent=1) + "\n").encode())
    return [path, side]


def write_bytes(path: str, data: bytes):
    """Local files through a temporary file and a rename (no half-written file); URLs as is."""
    if paths.is_url(path):
        from etils import epath
        epath.Path(path).write_bytes(data)
        return
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_full(path: str, scan=None):
    """-> (config, {"params": {"encoder", "predictor", "text"?}, "ema_params": {...}}).

    The trees have step.init_params' structure for that config (unboxed; the scanned layout
    when config.model.scan_layers, unless `scan` says otherwise) with float32 numpy leaves."""
    from safetensors.numpy import load

    data = paths.read_bytes(path)
    flat = load(data)
    meta = _metadata(data)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a tcjepa full export (metadata format="
                         f"{meta.get('format')!r}; a timm export loads with timm instead).")
    config = ml_collections.ConfigDict(json.loads(meta["config"]))
    groups = {g: {} for g in GROUPS}
    for key, value in flat.items():
        group, _, rest = key.partition("/")
        if group not in groups or not rest:
            raise ValueError(f"{path}: unexpected key {key!r}.")
        groups[group][rest] = value
    params = {GROUPS[g][1]: layout.unflatten(v) for g, v in groups.items()
              if v and GROUPS[g][0] == "params"}
    ema = layout.unflatten(groups["target_encoder"])
    if scan is None:
        scan = bool(config.model.get("scan_layers", False))
    if scan:
        params = layout.scanned(params, config.model.get("conditioning"))
        ema = layout.scanned({"encoder": ema})["encoder"]
    return config, {"params": params, "ema_params": ema}


def _metadata(data: bytes) -> dict:
    """The "__metadata__" of a safetensors file (its JSON header)."""
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]).get("__metadata__", {}) or {}
