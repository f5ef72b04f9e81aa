"""Between unrolled and scanned (config.model.scan_layers) parameter layouts.

Unrolled, layer i of a stack is a module "<name>_i"; scanned, the stack is one module
"<name>s" whose "layer" holds every parameter with a leading axis of the layers. The predictor
groups "block_i" and "cond_i" into one scanned PredictorLayer ("layers"/"layer"/{block, cond});
with conditioning "first" its conditioned layer 0 stays apart, as "layer_0".
"""

import re

import jax
import jax.numpy as jnp

_LAYER = re.compile(r"^(block|cond)_(\d+)$")


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def scanned_from_unrolled(params: dict, conditioning: str = "") -> dict:
    """{"encoder", "predictor", "text"?} params, unrolled -> scanned (unboxed arrays).

    `conditioning` (config.model.conditioning) is needed only for a one-layer predictor, whose
    unrolled tree looks the same under "all" and "first" but is scanned differently."""
    out = dict(params)
    out["encoder"] = _blocks(params["encoder"])
    if "text" in params:
        out["text"] = _blocks(params["text"])
    out["predictor"] = _predictor(params["predictor"], conditioning)
    return out


def _blocks(tree: dict) -> dict:
    depth = sum(1 for name in tree if re.match(r"^block_\d+$", name))
    rest = {k: v for k, v in tree.items() if not re.match(r"^block_\d+$", k)}
    return {**rest, "blocks": {"layer": _stack([tree[f"block_{i}"] for i in range(depth)])}}


def _predictor(tree: dict, conditioning: str = "") -> dict:
    rest = {k: v for k, v in tree.items() if not _LAYER.match(k)}
    depth = sum(1 for name in tree if name.startswith("block_"))
    conds = sorted(int(_LAYER.match(n).group(2)) for n in tree if n.startswith("cond_"))
    layers = [{"block": tree[f"block_{i}"], **({"cond": tree[f"cond_{i}"]} if i in conds else {})}
              for i in range(depth)]
    if conds == [0] and (depth > 1 or conditioning == "first"):  # conditioning "first"
        rest["layer_0"] = layers.pop(0)
    if layers:
        rest["layers"] = {"layer": _stack(layers)}
    return rest
