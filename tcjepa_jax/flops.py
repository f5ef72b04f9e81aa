"""FLOPs of one train step on one device, also when the layers are scanned.

XLA's cost analysis counts the body of a loop once, not once per iteration, so the compiled
step's count is far too low with `model.scan_layers=True` (and with `grad_accum > 1`, whose
micro-batches run in a loop too). The math does not depend on either switch, so we count the
same step with the layers unrolled and one micro-batch: traced and lowered (seconds: nothing is
compiled) for one host CPU device at one device's share of the batch, and counted by XLA's
cost analysis of that HLO. For B/16 I-JEPA at 128 images per chip this gives 1.134e13 against
1.138e13 from the step compiled for TPU v5p with the layers unrolled (0.4% apart).
"""

import copy

import jax

from tcjepa_jax import checkpoint as ckpt_lib
from tcjepa_jax import optim
from tcjepa_jax import sharding as shard_lib
from tcjepa_jax import step as step_lib


def abstract_inputs(models, config, tx, shardings, mesh):
    """ShapeDtypeStructs, with their shardings, of the train state and a global batch."""
    state_shapes = jax.eval_shape(
        lambda: step_lib.create_train_state(models, config, tx, shardings))
    state = ckpt_lib.abstract_like(state_shapes, shardings)
    batch_sharding = shard_lib.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((config.batch_size,) + v.shape[1:], v.dtype,
                                     sharding=batch_sharding)
             for k, v in step_lib.dummy_batch(models, config, batch_size=1).items()}
    return state, batch


def needs_unrolled_count(config) -> bool:
    """Whether the compiled step's own FLOP count is too low (it contains a loop over layers
    or micro-batches)."""
    return bool(config.model.get("scan_layers", False)) or int(config.get("grad_accum", 1) or 1) > 1


def unrolled_step_flops(config, vocab_size: int, mesh_axes: dict) -> float:
    """FLOPs of one train step per device of a mesh with `mesh_axes` sizes (XLA cost analysis).

    The batch is split over `data` x `fsdp`; the `tensor` axis splits each replica's work, so
    its share is divided by the tensor size (exact when the axis divides every split dimension).
    Raises RuntimeError when this host has no CPU backend to lower on.
    """
    replicas = mesh_axes.get("data", 1) * mesh_axes.get("fsdp", 1)
    local = copy.deepcopy(config)
    with local.unlocked():
        local.model.scan_layers = False
        local.grad_accum = 1
        local.batch_size = max(1, config.batch_size // replicas)
        local.mesh = (("data", 1), ("fsdp", 1), ("tensor", 1))
        local.mesh_slices = 1
    try:
        device = jax.devices("cpu")[0]
    except RuntimeError as e:
        raise RuntimeError(f"no CPU backend to count the unrolled step's FLOPs on: {e}") from e
    mesh = shard_lib.make_mesh(local, devices=[device])
    models = step_lib.build_models(local, vocab_size)
    tx = optim.make_optimizer(local)
    shardings = step_lib.state_shardings(models, local, tx, mesh)
    state, batch = abstract_inputs(models, local, tx, shardings, mesh)
    step = step_lib.jit_train_step(step_lib.make_train_step(models, local, tx, mesh),
                                   shardings, mesh)
    cost = step.lower(state, batch).cost_analysis() or {}
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float(cost.get("flops", 0.0)) / mesh_axes.get("tensor", 1)
