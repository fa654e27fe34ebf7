"""AnimateDiff motion modules as diffusers builds them inside `UNetMotionModel` (`AnimateDiffTransformer3D`).

A motion module attends over frames only, at every pixel of a video feature map, channels-last:

    x (B, F, H, W, C) -> GroupNorm(eps 1e-6, statistics over F, H, W and the channel group)
      -> (B*H*W, F, C) -> proj_in (linear) -> transformer_blocks -> proj_out (linear) -> (B, F, H, W, C) + x

Each `TemporalTransformerBlock` is diffusers' `BasicTransformerBlock` with `positional_embeddings="sinusoidal"`
and `double_self_attention=True`: a sinusoidal table over frame positions (`pos_embed.pe`, shape
(1, max_seq_length, dim)) is added to the normed tokens before each of its two self-attentions (attn1, attn2,
both over frames, projections without bias), then LayerNorm and a GEGLU feed-forward; residual after each.

`pos_embed.pe` is a persistent buffer in diffusers, so it is in every state dict: here it is the parameter
`transformer_blocks_k/pos_embed/pe`, initialised with the same table (`sinusoidal_table`), read and written by
the converters, and used behind `stop_gradient` (it never receives a gradient; leave it out of weight decay).
In diffusers the output projection `proj_out` is zero-initialised so that a fresh module is the identity; here
too (`zero_init_out=True`).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.layers.attention import Attention
from magdiff_jax.layers.common import default_kernel_init, dense, group_norm, layer_norm
from magdiff_jax.layers.transformer import FeedForward

VIDEO_AXES = ("activation_batch", "activation_frames", "activation_height", "activation_width", "activation_embed")
FRAME_TOKEN_AXES = ("activation_batch", "activation_frames", "activation_embed")


def sinusoidal_table(max_seq_length: int, dim: int) -> np.ndarray:
    """diffusers `SinusoidalPositionalEmbedding.pe`: (1, max_seq_length, dim), sin on even and cos on odd
    channels, frequencies exp(-log(10000) * 2i / dim), computed in float32 as PyTorch does (equal to its table
    within float32 rounding of exp and sin, about 2e-6; a checkpoint's own table is what the converters load)."""
    if dim % 2:
        raise ValueError(f"the sinusoidal frame table needs an even width, got {dim}")
    position = np.arange(max_seq_length, dtype=np.float32)[:, None]
    div_term = np.exp(np.arange(0, dim, 2, dtype=np.float32) * np.float32(-math.log(10000.0) / dim))
    pe = np.zeros((1, max_seq_length, dim), np.float32)
    pe[0, :, 0::2] = np.sin(position * div_term)
    pe[0, :, 1::2] = np.cos(position * div_term)
    return pe


class SinusoidalPositionalEmbedding(nn.Module):
    """Adds `pe[:, :L]` to (N, L, dim) tokens; `pe` is the diffusers buffer of the same name (module docstring)."""

    dim: int
    max_seq_length: int = 32
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        init = lambda key, shape, dtype=jnp.float32: jnp.asarray(sinusoidal_table(shape[1], shape[2]), dtype)
        pe = self.param("pe", nn.with_logical_partitioning(init, (None, "vocab", "embed")),
                        (1, self.max_seq_length, self.dim), jnp.float32)
        length = x.shape[1]
        if length > self.max_seq_length:
            raise ValueError(f"{length} frames exceed the motion module's motion_max_seq_length="
                             f"{self.max_seq_length}")
        pe = jax.lax.stop_gradient(pe[:, :length])
        return x + pe.astype(self.dtype or x.dtype)


class TemporalTransformerBlock(nn.Module):
    """diffusers `BasicTransformerBlock(positional_embeddings="sinusoidal", double_self_attention=True,
    attention_bias=False)` over (N, F, dim) frame tokens."""

    dim: int
    heads: int
    dim_head: int
    max_seq_length: int = 32
    dropout: float = 0.0
    attention_impl: str = "xla"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, deterministic=True):
        pos = SinusoidalPositionalEmbedding(self.dim, self.max_seq_length, dtype=self.dtype, name="pos_embed")
        attn = lambda name: Attention(self.dim, self.heads, self.dim_head, implementation=self.attention_impl,
                                      dtype=self.dtype, name=name)
        for k in (1, 2):
            h = pos(layer_norm(dtype=self.dtype, name=f"norm{k}")(x))
            x = x + attn(f"attn{k}")(h)
            x = nn.with_logical_constraint(x, FRAME_TOKEN_AXES)
        h = layer_norm(dtype=self.dtype, name="norm3")(x)
        return x + FeedForward(self.dim, dropout=self.dropout, dtype=self.dtype, name="ff")(h, deterministic)


class AnimateDiffTransformer3D(nn.Module):
    """diffusers `AnimateDiffTransformer3D` (one `motion_modules.j` of UNetMotionModel / MotionAdapter).

    Attributes:
      in_channels: channels C of the feature map.
      heads: attention heads; each is `in_channels // heads` wide (inner width heads * that).
      num_layers: temporal transformer blocks.
      norm_num_groups: GroupNorm groups.
      max_seq_length: rows of the frame-position table (the most frames the module accepts).
      zero_init_out: initialise `proj_out` to zero (as diffusers), so a fresh module is the identity.
    """

    in_channels: int
    heads: int = 8
    num_layers: int = 1
    norm_num_groups: int = 32
    max_seq_length: int = 32
    dropout: float = 0.0
    zero_init_out: bool = True
    attention_impl: str = "xla"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, deterministic=True):
        """x (B, F, H, W, C) -> (B, F, H, W, C)."""
        b, f, h, w, c = x.shape
        if c != self.in_channels:
            raise ValueError(f"{self.name or 'motion module'}: input has {c} channels, expected {self.in_channels}")
        dim_head = self.in_channels // self.heads
        inner = self.heads * dim_head
        x = nn.with_logical_constraint(x, VIDEO_AXES)
        residual = x
        y = group_norm(self.norm_num_groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        y = jnp.transpose(y, (0, 2, 3, 1, 4)).reshape(b * h * w, f, c)
        y = nn.with_logical_constraint(y, FRAME_TOKEN_AXES)
        y = dense(inner, axes=("embed", "mlp"), dtype=self.dtype, name="proj_in")(y)
        for k in range(self.num_layers):
            y = TemporalTransformerBlock(inner, self.heads, dim_head, self.max_seq_length, self.dropout,
                                         self.attention_impl, self.dtype, name=f"transformer_blocks_{k}",
                                         )(y, deterministic)
        out_init = nn.initializers.zeros_init() if self.zero_init_out else default_kernel_init
        y = dense(c, axes=("mlp", "embed"), dtype=self.dtype, kernel_init=out_init, name="proj_out")(y)
        y = jnp.transpose(y.reshape(b, h, w, f, c), (0, 3, 1, 2, 4))
        return nn.with_logical_constraint(y + residual, VIDEO_AXES)
