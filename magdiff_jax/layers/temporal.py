"""Temporal layers of the ModelScope video U-Net, named and computed as diffusers' `TemporalConvLayer` and
`TransformerTemporalModel` (as `UNet3DConditionModel` builds them).

Both take and return channels-last videos (B, F, H, W, C) and mix information along the frame axis only:

  TemporalConvLayer         four GroupNorm -> SiLU -> [Dropout] -> (3, 1, 1) convolutions in sequence, added to the
                            input (the last convolution starts at zero, so a fresh layer is the identity).
  TransformerTemporalModel  GroupNorm over the whole clip, a linear `proj_in`, `BasicTransformerBlock`s whose two
                            attentions are both self-attention over the F frames of each pixel (no text context and
                            no positional embedding, as in diffusers), a linear `proj_out` (zero at init here),
                            and a residual.

The layers compute exactly what diffusers computes for any F, F == 1 included; skipping them for single frames
(joint image/video training) is the U-Net's decision (`models.unet3d`).

Parameter paths follow diffusers' `nn.Sequential` indices: `conv1_0` (norm) and `conv1_2` (convolution; conv1 has no
dropout), `conv2_0`/`conv2_3`, `conv3_0`/`conv3_3`, `conv4_0`/`conv4_3`; `norm`, `proj_in`,
`transformer_blocks_{i}/...`, `proj_out`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magdiff_jax.layers import kernels
from magdiff_jax.layers.common import default_kernel_init, dense, group_norm
from magdiff_jax.layers.transformer import BasicTransformerBlock

VIDEO_AXES = ("activation_batch", "activation_frames", "activation_height", "activation_width", "activation_embed")
FRAME_TOKEN_AXES = ("activation_batch", "activation_frames", "activation_embed")


class TemporalConv(nn.Module):
    """PyTorch `nn.Conv3d(cin, features, kernel_size=(3, 1, 1), padding=(1, 0, 0))` on (B, F, H, W, cin).

    The kernel is stored as a Flax 3-D convolution kernel (3, 1, 1, cin, features) with logical names
    (conv_t, conv_h, conv_w, conv_in, conv_out), so the conversion table maps it with the plain `conv` transform.

    It is computed as one matmul over the three shifted copies of the frames side by side:
    y[f] = [x[f-1], x[f], x[f+1]] @ [K[0]; K[1]; K[2]] + bias (the same products as the convolution, summed in
    another order), the shifted copies rebuilt in the backward rather than saved, so the layer keeps no more than
    a convolution would: the override point `frame_taps_matmul` (`layers.kernels`; by default `jax.checkpoint`
    around the product).
    Not `lax.conv`: XLA's SPMD partitioner returns wrong values for a convolution whose spatial (here: frame) axis
    and output-feature axis are both sharded (frames over `context`, conv_out over `tensor`), while matmuls, pads,
    slices and concatenations partition correctly. One matmul rather than one per tap: one wide product runs faster
    than three thin ones, their weight gradients above all (benchmarks/README.md).
    """

    features: int
    zero_init: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        kernel_init = nn.initializers.zeros_init() if self.zero_init else default_kernel_init
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(kernel_init, ("conv_t", "conv_h", "conv_w", "conv_in", "conv_out")),
            (3, 1, 1, c, self.features),
            self.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), (self.features,),
            self.param_dtype,
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        return kernels.get("frame_taps_matmul")(x, kernel.reshape(3 * c, self.features)) + bias


def _shifted_frames(x):
    """(B, F, H, W, C) -> (B, F, H, W, 3C): frames f-1, f and f+1 side by side (zeros past either end)."""
    f = x.shape[1]
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0), (0, 0), (0, 0)))
    return jnp.concatenate([xp[:, t:t + f] for t in range(3)], axis=-1)


@kernels.default("frame_taps_matmul")
@jax.checkpoint
def frame_taps_matmul(x, kernel):
    """`_shifted_frames(x) @ kernel`, kernel (3C, D): the (3, 1, 1) convolution without its bias; the backward
    rebuilds the shifted frames (3x the input's size) from x."""
    return jnp.einsum("bfhwk,kd->bfhwd", _shifted_frames(x), kernel)


class TemporalConvLayer(nn.Module):
    """diffusers `TemporalConvLayer` (ModelScope): (B, F, H, W, in_dim) -> (B, F, H, W, in_dim).

    conv1: GroupNorm(in_dim) -> SiLU -> Conv(3,1,1) to out_dim; conv2..conv4: GroupNorm(out_dim) -> SiLU ->
    Dropout -> Conv(3,1,1) back to in_dim; output = input + conv4(conv3(conv2(conv1(input)))). GroupNorm statistics
    span all frames of a clip (PyTorch normalises the (B, C, F, H, W) tensor). conv4 is zero-initialised.

    Attributes:
      in_dim / out_dim: channels (out_dim None: in_dim). The U-Net uses in_dim == out_dim.
      dropout: rate of the three dropouts (UNet3DConditionModel builds these layers with 0.1); needs a "dropout" rng
        when `deterministic=False`.
      norm_num_groups: GroupNorm groups (eps 1e-5, PyTorch's default).
    """

    in_dim: int
    out_dim: int | None = None
    dropout: float = 0.0
    norm_num_groups: int = 32
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if x.ndim != 5 or x.shape[-1] != self.in_dim:
            raise ValueError(f"{self.name or 'TemporalConvLayer'}: expected a (B, F, H, W, {self.in_dim}) video, "
                             f"got shape {x.shape}")
        out_dim = self.out_dim or self.in_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = nn.with_logical_constraint(x, VIDEO_AXES)
        h = group_norm(self.norm_num_groups, epsilon=1e-5, name="conv1_0", **kw)(x)
        h = TemporalConv(out_dim, name="conv1_2", **kw)(jax.nn.silu(h))
        for k in (2, 3, 4):
            h = group_norm(self.norm_num_groups, epsilon=1e-5, name=f"conv{k}_0", **kw)(h)
            h = nn.Dropout(self.dropout)(jax.nn.silu(h), deterministic=deterministic)
            h = TemporalConv(self.in_dim, zero_init=k == 4, name=f"conv{k}_3", **kw)(h)
            h = nn.with_logical_constraint(h, VIDEO_AXES)
        return x + h


class TransformerTemporalModel(nn.Module):
    """diffusers `TransformerTemporalModel` with its defaults as the U-Net uses them: (B, F, H, W, C) -> same.

    GroupNorm(eps 1e-6) over the clip, `proj_in` linear to heads*dim_head, `num_layers` BasicTransformerBlocks
    (attn1 and attn2 both self-attention over the frames of one pixel: `double_self_attention`; GEGLU
    feed-forward), `proj_out` linear back to C, plus the input. No positional embedding is added.

    Attributes:
      heads / dim_head: diffusers' `num_attention_heads` / `attention_head_dim` of this layer.
      num_layers: transformer blocks.
      norm_num_groups: GroupNorm groups.
      dropout: attention/feed-forward dropout rate.
      attention_impl: implementation passed to `layers.attention.dot_product_attention`.
      zero_init_out: start `proj_out` at zero (default), so that a fresh layer is the identity and a U-Net inflated
        from an image model starts as that model. diffusers initialises it at random (its checkpoints are trained);
        only initial values differ, never the computation.
    """

    heads: int
    dim_head: int
    num_layers: int = 1
    norm_num_groups: int = 32
    dropout: float = 0.0
    attention_impl: str = "xla"
    zero_init_out: bool = True
    dtype: Any = None

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        if x.ndim != 5:
            raise ValueError(f"{self.name or 'TransformerTemporalModel'}: expected a (B, F, H, W, C) video, "
                             f"got shape {x.shape}")
        b, f, h, w, c = x.shape
        inner = self.heads * self.dim_head
        residual = x
        x = nn.with_logical_constraint(x, VIDEO_AXES)
        x = group_norm(self.norm_num_groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        x = x.transpose(0, 2, 3, 1, 4).reshape(b * h * w, f, c)  # one sequence of F frames per pixel
        x = nn.with_logical_constraint(x, FRAME_TOKEN_AXES)
        x = dense(inner, axes=("embed", "mlp"), dtype=self.dtype, name="proj_in")(x)
        for i in range(self.num_layers):
            # cross_attention_dim=inner with no context: attn2 is a second self-attention (double_self_attention)
            x = BasicTransformerBlock(
                inner, self.heads, self.dim_head, cross_attention_dim=inner, dropout=self.dropout,
                attention_impl=self.attention_impl, dtype=self.dtype, name=f"transformer_blocks_{i}",
            )(x, None, deterministic)
            x = nn.with_logical_constraint(x, FRAME_TOKEN_AXES)
        out_init = nn.initializers.zeros_init() if self.zero_init_out else default_kernel_init
        x = dense(c, axes=("mlp", "embed"), kernel_init=out_init, dtype=self.dtype, name="proj_out")(x)
        x = x.reshape(b, h, w, f, c).transpose(0, 3, 1, 2, 4)
        return x + residual
