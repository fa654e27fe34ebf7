"""CPU platform tuning, in one place: kernels for the layers' override points (`magdiff_jax.layers.kernels`), the
XLA CPU compile options, and the process set-up (glibc malloc tunables, synchronous dispatch) that XLA's CPU runtime
runs fastest with.

Nothing is on by default, and importing this package switches nothing: the models are then plain JAX/Flax,
differentiable in forward and reverse mode. `magdiff-jax` calls `setup_process()` first thing, and the trainer
trains under `tuning(jax.default_backend() == "cpu")`; from Python:

    from magdiff_jax import cpu
    cpu.enable()                                  # CPU kernels and compile options from here on
    step = jax.jit(train_step, compiler_options=cpu.compiler_options())
    with cpu.tuning(False):                       # the plain model code within the block
        ...

The setting is read when a function is traced (the kernels) and when its compile options are made
(`compiler_options`): a jitted function keeps what it was traced with, and JAX reuses a trace for the same Python
function, so after changing the setting jit a new function (a fresh closure) or call `jax.clear_caches()`. With the
tuning on, results differ from the plain code's only in summation order, but `jax.jvp` through a model raises (the
kernels are custom VJPs). On another backend the tuning changes nothing: each kernel checks when it is traced that
JAX's default backend is the CPU, and `compiler_options` then gives the caller's options alone. `enable()` touches no
JAX backend, so it may run before `jax.distributed.initialize`.
"""

from __future__ import annotations

import contextlib
import functools

from magdiff_jax.cpu import allocator, xla_flags
from magdiff_jax.cpu.allocator import allocator_hint

__all__ = ["allocator_hint", "compiler_options", "disable", "enable", "enabled", "one_writer_per_array",
           "setup_process", "tuning"]

_enabled = False


def enable() -> None:
    """Install the CPU kernels into the layers' override points and turn the CPU compile options on. Idempotent."""
    global _enabled
    from magdiff_jax.cpu import kernels
    from magdiff_jax.layers import kernels as layer_kernels

    layer_kernels.install(kernels.KERNELS)
    _enabled = True


def disable() -> None:
    """Put the layers' default kernels back and turn the CPU compile options off."""
    global _enabled
    from magdiff_jax.layers import kernels as layer_kernels

    layer_kernels.restore_defaults()
    _enabled = False


def enabled() -> bool:
    """Whether the tuning is on (`enable`)."""
    return _enabled


@contextlib.contextmanager
def tuning(on: bool = True):
    """The tuning on (or off) within the block, and back to what it was after it."""
    was = _enabled
    (enable if on else disable)()
    try:
        yield
    finally:
        (enable if was else disable)()


def compiler_options(extra: dict | None = None) -> dict | None:
    """Compile options for `jax.jit(..., compiler_options=...)` or `Lowered.compile`: XLA's CPU convolutions on
    Eigen (`xla_flags`) while the tuning is on, the default backend is the CPU and XLA_FLAGS does not choose the
    library set itself, updated with `extra` (the caller's win); None when empty."""
    options = xla_flags.convolution_options() if _enabled else {}
    return {**options, **(extra or {})} or None


def setup_process() -> None:
    """What `magdiff-jax` does first thing: XLA's CPU convolutions on Eigen for every program (XLA_FLAGS), a
    restart with the glibc malloc tunables when they are missing (`allocator`; never on a GPU or TPU host, see
    `allocator.accelerator_host`), CPU programs run on the calling
    thread, then `enable()`. Call it before JAX starts a backend; the restart replaces the process, so call it
    before any other work."""
    allocator.reexec_with_tunables()  # first: nothing of this process is kept, and jax not yet imported
    xla_flags.add_to_xla_flags()
    allocator.run_cpu_programs_on_calling_thread()
    enable()


@functools.cache  # once per process (Orbax warns on every override)
def one_writer_per_array() -> None:
    """On CPU devices (one host memory), let one replica write each replicated array: Orbax's replica-parallel
    writing slices every array into a piece per replica first, one eager op each (most of a checkpoint's time for a
    small state on 8 devices), for no I/O gain. Orbax already turns it off on GPUs; TPUs keep it."""
    import jax
    from orbax.checkpoint import type_handlers

    type_handlers.register_type_handler(jax.Array, type_handlers.ArrayHandler(use_replica_parallel=False),
                                        override=True)
