"""Where a run starts: its newest readable checkpoint, another run's weights, or step 0.

A restart must neither silently start over nor silently change the experiment
(docs/reliability.md):
- Checkpoints are tried newest first. One that cannot be read (killed mid-save, truncated,
  files missing) is logged with the reason and, once an older one has restored, moved to
  workdir/damaged_checkpoints/. If checkpoints exist and none can be read the run stops: it
  never starts from step 0 next to checkpoints.
- The saved config is compared with the given one. A field that changes the experiment stops
  the run with the list of differences, unless the user says --allow_config_change; fields of
  RESTART_SAFE are logged and allowed.
- A checkpoint written by a different number of hosts restores the train state (Orbax lays it
  out on any mesh), and the data stream continues at the global record the old hosts had
  reached, summed from their saved iterator states.
- A run without checkpoints starts at step 0, from config.init_from's weights if set.
"""

import json
import os
from typing import Any, Callable, NamedTuple

import jax
from absl import logging

from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax.config_lib import UserError

# Fields that may change between restarts of one run: how it is logged, checkpointed,
# evaluated, laid out on devices and fed, not what it computes. A name covers its sub-fields.
RESTART_SAFE = (
    "name", "log_every", "checkpoint_every", "keep_checkpoints", "keep_period",
    "peak_flops_per_device", "profile", "monitor", "probe", "mesh", "mesh_slices",
    "sharding_rules", "grad_accum", "model.remat", "model.scan_layers", "input.workers",
    "input.num_threads", "input.prefetch", "nonfinite", "init_from", "host_malloc",
    # Other ways to compute the same step (docs/method.md, section 9).
    "model.cond_attention", "model.text_pack_rows", "model.attention",
)
_ABSENT = "<absent>"


class Start(NamedTuple):
    state: Any           # TrainState, sharded
    data_iter: Any       # positioned where the restored step left the data
    step: int            # the last completed step (0: a fresh run)
    data_start: int      # global records skipped when data_iter was built (saved with each step)


# ---- Resume or start -----------------------------------------------------------------------

def resume_or_start(checkpointer: ckpt_lib.Checkpointer, config, *, abstract_state,
                    new_state: Callable[[], Any], make_iterator: Callable[[int], Any],
                    allow_config_change: bool = False) -> Start:
    steps = checkpointer.all_steps()
    if not steps:
        state = new_state()
        if config.init_from.get("workdir"):
            state = init_from(config, state, abstract_state)
        return Start(state, make_iterator(0), 0, 0)

    failures = {}
    for step in reversed(steps):
        try:
            saved, meta = checkpointer.restore_config(step), checkpointer.restore_meta(step)
        except Exception as e:  # pylint: disable=broad-except
            failures[step] = _reason(e)
            logging.warning("Checkpoint %d is unreadable (%s); trying an older one.", step,
                            failures[step])
            continue
        check_config(saved, config, step, allow_config_change)
        check_layout(saved, config)
        data_iter = None
        try:
            hosts = int(meta.get("process_count", jax.process_count()))
            if hosts == jax.process_count():
                data_start = int(meta.get("data_start", 0))
                data_iter = make_iterator(data_start)
                state = checkpointer.restore(step, abstract_state, data_iter)
            else:
                data_start, counts = rederive_data_start(checkpointer.data_states(step), hosts)
                state = checkpointer.restore(step, abstract_state)
                data_iter = make_iterator(data_start)
                if jax.process_index() == 0:  # the old hosts' counts continue on process 0
                    data_iter.counter.set_state(counts)
                logging.warning(
                    "Checkpoint %d was written by %d hosts, this run has %d: the data stream "
                    "continues at global record %d, the sum of the records the old hosts had read "
                    "(docs/reliability.md).", step, hosts, jax.process_count(), data_start)
        except Exception as e:  # pylint: disable=broad-except
            _close(data_iter)
            failures[step] = _reason(e)
            logging.warning("Checkpoint %d cannot be restored (%s); trying an older one.", step,
                            failures[step])
            continue
        if failures:
            where = checkpointer.set_aside(sorted(failures))
            logging.warning("Resumed from step %d, the newest readable checkpoint. Unreadable and "
                            "moved to %s: %s.", step, where,
                            "; ".join(f"step {s}: {r}" for s, r in sorted(failures.items())))
        else:
            logging.info("Resumed from %s at step %d.", checkpointer.directory, step)
        return Start(state, data_iter, step, data_start)

    raise UserError(
        f"{checkpointer.directory} holds checkpoints of steps {steps}, but none can be read: "
        + "; ".join(f"step {s}: {r}" for s, r in sorted(failures.items()))
        + ". Not starting from step 0 next to them: repair or move away the checkpoints "
        "directory (or use another --workdir) to start over.")


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"


def _close(data_iter):
    if data_iter is not None and hasattr(data_iter, "close"):
        data_iter.close()


# ---- Changed experiments ----------------------------------------------------------------

def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def config_changes(saved: dict, config) -> tuple[dict, dict]:
    """({field: (saved, given)} that change the experiment, {...} that do not)."""
    old, new = _flatten(saved), _flatten(json.loads(config.to_json()))
    # A field added to configs/common.py after the checkpoint was written had its default then.
    from configs.common import get_base_config
    defaults = _flatten(json.loads(get_base_config().to_json()))
    old.update({k: defaults[k] for k in new.keys() - old.keys() if k in defaults})
    changed = {k: (old.get(k, _ABSENT), new.get(k, _ABSENT)) for k in sorted(old.keys() | new.keys())
               if old.get(k, _ABSENT) != new.get(k, _ABSENT)}
    safe = {k: v for k, v in changed.items()
            if any(k == f or k.startswith(f + ".") for f in RESTART_SAFE)}
    return {k: v for k, v in changed.items() if k not in safe}, safe


def check_config(saved: dict, config, step: int, allow_change: bool):
    experiment, safe = config_changes(saved, config)
    for key, (old, new) in safe.items():
        logging.info("Config change on resume (allowed): %s: %s -> %s", key, old, new)
    if not experiment:
        return
    listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in experiment.items())
    if allow_change:
        logging.warning("Resuming step %d with an experiment-changing config "
                        "(--allow_config_change): %s", step, listing)
        return
    raise UserError(
        f"the checkpoint of step {step} was trained with another experiment; these fields "
        f"differ (checkpoint -> given): {listing}. Resume with the checkpoint's values, use a "
        "new --workdir for a new experiment, or pass --allow_config_change to continue this run "
        "with the new values on purpose.")


def check_layout(saved: dict, config):
    """Scanned and unrolled layers store parameters differently: say so instead of failing
    deep inside Orbax (models/scan_params.py converts parameter trees between the two)."""
    was = bool(saved.get("model", {}).get("scan_layers", False))
    if was != bool(config.model.get("scan_layers", False)):
        raise UserError(
            f"The checkpoint was written with model.scan_layers={was}, this run has "
            f"model.scan_layers={not was}; their parameters are laid out differently. Resume "
            f"with --config.model.scan_layers={was}, or start a new workdir.")


# ---- A different number of hosts ----------------------------------------------------------

def rederive_data_start(states: dict, hosts: int) -> tuple[int, dict]:
    """(global record to continue at, the old hosts' bad-record counts merged) from every old
    host's saved iterator state. Each host counts the records it read ("seen", skipped ones
    included, since the start of the run), so their sum is the position in the global stream:
    exact when the hosts read equally many, otherwise within the difference."""
    found = sorted(i for i, n in states if n == hosts)
    if found != list(range(hosts)):
        raise ValueError(f"the data positions of hosts {sorted(set(range(hosts)) - set(found))} "
                         f"of {hosts} are missing")
    counts = [states[(i, hosts)]["counts"] for i in range(hosts)]
    merged = {"seen": sum(int(c.get("seen", 0)) for c in counts), "skipped": {}, "dropped": {}}
    for c in counts:
        for kind in ("skipped", "dropped"):
            for k, v in c.get(kind, {}).items():
                merged[kind][k] = merged[kind].get(k, 0) + int(v)
    return merged["seen"], merged


# ---- Another run's weights (config.init_from) ---------------------------------------------

def init_from(config, state, abstract_state):
    """`state` with the encoders (and with init_from.predictor, the predictor and the text
    encoder) of init_from.workdir's checkpoint; optimizer state and step stay fresh."""
    source = ckpt_lib.reader(config.init_from.workdir)
    step = ckpt_lib.existing_step(source.manager, source.directory,
                                  config.init_from.get("step") or None)
    names = ["encoder"] + (["predictor", "text"] if config.init_from.get("predictor") else [])
    names = [n for n in names if n in abstract_state.params]
    import orbax.checkpoint as ocp
    saved = ocp.StandardCheckpointer().metadata(
        os.path.join(source.directory, str(step), "state")).item_metadata.tree
    wanted = {"params": {n: abstract_state.params[n] for n in names},
              "ema_params": abstract_state.ema_params}
    _check_shapes(wanted, saved, config.init_from.workdir, step)
    restored = source.restore_items(step, wanted)
    source.close()
    params = dict(state.params, **restored["params"])
    logging.info("Initialised %s and the target encoder from %s, step %d (optimizer state and "
                 "step start fresh).", ", ".join(names), config.init_from.workdir, step)
    return state.replace(params=params, ema_params=restored["ema_params"])


def _check_shapes(wanted, saved, workdir: str, step: int):
    problems = []
    saved_leaves = dict(jax.tree_util.tree_flatten_with_path(saved)[0])
    for path, leaf in jax.tree_util.tree_flatten_with_path(wanted)[0]:
        name = jax.tree_util.keystr(path)
        if path not in saved_leaves:
            problems.append(f"{name} is not in it")
        elif tuple(saved_leaves[path].shape) != tuple(leaf.shape):
            problems.append(f"{name}: {tuple(saved_leaves[path].shape)} there, "
                            f"{tuple(leaf.shape)} here")
    if problems:
        raise UserError(
            f"config.init_from: the checkpoint of step {step} in {workdir} does not match this "
            f"config's model: {'; '.join(problems[:10])}"
            + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else "")
            + ". Use the same model.* sizes as that run.")
