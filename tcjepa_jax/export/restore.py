"""Reads what an export needs from a run's Orbax checkpoint, and nothing else.

Only the requested subtrees of the train state are read (Orbax partial restore: the target is a
tree of just the wanted parameters, `partial_restore=True`); the optimizer state, the data
iterator and the other encoder stay on disk. Arrays come back as host numpy arrays, so a
checkpoint written by any mesh (or any number of hosts) restores on one CPU, and no model,
mesh or data pipeline is built. The checkpoint directory is opened read-only.
"""

import os

import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from tcjepa_jax import paths
from tcjepa_jax.checkpoint import existing_step
from tcjepa_jax.config_lib import UserError
from tcjepa_jax.export.layout import _map

# What each export needs from TrainState, as paths into its saved tree.
TARGET = ("ema_params",)               # the target encoder f̄ (EMA), the one kept after training
CONTEXT = ("params", "encoder")        # the context encoder f
PREDICTOR = ("params", "predictor")
TEXT = ("params", "text")


class CheckpointReader:
    """Read-only view of workdir/checkpoints: steps, the saved config, parameter subtrees."""

    def __init__(self, workdir: str):
        self.directory = paths.absolute(os.path.join(workdir, "checkpoints"))
        if not paths.exists(self.directory):
            raise UserError(f"no checkpoint under {self.directory}: is --workdir a training "
                            "run's directory (python -m tcjepa_jax.train --workdir=DIR)?")
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "config"),
            options=ocp.CheckpointManagerOptions(read_only=True),
            item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()})

    def step(self, step=None) -> int:
        """`step`, checked to exist, or the latest one."""
        return existing_step(self.manager, self.directory, step)

    def config(self, step: int) -> ml_collections.ConfigDict:
        raw = self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config
        return ml_collections.ConfigDict(raw)

    def restore(self, step: int, *wanted: tuple) -> dict:
        """{path: numpy tree} for each wanted path (e.g. TARGET) present in the checkpoint;
        a path the checkpoint lacks (TEXT in I-JEPA runs) is left out."""
        saved = self.manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        if saved is None:
            raise UserError(f"checkpoint {self.directory}/{step} has no train state.")
        item, found = {}, []
        for path in wanted:
            node = saved
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            if node is None:
                continue
            found.append(path)
            parent = item
            for key in path[:-1]:
                parent = parent.setdefault(key, {})
            parent[path[-1]] = node
        if not item:
            return {}
        restore_args = _map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
        state = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))).state
        out = {}
        for path in found:
            node = state
            for key in path:
                node = node[key]
            out[path] = _map(np.asarray, node)
        return out

    def close(self):
        self.manager.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

