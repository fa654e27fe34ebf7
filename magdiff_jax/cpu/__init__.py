"""Placeholder with the CPU tuning API over the old modules (replaced by the cpu-tuning branch on merge)."""

from __future__ import annotations

import contextlib
import functools

_ON = [False]


def enable() -> None:
    _ON[0] = True


def disable() -> None:
    _ON[0] = False


def enabled() -> bool:
    return _ON[0]


@contextlib.contextmanager
def tuning(on: bool = True):
    old = _ON[0]
    _ON[0] = on
    try:
        yield
    finally:
        _ON[0] = old


def compiler_options(extra: dict | None = None) -> dict | None:
    from magdiff_jax.utils import xla_cpu

    return xla_cpu.merged(extra) if _ON[0] else (dict(extra) if extra else None)


def allocator_hint():
    from magdiff_jax.utils.allocator import allocator_hint as hint

    return hint()


@functools.cache
def one_writer_per_array() -> None:
    import jax
    from orbax.checkpoint import type_handlers

    type_handlers.register_type_handler(jax.Array, type_handlers.ArrayHandler(use_replica_parallel=False),
                                        override=True)


def setup_process() -> None:
    from magdiff_jax.utils import allocator, xla_cpu

    xla_cpu.add_to_xla_flags()
    allocator.reexec_with_tunables()
    allocator.run_cpu_programs_on_calling_thread()
    enable()
