"""Override points: the few primitives of `magdiff_jax.layers` that a platform may compute its own way.

The layers look each one up here when a model is traced. The defaults, defined beside the layers that use them,
are plain JAX: any backend, differentiable in forward mode (`jax.jvp`) and reverse mode. `magdiff_jax.cpu`
installs its CPU kernels over them; nothing else here changes them, and importing a module changes nothing. A
jitted function keeps the kernels it was traced with.

  matmul(x, kernel) -> y                     every dense layer's x (..., in) @ kernel (in, out)      layers.common
  group_norm_keeps_batch(x) -> bool          whether GroupNorm computes with x's batch axis          layers.common
  attention(q, k, v, mask, scale) -> out     the "xla" attention on (B, L, H, D)                     layers.attention
  blockwise_attention(q, k, v, mask, scale, n_q) -> out
                                             the "blockwise" attention on its blocks of pairs        layers.attention
  auto_blockwise(q, k) -> bool               whether "auto" takes blockwise where cuDNN does not run layers.attention
  frame_taps_matmul(x, kernel) -> y          TemporalConv's product over the shifted frames          layers.temporal

A replacement must compute the same values up to summation order.
"""

from __future__ import annotations

from collections.abc import Callable

NAMES = ("matmul", "group_norm_keeps_batch", "attention", "blockwise_attention", "auto_blockwise",
         "frame_taps_matmul")
DEFAULTS: dict[str, Callable] = {}  # filled by the layer modules (`default`)
_active: dict[str, Callable] = {}


def default(name: str):
    """Decorator: `fn` is the default of override point `name` (and active while nothing replaces it)."""
    if name not in NAMES:
        raise ValueError(f"{name!r} is not an override point; they are {NAMES}")

    def register(fn):
        DEFAULTS[name] = fn
        _active.setdefault(name, fn)
        return fn

    return register


def get(name: str) -> Callable:
    """The implementation of `name` in use now."""
    return _active[name]


def active() -> dict[str, Callable]:
    """A copy of every override point's implementation in use now (for `install` to put back)."""
    return dict(_active)


def install(implementations: dict[str, Callable]) -> None:
    """Replace the named override points' implementations (names not given keep theirs)."""
    unknown = sorted(set(implementations) - set(NAMES))
    if unknown:
        raise ValueError(f"{unknown} are not override points; they are {NAMES}")
    _active.update(implementations)


def restore_defaults() -> None:
    """Every override point back to its default."""
    _active.clear()
    _active.update(DEFAULTS)


def all_defaults() -> bool:
    """Whether every override point has its default implementation."""
    return set(_active) == set(NAMES) and all(_active[n] is DEFAULTS[n] for n in NAMES)
