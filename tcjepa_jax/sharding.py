"""The device mesh and how parameters, state, batches and activations are laid out on it.

Sharding is a policy over logical axis names: every parameter is declared with names such as
"embed" or "mlp" (see models/), activations are constrained with names such as "act_batch" or
"act_mlp" (models/layers.constrain), and `config.sharding_rules` maps all of them to the mesh
axes `data`, `fsdp` and `tensor`. The batch is split over `data` and `fsdp` (data parallelism
and FSDP); `tensor` splits attention heads and MLP hidden units (tensor parallelism). So DP,
FSDP, FSDP+TP and HSDP are config values, not model code.
"""

import contextlib
import contextvars
import math

import jax
import numpy as np
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(config, num_devices: int) -> dict:
    """{axis: size} for `config.mesh` over `num_devices` devices (-1: the rest)."""
    names = [name for name, _ in config.mesh]
    sizes = [size for _, size in config.mesh]
    if not set(BATCH_AXES) <= set(names) or not set(names) <= set(MESH_AXES) or len(
            set(names)) != len(names):
        raise ValueError(f"config.mesh must name the axes {BATCH_AXES} and optionally 'tensor', "
                         f"each once; got {names}.")
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {config.mesh}.")
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
        raise ValueError(f"config.mesh {config.mesh} does not divide the {num_devices} devices.")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f"config.mesh {tuple(zip(names, sizes))} needs {math.prod(sizes)} devices, "
                         f"{num_devices} are available.")
    shape = dict(zip(names, sizes))
    return {axis: shape.get(axis, 1) for axis in MESH_AXES}


def make_mesh(config, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: every device of every host).

    With config.mesh_slices > 1 (multi-slice TPU), `data` is split into an outer part over the
    slices (data-center network) and an inner part within each slice (ICI), via
    mesh_utils.create_hybrid_device_mesh; fsdp and tensor stay within a slice.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    sizes = [shape[a] for a in MESH_AXES]
    slices = int(config.get("mesh_slices", 1))
    if slices > 1:
        if sizes[0] % slices:
            raise ValueError(f"config.mesh_slices={slices} must divide the data axis ({sizes[0]}).")
        ici = [sizes[0] // slices] + sizes[1:]
        array = mesh_utils.create_hybrid_device_mesh(ici, [slices, 1, 1], devices)
    elif devices[0].platform in ("tpu", "gpu"):  # physical-topology-aware order
        array = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    else:
        array = np.asarray(devices).reshape(sizes)
    return Mesh(array, MESH_AXES)


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


# ---- Activations -----------------------------------------------------------------------------

_ACTIVATIONS = contextvars.ContextVar("tcjepa_activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules):
    """While tracing inside this context, constrain() pins activations to `mesh` by `rules`."""
    token = _ACTIVATIONS.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain(x, logical_names):
    """Sharding constraint on an activation by logical names (a no-op outside
    activation_sharding, e.g. in probes or tests of single modules)."""
    context = _ACTIVATIONS.get()
    if context is None:
        return x
    mesh, rules = context
    spec = _mesh_spec(tuple(logical_names), x.shape, mesh, rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


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
