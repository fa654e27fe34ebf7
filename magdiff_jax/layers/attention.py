"""The one attention entry point, the diffusers-named `Attention` layer built on it, and `EntityAttention` (its
decoupled text/image cross-attention variant: MagDiff's APA with learnable branch weights, IP-Adapter's and
MagicVideo-V2's appearance attention with a fixed image weight).

Every attention in the project (CLIP self-attention, VAE mid-block attention, U-Net self/cross/temporal
attention) calls `dot_product_attention`, whose `implementation` comes from the model config:

  xla        two einsums around an fp32 softmax; any backend, any dtype. A query whose keys are all masked out
             gets a zero output, as PyTorch's SDPA gives.
  blockwise  the same computation a block at a time (`lax.map`): a block holds whole (batch, head) pairs, as many
             as fit BLOCK_SCORES scores, or, where one pair's scores do not fit, a slice of one pair's queries.
             Each block is recomputed in the backward rather than saved, so the (Lq, Lk) score matrix never
             exists whole: activation memory O(block) instead of O(B * H * Lq * Lk). The outputs are those of xla
             (each query row is the same computation). It loops over batch and heads, one block after another: it
             suits one device; where batch or heads are sharded, name xla.
  cudnn      cuDNN flash attention on a CUDA GPU (fp16/bf16, head_dim a multiple of 8 and at most 128). Asking for
             it elsewhere is an error that says why; tests gate it on `cudnn_available()`.
  pallas_tpu Pallas TPU flash attention (JAX's splash attention kernel, as maxdiffusion runs it:
             `layers.pallas_attention`): lengths and head_dim padded to the kernel's 128-multiple blocks, a
             key-padding mask (broadcastable to (B, 1, 1, Lk)) as segment ids, causal masks, its own backward, and
             under a multi-device mesh a `shard_map` over batch and heads. Masks that vary over heads or queries
             are refused. On a TPU; elsewhere only inside `pallas_attention.interpret_mode()` (the tests run it so
             on CPU), an error that says why otherwise.
  auto       (the model configs' default) cudnn where it is available and applicable and the sequence is long
             enough to gain from it; on a TPU pallas_tpu where both lengths are at least
             `pallas_attention.AUTO_MIN_LENGTH`, head_dim pads to 128 at most twice over and the mask is one it
             takes; else blockwise where the override point `auto_blockwise` says so (never by default;
             `magdiff_jax.cpu` takes it for large score matrices on CPU); else xla. Pallas is not imported, nor
             its kernels traced, on other backends.

xla's and blockwise's computations are the override points `attention` and `blockwise_attention`
(`layers.kernels`): plain JAX by default, differentiated by autodiff in either mode; `magdiff_jax.cpu` replaces
them by kernels with hand-written backwards built from the helpers here.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magdiff_jax.layers import kernels, pallas_attention
from magdiff_jax.layers.common import dense
from magdiff_jax.layers.remat import tag

IMPLEMENTATIONS = ("xla", "blockwise", "cudnn", "pallas_tpu", "auto")
# Below this many keys the fused kernel does not pay for itself (77-token prompts, 16-frame temporal attention).
AUTO_CUDNN_MIN_LENGTH = 256
# A blockwise block holds at most this many scores (4 MB in fp32: it stays in cache).
BLOCK_SCORES = 1 << 20


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
      implementation: "xla", "blockwise", "cudnn", "pallas_tpu" or "auto" (module docstring).
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
    elif implementation in ("blockwise", "pallas_tpu"):
        impl = implementation
    elif implementation == "auto":
        if cudnn_available() and _cudnn_applicable(q, k):
            impl = "cudnn" if k.shape[1] >= AUTO_CUDNN_MIN_LENGTH else "xla"
        elif pallas_attention.tpu_available() and pallas_attention.auto_applicable(q, k, v, mask):
            impl = "pallas_tpu"
        elif kernels.get("auto_blockwise")(q, k):
            impl = "blockwise"
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, scale=scale, implementation="cudnn"
        ).astype(q.dtype)
    if impl == "pallas_tpu":
        return pallas_attention.splash_attention(q, k, v, mask=mask, is_causal=is_causal, scale=scale)
    if is_causal:
        causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), jnp.bool_))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "blockwise":
        return _blockwise_attention(q, k, v, mask, scale)
    return kernels.get("attention")(q, k, v, None if mask is None else jnp.asarray(mask), scale)


@kernels.default("auto_blockwise")
def never_blockwise(q, k) -> bool:
    return False


@kernels.default("attention")
def plain_attention(q, k, v, mask, scale):
    """Softmax attention (B, Lq, H, D) x (B, Lk, H, D) -> (B, Lq, H, D) under an optional boolean mask
    (broadcastable to (B, H, Lq, Lk), True keeps a key), differentiated by autodiff."""
    q, k, v = _heads_first(q * jnp.asarray(scale, q.dtype)), _heads_first(k), _heads_first(v)
    return _heads_first(_softmax_attention(q, k, v, mask)[0])


def _divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of n that is at most limit (at least 1)."""
    return max(d for d in range(1, min(n, max(limit, 1)) + 1) if n % d == 0)


def _blocks(q, k) -> tuple[int, int]:
    """blockwise's tiling: (pairs per block, query blocks). A block holds whole (batch, head) pairs while a pair's
    scores fit BLOCK_SCORES (as many pairs as fit), else one pair's queries split into the fewest blocks that fit."""
    pairs, per_pair = q.shape[0] * q.shape[2], q.shape[1] * k.shape[1]
    if per_pair <= BLOCK_SCORES:
        return _divisor_at_most(pairs, BLOCK_SCORES // per_pair), 1
    length = q.shape[1]
    return 1, length // _divisor_at_most(length, BLOCK_SCORES // k.shape[1])


def _blockwise_attention(q, k, v, mask, scale):
    b, lq, h, d = q.shape
    group, n_q = _blocks(q, k)
    # (B, L, H, D) -> (pairs / group, group, 1, L, D): heads first, each block a batch of `group` single-head pairs
    pairs = lambda t: _heads_first(t).reshape(b * h // group, group, 1, t.shape[1], t.shape[3])
    if mask is not None:  # broadcast over batch and heads, its query axis kept where it is shared (size 1)
        mask = jnp.asarray(mask).reshape((1,) * (4 - jnp.ndim(mask)) + jnp.shape(mask))
        mask = jnp.broadcast_to(mask, (b, h, *mask.shape[2:])).reshape(b * h // group, group, 1, *mask.shape[2:])
    # (pairs / group, group, 1, Lq, D)
    out = kernels.get("blockwise_attention")(pairs(q), pairs(k), pairs(v), mask, scale, n_q)
    return _heads_first(out.reshape(b, h, lq, d))


def _split_queries(t, n_q):
    """(..., L, X) -> (n_q, ..., L / n_q, X): the query blocks of one block of pairs, leading."""
    return jnp.moveaxis(t.reshape(*t.shape[:-2], n_q, t.shape[-2] // n_q, t.shape[-1]), -3, 0)


def _merge_queries(t):
    """The inverse of `_split_queries`."""
    t = jnp.moveaxis(t, 0, -3)
    return t.reshape(*t.shape[:-3], t.shape[-3] * t.shape[-2], t.shape[-1])


def _per_query(mask) -> bool:
    return mask is not None and mask.shape[-2] != 1


def _blocks_forward(attend, q, k, v, mask, n_q):
    """`attend(q, k, v, mask)` (heads-first attention of scaled queries, giving arrays with the query axis second to
    last) on one block of pairs, its queries `n_q` blocks at a time."""
    if n_q == 1:
        return attend(q, k, v, mask)
    per_query = _per_query(mask)
    one = lambda xs: attend(xs[0], k, v, xs[1] if per_query else mask)
    out = jax.lax.map(one, (_split_queries(q, n_q), _split_queries(mask, n_q) if per_query else None))
    return jax.tree.map(_merge_queries, out)


@jax.checkpoint
def _recomputed_output(q, k, v, mask):
    """The output of `_softmax_attention`, recomputed in the backward rather than saved (its probabilities)."""
    return _softmax_attention(q, k, v, mask)[0]


@kernels.default("blockwise_attention")
def plain_blockwise_attention(q, k, v, mask, scale, n_q):
    """blockwise's computation on (blocks, group, 1, L, D) heads-first pairs: a loop over the blocks, each block of
    queries recomputed in the backward, so that autodiff keeps no block's probabilities."""
    q = q * jnp.asarray(scale, q.dtype)
    return jax.lax.map(lambda xs: _blocks_forward(_recomputed_output, *xs, n_q), (q, k, v, mask))


def _heads_first(t):
    return jnp.swapaxes(t, 1, 2)  # (B, L, H, D) <-> (B, H, L, D)


def _logits(q, k, mask):
    """(B, H, Lq, D) x (B, H, Lk, D) -> (B, H, Lq, Lk) fp32 logits of scaled queries, masked keys at fp32's min."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return logits


def _unseen_to_zero(weights, mask):
    """A query with no visible key attends to nothing (PyTorch's SDPA gives it a zero output)."""
    return weights if mask is None else jnp.where(jnp.any(mask, axis=-1, keepdims=True), weights, 0.0)


def _softmax_attention(q, k, v, mask):
    """Heads-first softmax attention of scaled queries: output (B, H, Lq, D), probabilities (in v's dtype) and
    each query's log-sum-exp (B, H, Lq, 1)."""
    logits = _logits(q, k, mask)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))  # the softmax does not depend on it
    unnormalised = jnp.exp(logits - top)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    weights = _unseen_to_zero(unnormalised / total, mask).astype(v.dtype)
    out = jnp.einsum("bhqk,bhkd->bhqd", weights, v).astype(q.dtype)
    return out, weights, top + jnp.log(total)


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


BRANCH_WEIGHTS = ("learnable", "fixed")


class EntityAttention(Attention):
    """Decoupled text/image cross-attention (IP-Adapter's decoupled cross-attention) at the place of a
    `BasicTransformerBlock`'s `attn2`:

        Q = to_q(x),  K_t, V_t = to_k(context), to_v(context),  K_i, V_i = to_k_ip(image), to_v_ip(image)
        out = to_out_0( w_t * Attn(Q, K_t, V_t) + w_i * Attn(Q, K_i, V_i) )

    `branch_weights` says what the weights are:

      learnable  MagDiff's APA (VideoAssembler's EPAF): w_t, w_i are the learnable scalars `text_scale` (init
                 `text_scale_init`, 1.0) and `image_scale` (init `image_scale_init`, 1.5), one pair per layer.
      fixed      IP-Adapter / MagicVideo-V2's appearance encoder: w_t = 1 and w_i = `fixed_image_scale` (lambda,
                 default 1.0), a constant of the module: no scale parameters. diffusers `IPAdapterAttnProcessor2_0`
                 with `scale` = lambda (one IP-Adapter, no masks).

    The heads and `to_out_0` are shared by the two branches. Parameters: `to_q`, `to_k`, `to_v`, `to_out_0` (as
    `Attention`'s), the bias-free `to_k_ip` and `to_v_ip` (shaped as `to_k`/`to_v`; when a pretrained U-Net is
    extended they start as copies of `to_k`/`to_v`: `models.inflate.add_image_projections`), and in "learnable"
    mode `text_scale` and `image_scale`. Being bias-free, all-zero image tokens give V_i = 0 and so an image branch
    of exactly zero.

    x (B, L, query_dim), context (B, Lt, cross_attention_dim), image_context (B, Li, cross_attention_dim),
    image_mask: optional boolean, broadcastable to (B, heads, L, Li), True keeps an image token.
    Returns (B, L, query_dim).
    """

    branch_weights: str = "learnable"
    fixed_image_scale: float = 1.0
    text_scale_init: float = 1.0
    image_scale_init: float = 1.5

    @nn.compact
    def __call__(self, x, context, image_context, image_mask=None):
        if self.branch_weights not in BRANCH_WEIGHTS:
            raise ValueError(f"branch_weights must be one of {BRANCH_WEIGHTS}, got {self.branch_weights!r}")
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
        if self.branch_weights == "fixed":
            out = text + jnp.asarray(self.fixed_image_scale, image.dtype) * image
        else:
            text_scale = _scalar(self, "text_scale", self.text_scale_init, self.param_dtype)
            image_scale = _scalar(self, "image_scale", self.image_scale_init, self.param_dtype)
            out = text_scale.astype(text.dtype) * text + image_scale.astype(image.dtype) * image
        out = tag(out.reshape(*out.shape[:-2], inner), "attention")
        return dense(self.query_dim, axes=("heads", "embed"), use_bias=self.out_bias, name="to_out_0", **kw)(out)
