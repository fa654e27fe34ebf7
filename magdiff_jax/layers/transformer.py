"""Spatial transformers as diffusers names them: `Transformer2DModel` over `BasicTransformerBlock`s.

Channels-last: a (B, H, W, C) feature map is normed, projected (1x1 conv or linear, per config), flattened to
(B, H*W, C) tokens, run through the blocks (self-attention, cross-attention over the text, GEGLU feed-forward)
and projected back with a residual connection.

With `entity_attention`, each block's `attn2` is an `EntityAttention` that also attends to per-sample image tokens
(`image_context`, optionally masked by `image_mask`), passed down as keyword arguments; `branch_weights` picks its
weighting: "learnable" (MagDiff's video U-Net) or "fixed" with the image branch scaled by `fixed_image_scale`
(IP-Adapter; MagicVideo-V2's appearance attention in `unet_motion`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from magdiff_jax.layers.attention import Attention, EntityAttention
from magdiff_jax.layers.common import conv, default_kernel_init, dense, gelu, group_norm, layer_norm, matmul
from magdiff_jax.layers.remat import tag


class _HalvesDense(nn.Module):
    """`nn.Dense(2 * half)` (same parameters, initialisation and names) computed as two products, one per half of
    its outputs: XLA's CPU backward of one product whose output is split concatenates the halves' gradients and
    transposes that (2 * half)-wide tensor before the weight gradient."""

    half: int
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(default_kernel_init, ("embed", "mlp")),
                            (x.shape[-1], 2 * self.half), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
                          (2 * self.half,), self.param_dtype)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return tuple(matmul(x, k) + b for k, b in zip(jnp.split(kernel, 2, axis=1), jnp.split(bias, 2)))


class GEGLU(nn.Module):
    """`proj` to 2*inner, split into (hidden, gate), hidden * gelu(gate) (exact gelu)."""

    inner_dim: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        hidden, gate = _HalvesDense(self.inner_dim, dtype=self.dtype, name="proj")(x)
        return hidden * gelu(gate)


class FeedForward(nn.Module):
    """diffusers `FeedForward(activation_fn="geglu")`: net.0 = GEGLU, net.1 = dropout, net.2 = linear out."""

    dim: int
    mult: int = 4
    dropout: float = 0.0
    dtype: Any = None

    @nn.compact
    def __call__(self, x, deterministic=True):
        inner = self.dim * self.mult
        x = GEGLU(inner, dtype=self.dtype, name="net_0")(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return tag(dense(self.dim, axes=("mlp", "embed"), dtype=self.dtype, name="net_2")(x), "mlp")


class BasicTransformerBlock(nn.Module):
    """norm1 -> attn1 (self, or cross when only_cross_attention) -> norm2 -> attn2 (cross) -> norm3 -> ff.

    With `entity_attention`, attn2 is an `EntityAttention` (its `branch_weights` and `fixed_image_scale` as given
    here) over the text `context` and the image tokens `image_context` (B, Li, cross_attention_dim), which are then
    required; without it they must be None."""

    dim: int
    heads: int
    dim_head: int
    cross_attention_dim: int | None = None
    only_cross_attention: bool = False
    dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Any = None
    entity_attention: bool = False
    branch_weights: str = "learnable"
    fixed_image_scale: float = 1.0

    @nn.compact
    def __call__(self, x, context=None, deterministic=True, image_context=None, image_mask=None):
        attn = lambda name: Attention(
            self.dim, self.heads, self.dim_head, implementation=self.attention_impl, dtype=self.dtype, name=name
        )
        if self.entity_attention and (self.cross_attention_dim is None or image_context is None):
            raise ValueError("a block with entity_attention needs cross-attention and image_context tokens")
        if not self.entity_attention and image_context is not None:
            raise ValueError("image_context was given to a transformer block without entity_attention")
        h = layer_norm(dtype=self.dtype, name="norm1")(x)
        x = x + attn("attn1")(h, context if self.only_cross_attention else None)
        if self.cross_attention_dim is not None:
            h = layer_norm(dtype=self.dtype, name="norm2")(x)
            if self.entity_attention:
                x = x + EntityAttention(self.dim, self.heads, self.dim_head, implementation=self.attention_impl,
                                        dtype=self.dtype, branch_weights=self.branch_weights,
                                        fixed_image_scale=self.fixed_image_scale, name="attn2")(
                    h, context, image_context, image_mask)
            else:
                x = x + attn("attn2")(h, context)
        h = layer_norm(dtype=self.dtype, name="norm3")(x)
        return x + FeedForward(self.dim, dropout=self.dropout, dtype=self.dtype, name="ff")(h, deterministic)


class Transformer2DModel(nn.Module):
    """A stack of `BasicTransformerBlock`s over the H*W tokens of a (B, H, W, C) feature map; `image_context` and
    `image_mask` go to every block's `EntityAttention` (`branch_weights`, `fixed_image_scale`) when
    `entity_attention` is set."""

    heads: int
    dim_head: int
    num_layers: int = 1
    cross_attention_dim: int | None = None
    norm_num_groups: int = 32
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Any = None
    entity_attention: bool = False
    branch_weights: str = "learnable"
    fixed_image_scale: float = 1.0

    @nn.compact
    def __call__(self, x, context=None, deterministic=True, image_context=None, image_mask=None):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = group_norm(self.norm_num_groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        if self.use_linear_projection:
            proj_in = dense(inner, axes=("embed", "mlp"), dtype=self.dtype, name="proj_in")
            proj_out = dense(c, axes=("mlp", "embed"), dtype=self.dtype, name="proj_out")
        else:
            proj_in = conv(inner, (1, 1), dtype=self.dtype, name="proj_in")
            proj_out = conv(c, (1, 1), dtype=self.dtype, name="proj_out")
        x = proj_in(x).reshape(b, h * w, inner)  # (B, HW, inner): a 1x1 conv and a linear are the same map
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        for i in range(self.num_layers):
            x = BasicTransformerBlock(
                inner, self.heads, self.dim_head, self.cross_attention_dim, self.only_cross_attention,
                self.dropout, self.attention_impl, self.dtype, self.entity_attention,
                branch_weights=self.branch_weights, fixed_image_scale=self.fixed_image_scale,
                name=f"transformer_blocks_{i}",
            )(x, context, deterministic, image_context=image_context, image_mask=image_mask)
        return proj_out(x.reshape(b, h, w, inner)) + residual
