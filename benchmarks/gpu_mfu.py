"""Step time, images/s and MFU of the real train step on one accelerator (a GPU, or whatever
jax.devices()[0] is), at paper shapes: by default ViT-L/16 TC-JEPA in bfloat16.

    python benchmarks/gpu_mfu.py [--config=configs/in1k_vit_l16.py[:ARGS]] [--batch=128]
        [--steps=20] [--warmup=2] [--json=FILE] [--config.model.attention=auto|xla|cudnn|...]

The step is the one train.py runs (step.make_train_step, jitted with the state donated), on one
device, with random parameters and a synthetic batch of the config's shapes (real mask draws,
captions of random lengths; benchmarks/step_parts.py): the data pipeline is not timed. If the
compile or the first step runs out of device memory the batch is halved and tried again, down to
--min_batch.

Time: the mean of --steps steps after --warmup, the state fed back, one block_until_ready at the
end. FLOPs: XLA's cost analysis of the same step with its layers unrolled, lowered on the host
CPU (tcjepa_jax/flops.py), where attention is plain XLA: the cuDNN / splash kernels are custom
calls whose FLOPs the compiled program's own count leaves out (printed next to it). MFU = FLOPs /
step time / the device's dense bf16 peak (tcjepa_jax/chips.py, or config.peak_flops_per_device;
"n/a" for a device the table does not list, e.g. a CPU).
"""

import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # step_parts.py, next to this file

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tcjepa_jax import chips, optim, sharding as shard_lib, step as step_lib  # noqa: E402
from tcjepa_jax import flops as flops_lib  # noqa: E402
from tcjepa_jax.config_lib import validate_config  # noqa: E402
from tcjepa_jax.models import attention as attention_lib  # noqa: E402
from step_parts import random_state, synthetic_batch  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(REPO, "configs", "in1k_vit_l16.py"), "Config file.")
_BATCH = flags.DEFINE_integer("batch", 128, "Images per step (on the one device).")
_MIN_BATCH = flags.DEFINE_integer("min_batch", 8, "Smallest batch tried after out-of-memory.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps before them (the first compiles).")
_JSON = flags.DEFINE_string("json", None, "Also write the numbers to this JSON file.")

# Rows of the text embedding table when the config leaves it to a tokenizer (none is built).
TEXT_VOCAB = 32128


def one_device_config(config, batch: int):
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.batch_size = batch
        config.grad_accum = 1
        config.mesh = (("data", 1), ("fsdp", 1), ("tensor", 1))
        config.mesh_slices = 1
    validate_config(config)
    return config


def run(config, steps: int, warmup: int) -> dict:
    device = jax.devices()[0]
    vocab = int(config.model.get("text_vocab_size", 0)) or TEXT_VOCAB
    mesh = shard_lib.make_mesh(config, devices=[device])
    models = step_lib.build_models(config, vocab)
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    state = random_state(models, config, tx, shardings)
    batch = jax.device_put(synthetic_batch(models, config, vocab),
                           shard_lib.batch_sharding(mesh))
    train_step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh),
                                         shardings, mesh)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics if warmup else state)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - t0) / max(steps, 1)
    skipped = int(state.nonfinite["total"])

    flops = flops_lib.unrolled_step_flops(config, vocab, {})  # attention as plain XLA: counted
    peak = chips.peak_flops(config, device)
    platform = device.platform
    return {
        "config": config.name, "encoder": config.model.encoder,
        "conditioning": config.model.conditioning, "dtype": config.model.dtype,
        "remat": config.model.remat, "batch_size": config.batch_size,
        "device": device.device_kind, "platform": platform,
        "attention": config.model.get("attention", "auto"),
        "attention_here": attention_lib.attention_platform_summary(
            config.model.get("attention", "auto"), platform),
        "compile_s": compile_s, "steps": steps, "step_s": step_s,
        "images_per_s": config.batch_size / step_s, "flops_per_step": flops,
        "compiled_flops_per_step": step_lib.compiled_flops(compiled),
        "achieved_flops_per_s": flops / step_s, "peak_flops_per_s": peak,
        "mfu": flops / step_s / peak if peak else None, "nonfinite_steps": skipped,
    }


def _out_of_memory(error: Exception) -> bool:
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def report(r: dict) -> None:
    print(f"{r['config']}: {r['encoder']} {r['conditioning']}, {r['dtype']}, remat {r['remat']},"
          f" batch {r['batch_size']} on 1 x {r['device']}; attention {r['attention']} "
          f"({r['attention_here']} on {r['platform']})")
    print(f"compiled in {r['compile_s']:.1f} s; {r['steps']} steps timed")
    print(f"step time  {r['step_s'] * 1e3:10.1f} ms")
    print(f"images/s   {r['images_per_s']:10.1f}")
    print(f"FLOPs/step {r['flops_per_step']:10.3e}  (XLA cost analysis, layers unrolled, "
          f"attention as XLA ops; the compiled step's own count: "
          f"{r['compiled_flops_per_step']:.3e})")
    print(f"achieved   {r['achieved_flops_per_s'] / 1e12:10.1f} TFLOP/s")
    if r["mfu"] is None:
        print("MFU        n/a (no peak for this device in tcjepa_jax/chips.py; "
              "set --config.peak_flops_per_device)")
    else:
        print(f"MFU        {r['mfu']:10.1%}  of {r['peak_flops_per_s'] / 1e12:.0f} TFLOP/s dense "
              "bf16 peak")
    if r["nonfinite_steps"]:
        print(f"warning: {r['nonfinite_steps']} steps had a non-finite loss or gradient and "
              "skipped the optimizer update: the step time is too low.")


def main(argv):
    del argv
    batch = _BATCH.value
    while True:
        config = one_device_config(_CONFIG.value, batch)
        try:
            result = run(config, _STEPS.value, _WARMUP.value)
            break
        except jax.errors.JaxRuntimeError as e:
            if not _out_of_memory(e) or batch // 2 < _MIN_BATCH.value:
                raise
            print(f"batch {batch} does not fit ({str(e).splitlines()[0][:160]}); trying "
                  f"{batch // 2}", flush=True)
            batch //= 2
    report(result)
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
