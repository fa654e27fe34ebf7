"""CPU kernels for the layers' override points (`magdiff_jax.layers.kernels`), installed by `magdiff_jax.cpu`.

Each computes what the layers' default computes, up to summation order, in the form XLA's CPU backend runs
fastest (the measurements: benchmarks/README.md, "CPU tuning"):

  matmul                  a custom VJP whose weight gradient contracts the minor axis of its left operand
                          (`weight_gradient`): XLA's CPU matmul library (YNNPACK) takes that form; a product over
                          the tokens (the major axis of both operands) runs in Eigen at a fraction of the speed.
  attention               xla attention with a hand-written backward that keeps the probabilities and takes every
                          gradient product in YNNPACK's operand layout (autodiff's dV = P^T dO and dK = dS^T Q
                          contract the major axis of both operands).
  blockwise_attention     flash attention's bookkeeping: the forward keeps each query's output and log-sum-exp,
                          the backward recomputes a block's probabilities from them (one QK^T product, no second
                          softmax or PV product) and takes its gradients as xla's backward does.
  frame_taps_matmul       TemporalConv's product with a hand-written backward that rebuilds the shifted frames from
                          the input and takes both gradient products as einsums of its own (autodiff of the
                          default's recomputed product gives XLA slower forms of them).
  auto_blockwise          blockwise where the saved probabilities would pass 256 MB (AUTO_BLOCKWISE_MIN_SCORES in
                          fp32), or where each (batch, head) pair has at least 1024 x 1024 scores and all of them
                          pass 16 MB: there the blocks' scores stay in cache.
  group_norm_keeps_batch  a single sample is normalised without its batch axis: YNNPACK sums the middle axis of a
                          (1, N, C) array far slower than the first axis of the (N, C) array it equals, and the
                          gradient's per-channel sums take their shape from the forward.

The first four are custom VJPs and take reverse-mode autodiff only: `jax.jvp` through them raises. Each kernel
checks, when it is traced, that JAX's default backend is the CPU, and computes the layers' default elsewhere.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.layers import kernels as layer_kernels
from magdiff_jax.layers.attention import (
    _blocks_forward,
    _heads_first,
    _logits,
    _merge_queries,
    _per_query,
    _softmax_attention,
    _split_queries,
    _unseen_to_zero,
)
from magdiff_jax.layers.temporal import _shifted_frames

# auto_blockwise: blockwise from this many scores (B * H * Lq * Lk) up, for memory; from AUTO_BLOCKWISE_LARGE_PAIR
# scores up where each (batch, head) pair has at least AUTO_BLOCKWISE_PAIR_SCORES (Lq * Lk), for speed.
AUTO_BLOCKWISE_MIN_SCORES = 1 << 26
AUTO_BLOCKWISE_LARGE_PAIR = 1 << 22
AUTO_BLOCKWISE_PAIR_SCORES = 1 << 20
# weight_gradient with in == out: x^T materialised from this many features up
WEIGHT_GRADIENT_TRANSPOSE_MIN = 256


# --- dense layers ---------------------------------------------------------------------------------------------------

@jax.custom_vjp
def matmul(x, kernel):
    """x (..., in) @ kernel (in, out); its backward takes the weight gradient as `weight_gradient` does."""
    return jnp.dot(x, kernel)


def _matmul_fwd(x, kernel):
    return jnp.dot(x, kernel), (x, kernel)


def _matmul_bwd(res, d_y):
    x, kernel = res
    return jnp.dot(d_y, kernel.T), weight_gradient(x, d_y)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def weight_gradient(x, d_y):
    """x^T dy over every leading axis: x (..., in), dy (..., out) -> (in, out), the weight gradient of x @ kernel.
    One operand is transposed first, the narrower one, behind an optimization barrier (XLA would fold the transpose
    back into the product): where in < out, x^T @ dy; where in > out, (dy^T @ x)^T, with a second barrier around the
    product, else XLA rewrites the final transpose as x^T dy again; where in == out, x^T @ dy from
    WEIGHT_GRADIENT_TRANSPOSE_MIN features up, and XLA's own product below (there a transpose costs what it saves)."""
    n_in, n_out = x.shape[-1], d_y.shape[-1]
    x, d_y = x.reshape(-1, n_in), d_y.reshape(-1, n_out)
    if n_in > n_out:
        return jax.lax.optimization_barrier(jax.lax.optimization_barrier(d_y.T) @ x).T
    if n_in < n_out or n_in >= WEIGHT_GRADIENT_TRANSPOSE_MIN:
        return jax.lax.optimization_barrier(x.T) @ d_y
    return x.T @ d_y


# --- TemporalConv --------------------------------------------------------------------------------------------------

@jax.custom_vjp
def frame_taps_matmul(x, kernel):
    """`_shifted_frames(x) @ kernel` (`layers.temporal`), its backward keeping only x and rebuilding the shifted
    frames."""
    return jnp.einsum("bfhwk,kd->bfhwd", _shifted_frames(x), kernel)


def _frame_taps_matmul_fwd(x, kernel):
    return frame_taps_matmul(x, kernel), (x, kernel)


def _frame_taps_matmul_bwd(res, d_y):
    x, kernel = res
    shifted, shift_vjp = jax.vjp(_shifted_frames, x)
    d_kernel = jnp.einsum("bfhwk,bfhwd->kd", shifted, d_y)
    (d_x,) = shift_vjp(jnp.einsum("bfhwd,kd->bfhwk", d_y, kernel))
    return d_x, d_kernel


frame_taps_matmul.defvjp(_frame_taps_matmul_fwd, _frame_taps_matmul_bwd)


# --- GroupNorm ------------------------------------------------------------------------------------------------------

def group_norm_keeps_batch(x) -> bool:
    """Keep the batch axis unless there is a single sample (module docstring)."""
    return x.shape[0] != 1


# --- attention ------------------------------------------------------------------------------------------------------

def auto_blockwise(q, k) -> bool:
    """auto's choice (module docstring): blockwise for many scores, or for large pairs and enough of them."""
    scores = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]
    large_pairs = q.shape[1] * k.shape[1] >= AUTO_BLOCKWISE_PAIR_SCORES and scores >= AUTO_BLOCKWISE_LARGE_PAIR
    return scores >= AUTO_BLOCKWISE_MIN_SCORES or large_pairs


def _no_gradient(mask):
    """The cotangent of a boolean mask (or None) in a custom VJP: float0 zeros."""
    return jax.tree.map(lambda m: np.zeros(m.shape, jax.dtypes.float0), mask)


def _softmax_attention_backward(scale, q, k, v, out, weights, d_out):
    """Softmax attention's gradient from the probabilities P, heads-first (q scaled), every product in the layout
    YNNPACK runs at full speed: dV^T = dO^T P and dK^T = Q^T dS are taken as (D, Lq) x (Lq, Lk) products.
    dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale. Returns dQ (B, H, Lq, D), dK^T and dV^T
    (B, H, D, Lk)."""
    d_vt = jnp.einsum("bhdq,bhqk->bhdk", jnp.swapaxes(d_out, 2, 3), weights)
    d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits = (weights.astype(jnp.float32) * (d_weights - row)).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k) * jnp.asarray(scale, q.dtype)
    d_kt = jnp.einsum("bhdq,bhqk->bhdk", jnp.swapaxes(q, 2, 3), d_logits)
    return d_q, d_kt, d_vt


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def attention(q, k, v, mask, scale):
    """The `attention` override point with a backward that keeps the probabilities (B * H * Lq * Lk values, as
    autodiff of the same forward does) instead of recomputing them; the mask gets no gradient."""
    return _attention_fwd(q, k, v, mask, scale)[0]


def _attention_fwd(q, k, v, mask, scale):
    q, k, v = _heads_first(q * jnp.asarray(scale, q.dtype)), _heads_first(k), _heads_first(v)
    out, weights, _ = _softmax_attention(q, k, v, mask)
    return _heads_first(out), (q, k, v, out, weights, mask)


def _attention_bwd(scale, res, d_out):
    *res, mask = res
    d_q, d_kt, d_vt = _softmax_attention_backward(scale, *res, _heads_first(d_out))
    from_transposed = lambda t: jnp.transpose(t, (0, 3, 1, 2))  # (B, H, D, L) -> (B, L, H, D)
    return _heads_first(d_q), from_transposed(d_kt), from_transposed(d_vt), _no_gradient(mask)


attention.defvjp(_attention_fwd, _attention_bwd)


def _output_and_lse(q, k, v, mask):
    out, _, lse = _softmax_attention(q, k, v, mask)
    return out, lse


def _blocks_backward(scale, q, k, v, mask, out, lse, d_out, n_q):
    """dQ, dK^T, dV^T of one block of pairs: its probabilities recomputed from the saved log-sum-exp (no second
    softmax, no second P V product); over query blocks dK^T and dV^T are summed in fp32."""

    def one(qb, mb, ob, lb, db):
        weights = _unseen_to_zero(jnp.exp(_logits(qb, k, mb) - lb), mb)
        return _softmax_attention_backward(scale, qb, k, v, ob, weights.astype(v.dtype), db)

    if n_q == 1:
        return one(q, mask, out, lse, d_out)
    per_query = _per_query(mask)

    def step(acc, xs):
        qb, mb, ob, lb, db = xs
        d_q, d_kt, d_vt = one(qb, mb if per_query else mask, ob, lb, db)
        return (acc[0] + d_kt.astype(jnp.float32), acc[1] + d_vt.astype(jnp.float32)), d_q

    split = lambda t: _split_queries(t, n_q)
    acc = (jnp.zeros(k.shape[:-2] + k.shape[:-3:-1], jnp.float32),) * 2  # (..., D, Lk)
    (d_kt, d_vt), d_q = jax.lax.scan(
        step, acc, (split(q), split(mask) if per_query else None, split(out), split(lse), split(d_out)))
    return _merge_queries(d_q), d_kt.astype(k.dtype), d_vt.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blockwise_attention(q, k, v, mask, scale, n_q):
    """The `blockwise_attention` override point with flash attention's bookkeeping: the forward keeps each block's
    output and log-sum-exp (Lq values per pair) instead of its probabilities; the backward recomputes a block's
    probabilities from them: five products a block instead of the six of a recomputed forward and its backward."""
    return _blockwise_attention_fwd(q, k, v, mask, scale, n_q)[0]


def _blockwise_attention_fwd(q, k, v, mask, scale, n_q):
    q = q * jnp.asarray(scale, q.dtype)
    out, lse = jax.lax.map(lambda xs: _blocks_forward(_output_and_lse, *xs, n_q), (q, k, v, mask))
    return out, (q, k, v, mask, out, lse)


def _blockwise_attention_bwd(scale, n_q, res, d_out):
    q, k, v, mask, out, lse = res
    d_q, d_kt, d_vt = jax.lax.map(lambda xs: _blocks_backward(scale, *xs, n_q), (q, k, v, mask, out, lse, d_out))
    return d_q, jnp.swapaxes(d_kt, -1, -2), jnp.swapaxes(d_vt, -1, -2), _no_gradient(mask)


blockwise_attention.defvjp(_blockwise_attention_fwd, _blockwise_attention_bwd)


# --- installation ---------------------------------------------------------------------------------------------------

def _on_cpu_backend(name: str, kernel):
    """`kernel` where JAX's default backend is the CPU when it is traced, the layers' default elsewhere."""
    default = layer_kernels.DEFAULTS[name]

    @functools.wraps(kernel)
    def pick(*args):
        return (kernel if jax.default_backend() == "cpu" else default)(*args)

    return pick


KERNELS = {name: _on_cpu_backend(name, fn) for name, fn in (
    ("matmul", matmul), ("group_norm_keeps_batch", group_norm_keeps_batch), ("attention", attention),
    ("blockwise_attention", blockwise_attention), ("auto_blockwise", auto_blockwise),
    ("frame_taps_matmul", frame_taps_matmul))}
