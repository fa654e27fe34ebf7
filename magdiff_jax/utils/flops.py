"""Analytic FLOP counts of a JAX function, from the shapes of its matmuls and convolutions.

The convention of PERF.md (and maxdiffusion): a dense layer costs 2 * tokens * in * out, a convolution
2 * output_elements * in_channels * prod(kernel), attention its two batched matmuls (QK^T and AV); norms,
activations and other elementwise work are not counted. A training step is 3x the forward (recompute from remat
is not counted). The count walks the function's jaxpr (through jit, remat, custom-vjp and scan bodies, scans
multiplied by their length), so it follows the model as written, and `benchmarks/` cross-checks it against
XLA's own `cost_analysis()`.

XLA counts a convolution's multiply-adds only where the kernel tap lands on the input, not on its zero padding: a
3x3 "SAME" convolution on 16x16 counts (46/48)^2 = 92% of the convention's, on 32x32 96%. `count_in_bounds_flops`
counts that way too (the same walk, convolutions by their in-bounds taps), for comparisons with XLA at small sizes.
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


def _in_bounds_taps(n: int, k: int, out: int, stride: int, pad_lo: int, lhs_dil: int, rhs_dil: int) -> int:
    """(output position, kernel tap) pairs of one spatial axis whose tap lands on an input element."""
    dilated = (n - 1) * lhs_dil + 1
    return sum(1 for o in range(out) for t in range(k)
               if 0 <= (p := o * stride + t * rhs_dil - pad_lo) < dilated and p % lhs_dil == 0)


def _conv_flops(eqn, in_bounds: bool = False) -> int:
    """2 * batch * output features * (output position, kernel tap) pairs * input channels per group: every pair in
    the convention, only the in-bounds ones with `in_bounds`."""
    out = eqn.outvars[0].aval.shape
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    params = eqn.params
    dn = params["dimension_numbers"]
    kernel_in = rhs[dn.rhs_spec[1]]  # input channels per group, so grouped convolutions count right too
    spatial = len(dn.rhs_spec) - 2
    lhs_dil = params.get("lhs_dilation") or (1,) * spatial
    rhs_dil = params.get("rhs_dilation") or (1,) * spatial
    taps = _in_bounds_taps if in_bounds else (lambda n, k, out, *_: out * k)
    pairs = math.prod(
        taps(lhs[dn.lhs_spec[2 + i]], rhs[dn.rhs_spec[2 + i]], out[dn.out_spec[2 + i]],
             params["window_strides"][i], params["padding"][i][0], lhs_dil[i], rhs_dil[i])
        for i in range(spatial))
    return 2 * out[dn.out_spec[0]] * out[dn.out_spec[1]] * pairs * kernel_in


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


def jaxpr_flops(jaxpr, in_bounds: bool = False) -> int:
    """The convention's FLOPs of a jaxpr; `in_bounds`: convolutions by their in-bounds taps (module docstring)."""
    total = 0
    for eqn in jaxpr.eqns:
        prim = eqn.primitive.name
        if prim == "dot_general":
            total += _dot_flops(eqn)
        elif prim == "conv_general_dilated":
            total += _conv_flops(eqn, in_bounds)
        else:
            inner = sum(jaxpr_flops(j, in_bounds) for j in _sub_jaxprs(eqn))
            if prim == "scan":
                inner *= eqn.params["length"]
            elif prim == "cond":
                inner = max((jaxpr_flops(j, in_bounds) for j in _sub_jaxprs(eqn)), default=0)
            total += inner
    return total


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs of one call `fn(*args, **kwargs)` (matmuls and convolutions only)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr)


def count_in_bounds_flops(fn, *args, **kwargs) -> int:
    """`count_flops` with each convolution counted by its in-bounds taps only, as XLA's `cost_analysis()` counts."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args, **kwargs).jaxpr, in_bounds=True)
