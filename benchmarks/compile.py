"""Compile time, FLOPs and memory of a config's train step, unrolled vs nn.scan, on this host.

    python benchmarks/compile.py [--config=configs/in1k_vit_h14.py] [--batch=2] [--config.KEY=VALUE]

Builds the real train step on one local device with abstract inputs (nothing runs) for
model.scan_layers False and True, and prints trace+lower and compile seconds, XLA's FLOPs per
step and temporaries. XLA counts a scanned layer once, so the scanned program's own count is
too low; next to it, the count tcjepa_jax/flops.py takes from the unrolled step (what the trainer
and the AOT tool report).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tcjepa_jax import flops as flops_lib, optim, sharding as shard_lib, step as step_lib  # noqa: E402
from tcjepa_jax.checkpoint import abstract_like  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/in1k_vit_h14.py", "Config file.")
_BATCH = flags.DEFINE_integer("batch", 2, "Batch size compiled for (one device).")


def compile_step(config):
    models = step_lib.build_models(config, config.model.text_vocab_size or 32128)
    mesh = shard_lib.make_mesh(config, devices=jax.devices()[:1])
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    state = abstract_like(jax.eval_shape(
        lambda: step_lib.create_train_state(models, config, tx, shardings)), shardings)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=shard_lib.batch_sharding(mesh)),
        step_lib.dummy_batch(models, config, batch_size=config.batch_size))
    step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh), shardings,
                                   mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, step_lib.compiled_flops(compiled), compiled.memory_analysis()


def main(argv):
    del argv
    for scan in (False, True):
        config = _CONFIG.value.copy_and_resolve_references()
        config.batch_size, config.model.scan_layers = _BATCH.value, scan
        config.mesh = (("data", 1), ("fsdp", 1), ("tensor", 1))
        lower_s, compile_s, flops, memory = compile_step(config)
        counted = flops_lib.unrolled_step_flops(
            config, config.model.text_vocab_size or 32128, {"data": 1, "fsdp": 1, "tensor": 1})
        print(f"{config.name} {config.model.encoder}, batch {config.batch_size}, "
              f"{config.model.dtype}, remat {config.model.remat}, scan_layers={scan}: "
              f"trace+lower {lower_s:.1f} s, compile {compile_s:.1f} s, {flops:.4g} FLOPs/step"
              f" in the compiled program, {counted:.4g} counted unrolled, temporaries "
              f"{memory.temp_size_in_bytes / 2**30:.2f} GiB", flush=True)


if __name__ == "__main__":
    app.run(main)
