"""Progress lines (step, loss, images/s, ETA) and TensorBoard logs."""

import logging as logging_std
import os
import time

import jax
import numpy as np
from absl import logging


class _QuietLibraries(logging_std.Filter):
    """Drops INFO chatter of libraries (Orbax logs every save in detail) from the console."""

    def filter(self, record):
        return record.levelno >= logging_std.WARNING or "orbax" not in record.pathname


def quiet_library_logs():
    logging.get_absl_handler().addFilter(_QuietLibraries())


class Progress:
    """Throughput, MFU and ETA from wall time between log points (steps are asynchronous)."""

    def __init__(self, total_steps: int, batch_size: int, flops_per_step: float, start_step: int,
                 peak_flops_per_device: float | None = None):
        """flops_per_step: per device, as XLA's cost analysis reports it; peak: per device, from
        tcjepa_jax/chips.py or config.peak_flops_per_device (None: MFU is not logged)."""
        self.total_steps, self.batch_size, self.flops = total_steps, batch_size, flops_per_step
        self.peak = peak_flops_per_device
        self._last_step, self._last_time = start_step, None

    def update(self, step: int, now: float | None = None) -> dict:
        now = time.time() if now is None else now
        if self._last_time is None:  # The first step includes warm-up; time from here on.
            self._last_step, self._last_time = step, now
            return {}
        steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
        self._last_step, self._last_time = step, now
        out = {
            "step_time_s": 1.0 / max(steps_per_s, 1e-9),
            "images_per_s": steps_per_s * self.batch_size,
            # XLA's cost analysis of an SPMD program counts one device's share.
            "tflops_per_s_per_device": steps_per_s * self.flops / 1e12,
            "eta_s": (self.total_steps - step) / max(steps_per_s, 1e-9),
        }
        if self.peak:
            out["mfu"] = steps_per_s * self.flops / self.peak
        return out


class Profiler:
    """A jax.profiler trace of steps [profile.first_step, + profile.num_steps) on process 0,
    written under workdir/tensorboard (TensorBoard's Profile tab shows it)."""

    def __init__(self, config, workdir: str):
        profile = config.get("profile", {})
        self.first = int(profile.get("first_step", 0))
        self.last = self.first + int(profile.get("num_steps", 0)) - 1
        self.enabled = self.last >= self.first > 0 and jax.process_index() == 0
        self.log_dir = os.path.join(workdir, "tensorboard")
        self.options = jax.profiler.ProfileOptions()
        self.options.python_tracer_level = int(bool(profile.get("python_tracer", False)))
        self.active = False

    def before(self, step: int):
        if self.enabled and step == self.first:
            jax.profiler.start_trace(self.log_dir, profiler_options=self.options)
            self.active = True

    def after(self, step: int, state):
        if self.active and step == self.last:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            logging.info("Wrote a profile of steps %d-%d to %s (TensorBoard, Profile tab).",
                         self.first, self.last, self.log_dir)


def _format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _by_kind(scalars: dict, prefix: str) -> str:
    kinds = [f"{k[len(prefix):]} {int(v)}" for k, v in sorted(scalars.items()) if k.startswith(prefix)]
    return f" ({', '.join(kinds)})" if kinds else ""


class MetricWriter:
    """Logs a one-line summary to the console and every scalar to TensorBoard (process 0)."""

    def __init__(self, workdir: str, config):
        self.total_steps = config.total_steps
        self._tb = None
        if jax.process_index() == 0:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(f"{workdir}/tensorboard")

    def write(self, step: int, metrics: dict):
        scalars = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
        if self._tb is not None:
            for name, value in scalars.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        line = f"step {step}/{self.total_steps}"
        for name in ("loss", "loss_pred", "loss_sparse", "loss_consistency", "o_frac_pos/layer0"):
            if name in scalars:
                line += f" | {name} {scalars[name]:.4f}"
        if "monitor/target_rank" in scalars:
            line += (f" | target std {scalars['monitor/target_std']:.3g}, "
                     f"rank {scalars['monitor/target_rank']:.1f}")
        if "images_per_s" in scalars:
            if "mfu" in scalars:
                line += f" | MFU {scalars['mfu']:.1%}"
            line += (f" | {scalars['images_per_s']:.1f} img/s"
                     f" | ETA {_format_eta(scalars['eta_s'])}")
        if scalars.get("bad_records") or scalars.get("dropped_captions"):
            line += f" | bad records {int(scalars.get('bad_records', 0))}" + _by_kind(scalars, "bad_records/")
            line += f", dropped captions {int(scalars.get('dropped_captions', 0))}" + _by_kind(
                scalars, "dropped_captions/")
        if any(k.startswith("eval") for k in scalars) and "loss" not in scalars:
            return
        logging.info(line)

    def close(self):
        if self._tb is not None:
            self._tb.close()
