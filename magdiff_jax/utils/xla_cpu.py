"""The XLA CPU setting the project runs with: convolutions on Eigen, matmuls and reductions on YNNPACK.

XLA's CPU backend hands dots, convolutions and reductions to the YNNPACK library by default
(`xla_cpu_experimental_ynn_fusion_type`). Its convolutions are the slow part of that: on a 2-core AMD EPYC (Zen 4,
AVX-512), a 3x3 convolution (8, 32, 32, 64) -> 64 channels, forward + backward, takes 8.2 ms in YNNPACK against
6.6 ms in PyTorch, and the weight gradient alone 4.7 ms; a diffusers-style ResnetBlock2D at that size ran its
forward + backward in 24 ms with YNNPACK convolutions and 11.5 ms with XLA's Eigen convolutions (PyTorch: 12-13
ms). YNNPACK's matmuls and reductions stay: without them the same U-Net step ran 1.5x slower. The 15M-parameter
unet3d training step of `benchmarks/unet_cpu.py` is ~7% faster this way.

Two ways in, both leaving a user's own choice alone (an `XLA_FLAGS` that names the option wins):
  - `add_to_xla_flags()` appends `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to XLA_FLAGS,
    for every program of the process; it must run before JAX starts its backends (`magdiff-jax` does it first).
  - `compiler_options()` gives the same setting as per-program compile options (for `jax.jit(...,
    compiler_options=...)` or `Lowered.compile`) when JAX's default backend is the CPU: the trainer's step and the
    pipelines' sampling loops use it, so a notebook gets the faster convolutions too.
The setting only chooses which library runs an operation; results differ from YNNPACK's only in summation order.
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
def compiler_options() -> dict[str, str]:
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


def merged(options: dict | None) -> dict | None:
    """`compiler_options()` updated with `options` (the caller's win); None when both are empty."""
    return {**compiler_options(), **(options or {})} or None
