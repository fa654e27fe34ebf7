"""The XLA CPU setting the CPU tuning runs with: convolutions on Eigen, matmuls and reductions on YNNPACK.

XLA's CPU backend hands dots, convolutions and reductions to the YNNPACK library by default
(`xla_cpu_experimental_ynn_fusion_type`). Its convolutions run well behind XLA's Eigen ones (a U-Net's 3x3
convolutions with their gradients about twice as long), while its matmuls and reductions are the faster choice; so
the setting takes convolutions off YNNPACK only. It chooses which library runs an operation: results differ only in
summation order. Measurements: benchmarks/README.md, "CPU tuning".

Two ways in, both leaving a user's own choice alone (an `XLA_FLAGS` that names the option wins):
  - `add_to_xla_flags()` appends `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to XLA_FLAGS,
    for every program of the process; it must run before JAX starts its backends (`cpu.setup_process` does so).
  - `convolution_options()` gives the same setting as per-program compile options (for `jax.jit(...,
    compiler_options=...)` or `Lowered.compile`), through `cpu.compiler_options` while the tuning is on.
"""

from __future__ import annotations

import functools
import os

OPTION = "xla_cpu_experimental_ynn_fusion_type"
FLAG = f"--{OPTION}=-individual_convolution"  # XLA_FLAGS form: the default set less convolutions
# the compile-option form names the whole set: XLA's default (dots, convolutions, reductions) less convolutions
VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


def user_chose(environ=os.environ) -> bool:
    """Whether XLA_FLAGS already names the option (then neither way here changes anything)."""
    return OPTION in environ.get("XLA_FLAGS", "")


def add_to_xla_flags(environ=os.environ) -> bool:
    """Append FLAG to XLA_FLAGS unless it names the option already, or JAX's backends have started (XLA reads the
    variable once). Returns whether it was added."""
    if user_chose(environ):
        return False
    if environ is os.environ:
        try:
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized():
                return False
        except (ImportError, AttributeError):
            pass
    environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {FLAG}".strip()
    return True


@functools.cache
def convolution_options() -> dict[str, str]:
    """{OPTION: VALUE} when JAX's default backend is the CPU, XLA_FLAGS does not choose the option, and this XLA
    accepts it (tried once on a one-line program); else {}."""
    import jax
    import jax.numpy as jnp

    if user_chose() or jax.default_backend() != "cpu":
        return {}
    options = {OPTION: VALUE}
    try:
        jax.jit(lambda x: x + 1).lower(jnp.zeros((), jnp.float32)).compile(options)
    except Exception:  # an XLA without the option (or with other values): its defaults stay
        return {}
    return options
