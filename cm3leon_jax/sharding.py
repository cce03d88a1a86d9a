"""Device mesh, the one table of logical-axis rules, and helpers that place arrays on the mesh.

Every array in the model names its axes logically (`embed`, `mlp`, `heads`, ...). The table
below is the only place that says which mesh axis each logical axis is split over, so changing a
parallelism strategy is a one-line edit here, never a hunt through the model.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axes. Parameters: the model dimension is split over `fsdp` (ZeRO-3 style),
# head/FFN/vocab dimensions over `tensor` (Megatron style). Activations: the batch over
# data+fsdp, heads and FFN hidden over `tensor`; sequence and model dims stay whole.
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("position", None),
    ("layers", None),
    ("norm", None),
    ("lora_rank", None),   # a low-rank adapter's inner axis (lora.py): small, kept whole
    # activations
    ("batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    # decode-time cache
    ("cache_batch", BATCH_AXES),
    ("cache_length", None),
    ("cache_heads", "tensor"),
    ("cache_kv", None),
)


def resolve_mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Turns the config's (data, fsdp, tensor), where one entry may be -1, into a full shape."""
    shape = [int(mesh_config.data), int(mesh_config.fsdp), int(mesh_config.tensor)]
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh axes must be positive or -1, got data={shape[0]} fsdp={shape[1]} tensor={shape[2]}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1 (fill with the remaining devices), got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(
                f"mesh {dict(zip(MESH_AXES, shape))} cannot be filled: {num_devices} devices are not "
                f"divisible by the fixed axes' product {known}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but "
            f"{num_devices} are available; set --config.mesh.data/fsdp/tensor so their product is "
            f"{num_devices} (or one of them to -1)")
    return tuple(shape)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh, ordered so `tensor` gets the fastest links."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config, len(devices))
    try:
        from jax.experimental import mesh_utils
        device_array = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        device_array = np.asarray(devices).reshape(shape)
    # Auto axes: the GSPMD style where sharding constraints are hints the compiler propagates.
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(device_array, MESH_AXES, axis_types=axis_types)


def logical_to_spec(logical_axes: Sequence[str | None]) -> PartitionSpec:
    return nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_AXIS_RULES)


def logical_sharding(mesh: Mesh, logical_axes: Sequence[str | None]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes))


def tree_shardings(mesh: Mesh, boxed_abstract_tree: Any) -> Any:
    """Shardings for a tree whose leaves carry logical axis names (Flax `LogicallyPartitioned`)."""
    specs = nn.get_partition_spec(boxed_abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batch arrays are [batch, length]: rows split over data+fsdp, the sequence kept whole."""
    return logical_sharding(mesh, ("batch", "activation_length"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_divisible(name: str, size: int, mesh: Mesh, mesh_axes: Any) -> None:
    """Raises a clear error before XLA would fail on an axis that cannot be split evenly."""
    axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    parts = math.prod(mesh.shape[a] for a in axes)
    if size % parts:
        raise ValueError(
            f"{name}={size} is not divisible by mesh axes {axes} of total size {parts} "
            f"(mesh {dict(mesh.shape)})")


def global_batch_from_local(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's rows (each process feeds only its slice)."""
    sharding = batch_sharding(mesh)
    out = {}
    for key, local in local_batch.items():
        global_shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out


@contextlib.contextmanager
def activate(mesh: Mesh):
    """Mesh and logical rules in scope, so the model's logical sharding constraints resolve."""
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    with set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        yield
