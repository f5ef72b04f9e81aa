"""Input-pipeline throughput next to what the train step consumes, measured in one run.

    python benchmarks/data.py [--records=512] [--batches=12] [--step_batch=4]

For two settings, the default config (64 px) and the ViT-B/16 paper recipe at 224 px, it writes
JPEG ArrayRecord shards of synthetic scenes (the default at 64 px, the 224 px setting from
320 px images, about an ImageNet photo's size), then prints the images/s of the full pipeline
(read, decode, RandomResizedCrop, captions, tokenize, masks, batch) with 0, 1 and 2 worker
processes, and the images/s of the compiled train step of the same config on this machine.
The pipeline keeps up when its images/s is at least the step's.
"""

import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from array_record.python.array_record_module import ArrayRecordWriter  # noqa: E402
from PIL import Image  # noqa: E402

from configs import in1k_vit_b16, synthetic_tiny  # noqa: E402
from tcjepa_jax import optim, sharding as shard_lib, step as step_lib  # noqa: E402
from tcjepa_jax.data import pipeline, records, synthetic  # noqa: E402
from tcjepa_jax.experiment import setup  # noqa: E402

_RECORDS = flags.DEFINE_integer("records", 512, "Records written per setting.")
_BATCHES = flags.DEFINE_integer("batches", 12, "Timed batches per pipeline measurement.")
_STEP_BATCH = flags.DEFINE_integer("step_batch", 4, "Batch size of the 224 px setting.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed train steps per setting.")


def write_jpeg_shards(directory: str, num_records: int, image_size: int) -> int:
    """Synthetic scenes as JPEG records (quality 90) in shards of 128; returns total bytes."""
    scenes = synthetic.SyntheticScenes(image_size=image_size, seed=1)
    total = 0
    for start in range(0, num_records, 128):
        writer = ArrayRecordWriter(os.path.join(directory, f"shard-{start // 128:05d}.array_record"),
                                   "group_size:1")
        for i in range(start, min(start + 128, num_records)):
            scene = scenes[i]
            out = io.BytesIO()
            Image.fromarray(scene["image"]).save(out, format="JPEG", quality=90)
            record = records.encode_record(id=f"{i}", image=out.getvalue(),
                                           captions=scene["captions"])
            total += len(record)
            writer.write(record)
        writer.close()
    return total


def pipeline_images_per_s(config, tokenizer, mask_spec, source, batches: int) -> float:
    it = pipeline.make_train_iterator(config, tokenizer, mask_spec, source=source)
    try:
        next(it)  # worker start-up and the first batch are not throughput
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * config.batch_size / (time.perf_counter() - t0)
    finally:
        it.close()


def step_images_per_s(config, exp, steps: int) -> float:
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(exp.models, config, tx, exp.mesh)
    state = step_lib.create_train_state(exp.models, config, tx, shardings)
    it = pipeline.make_train_iterator(config, exp.tokenizer, exp.models.mask_spec, source=exp.source)
    batch = shard_lib.make_global_batch(next(it), shard_lib.batch_sharding(exp.mesh))
    it.close()
    step = step_lib.jit_train_step(step_lib.make_train_step(exp.models, config, tx), shardings,
                                   exp.mesh)
    compiled = step.lower(state, batch).compile()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    return steps * config.batch_size / (time.perf_counter() - t0)


def settings():
    default = synthetic_tiny.get_config("")
    default.probe.enabled = False  # the probes read synthetic scenes, not these shards
    paper = in1k_vit_b16.get_config("")
    paper.batch_size = _STEP_BATCH.value
    paper.model.dtype = "float32"  # bf16 is slower than float32 on most CPUs
    paper.mesh = (("data", -1), ("fsdp", 1))
    paper.tokenizer.vocab_size = 1000
    return [("default (synthetic_tiny, 64 px)", default, 64),
            (f"224 px (in1k_vit_b16, batch {paper.batch_size})", paper, 320)]


def main(argv):
    del argv
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, {os.cpu_count()} CPU cores; "
          f"{_RECORDS.value} JPEG records per setting, {_BATCHES.value} timed batches")
    for name, config, stored_size in settings():
        with tempfile.TemporaryDirectory() as tmp:
            shards = os.path.join(tmp, "shards")
            os.makedirs(shards)
            size = write_jpeg_shards(shards, _RECORDS.value, stored_size)
            config.input.update(source="array_record", data_dir=shards, caption_file="")
            exp = setup(config, os.path.join(tmp, "run"))
            print(f"\n{name}: {stored_size} px JPEGs, {size / _RECORDS.value / 1024:.1f} KiB per "
                  f"record; batch {config.batch_size}, {config.input.num_captions} captions x "
                  f"{config.input.max_caption_len} tokens, {config.input.num_threads} threads")
            step = step_images_per_s(config, exp, _STEPS.value)
            rates = {}
            for workers in (0, 1, 2):
                config.input.workers = workers
                rates[workers] = pipeline_images_per_s(config, exp.tokenizer, exp.models.mask_spec,
                                                       exp.source, _BATCHES.value)
            for workers, rate in rates.items():
                print(f"  pipeline, {workers} workers: {rate:8.1f} img/s  = x{rate / step:.2f} "
                      f"the train step")
            print(f"  train step ({config.model.encoder}, {config.model.dtype}): {step:8.1f} img/s")


if __name__ == "__main__":
    app.run(main)
