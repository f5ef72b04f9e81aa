"""Pretrain a TC-JEPA (or I-JEPA) image encoder.

    python -m tcjepa_jax.train [--config=configs/F.py[:ARGS]] [--workdir=DIR] [--config.KEY=VALUE]

With no flags it trains the embedded default (configs/synthetic_tiny.py) into
runs/synthetic_tiny. A workdir that holds checkpoints is resumed from its latest one.
"""

import json
import os
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging

from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax import chips
from tcjepa_jax import distributed
from tcjepa_jax import evaluation
from tcjepa_jax import flops as flops_lib
from tcjepa_jax import host_memory
from tcjepa_jax import monitors
from tcjepa_jax import optim
from tcjepa_jax import paths
from tcjepa_jax import resume
from tcjepa_jax import sharding as shard_lib
from tcjepa_jax import step as step_lib
from tcjepa_jax.config_lib import UserError, config_value, define_config_flag, parse_flags, run_command
from tcjepa_jax.experiment import setup
from tcjepa_jax.data import pipeline
from tcjepa_jax.metrics import MetricWriter, Profiler, Progress
from tcjepa_jax.nonfinite import NonfiniteWatch

_CONFIG = define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config.name>.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "Multi-host: host:port of process 0 (the same on every host); "
    "empty = found from the environment (TPU pods, SLURM) or a single-host run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "Multi-host: this process's id.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "Resume a workdir even though the given config changes the "
    "experiment (model, data, masks, loss, schedule, batch) against its checkpoint's config.")


# Written by process 0 when a run has reached config.total_steps.
FINAL_METRICS = "final_metrics.json"


# ---- Train -----------------------------------------------------------------------------------

def train(config, workdir: str, allow_config_change: bool = False) -> dict:
    """Trains to config.total_steps (resuming if possible); returns the final metrics.

    allow_config_change: resume even if the checkpoint's config differs in fields that change
    the experiment (resume.py).
    """
    # Before the CPU backend starts its threads (host_memory.py).
    host_memory.configure(config.host_malloc)
    workdir = paths.absolute(workdir)
    paths.makedirs(workdir)
    logging.info("Run %s in %s.", config.name, workdir)
    mesh, tokenizer, models, source = setup(config, workdir)
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    _log_model(config, mesh, models, shardings)
    train_step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh),
                                         shardings, mesh)
    batch_sharding = shard_lib.batch_sharding(mesh)

    def make_iterator(start: int):
        return pipeline.make_train_iterator(
            config, tokenizer, models.mask_spec, source=source, start=start,
            process_index=jax.process_index(), process_count=jax.process_count())

    logging.info("Training data: %s, %d worker processes.", source, config.input.workers)
    checkpointer = ckpt_lib.Checkpointer(workdir, config)
    checkpointer.install_sigterm_handler()
    # The newest readable checkpoint, or step 0 (from config.init_from's weights if set).
    abstract = ckpt_lib.abstract_like(jax.eval_shape(
        lambda: step_lib.create_train_state(models, config, tx, shardings)), shardings)
    state, data_iter, start_step, data_start = resume.resume_or_start(
        checkpointer, config, abstract_state=abstract,
        new_state=lambda: step_lib.create_train_state(models, config, tx, shardings),
        make_iterator=make_iterator, allow_config_change=allow_config_change)

    writer = MetricWriter(workdir, config)
    metrics = {}
    if start_step < config.total_steps:
        batch = shard_lib.make_global_batch(next(data_iter), batch_sharding)
        t0 = time.time()
        logging.info("Compiling the train step...")
        compiled = train_step.lower(state, batch).compile()
        flops = _step_flops(compiled, config, models, mesh)
        logging.info("Compiled the train step in %.1fs (%.3g FLOPs per step and device).",
                     time.time() - t0, flops)
        peak = chips.peak_flops(config, jax.devices()[0]) if flops > 0 else None
        progress = Progress(config.total_steps, config.batch_size, flops, start_step, peak)
        profiler = Profiler(config, workdir)
        periodic_eval = evaluation.PeriodicEvaluator(config, workdir, models, writer, tokenizer)
        collapse = monitors.CollapseWatch(config.get("monitor", {}).get("collapse_fraction", 0))
        nonfinite = NonfiniteWatch(config, checkpointer, start_step,
                                   jax.device_get(state.nonfinite))

        try:
            for step in range(start_step + 1, config.total_steps + 1):
                profiler.before(step)
                state, step_metrics = compiled(state, batch)
                profiler.after(step, state)
                last = step == config.total_steps
                if step % config.log_every == 0 or last or step == start_step + 1:
                    metrics, counters = jax.device_get((step_metrics, state.nonfinite))
                    metrics.update(progress.update(step), **data_iter.counter.metrics(),
                                   **nonfinite.metrics(counters))
                    writer.write(step, metrics)
                    collapse.update(step, metrics)
                    nonfinite.check(step, counters)
                periodic_eval.maybe_run(step, state)
                preempted = checkpointer.preempted(step)
                if last or preempted or checkpointer.manager.should_save(step):
                    nonfinite.check_before_save(step, state)  # never save past a stop
                checkpointer.save(step, state, data_iter, config, force=last or preempted,
                                  data_start=data_start)
                if preempted:
                    periodic_eval.close()
                    checkpointer.wait()
                    writer.close()
                    checkpointer.close()
                    logging.warning("Preempted: saved step %d, exiting.", step)
                    sys.exit(0)
                if not last:
                    batch = shard_lib.make_global_batch(next(data_iter), batch_sharding)
        except BaseException:
            checkpointer.wait_after_error()  # a save in flight completes before the exit
            raise
        periodic_eval.close()
        checkpointer.wait()
    else:
        logging.info("Already trained to step %d.", start_step)

    if config.probe.enabled:
        results = evaluation.final_evaluation(config, workdir, models,
                                              evaluation.encoder_params(state, config),
                                              config.total_steps,
                                              evaluation.model_params(state, config), tokenizer)
        metrics.update(results)
        writer.write(config.total_steps, results)
    writer.close()
    checkpointer.close()
    _write_final_metrics(workdir, config, metrics)
    logging.info("Done. Checkpoints: %s; TensorBoard: tensorboard --logdir %s",
                 checkpointer.directory, os.path.join(workdir, "tensorboard"))
    return metrics


def _write_final_metrics(workdir: str, config, metrics: dict):
    """workdir/final_metrics.json: the run reached total_steps (launch/sweep.py reads it to
    skip finished runs and to tabulate results)."""
    if jax.process_index() != 0:
        return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    paths.write_text(os.path.join(workdir, FINAL_METRICS), json.dumps(
        {"name": config.name, "step": config.total_steps, "metrics": scalars}, indent=2))


def _step_flops(compiled, config, models, mesh) -> float:
    """FLOPs per step and device; counted on the unrolled step when the compiled one loops over
    layers or micro-batches (XLA counts a loop body once; tcjepa_jax/flops.py)."""
    if not flops_lib.needs_unrolled_count(config):
        return step_lib.compiled_flops(compiled)
    try:
        vocab = models.text.vocab_size if models.text is not None else 0
        return flops_lib.unrolled_step_flops(config, vocab, dict(mesh.shape))
    except RuntimeError as e:
        logging.warning("TFLOP/s and MFU are not logged: %s", e)
        return 0.0


def _log_model(config, mesh, models, shardings):
    sizes = jax.tree.map(lambda s: s.shape, jax.eval_shape(
        lambda: step_lib.init_params(models, config, jax.random.key(0))))
    counts = {name: sum(int(np.prod(shape)) for shape in jax.tree.leaves(
        tree, is_leaf=lambda x: isinstance(x, tuple))) for name, tree in sizes.items()}
    logging.info("Devices: %d x %s, mesh %s. Parameters: %s.", jax.device_count(),
                 jax.devices()[0].device_kind, dict(mesh.shape),
                 ", ".join(f"{name} {count / 1e6:.2f}M" for name, count in counts.items()))


def main(argv):
    del argv
    config = config_value(_CONFIG)
    run_command(join_and_train, config, _WORKDIR.value or os.path.join("runs", config.name))


def join_and_train(config, workdir: str) -> dict:
    try:
        distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    except ValueError as e:
        raise UserError(str(e)) from e
    return train(config, workdir, _ALLOW_CONFIG_CHANGE.value)


def run():
    """Console-script entry point (tcjepa-train)."""
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
