"""Orbax checkpoints of the train state, the data iterator and the config.

One CheckpointManager per run (maxtext style): asynchronous saves every `checkpoint_every`
steps, the newest `keep_checkpoints` kept plus every `keep_period`-th step for good, a save
forced on preemption (SIGTERM or the TPU preemption notice), and restore straight into the
sharded layout of the running job. Each step's checkpoint holds four items:

    state   the TrainState (Orbax PyTree, sharded)
    data    each host's Grain iterator state, process_<i>-of-<n>.json
    config  the run's config as JSON
    meta    {"process_count", "data_start"}: how the data stream was laid out (resume.py)

A save that fails (disk full, permissions) raises CheckpointError: the run stops instead of
training on without checkpoints (docs/reliability.md).
"""

import functools
import json
import os
import shutil
import signal
import threading
import time

import grain
import jax
from absl import logging
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies
from orbax.checkpoint._src.metadata import array_metadata_store  # no public alias

from tcjepa_jax import paths
from tcjepa_jax.config_lib import UserError

ITEMS = ("state", "data", "config", "meta")

# Orbax splits every replicated array among its replicas so that each writes a part, slicing it
# with a jitted op compiled per shape. For the many small arrays of a train state (norms, biases)
# that compile costs more than the write it shares out, so only arrays whose per-replica part
# would be at least this large are split; smaller ones are written whole by one replica.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


@functools.cache  # once per process: Orbax logs a warning on every override
def _register_array_handler():
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
            array_metadata_store=array_metadata_store.Store()),  # as Orbax's default handler
        override=True)


def reader(workdir: str) -> "Checkpointer":
    """A read-only Checkpointer of workdir's checkpoints (Checkpointer's `read_only`)."""
    import ml_collections
    return Checkpointer(workdir, ml_collections.ConfigDict(
        {"checkpoint_every": 1, "keep_checkpoints": None}), read_only=True)


class CheckpointError(UserError):
    """A checkpoint could not be written: the run stops rather than train on unprotected."""


class Checkpointer:
    def __init__(self, workdir: str, config, read_only: bool = False):
        """`read_only`: a reader (evaluate, plot, init_from; export has its own) of a run
        that may still be training; it neither saves nor deletes, and in particular leaves
        alone the temporary directory of a save in progress, which the run's own clean-up
        would remove."""
        self.directory = paths.absolute(os.path.join(workdir, "checkpoints"))
        keep_last, keep_period = config.get("keep_checkpoints"), config.get("keep_period", 0)
        keep = [policies.LatestN(keep_last) if keep_last else policies.PreserveAll()]
        if keep_period:
            keep.append(policies.EveryNSteps(keep_period))
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else config.checkpoint_every,
            create=not read_only,
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=True,
            cleanup_tmp_directories=not read_only,   # what a save killed half-way left behind
            read_only=read_only,
        )
        _register_array_handler()
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self._preempted = threading.Event()

    # ---- Preemption ------------------------------------------------------------------------
    def install_sigterm_handler(self):
        """SIGTERM (what schedulers send before killing a job) asks for a save at the next step.

        One process: a Python handler sets a flag. Several: JAX's preemption service (started
        by jax.distributed.initialize) catches SIGTERM on any host and makes every host reach
        the same sync step (manager.reached_preemption), so all save that step and exit
        together; a Python handler would replace its handler and leave the other hosts
        training while this one exits."""
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self._preempted.set())

    def preempted(self, step: int) -> bool:
        return self._preempted.is_set() or self.manager.reached_preemption(step)

    # ---- Save ------------------------------------------------------------------------------
    def save(self, step: int, state, data_iterator, config, force: bool = False,
             data_start: int = 0) -> bool:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
            meta=ocp.args.JsonSave({"process_count": jax.process_count(),
                                    "data_start": int(data_start)}),
        )
        try:  # also raises the error of the previous, asynchronous save
            return self.manager.save(step, args=args, force=force)
        except Exception as e:  # pylint: disable=broad-except
            raise self._save_failed(e) from e

    def wait(self):
        """Blocks until pending saves are written; raises CheckpointError if one failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            raise self._save_failed(e) from e

    def wait_after_error(self):
        """wait() on the way out of a failing run: a save in flight completes; an error of the
        save itself is logged, not raised over the run's own."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # pylint: disable=broad-except
            logging.error("%s", self._save_failed(e))

    def _save_failed(self, error: Exception) -> CheckpointError:
        good = self.manager.latest_step()
        return CheckpointError(
            f"saving a checkpoint to {self.directory} failed: {type(error).__name__}: "
            f"{str(error)[:500]}. The run stops instead of training on without checkpoints. "
            "Free disk space or fix the directory's permissions, then restart the same command: "
            + (f"it resumes from step {good}, the newest complete checkpoint." if good is not None
               else "no checkpoint was completed, so it starts from step 0."))

    # ---- Restore ---------------------------------------------------------------------------
    def all_steps(self) -> list:
        return sorted(self.manager.all_steps())

    def latest_step(self):
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restores into `abstract_state`'s shardings and, given an iterator, sets its position."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**items)).state

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(
            config=ocp.args.JsonRestore())).config

    def restore_meta(self, step: int) -> dict:
        """The step's data layout; {} for a checkpoint without one."""
        if not (epath.Path(self.directory) / str(step) / "meta").exists():
            return {}
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore())).meta

    def data_states(self, step: int) -> dict:
        """Every host's saved iterator state: {(process_index, process_count): state}."""
        states = {}
        for f in (epath.Path(self.directory) / str(step) / "data").glob("process_*-of-*.json"):
            index, count = f.name[len("process_"):-len(".json")].split("-of-")
            states[(int(index), int(count))] = json.loads(f.read_text())
        return states

    def restore_items(self, step: int, abstract_items: dict) -> dict:
        """Only some items of the saved train state, e.g. {"ema_params": abstract tree}: the rest
        (optimizer state, the other encoder) is never read."""
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_items)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=abstract_items, restore_args=restore_args, partial_restore=True))).state

    def set_aside(self, steps) -> str:
        """Moves unreadable checkpoints to workdir/damaged_checkpoints/ (process 0; kept for
        inspection, out of the way of the steps that will be saved again)."""
        target = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
        if jax.process_index() == 0:
            paths.makedirs(target)
            for step in steps:
                src = os.path.join(self.directory, str(step))
                dst = os.path.join(target, f"{step}.{time.strftime('%Y%m%d-%H%M%S')}")
                if paths.is_url(self.directory):
                    epath.Path(src).rename(dst)
                else:
                    shutil.move(src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("tcjepa_jax: damaged checkpoints set aside")
        self.manager.reload()
        return target

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
