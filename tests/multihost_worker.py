"""One process of test_multihost.py's multi-host runs (not a test module).

    python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT TOKENIZER WORKDIR STOP_AT OUT

Joins the other processes through jax.distributed (gloo collectives on CPU), each with
8 / NUM_PROCESSES CPU devices, and trains test_train's tiny config in WORKDIR: to the end, or
saving and exiting after step STOP_AT (> 0), as on preemption, or (STOP_AT < 0) for 10000 steps,
until the test sends SIGTERM. Writes the final metrics to OUT.
"""

import json
import os
import sys

process_id, num_processes, port = (int(a) for a in sys.argv[1:4])
tokenizer, workdir, stop_at, out = sys.argv[4], sys.argv[5], int(sys.argv[6]), sys.argv[7]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={8 // num_processes}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
from absl import logging  # noqa: E402

from tcjepa_jax import checkpoint as ckpt_lib  # noqa: E402
from tcjepa_jax import distributed, train  # noqa: E402

import test_train  # noqa: E402  (tests/ is sys.path[0]: this script's folder)

logging.set_verbosity(logging.INFO)
# One cache for both launches of a test (preempted, resumed): the resumed run compiles nothing.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(workdir), "xla_cache"))
if num_processes > 1:
    assert distributed.initialize(f"localhost:{port}", num_processes, process_id)
assert jax.device_count() == 8 and jax.process_count() == num_processes
config = test_train.tiny_config(tokenizer)
if stop_at > 0:
    ckpt_lib.Checkpointer.preempted = lambda self, step: step == stop_at
elif stop_at < 0:  # a long run that the test ends with a real SIGTERM to one host
    config.total_steps, config.checkpoint_every = 10_000, 10_000
try:
    metrics = train.train(config, workdir)
except SystemExit:
    metrics = {}
with open(out, "w") as f:
    json.dump({k: float(v) for k, v in metrics.items() if k in ("loss", "bad_records")}, f)
