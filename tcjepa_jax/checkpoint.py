"""Orbax checkpoints of the train state, the data iterator and the config.

One CheckpointManager per run (maxtext style): asynchronous saves every `checkpoint_every`
steps, the latest `keep_checkpoints` kept, a save forced on preemption (SIGTERM or the TPU
preemption notice), and restore straight into the sharded layout of the running job.
"""

import json
import os
import signal
import threading

import grain
import jax
import orbax.checkpoint as ocp

from tcjepa_jax import paths
from tcjepa_jax.config_lib import UserError


class Checkpointer:
    def __init__(self, workdir: str, config):
        self.directory = paths.absolute(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=config.checkpoint_every,
            max_to_keep=config.keep_checkpoints,
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data", "config"))
        self._preempted = threading.Event()

    # ---- Preemption ------------------------------------------------------------------------
    def install_sigterm_handler(self):
        """SIGTERM (what schedulers send before killing a job) asks for a save at the next step."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._preempted.set())

    def preempted(self, step: int) -> bool:
        return self._preempted.is_set() or self.manager.reached_preemption(step)

    # ---- Save / restore --------------------------------------------------------------------
    def latest_step(self):
        return self.manager.latest_step()

    def save(self, step: int, state, data_iterator, config, force: bool = False) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
        )
        return self.manager.save(step, args=args, force=force)

    def restore(self, step: int, abstract_state, data_iterator):
        """Restores into `abstract_state`'s shardings and sets the iterator's position."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator),
        ))
        return restored.state

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config

    def restore_state_only(self, step: int, abstract_state):
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state))).state

    def restore_items(self, step: int, abstract_items: dict) -> dict:
        """Only some items of the saved train state, e.g. {"ema_params": abstract tree}: the rest
        (optimizer state, the other encoder) is never read."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_items)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_items, restore_args=restore_args, partial_restore=True))).state

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def existing_step(manager, directory: str, step=None) -> int:
    """`step`, checked to be among the checkpoints under `directory`, or the latest one; a
    UserError saying what to do otherwise (the evaluate, export and plot commands)."""
    steps = sorted(manager.all_steps())
    if not steps:
        raise UserError(f"no checkpoint under {directory}; train first "
                        f"(python -m tcjepa_jax.train --workdir={os.path.dirname(directory)}).")
    if step is None:
        return steps[-1]
    if step not in steps:
        raise UserError(f"no checkpoint of step {step} under {directory}; there are {steps}.")
    return step


def abstract_like(state_shapes, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring into a new mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state_shapes, shardings)
