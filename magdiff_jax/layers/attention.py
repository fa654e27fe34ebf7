"""The one attention entry point, the diffusers-named `Attention` layer built on it, and `EntityAttention` (its
decoupled text/image cross-attention variant for MagDiff).

Every attention in the project (CLIP self-attention, VAE mid-block attention, U-Net self/cross/temporal
attention) calls `dot_product_attention`, whose `implementation` comes from the model config:

  xla        two einsums around an fp32 softmax, with a hand-written backward (custom VJP) that keeps the
             probabilities and takes every gradient product in the operand layout XLA's CPU matmuls run fastest
             (autodiff's dV = P^T dO and dK = dS^T Q contract the major axis of both operands); any backend, any
             dtype. A query whose keys are all masked out gets a zero output, as PyTorch's SDPA gives.
  blockwise  the same computation over blocks of queries (`lax.map`), each block rematerialised in the backward
             pass, so the (Lq, Lk) score matrix never exists whole: activation memory O(Lq * block) instead of
             O(Lq * Lk). The outputs are those of xla (each query row is the same computation). Blocks hold at
             most BLOCK_SCORES scores.
  cudnn      cuDNN flash attention on a CUDA GPU (fp16/bf16, head_dim a multiple of 8 and at most 128). Asking for
             it elsewhere is an error that says why; tests gate it on `cudnn_available()`.
  auto       (the model configs' default) cudnn where it is available and applicable and the sequence is long
             enough to gain from it; on CPU, blockwise once the scores pass AUTO_BLOCKWISE_MIN_SCORES (where the
             saved probabilities would pass 256 MB per attention in fp32); else xla.
             Forward + backward on a 2-core CPU, q/k/v (8, 1024, 2, 32), alternating runs: xla 37 ms, blockwise
             61 ms, autodiff of the same forward 72 ms (PyTorch's SDPA, flash kernel: 50-61 ms); at
             (1024, 8, 8, 32) (temporal attention) 14 / 17 / 20 ms.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.layers.common import dense
from magdiff_jax.layers.remat import tag

IMPLEMENTATIONS = ("xla", "blockwise", "cudnn", "auto")
# Below this many keys the fused kernel does not pay for itself (77-token prompts, 16-frame temporal attention).
AUTO_CUDNN_MIN_LENGTH = 256
# auto on CPU: blockwise from this many scores (B * H * Lq * Lk) up; a block holds at most BLOCK_SCORES of them.
AUTO_BLOCKWISE_MIN_SCORES = 1 << 26
BLOCK_SCORES = 1 << 21


@functools.cache
def cudnn_available() -> bool:
    """True when JAX sees a CUDA GPU (where cuDNN flash attention can run)."""
    try:
        return any(d.platform == "gpu" and "cuda" in d.client.platform_version.lower() for d in jax.devices())
    except RuntimeError:
        return False


def _cudnn_applicable(q, k) -> bool:
    head_dim = q.shape[-1]
    return q.dtype in (jnp.float16, jnp.bfloat16) and head_dim % 8 == 0 and head_dim <= 128


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: str = "xla",
) -> jax.Array:
    """Scaled dot-product attention.

    Args:
      q: (B, Lq, H, D) queries; k, v: (B, Lk, H, D) keys and values.
      mask: optional boolean mask broadcastable to (B, H, Lq, Lk); True keeps a key.
      is_causal: apply a causal (lower-triangular) mask.
      scale: logit scale, default 1/sqrt(D).
      implementation: "xla", "cudnn" or "auto" (module docstring).
    Returns:
      (B, Lq, H, D), in q's dtype.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")
    impl = "xla"
    if implementation == "cudnn":
        if not cudnn_available():
            raise RuntimeError("attention implementation 'cudnn' needs a CUDA GPU; none is visible to JAX")
        if not _cudnn_applicable(q, k):
            raise ValueError(
                "cuDNN flash attention needs fp16/bf16 inputs and a head_dim that is a multiple of 8 and <= 128; "
                f"got dtype {q.dtype} and head_dim {q.shape[-1]}"
            )
        impl = "cudnn"
    elif implementation == "blockwise":
        impl = "blockwise"
    elif implementation == "auto":
        if cudnn_available() and _cudnn_applicable(q, k):
            impl = "cudnn" if k.shape[1] >= AUTO_CUDNN_MIN_LENGTH else "xla"
        elif jax.default_backend() == "cpu" and _num_scores(q, k) >= AUTO_BLOCKWISE_MIN_SCORES:
            impl = "blockwise"
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation="cudnn"
        ).astype(q.dtype)
    if impl == "blockwise":
        return _blockwise_attention(q, k, v, mask, is_causal, scale)
    return _xla_attention(q, k, v, mask, is_causal, scale)


def _num_scores(q, k) -> int:
    return q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]


def _num_blocks(q, k) -> int:
    """The fewest query blocks (a divisor of Lq) whose scores fit BLOCK_SCORES each."""
    length, per_query = q.shape[1], _num_scores(q, k) // q.shape[1]
    for n in range(1, length + 1):
        if length % n == 0 and (length // n) * per_query <= BLOCK_SCORES:
            return n
    return length


def _blockwise_attention(q, k, v, mask, is_causal, scale):
    b, length, h, d = q.shape
    n = _num_blocks(q, k)
    if is_causal:
        causal = jnp.tril(jnp.ones((length, k.shape[1]), jnp.bool_))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    blocks = lambda t, axis: jnp.moveaxis(t.reshape(*t.shape[:axis], n, t.shape[axis] // n, *t.shape[axis + 1:]),
                                          axis, 0)
    xs = [blocks(q, 1)]
    if mask is not None:  # split its query axis with q's (a mask that does not vary over queries is shared)
        mask = jnp.asarray(mask).reshape((1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))
        if mask.shape[2] != 1:
            xs.append(blocks(jnp.broadcast_to(mask, (*mask.shape[:2], length, mask.shape[3])), 2))

    @jax.checkpoint
    def block(xs):
        block_mask = xs[1] if len(xs) > 1 else mask
        return _xla_attention(xs[0], k, v, block_mask, False, scale)

    out = jax.lax.map(block, xs)  # (n, B, Lq / n, H, D)
    return jnp.moveaxis(out, 0, 1).reshape(b, length, h, d)


def _xla_attention(q, k, v, mask, is_causal, scale):
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), jnp.bool_))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _attention(q, k, v, None if mask is None else jnp.asarray(mask), scale)


def _heads_first(t):
    return jnp.swapaxes(t, 1, 2)  # (B, L, H, D) <-> (B, H, L, D)


def _attention_forward(q, k, v, mask, scale):
    """The forward of `_attention`: the output (B, Lq, H, D) and the backward's residuals, heads-first."""
    q, k, v = _heads_first(q * jnp.asarray(scale, q.dtype)), _heads_first(k), _heads_first(v)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)  # (B, H, Lq, Lk)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    if mask is not None:  # a query with no visible key attends to nothing
        weights = jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)
    weights = weights.astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).astype(q.dtype)
    return _heads_first(out), (q, k, v, out, weights)


def _attention_backward(scale, res, d_out):
    """Softmax attention's gradient from the saved probabilities P, heads-first, with every product in a form XLA's
    CPU matmul library runs at full speed: dV^T = dO^T P and dK^T = Q^T dS are taken as (D, Lq) x (Lq, Lk)
    products (their transposed forms, contracting the major query axis of both operands, ran 2-4x slower).
    dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K * scale."""
    q, k, v, out, weights = res
    d_out = _heads_first(d_out)
    d_vt = jnp.einsum("bhdq,bhqk->bhdk", jnp.swapaxes(d_out, 2, 3), weights)
    d_weights = jnp.einsum("bhqd,bhkd->bhqk", d_out, v, preferred_element_type=jnp.float32)
    row = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
    d_logits = (weights.astype(jnp.float32) * (d_weights - row)).astype(q.dtype)
    d_q = jnp.einsum("bhqk,bhkd->bhqd", d_logits, k) * jnp.asarray(scale, q.dtype)
    d_kt = jnp.einsum("bhdq,bhqk->bhdk", jnp.swapaxes(q, 2, 3), d_logits)
    from_transposed = lambda t: jnp.transpose(t, (0, 3, 1, 2))  # (B, H, D, L) -> (B, L, H, D)
    return _heads_first(d_q), from_transposed(d_kt), from_transposed(d_vt)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask, scale):
    """Softmax attention (B, Lq, H, D) x (B, Lk, H, D) -> (B, Lq, H, D) under an optional boolean mask
    (broadcastable to (B, H, Lq, Lk), True keeps a key; it gets no gradient). The backward keeps the probabilities
    (B * H * Lq * Lk values, as autodiff of the same forward does) instead of recomputing them."""
    return _attention_forward(q, k, v, mask, scale)[0]


def _attention_fwd(q, k, v, mask, scale):
    out, res = _attention_forward(q, k, v, mask, scale)
    return out, (res, mask)


def _attention_bwd(scale, res, d_out):
    res, mask = res
    no_grad = jax.tree.map(lambda m: np.zeros(m.shape, jax.dtypes.float0), mask)
    return (*_attention_backward(scale, res, d_out), no_grad)


_attention.defvjp(_attention_fwd, _attention_bwd)


class Attention(nn.Module):
    """Multi-head attention named as diffusers' `Attention`: `to_q`, `to_k`, `to_v`, `to_out_0`.

    Self-attention when `context` is None, cross-attention over `context` (B, Lk, cross_attention_dim) otherwise.
    Input (B, L, query_dim) -> output (B, L, query_dim).
    """

    query_dim: int
    heads: int
    dim_head: int
    qkv_bias: bool = False
    out_bias: bool = True
    implementation: str = "xla"
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, mask=None):
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        context = x if context is None else context
        q = dense(inner, axes=("embed", "heads"), use_bias=self.qkv_bias, name="to_q", **kw)(x)
        k = dense(inner, axes=("embed", "heads"), use_bias=self.qkv_bias, name="to_k", **kw)(context)
        v = dense(inner, axes=("embed", "heads"), use_bias=self.qkv_bias, name="to_v", **kw)(context)
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim_head)  # (B, L, H, D)
        q, k, v = split(q), split(k), split(v)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        out = dot_product_attention(q, k, v, mask=mask, implementation=self.implementation)
        out = tag(out.reshape(*out.shape[:-2], inner), "attention")
        return dense(self.query_dim, axes=("heads", "embed"), use_bias=self.out_bias, name="to_out_0", **kw)(out)


def _scalar(module: nn.Module, name: str, value: float, dtype):
    """A learnable scalar parameter (shape (), no logical axes to name)."""
    return module.param(name, nn.with_logical_partitioning(nn.initializers.constant(value), ()), (), dtype)


class EntityAttention(Attention):
    """Decoupled text/image cross-attention (MagDiff's APA / VideoAssembler's EPAF; IP-Adapter's decoupled
    cross-attention with learnable branch weights), at the place of a `BasicTransformerBlock`'s `attn2`:

        out = to_out_0( text_scale * Attn(Q, K_t, V_t) + image_scale * Attn(Q, K_i, V_i) )
        Q = to_q(x),  K_t, V_t = to_k(context), to_v(context),  K_i, V_i = to_k_ip(image), to_v_ip(image)

    The heads and `to_out_0` are shared by the two branches. Parameters: `to_q`, `to_k`, `to_v`, `to_out_0` (as
    `Attention`'s), the bias-free `to_k_ip` and `to_v_ip` (shaped as `to_k`/`to_v`; when a pretrained U-Net is
    extended they start as copies of `to_k`/`to_v`, see `models.magdiff`) and the scalars `text_scale` (init 1.0)
    and `image_scale` (init 1.5). Being bias-free, all-zero image tokens give V_i = 0 and so an image branch of
    exactly zero.

    x (B, L, query_dim), context (B, Lt, cross_attention_dim), image_context (B, Li, cross_attention_dim),
    image_mask: optional boolean, broadcastable to (B, heads, L, Li), True keeps an image token.
    Returns (B, L, query_dim).
    """

    text_scale_init: float = 1.0
    image_scale_init: float = 1.5

    @nn.compact
    def __call__(self, x, context, image_context, image_mask=None):
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        proj = lambda name, bias: dense(inner, axes=("embed", "heads"), use_bias=bias, name=name, **kw)
        split = lambda t: t.reshape(*t.shape[:-1], self.heads, self.dim_head)  # (B, L, H, D)
        q = split(proj("to_q", self.qkv_bias)(x))
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        k, v = split(proj("to_k", self.qkv_bias)(context)), split(proj("to_v", self.qkv_bias)(context))
        k_ip, v_ip = split(proj("to_k_ip", False)(image_context)), split(proj("to_v_ip", False)(image_context))
        text = dot_product_attention(q, k, v, implementation=self.implementation)
        image = dot_product_attention(q, k_ip, v_ip, mask=image_mask, implementation=self.implementation)
        text_scale = _scalar(self, "text_scale", self.text_scale_init, self.param_dtype)
        image_scale = _scalar(self, "image_scale", self.image_scale_init, self.param_dtype)
        out = text_scale.astype(text.dtype) * text + image_scale.astype(image.dtype) * image
        out = tag(out.reshape(*out.shape[:-2], inner), "attention")
        return dense(self.query_dim, axes=("heads", "embed"), use_bias=self.out_bias, name="to_out_0", **kw)(out)
