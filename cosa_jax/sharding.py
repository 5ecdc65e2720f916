"""The one sharding-rules table, and the device mesh it maps onto.

Every weight is listed once in ``PARAM_LOGICAL_AXES`` with its logical axes; ``LOGICAL_TO_MESH``
maps logical axes onto mesh axes ``(data, fsdp, tensor)``. The 4-GPU CoSAlign recipe is
``data=1, fsdp=4, tensor=1``; a TPU pod uses the same tables with other mesh sizes.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axis (a tuple shards over several; None replicates).
LOGICAL_TO_MESH: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "cache_seq": None,
}

# Parameter path ('/'-joined) -> logical axes. Layer weights are stacked on a leading axis.
PARAM_LOGICAL_AXES: dict[str, tuple[str, ...]] = {
    "embed_tokens": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "norm": ("norm",),
    "layers/input_norm": ("layers", "norm"),
    "layers/post_attn_norm": ("layers", "norm"),
    "layers/q_proj": ("layers", "embed", "q_heads", "head_dim"),
    "layers/k_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "layers/v_proj": ("layers", "embed", "kv_heads", "head_dim"),
    "layers/o_proj": ("layers", "q_heads", "head_dim", "embed"),
    "layers/gate_proj": ("layers", "embed", "mlp"),
    "layers/up_proj": ("layers", "embed", "mlp"),
    "layers/down_proj": ("layers", "mlp", "embed"),
}

# KV cache [layers, batch, cache_seq, kv_heads, head_dim].
CACHE_LOGICAL_AXES = ("layers", "batch", "cache_seq", "kv_heads", "head_dim")


def make_mesh(shape: Sequence[int] | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; ``shape=None`` puts every device on fsdp.

    Axis types are Auto so that XLA inserts the FSDP all-gathers itself (jax>=0.9 defaults to
    Explicit, which would demand out_sharding on every contraction over a sharded dimension).
    """
    devices = list(devices if devices is not None else jax.devices())
    if shape is None:
        shape = (1, len(devices), 1)
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"mesh.shape must be (data, fsdp, tensor), got {shape}")
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh.shape {shape} needs {int(np.prod(shape))} devices, "
                         f"but {len(devices)} are available")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _mesh_axis_size(mesh: Mesh, mesh_axes) -> int:
    if mesh_axes is None:
        return 1
    names = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    return int(np.prod([mesh.shape[n] for n in names]))


def logical_to_spec(logical_axes: Sequence[str], shape: Sequence[int], mesh: Mesh,
                    *, name: str = "") -> P:
    """PartitionSpec for one array; a dimension the mesh axis does not divide is replicated."""
    spec = []
    for axis, dim in zip(logical_axes, shape):
        mesh_axes = LOGICAL_TO_MESH[axis]
        size = _mesh_axis_size(mesh, mesh_axes)
        if size > 1 and dim % size:
            log.warning("%s: %s dim %d not divisible by mesh %s=%d; replicating it",
                        name, axis, dim, mesh_axes, size)
            mesh_axes = None
        spec.append(mesh_axes if size > 1 else None)
    return P(*spec)


def param_path(path) -> str:
    """'/'-joined key path of a params pytree leaf."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def param_specs(params_shapes, mesh: Mesh):
    """PartitionSpecs for a params pytree (arrays or ShapeDtypeStructs)."""
    def one(path, leaf):
        key = param_path(path)
        if key not in PARAM_LOGICAL_AXES:
            raise KeyError(f"parameter {key!r} has no entry in PARAM_LOGICAL_AXES")
        return logical_to_spec(PARAM_LOGICAL_AXES[key], leaf.shape, mesh, name=key)
    return jax.tree_util.tree_map_with_path(one, params_shapes)


def param_shardings(params_shapes, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params_shapes, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) axis over (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, P(LOGICAL_TO_MESH["batch"], *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def cache_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(CACHE_LOGICAL_AXES, shape, mesh, name="kv_cache"))
