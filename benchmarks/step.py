"""Train-step throughput of TC-JEPA next to I-JEPA mode on the same config.

    python benchmarks/step.py [--config=configs/synthetic_tiny.py] [--steps=10] [--config.KEY=VALUE]

Prints images/s, FLOPs per step from XLA's cost analysis, achieved FLOP/s as a fraction of a
matmul peak measured in this same process, and the TC-JEPA / I-JEPA ratios. Inputs are one
real batch from the pipeline, reused, so the numbers are the step alone.
"""

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tcjepa_jax import optim, step as step_lib, sharding as shard_lib  # noqa: E402
from tcjepa_jax.config_lib import DEFAULT_CONFIG  # noqa: E402
from tcjepa_jax.data import pipeline  # noqa: E402
from tcjepa_jax.experiment import setup  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per mode (after one warm-up step).")


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, repeats: int = 10) -> float:
    """FLOP/s of a large square matmul on the default device: the roofline we compare to."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0)


def measure(config, workdir: str, steps: int) -> dict:
    mesh, tokenizer, models, source = setup(config, workdir)
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    state = step_lib.create_train_state(models, config, tx, shardings)
    data = pipeline.make_train_iterator(config, tokenizer, models.mask_spec, source=source)
    batch = shard_lib.make_global_batch(next(data), shard_lib.batch_sharding(mesh))
    train_step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh),
                                         shardings, mesh)
    compiled = train_step.lower(state, batch).compile()
    flops = step_lib.compiled_flops(compiled)  # per device
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - t0) / steps
    return {"images_per_s": config.batch_size / seconds, "flops": flops,
            "flops_per_s": flops / seconds}


def main(argv):
    del argv
    config = _CONFIG.value
    dtype = jnp.dtype(config.model.dtype)
    peak = matmul_peak_flops(dtype=dtype)  # one device, as the step's FLOPs are per device
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for mode in ("all", "none"):
            mode_config = config.copy_and_resolve_references()
            mode_config.model.conditioning = mode
            results["TC-JEPA" if mode == "all" else "I-JEPA"] = measure(
                mode_config, tmp, _STEPS.value)
    print(f"config {config.name}: batch {config.batch_size}, encoder {config.model.encoder}, "
          f"{config.model.dtype}, {jax.device_count()} x {jax.devices()[0].device_kind}")
    print(f"matmul peak measured here: {peak / 1e9:.1f} GFLOP/s per device")
    for name, r in results.items():
        print(f"{name:8s} {r['images_per_s']:8.1f} img/s  {r['flops'] / 1e9:8.2f} GFLOP/step/device  "
              f"{r['flops_per_s'] / 1e9:7.1f} GFLOP/s/device  = {r['flops_per_s'] / peak:.1%} of peak")
    tc, ij = results["TC-JEPA"], results["I-JEPA"]
    print(f"TC-JEPA / I-JEPA: step FLOPs x{tc['flops'] / ij['flops']:.2f}, "
          f"images/s x{tc['images_per_s'] / ij['images_per_s']:.2f}, "
          f"FLOP/s x{tc['flops_per_s'] / ij['flops_per_s']:.2f}")


if __name__ == "__main__":
    app.run(main)
