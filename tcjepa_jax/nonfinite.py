"""The host's side of non-finite steps (config.nonfinite; the step's side: step.py).

The step counts non-finite steps in TrainState.nonfinite; NonfiniteWatch reads those counters
where the host syncs anyway (with the logged metrics, and before a checkpoint is saved), logs
skipped steps and ends the run with NonFiniteError when the counters say so
(docs/reliability.md).
"""

import jax
from absl import logging

from tcjepa_jax import step as step_lib
from tcjepa_jax.config_lib import UserError


class NonFiniteError(UserError, FloatingPointError):
    """The loss or the gradients stopped being finite (config.nonfinite); reported like a
    UserError: one message, no traceback."""


class NonfiniteWatch:
    """Reads the step's non-finite counters (TrainState.nonfinite, step.count_nonfinite) where
    the host syncs anyway: with the metrics, and before a checkpoint is saved (a few scalars).
    Logs skipped steps and ends the run with NonFiniteError when the counters say so."""

    def __init__(self, config, checkpointer, start_step: int, counters: dict):
        self.action, self.max_skips = step_lib.nonfinite_options(config)
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
