"""The mesh and the one place where logical axis names meet mesh axes.

Mesh axes (DESIGN.md): `data` (pure data parallel), `fsdp` (data parallel with sharded parameters and optimizer
state), `tensor` (heads / feed-forward / channel model parallelism) and `context` (sequence and frame
parallelism). Sizes come from config; one size may be -1 and fills the remaining devices.

Every parameter is created with logical axis names (`magdiff_jax.layers.common`); `DEFAULT_RULES` maps them to
mesh axes. A parameter dimension that the mapped mesh axes do not divide is replicated instead (a 4-channel
latent conv on tensor=8), so any config shards on any mesh; `param_shardings` computes it all from
`jax.eval_shape(init)`, and `init_sharded` creates parameters directly in place, never whole on one device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from magdiff_jax.utils.prng import init_key

MESH_AXES = ("data", "fsdp", "tensor", "context")

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: Rules = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("conv_in", "fsdp"),
    # Not "tensor": with the batch over data x fsdp, XLA's SPMD partitioner (jax 0.10.2) computes wrong weight
    # gradients for a conv kernel sharded over both fsdp (input channels) and tensor (output channels).
    # tests/sharded_checks.py checks gradients on that mesh.
    ("conv_out", None),
    ("conv_t", None),
    ("conv_h", None),
    ("conv_w", None),
    ("norm", None),
    ("vocab", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_frames", "context"),
    ("activation_heads", "tensor"),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_embed", None),
)


def updated_rules(base: Rules, overrides, what: str = "sharding rules") -> Rules:
    """`base` with each (logical name, mesh axes) pair of `overrides` replacing the entry of that name (or added);
    mesh axes: None, one axis name or a sequence of them. A malformed pair or an unknown mesh axis is an error
    naming `what`."""
    table = dict(base)
    for pair in overrides or ():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not isinstance(pair[0], str):
            raise ValueError(f"{what}: {pair!r} is not a (logical axis name, mesh axes) pair")
        name, axes = pair
        names = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        unknown = [a for a in names if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"{what}: {name!r} maps to unknown mesh axes {unknown}; the axes are {MESH_AXES}")
        table[name] = None if axes is None else (axes if isinstance(axes, str) else tuple(axes))
    return tuple(table.items())


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve {"data": 2, "fsdp": -1, ...} (missing axes are 1) to a shape over `num_devices` devices."""
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh: unknown axes {unknown}; the axes are {MESH_AXES}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    fills = [a for a, s in zip(MESH_AXES, shape) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"mesh: only one axis may be -1, got {fills}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    fixed = math.prod(s for s in shape if s != -1)
    if fills:
        if num_devices % fixed:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not divisible by "
                             f"the fixed axes' product {fixed}")
        shape[MESH_AXES.index(fills[0])] = num_devices // fixed
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                         f"but {num_devices} are available")
    return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes data/fsdp/tensor/context (Auto axis types) from config sizes."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes, len(devices))
    try:
        arr = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError):
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def _rule_table(rules: Rules) -> dict[str, tuple[str, ...]]:
    table = {}
    for name, axes in rules:
        table[name] = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return table


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """PartitionSpec for an array with logical axis `names`; indivisible dims and reused mesh axes replicate."""
    table = _rule_table(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(names, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        axes = tuple(a for a in table[name] if a not in used and mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for a tree of (possibly `nn.LogicallyPartitioned`-boxed) abstract arrays."""

    def one(x):
        if isinstance(x, nn.LogicallyPartitioned):
            return NamedSharding(mesh, logical_to_spec(x.names, x.value.shape, mesh, rules))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def abstract_init(module: nn.Module, *args, **kwargs):
    """The boxed variable tree of `module.init(key, *args)`, as ShapeDtypeStructs (no memory spent)."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))


def init_sharded(module: nn.Module, key, *args, mesh: Mesh, rules: Rules = DEFAULT_RULES, shardings=None,
                 **kwargs):
    """Initialise `module` directly sharded, drawing from `key` through the init generator (utils/prng.py):
    returns (unboxed params, their shardings). `shardings`: the params' (`param_shardings`), if already known."""
    found = {}

    def constrained(k):  # one trace: unless given, the shardings come from the boxes' logical names
        boxed = module.init(init_key(k), *args, **kwargs)["params"]
        found["shardings"] = param_shardings(boxed, mesh, rules) if shardings is None else shardings
        return jax.tree.map(jax.lax.with_sharding_constraint, nn.meta.unbox(boxed), found["shardings"])

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(constrained)(key)
    return jax.device_put(params, found["shardings"]), found["shardings"]


@contextlib.contextmanager
def activation_rules_context(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Context under which a module's `nn.with_logical_constraint` calls resolve against `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
