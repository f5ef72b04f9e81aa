"""Non-finite steps (config.nonfinite, docs/reliability.md): the step's side and the host's.

The step's side (traced inside make_train_step, step.py): finite_update tells whether a step's
loss and gradients are finite, and count_nonfinite keeps the NONFINITE_COUNTERS in
TrainState.nonfinite. The host's side: NonfiniteWatch reads those counters where the host syncs
anyway (with the logged metrics, and before a checkpoint is saved), logs skipped steps and ends
the run with NonFiniteError when the counters say so.
"""

import jax
import jax.numpy as jnp
import optax
from absl import logging

from tcjepa_jax.config_lib import UserError


# ---- Options ---------------------------------------------------------------------------------

def nonfinite_options(config) -> tuple:
    """(action, max_skips_in_a_row) of config.nonfinite, checked."""
    options = config.get("nonfinite", {})
    action = options.get("action", "stop")
    max_skips = options.get("max_skips_in_a_row", 10)
    if action not in ("stop", "skip"):
        raise UserError(f"nonfinite.action={action!r}; choose 'stop' or 'skip'.")
    if not isinstance(max_skips, int) or max_skips < 1:
        raise UserError(f"nonfinite.max_skips_in_a_row={max_skips!r} must be an integer >= 1.")
    return action, max_skips


# ---- The step's side: finiteness and counters (traced) ---------------------------------------

# Counters of steps whose loss or gradients were not finite (NaN or Inf). Such a step leaves
# params, ema_params and opt_state untouched; only `step` advances (its batch is consumed).
#   total       such steps so far (over resumes: it is checkpointed)
#   in_a_row    length of the current run of consecutive such steps (0 after a finite step)
#   stop_step   0, or the step at which the run must stop (config.nonfinite): with action
#               "stop" the first non-finite step, with "skip" the step that made
#               max_skips_in_a_row in a row. Set once; train.py never checkpoints a state in
#               which it is set, so a checkpoint always has 0.
NONFINITE_COUNTERS = ("total", "in_a_row", "stop_step")


def nonfinite_counters():
    return {name: jnp.zeros((), jnp.int32) for name in NONFINITE_COUNTERS}


def finite_update(loss, grads) -> tuple:
    """(ok, global gradient norm): ok is whether the loss and every gradient are finite.

    One reduction serves both: a NaN or Inf anywhere in `grads` makes their global norm NaN or
    Inf. A norm that overflows float32 (a gradient norm above ~1.8e19, all entries finite)
    counts as non-finite too, which is what such a step is in all but name."""
    grad_norm = optax.tree.norm(grads)
    return jnp.isfinite(loss) & jnp.isfinite(grad_norm), grad_norm


def count_nonfinite(counters: dict, ok, step, limit: int) -> dict:
    """The NONFINITE_COUNTERS after step number `step` (1-based: state.step + 1), whose loss
    and gradients were finite iff `ok`; `limit` non-finite steps in a row latch stop_step
    (action "stop" is limit 1, "skip" is max_skips_in_a_row)."""
    bad = jnp.logical_not(ok).astype(jnp.int32)
    in_a_row = (counters["in_a_row"] + 1) * bad
    stop_step = jnp.where((counters["stop_step"] == 0) & (in_a_row >= limit),
                          jnp.asarray(step, jnp.int32), counters["stop_step"])
    return {"total": counters["total"] + bad, "in_a_row": in_a_row, "stop_step": stop_step}


# ---- The host's side -------------------------------------------------------------------------

class NonFiniteError(UserError, FloatingPointError):
    """The loss or the gradients stopped being finite (config.nonfinite); reported like a
    UserError: one message, no traceback."""


class NonfiniteWatch:
    """Reads the step's non-finite counters (TrainState.nonfinite, count_nonfinite) where
    the host syncs anyway: with the metrics, and before a checkpoint is saved (a few scalars).
    Logs skipped steps and ends the run with NonFiniteError when the counters say so."""

    def __init__(self, config, checkpointer, start_step: int, counters: dict):
        self.action, self.max_skips = nonfinite_options(config)
        self.checkpointer = checkpointer
        self.checked_step, self.seen_total = start_step, int(counters["total"])

    @staticmethod
    def metrics(counters: dict) -> dict:
        return {"nonfinite_skips": int(counters["total"]),
                "nonfinite_in_a_row": int(counters["in_a_row"])}

    def check_before_save(self, step: int, state):
        if step != self.checked_step:
            self.check(step, jax.device_get(state.nonfinite))

    def check(self, step: int, counters: dict):
        total, stop_step = int(counters["total"]), int(counters["stop_step"])
        if stop_step:
            raise self._error(stop_step, total)
        if total > self.seen_total:
            since = self.checked_step + 1
            logging.warning(
                "Skipped %d step(s) with a non-finite loss or gradients in %s (%d in a row now, "
                "%d in all; the run stops at nonfinite.max_skips_in_a_row=%d in a row).",
                total - self.seen_total, f"step {step}" if since == step else
                f"steps {since}-{step}", int(counters["in_a_row"]), total, self.max_skips)
        self.checked_step, self.seen_total = step, total

    def _error(self, stop_step: int, total: int) -> NonFiniteError:
        self.checkpointer.wait()  # a save in flight is a good one: let it complete
        steps = sorted(self.checkpointer.manager.all_steps())
        if self.action == "stop":
            first = stop_step
            what = (f"step {stop_step}: the loss or the gradients are not finite (NaN or Inf), "
                    "so the run stops (config.nonfinite.action='stop'). The step was not "
                    "applied and no checkpoint was written after it.")
        else:
            first = stop_step - self.max_skips + 1
            what = (f"steps {first}-{stop_step}: {self.max_skips} steps in a row had a "
                    "non-finite loss or gradients (NaN or Inf); each was skipped "
                    "(config.nonfinite.action='skip', "
                    f"max_skips_in_a_row={self.max_skips}; {total} skipped in all), so the "
                    "run stops.")
        good = [s for s in steps if s < first]
        if good:
            where = (f" The last good checkpoint is step {good[-1]} ({self.checkpointer.directory})"
                     + (f"; step {steps[-1]}, saved during the skipped steps, holds the "
                        f"parameters of step {first - 1}" if steps[-1] != good[-1] else "")
                     + f": rerunning the same command resumes from step {steps[-1]}.")
        else:
            where = (f" No checkpoint was written before step {first}: rerunning the same "
                     "command starts again from step 0.")
        return NonFiniteError(
            what + where + " It replays the same batches, so expect the same failure unless "
            "something changes: lower the learning rate (--config.optim.lr_peak), lengthen the "
            "warm-up (--config.optim.warmup_steps), or "
            + ("skip such steps (--config.nonfinite.action=skip)." if self.action == "stop"
               else "allow longer runs of skipped steps "
                    "(--config.nonfinite.max_skips_in_a_row)."))
