"""The mesh and the one place where logical axis names meet mesh axes.

Mesh axes (DESIGN.md): `data` (pure data parallel), `fsdp` (data parallel with sharded parameters and optimizer
state), `tensor` (heads / feed-forward / channel model parallelism) and `context` (sequence and frame
parallelism). Sizes come from config; one size may be -1 and fills the remaining devices.

Across TPU slices, or GPU/CPU hosts, devices talk over the slower data-centre network (DCN) rather than the chips'
interconnect (ICI). Config `mesh_dcn` (same axes) says how much of each axis goes across DCN; by default the data
axis spans the slices or hosts and every other axis stays within one (`make_mesh`, `dcn_shape`).

Every parameter is created with logical axis names (`magdiff_jax.layers.common`); `DEFAULT_RULES` maps them to
mesh axes. A parameter dimension that the mapped mesh axes do not divide is replicated instead (a 4-channel
latent conv on tensor=8), so any config shards on any mesh; `param_shardings` computes it all from
`jax.eval_shape(init)`, and `init_sharded` creates parameters directly in place, never whole on one device.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from magdiff_jax.utils.prng import init_key

log = logging.getLogger(__name__)

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


def _sizes(sizes: Mapping[str, int], what: str) -> list[int]:
    unknown = sorted(set(sizes) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"{what}: unknown axes {unknown}; the axes are {MESH_AXES}")
    shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
    fills = [a for a, s in zip(MESH_AXES, shape) if s == -1]
    if len(fills) > 1:
        raise ValueError(f"{what}: only one axis may be -1, got {fills}")
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"{what}: sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
    return shape


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve {"data": 2, "fsdp": -1, ...} (missing axes are 1) to a shape over `num_devices` devices."""
    shape = _sizes(sizes, "mesh")
    fills = [a for a, s in zip(MESH_AXES, shape) if s == -1]
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


# Data parallelism across DCN by default: the data axis spans the slices or hosts (`mesh_dcn`, `dcn_shape`).
DEFAULT_DCN = {"data": -1}


def check_dcn_sizes(dcn_sizes: Mapping[str, int], sizes: Mapping[str, int], what: str = "mesh_dcn") -> None:
    """The checks on DCN sizes that need no devices: known axes, sizes positive or -1 (at most one), and each fixed
    DCN size dividing the mesh size of its axis where that is fixed."""
    dcn = _sizes(dcn_sizes, what)
    for axis, n, total in zip(MESH_AXES, dcn, _sizes(sizes, "mesh")):
        if n > 1 and total != -1 and total % n:
            raise ValueError(f"{what}.{axis}={n} does not divide mesh.{axis}={total} (the mesh sizes are totals "
                             f"over all devices; {what} says how much of each goes across slices or hosts)")


def granules(devices: Sequence[jax.Device]) -> tuple[str, list[list[jax.Device]]]:
    """The units the data-centre network (DCN) joins, each a list of devices, in order: TPU slices where the devices
    carry more than one `slice_index`; processes (hosts) where the devices are not TPUs (GPU nodes, CPU processes);
    otherwise one unit (a single TPU slice is one ICI domain, whatever number of hosts it spans)."""
    slices = {getattr(d, "slice_index", None) for d in devices}
    if None not in slices and len(slices) > 1:
        kind, key = "slice", lambda d: d.slice_index
    elif devices[0].platform != "tpu" and len({d.process_index for d in devices}) > 1:
        kind, key = "process", lambda d: d.process_index
    else:
        return "slice", [list(devices)]
    groups: dict[int, list[jax.Device]] = {}
    for d in devices:
        groups.setdefault(key(d), []).append(d)
    return kind, [groups[k] for k in sorted(groups)]


def dcn_shape(dcn_sizes: Mapping[str, int], shape: Sequence[int], num_granules: int, kind: str = "slice",
              what: str = "mesh_dcn") -> tuple[int, ...]:
    """Resolve DCN sizes against the mesh `shape` (totals over all devices) and the number of slices or processes.

    The DCN sizes must multiply to a divisor of `num_granules`: consecutive granules form one group (e.g. the 8
    one-GPU processes of a node), and each group holds the `shape / dcn` ICI part of the mesh. A -1 takes the
    largest value that divides both the granules left and its axis's mesh size (1 on one slice or host).
    """
    dcn = _sizes(dcn_sizes, what)
    fixed = math.prod(n for n in dcn if n != -1)
    if num_granules % fixed:
        named = [f"{what}.{a}={n}" for a, n in zip(MESH_AXES, dcn) if n > 1]
        plural = {"slice": "slices", "process": "processes"}[kind]
        raise ValueError(f"{' x '.join(named)}{f' = {fixed}' if len(named) > 1 else ''} does not divide the "
                         f"{num_granules} {kind if num_granules == 1 else plural} of this run (the DCN sizes split "
                         f"the {plural} into equal groups; -1 fits itself)")
    if -1 in dcn:
        i = dcn.index(-1)
        left = num_granules // fixed
        dcn[i] = max(n for n in range(1, left + 1) if left % n == 0 and shape[i] % n == 0)
    for axis, n, total in zip(MESH_AXES, dcn, shape):
        if total % n:
            raise ValueError(f"{what}.{axis}={n} does not divide the mesh's {axis} axis of {total} (mesh.{axis})")
    return tuple(dcn)


_fallbacks_logged: set[str] = set()


def _fallback(reason: str) -> None:
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        log.warning("make_mesh: %s; the devices are laid out in plain order instead (collectives may be slower)",
                    reason)


def _device_mesh(shape: tuple[int, ...], devices: list) -> np.ndarray:
    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, AssertionError, NotImplementedError) as e:
        _fallback(f"create_device_mesh{shape} failed on {len(devices)} {devices[0].platform} devices "
                  f"({str(e)[:300]})")
        return np.asarray(devices).reshape(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn_sizes: Mapping[str, int] | None = None) -> Mesh:
    """A Mesh with axes data/fsdp/tensor/context (Auto axis types) from config sizes (`device_array`)."""
    return Mesh(device_array(sizes, devices, dcn_sizes), MESH_AXES)


def device_array(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
                 dcn_sizes: Mapping[str, int] | None = None) -> np.ndarray:
    """The devices (default: all) laid out in the mesh's shape, in MESH_AXES order.

    `sizes` are totals over all devices (`mesh_shape`); `dcn_sizes` (config `mesh_dcn`, default `DEFAULT_DCN`) say
    how much of each axis goes across the data-centre network, between TPU slices or GPU/CPU hosts (`granules`,
    `dcn_shape`); the rest of each axis stays within one slice or host. With DCN sizes all 1 (always so on one slice
    or host) the mesh is `create_device_mesh`'s over all devices; otherwise `create_hybrid_device_mesh`'s, with
    `process_is_granule` for non-TPU devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(sizes, len(devices))
    kind, groups = granules(devices)
    dcn = dcn_shape(DEFAULT_DCN if dcn_sizes is None else dcn_sizes, shape, len(groups), kind)
    if math.prod(dcn) == 1:
        return _device_mesh(shape, devices)
    ici = tuple(s // n for s, n in zip(shape, dcn))
    if math.prod(dcn) == len(groups):
        try:
            return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=kind == "process")
        except (ValueError, AssertionError, NotImplementedError) as e:
            _fallback(f"create_hybrid_device_mesh(ici={ici}, dcn={dcn}) failed ({str(e)[:300]})")
            blocks = [np.asarray(g).reshape(ici) for g in groups]
    else:  # several consecutive granules per DCN group (one-GPU processes: a node's processes form one group)
        per = len(groups) // math.prod(dcn)
        blocks = [_device_mesh(ici, [d for g in groups[k:k + per] for d in g]) for k in range(0, len(groups), per)]
    grid = np.empty(dcn, dtype=object)
    for k, index in enumerate(np.ndindex(*dcn)):
        grid[index] = blocks[k]
    return np.block(grid.tolist())


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
