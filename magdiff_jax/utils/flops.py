"""Analytic FLOP counts of a JAX function, from the shapes of its matmuls and convolutions.

The convention of PERF.md (and maxdiffusion): a dense layer costs 2 * tokens * in * out, a convolution
2 * output_elements * in_channels * prod(kernel), attention its two batched matmuls (QK^T and AV); norms,
activations and other elementwise work are not counted. A training step is 3x the forward (recompute from remat
is not counted). The count walks the function's jaxpr (through jit, remat, custom-vjp and scan bodies, scans
multiplied by their length), so it follows the model as written, and `benchmarks/` cross-checks it against
XLA's own `cost_analysis()`.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core as jex_core


def _dot_flops(eqn) -> int:
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    contract = math.prod(lhs[d] for d in lc)
    batch = math.prod(lhs[d] for d in lb)
    lhs_free = math.prod(s for d, s in enumerate(lhs) if d not in lc and d not in lb)
    rhs_free = math.prod(s for d, s in enumerate(rhs) if d not in rc and d not in rb)
    return 2 * batch * lhs_free * rhs_free * contract


def _conv_flops(eqn) -> int:
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params["dimension_numbers"]
    kernel_in = rhs[dn.rhs_spec[1]]  # input channels per group, so grouped convolutions count right too
    kernel_spatial = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    return 2 * math.prod(out) * kernel_in * kernel_spatial


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        if isinstance(value, jex_core.ClosedJaxpr):
            yield value.jaxpr
        elif isinstance(value, jex_core.Jaxpr):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                if isinstance(v, jex_core.ClosedJaxpr):
                    yield v.jaxpr
                elif isinstance(v, jex_core.Jaxpr):
                    yield v


def jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        if prim == "dot_general":
            total += _dot_flops(eqn)
        elif prim == "conv_general_dilated":
            total += _conv_flops(eqn)
        else:
            inner = sum(jaxpr_flops(j) for j in _sub_jaxprs(eqn))
            if prim == "scan":
                inner *= eqn.params["length"]
            elif prim == "cond":
                inner = max((jaxpr_flops(j) for j in _sub_jaxprs(eqn)), default=0)
            total += inner
    return total


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call `fn(*args, **kwargs)` (matmuls and convolutions only)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)
