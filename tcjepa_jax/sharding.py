"""The device mesh and how parameters, state and batches are laid out on it.

Sharding is a policy over logical axis names: every parameter is declared with names such as
"embed" or "mlp" (see models/), and `config.sharding_rules` maps those names to mesh axes. The
batch is split over all mesh axes (data parallel over `data`, FSDP over `fsdp`).
"""

import math

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(config, devices=None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    names = [name for name, _ in config.mesh]
    sizes = [size for _, size in config.mesh]
    if set(names) != set(BATCH_AXES) or len(names) != 2:
        raise ValueError(f"config.mesh must name exactly the axes {BATCH_AXES}, got {names}.")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {config.mesh}.")
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
        raise ValueError(f"config.mesh {config.mesh} does not divide the {len(devices)} devices.")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(f"config.mesh {tuple(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                         f"{len(devices)} are available.")
    return Mesh(np.asarray(devices).reshape(sizes), names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _mesh_spec(logical_spec, shape, mesh, rules) -> P:
    """Logical names -> mesh axes, replicating any dimension the mesh axis does not divide."""
    mesh_axes = nn.logical_to_mesh_axes(logical_spec, rules)
    fitted = []
    for dim, axis in zip(shape, tuple(mesh_axes) + (None,) * (len(shape) - len(mesh_axes))):
        axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
        size = math.prod(mesh.shape[a] for a in axes)
        fitted.append(axis if axes and dim % size == 0 else None)
    return P(*fitted)


def param_shardings(boxed_abstract_params, mesh: Mesh, rules):
    """NamedShardings for a tree of (abstract) arrays still wrapped in nn.Partitioned boxes."""
    specs = nn.get_partition_spec(boxed_abstract_params)
    shapes = nn.unbox(boxed_abstract_params)

    def sharding(spec, leaf):
        if not hasattr(leaf, "shape"):  # an empty placeholder such as optax's MaskedNode
            return leaf
        return NamedSharding(mesh, _mesh_spec(spec, leaf.shape, mesh, rules))

    return jax.tree.map(sharding, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def make_global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """Per-host numpy batch -> one global jax.Array per key, split over the batch axes."""
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
