"""Lowers (and, with ":compile", compiles) the tiny TC-JEPA train step for a compile-only TPU
topology with a given model.attention and image size; prints one JSON line per variant with
the number of Pallas TPU kernel calls (tpu_custom_call) in the program. Run by
tests/test_attention_impl.py in a subprocess: libtpu's environment must be set before jax loads
(tools/aot.py does that), and one process serves several variants (its start-up is seconds).

    python tests/attention_aot_worker.py ATTENTION:IMAGE_SIZE[:compile] ...
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tcjepa_jax.tools import aot  # noqa: E402  (first: the compile-only libtpu environment)
from tcjepa_jax import flops as flops_lib, optim  # noqa: E402
from tcjepa_jax import sharding as shard_lib, step as step_lib  # noqa: E402
from tcjepa_jax.config_lib import validate_config  # noqa: E402
from configs import synthetic_tiny  # noqa: E402

TOPOLOGY = "v5e:2x2"
KERNEL = "tpu_custom_call"


def main(attention: str, image_size: int, compile_too: bool):
    config = synthetic_tiny.get_config()
    config.model.attention = attention
    config.input.image_size = image_size
    config.masks.max_context = 0
    config.model.predictor_depth = 1
    config.input.num_captions = 1
    config.batch_size = 8                        # 2 images per chip
    validate_config(config)
    devices = aot.topology_devices(TOPOLOGY)
    mesh = shard_lib.make_mesh(config, devices=devices)
    models = step_lib.build_models(config, 64)
    tx = optim.make_optimizer(config)
    shardings = step_lib.state_shardings(models, config, tx, mesh)
    state, batch = flops_lib.abstract_inputs(models, config, tx, shardings, mesh)
    train_step = step_lib.jit_train_step(step_lib.make_train_step(models, config, tx, mesh),
                                         shardings, mesh)
    lowered = train_step.lower(state, batch)
    out = {"attention": attention, "image_size": image_size,
           "lowered_kernels": lowered.as_text().count(KERNEL),
           "context_slots": models.mask_spec.num_context_slots}
    if compile_too:
        compiled = lowered.compile()
        out["compiled_kernels"] = compiled.as_text().count(KERNEL)
        out["flops"] = step_lib.compiled_flops(compiled)
    print(json.dumps(out))


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        attention, size, *rest = spec.split(":")
        main(attention, int(size), rest == ["compile"])
