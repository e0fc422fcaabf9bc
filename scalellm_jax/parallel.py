"""Device mesh and sharding rules for tensor (TP) and expert (EP) parallelism.

The mesh has two named axes, ``expert`` and ``tensor``. Dense layers are sharded with
PartitionSpecs and left to XLA's sharding propagation (attention heads over ``tensor``, the
vocabulary of the output projection over ``tensor``); the MoE block runs under ``jax.shard_map``
(see ``model/moe.py``): experts over ``expert``, each expert's intermediate dimension over
``tensor``.

Axis types are ``Auto`` on purpose: ``jax.make_mesh`` defaults to ``Explicit`` axes in recent
jax, which would make every sharding part of the array types; the model code relies on
propagation for the dense layers and is explicit only where it matters (shard_map).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from scalellm_jax import weights
from scalellm_jax.config import ConfigError, ModelConfig

EXPERT, TENSOR = "expert", "tensor"


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1

    def __post_init__(self):
        for name in ("tensor_parallel_size", "expert_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    @property
    def num_devices(self) -> int:
        return self.tensor_parallel_size * self.expert_parallel_size

    def check(self, config: ModelConfig) -> None:
        """Raise ``ConfigError`` naming the option, the dimension it cannot split, that dimension's size, the mesh
        axis, and the sizes that would work, when the model cannot be split this way. (The vocabulary is padded
        instead: see ``weights.Weight.padded``.)"""
        tp, ep = self.tensor_parallel_size, self.expert_parallel_size
        tensor_error = _tensor_split_error(config, tp)
        if tensor_error:
            works = [t for t in range(1, config.num_heads + 1) if not _tensor_split_error(config, t)]
            raise ConfigError(f"tensor_parallel_size {tp} {tensor_error} (split over the tensor axis); "
                              f"tensor_parallel_size that work: {', '.join(map(str, works))}")
        if config.num_experts % ep:
            works = [e for e in range(1, config.num_experts + 1) if config.num_experts % e == 0]
            raise ConfigError(f"expert_parallel_size {ep} must divide num_experts ({config.num_experts}) (split over "
                              f"the expert axis); expert_parallel_size that work: {', '.join(map(str, works))}")


def _tensor_split_error(config: ModelConfig, tp: int) -> str | None:
    """Why the tensor axis cannot be ``tp`` devices wide for this model, or None."""
    if config.num_kv_heads % tp and tp % config.num_kv_heads:
        return f"must divide num_kv_heads ({config.num_kv_heads}) or be a multiple of it"
    if config.num_heads % tp:
        return f"must divide num_heads ({config.num_heads})"
    if config.intermediate_size % tp:
        return f"must divide intermediate_size ({config.intermediate_size})"
    return None


def build_mesh(parallel: ParallelConfig, devices: list | None = None) -> Mesh:
    """A (expert, tensor) mesh over the first ``num_devices`` devices.

    After ``jax.distributed.initialize`` (see ``scalellm_jax.distributed``), ``jax.devices()`` lists
    the devices of every process, process by process, so ``tensor`` (the inner axis) stays within a
    host when ``tensor_parallel_size`` divides its local device count and ``expert`` spans the hosts.
    """
    available = devices if devices is not None else jax.devices()
    if parallel.num_devices > len(available):
        raise ConfigError(
            f"tensor_parallel_size × expert_parallel_size = {parallel.num_devices} devices, "
            f"but only {len(available)} are visible"
        )
    chosen = available[: parallel.num_devices]
    left_out = sorted({d.process_index for d in available} - {d.process_index for d in chosen})
    if left_out:
        # A process without a device in the mesh would load nothing and could run nothing.
        raise ConfigError(
            f"tensor_parallel_size × expert_parallel_size = {parallel.num_devices} devices leaves "
            f"process(es) {left_out} out of the mesh; use all {len(available)} devices of the "
            f"{jax.process_count()} processes"
        )
    return jax.make_mesh(
        (parallel.expert_parallel_size, parallel.tensor_parallel_size),
        (EXPERT, TENSOR),
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=chosen,
    )


def kv_head_shards(config: ModelConfig, tp: int) -> int:
    """Devices the KV heads are split over: all of the tensor axis when they divide evenly, else 1
    (fewer kv heads than the tensor axis: every device keeps all of them)."""
    return tp if config.num_kv_heads % tp == 0 else 1


# Which mesh axis a sharded logical axis (see scalellm_jax.weights) is split over. kv_heads go over tensor only
# when they divide it (kv_head_shards); else every device keeps all of them.
MESH_AXIS_OF = {"heads": TENSOR, "kv_heads": TENSOR, "ffn": TENSOR, "vocab": TENSOR, "experts": EXPERT}


def _mesh_axes(weight: weights.Weight, config: ModelConfig, tp: int) -> tuple[str | None, ...]:
    """Per axis of ``weight``, the mesh axis it is split over (None: not split)."""
    def mesh_axis(axis: str) -> str | None:
        if axis not in weight.sharded:
            return None
        if axis == "kv_heads" and kv_head_shards(config, tp) != tp:
            return None
        return MESH_AXIS_OF[axis]

    return tuple(mesh_axis(a) for a in weight.axes)


def weight_spec(weight: weights.Weight, config: ModelConfig, mesh: Mesh) -> P:
    """The PartitionSpec of one declared weight: its ``sharded`` axes over their mesh axes."""
    return P(*_mesh_axes(weight, config, mesh.shape[TENSOR]))


def placed_shape(weight: weights.Weight, config: ModelConfig, mesh: Mesh | None) -> tuple[int, ...]:
    """``weight``'s shape on ``mesh``: its padded axes rounded up to a multiple of their mesh axis."""
    shape = weight.shape(config)
    if mesh is None or not weight.padded:
        return shape
    axes = _mesh_axes(weight, config, mesh.shape[TENSOR])
    return tuple(-(-size // mesh.shape[axis]) * mesh.shape[axis] if name in weight.padded and axis else size
                 for name, size, axis in zip(weight.axes, shape, axes, strict=True))


def pad_for_mesh(value: Any, weight: weights.Weight, config: ModelConfig, mesh: Mesh | None) -> Any:
    """``value`` (a weight as stored) zero-padded to :func:`placed_shape` (itself when nothing is padded)."""
    target = placed_shape(weight, config, mesh)
    if tuple(value.shape) == target:
        return value
    host = np.asarray(value)
    return np.pad(host, [(0, t - n) for n, t in zip(host.shape, target, strict=True)])


def weight_shards(weight: weights.Weight, config: ModelConfig, tp: int, ep: int) -> int:
    """How many parts one copy of ``weight`` is split into on an (``ep``, ``tp``) mesh."""
    sizes = {TENSOR: tp, EXPERT: ep, None: 1}
    return math.prod(sizes[axis] for axis in _mesh_axes(weight, config, tp))


def module_specs(module: str, config: ModelConfig, mesh: Mesh) -> dict[str, P]:
    """PartitionSpecs of the weights one Flax module owns, by parameter name (for its shard_map)."""
    return {w.name: weight_spec(w, config, mesh) for w in weights.weights_of(module, config)}


def param_specs(config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    """PartitionSpecs for every parameter of :class:`scalellm_jax.model.Mixtral`, as a nested tree."""
    specs: dict[str, Any] = {}
    for path, weight, _ in weights.iter_weights(config):
        node = specs
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = weight_spec(weight, config, mesh)
    return specs


def param_shardings(config: ModelConfig, mesh: Mesh) -> dict[str, Any]:
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), param_specs(config, mesh), is_leaf=lambda x: isinstance(x, P)
    )


def put_global(value: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """Place ``value`` (the whole array, a host or local-device copy) with ``sharding``.

    Within one process this is ``jax.device_put``. When ``sharding`` spans devices of other
    processes, every process holds the same value and builds only its own devices' shards from
    it: ``device_put`` would instead first all-gather the whole array from every process to check
    that the copies agree, one cross-host transfer of every full tensor.
    """
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    host = np.asarray(value)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_params(params: dict, config: ModelConfig, mesh: Mesh) -> dict:
    """Place ``params`` on the mesh (each device receives only its shard; padded weights padded first)."""
    shardings = param_shardings(config, mesh)
    padded = {}
    for path, weight, _ in weights.iter_weights(config):
        node = params
        for key in path:
            node = node[key]
        target = padded
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = pad_for_mesh(node, weight, config, mesh)
    if not mesh.is_multi_process:
        return jax.device_put(padded, shardings)  # one batched transfer
    return jax.tree.map(put_global, padded, shardings)
