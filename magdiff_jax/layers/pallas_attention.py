"""Pallas TPU flash attention behind the attention entry point (`implementation="pallas_tpu"`, and "auto" on a TPU
for long sequences).

The kernel is JAX's splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`), the one maxdiffusion
runs on TPUs: an online softmax over key blocks held in VMEM and hand-written backward kernels (dq; dk and dv), so
that no (Lq, Lk) score matrix is ever stored: O(L * D) activation memory per (batch, head) pair. What it wants:

  layout   heads first: one (H, L, D) problem per batch element (the kernel is vmapped over the batch).
  blocks   query and key block sizes that are multiples of MIN_BLOCK (128, the TPU's lane width) and divide the
           padded sequence lengths; head_dim a multiple of 128.
  masks    a static mask per head (full, or causal: query i sees key j <= i) and dynamic segment ids (query i
           sees key j only where their ids are equal).
  scale    none: queries are multiplied by `scale` in their dtype first (as the xla implementation does); logits,
           softmax statistics and accumulators are fp32 in the kernel, the output is in q's dtype.

`splash_attention` therefore pads
  - head_dim with zeros up to a multiple of 128 (q.k is unchanged; the zero value columns are sliced off);
  - Lq and Lk each up to a multiple of 128 and tiles them with the largest multiple of 128 that divides the padded
    length and is at most MAX_BLOCK (512 in fp32, twice that in 16-bit dtypes, maxdiffusion's choice);
and turns the key-padding mask and the padded positions into segment ids: queries id 1 (padded queries 0, their
rows sliced off), kept keys 1, masked and padded keys 0. The kernel gives a query that sees no key the mean of
all values; such a query (all keys masked, or masked up to its causal limit) gets a zero output here, as xla
and PyTorch's SDPA give.

Masks it takes: key-padding masks only, broadcastable to (B, 1, 1, Lk) (True keeps a key). A mask that varies
over heads or queries is refused (`unsupported` says why); "auto" takes xla for it.

Sharding: under a mesh of several devices (`jax.set_mesh`; the trainer sets one) the kernel runs in `shard_map`,
the batch over the mesh axes of logical axis `activation_batch` and the heads over those of `activation_heads`
(each only where they divide it), lengths whole: XLA cannot partition a Mosaic kernel itself.

Interpret mode: inside `interpret_mode()` the kernel runs in Pallas' interpreter on any backend (the tests check
it on CPU against xla this way); elsewhere than on a TPU it is refused otherwise. Pallas itself is imported only
when a kernel is traced. The mode is read when a function is traced: a jitted function keeps the mode it was
traced with.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

# Block sizes and head_dim are multiples of the TPU's 128 lanes.
MIN_BLOCK = 128
# The largest query / key block in fp32 (twice this in 16-bit dtypes): maxdiffusion's block_q.
MAX_BLOCK = 512
# "auto" on a TPU takes the kernel when both lengths are at least this long (the 32 x 32 tokens of a 256 px
# video frame's latent and up; 77-token prompts and 16-frame temporal attention stay on xla). Not yet tuned on a
# TPU.
AUTO_MIN_LENGTH = 1024
# ... and when padding head_dim to a multiple of 128 at most doubles it (64 -> 128 yes; ModelScope's heads of
# width 5 to 20, or SD 1.5's 40, no: the kernel would spend most of its matmuls on zeros).
AUTO_MAX_HEAD_PADDING = 2

_interpret = contextvars.ContextVar("magdiff_pallas_interpret", default=False)


@functools.cache
def tpu_available() -> bool:
    """True when JAX sees a TPU (where the Pallas TPU kernels compile)."""
    try:
        return any(d.platform == "tpu" for d in jax.devices())
    except RuntimeError:
        return False


@contextlib.contextmanager
def interpret_mode(enabled: bool = True):
    """Within this context the Pallas TPU kernels traced run in Pallas' interpreter (any backend; slow)."""
    token = _interpret.set(enabled)
    try:
        yield
    finally:
        _interpret.reset(token)


def interpreting() -> bool:
    """Whether `interpret_mode` is on."""
    return _interpret.get()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def padded_head_dim(head_dim: int) -> int:
    """head_dim rounded up to a multiple of MIN_BLOCK."""
    return _round_up(head_dim, MIN_BLOCK)


def tiling(length: int, dtype) -> tuple[int, int]:
    """(padded length, block): length rounded up to a multiple of MIN_BLOCK, and the largest multiple of MIN_BLOCK
    that divides it and is at most MAX_BLOCK (2 * MAX_BLOCK for 16-bit dtypes)."""
    padded = _round_up(max(length, 1), MIN_BLOCK)
    limit = MAX_BLOCK * (2 if jnp.dtype(dtype).itemsize == 2 else 1)
    block = max(b for b in range(MIN_BLOCK, min(limit, padded) + 1, MIN_BLOCK) if padded % b == 0)
    return padded, block


def _mask_shape(mask) -> tuple[int, ...] | None:
    """The mask's shape as (B or 1, H or 1, Lq or 1, Lk or 1); None for a mask of more than 4 axes."""
    shape = tuple(jnp.shape(mask))
    return None if len(shape) > 4 else (1,) * (4 - len(shape)) + shape


def unsupported(q, k, v, mask) -> str | None:
    """Why the kernel cannot compute this attention (None when it can). q (B, Lq, H, D), k and v (B, Lk, H, D),
    mask as `dot_product_attention` takes it."""
    if v.shape[-1] != q.shape[-1]:
        return f"pallas_tpu needs values as wide as queries and keys; got head_dim {q.shape[-1]} and {v.shape[-1]}"
    if mask is None:
        return None
    shape = _mask_shape(mask)
    batch, length = q.shape[0], k.shape[1]
    if shape is None or shape[1] != 1 or shape[2] != 1 or shape[0] not in (1, batch) or shape[3] not in (1, length):
        return (
            f"pallas_tpu takes key-padding masks only, broadcastable to (B, 1, 1, Lk) = ({batch}, 1, 1, "
            f"{length}); got a mask of shape {tuple(jnp.shape(mask))}"
        )
    return None


def auto_applicable(q, k, v, mask) -> bool:
    """Whether "auto" takes the kernel on a TPU: both lengths at least AUTO_MIN_LENGTH, head_dim padding at most
    AUTO_MAX_HEAD_PADDING times, and a mask the kernel takes."""
    head_dim = q.shape[-1]
    return (
        min(q.shape[1], k.shape[1]) >= AUTO_MIN_LENGTH
        and padded_head_dim(head_dim) <= AUTO_MAX_HEAD_PADDING * head_dim
        and unsupported(q, k, v, mask) is None
    )


def _key_keep(mask, batch: int, length: int):
    """A key-padding mask as (B, Lk) booleans (True keeps a key)."""
    shape = _mask_shape(mask)
    keep = jnp.reshape(jnp.asarray(mask).astype(jnp.bool_), (shape[0], shape[3]))
    return jnp.broadcast_to(keep, (batch, length))


def _splash_kernel(heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, is_causal: bool):
    """The splash attention kernel for one batch element: (H, Lq, D) x (H, Lk, D) (padded lengths) -> (H, Lq, D)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    one = masks.CausalMask((q_len, kv_len)) if is_causal else masks.FullMask((q_len, kv_len))
    sizes = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        block_q_dq=block_q,
        block_kv_dq=block_kv,
    )
    return splash.make_splash_mha(
        masks.MultiHeadMask((one,) * heads), block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpreting()
    )


def _mesh_axes(spec, size: int, mesh) -> tuple[str, ...] | None:
    """The leading mesh axes of a logical axis' mapping whose product divides `size` (None: replicated)."""
    names = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    kept, product = [], 1
    for name in names:
        if name not in mesh.axis_names or size % (product * mesh.shape[name]):
            break
        kept.append(name)
        product *= mesh.shape[name]
    return tuple(kept) or None


def _over_mesh(fn, batch: int, heads: int, n_ids: int):
    """`fn(q, k, v, *ids)` on (B, H, L, D) arrays and (B, L) segment ids, in `shard_map` over the mesh in context
    (batch and heads split, lengths whole) when it has several devices; `fn` itself otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return fn
    batch_spec, head_spec = nn.logical_to_mesh_axes(("activation_batch", "activation_heads"))
    batch_axes, head_axes = _mesh_axes(batch_spec, batch, mesh), _mesh_axes(head_spec, heads, mesh)
    if head_axes and batch_axes and set(head_axes) & set(batch_axes):
        head_axes = None
    arrays, ids = PartitionSpec(batch_axes, head_axes, None, None), PartitionSpec(batch_axes, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(arrays,) * 3 + (ids,) * n_ids, out_specs=arrays, check_vma=False)


def splash_attention(q, k, v, *, mask=None, is_causal: bool = False, scale: float | None = None):
    """Softmax attention by the Pallas TPU splash kernel (module docstring): (B, Lq, H, D) queries, (B, Lk, H, D)
    keys and values, an optional key-padding mask broadcastable to (B, 1, 1, Lk) (True keeps a key), a causal mask
    (query i sees keys j <= i), logit scale (default 1/sqrt(D)). Returns (B, Lq, H, D) in q's dtype. Differentiable
    (reverse mode) through the kernel's own backward."""
    if not (tpu_available() or interpreting()):
        raise RuntimeError(
            "attention implementation 'pallas_tpu' needs a TPU (none is visible to JAX), or Pallas "
            "interpret mode (magdiff_jax.layers.pallas_attention.interpret_mode())"
        )
    reason = unsupported(q, k, v, mask)
    if reason is not None:
        raise ValueError(reason)
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    scale = head_dim**-0.5 if scale is None else scale
    (q_pad, block_q), (kv_pad, block_kv) = tiling(q_len, q.dtype), tiling(kv_len, q.dtype)
    d_pad = padded_head_dim(head_dim)

    def prepare(t, length):  # (B, L, H, D) -> (B, H, length, d_pad), zero-padded
        t = jnp.swapaxes(t, 1, 2)
        return jnp.pad(t, ((0, 0), (0, 0), (0, length - t.shape[2]), (0, d_pad - head_dim)))

    args = [prepare(q * jnp.asarray(scale, q.dtype), q_pad), prepare(k, kv_pad), prepare(v, kv_pad)]
    keep = None if mask is None else _key_keep(mask, batch, kv_len)
    if keep is not None or kv_pad != kv_len:
        real = lambda n, length: jnp.broadcast_to(jnp.arange(length) < n, (batch, length))
        kv_keep = real(kv_len, kv_pad) if keep is None else jnp.pad(keep, ((0, 0), (0, kv_pad - kv_len)))
        args += [real(q_len, q_pad).astype(jnp.int32), kv_keep.astype(jnp.int32)]

    def attend(q, k, v, *ids):
        from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

        kernel = _splash_kernel(q.shape[1], q_pad, kv_pad, block_q, block_kv, is_causal)
        if not ids:
            return jax.vmap(kernel)(q, k, v)
        return jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=ids[0], kv=ids[1]))

    out = _over_mesh(attend, batch, heads, len(args) - 3)(*args)
    out = jnp.swapaxes(out[:, :, :q_len, :head_dim], 1, 2).astype(q.dtype)
    if keep is not None:  # a query that sees no key: zero output
        seen = jnp.cumsum(keep, axis=-1) > 0  # (B, Lk): some key at or before j is kept
        last = jnp.minimum(jnp.arange(q_len), kv_len - 1) if is_causal else jnp.full((q_len,), kv_len - 1)
        out = jnp.where(seen[:, last][:, :, None, None], out, jnp.zeros((), out.dtype))
    return out
