"""2D residual, down- and up-sampling layers named and computed as diffusers' `ResnetBlock2D`, `Downsample2D`
and `Upsample2D` (channels-last: inputs and outputs are (B, H, W, C)).

Shared by the VAE and the 2D/3D U-Nets. Parameter paths follow the diffusers module names one-to-one
(`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`; the sampling convolutions are `conv`),
so a conversion table maps `....resnets.0.conv1.weight` to `.../resnets_0/conv1/kernel` and
`....downsamplers.0.conv.weight` to `.../downsamplers_0/conv/kernel`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from magdiff_jax.layers.common import activation, conv, dense, group_norm
from magdiff_jax.layers.remat import tag

TIME_EMBEDDING_NORMS = ("default", "scale_shift")


def _pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((p, p), (p, p))


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block: GroupNorm -> act -> conv3x3 (+ time embedding) -> GroupNorm -> act ->
    dropout -> conv3x3, plus a (1x1-projected when the channel count changes) shortcut, all divided by
    `output_scale_factor`.

    Attributes:
      in_channels: channels of the input (checked against the input's last axis).
      out_channels: channels of the output; None keeps `in_channels`.
      temb_channels: width of the time embedding; None means the block takes no embedding and has no
        `time_emb_proj` (VAE blocks).
      groups / groups_out: GroupNorm groups of `norm1` / `norm2` (`groups_out` None: same as `groups`).
      eps: GroupNorm epsilon (diffusers' default 1e-6; the SD U-Net uses 1e-5).
      non_linearity: activation name (`silu`/`swish`, `gelu`, `mish`, ...), applied to features and embedding.
      time_embedding_norm: "default" adds `time_emb_proj(act(temb))` after conv1; "scale_shift" projects to
        2*out_channels and applies `norm2(h) * (1 + scale) + shift`.
      skip_time_act: do not apply the activation to `temb` before `time_emb_proj`.
      output_scale_factor: the sum of shortcut and residual is divided by it.
      use_in_shortcut: force (True) or forbid (False) the 1x1 `conv_shortcut`; None: present iff in != out.
      conv_shortcut_bias: whether `conv_shortcut` has a bias.
      dropout: dropout rate before conv2 (needs a "dropout" rng when `deterministic=False` and rate > 0).
      dtype: compute dtype (None: inputs' dtype); parameters are `param_dtype`.
    """

    in_channels: int
    out_channels: int | None = None
    temb_channels: int | None = None
    groups: int = 32
    groups_out: int | None = None
    eps: float = 1e-6
    non_linearity: str = "silu"
    time_embedding_norm: str = "default"
    skip_time_act: bool = False
    output_scale_factor: float = 1.0
    use_in_shortcut: bool | None = None
    conv_shortcut_bias: bool = True
    dropout: float = 0.0
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @property
    def has_shortcut(self) -> bool:
        out = self.out_channels or self.in_channels
        return self.in_channels != out if self.use_in_shortcut is None else self.use_in_shortcut

    @nn.compact
    def __call__(self, x, temb=None, deterministic: bool = True):
        """x (B, H, W, in_channels), temb (B, temb_channels) or None -> (B, H, W, out_channels)."""
        if x.shape[-1] != self.in_channels:
            raise ValueError(
                f"{self.name or 'ResnetBlock2D'}: input has {x.shape[-1]} channels, expected "
                f"in_channels={self.in_channels}"
            )
        if self.time_embedding_norm not in TIME_EMBEDDING_NORMS:
            raise ValueError(
                f"time_embedding_norm {self.time_embedding_norm!r} is not one of {TIME_EMBEDDING_NORMS}"
            )
        out = self.out_channels or self.in_channels
        groups_out = self.groups if self.groups_out is None else self.groups_out
        act = activation(self.non_linearity)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        h = group_norm(self.groups, epsilon=self.eps, name="norm1", **kw)(x)
        h = act(h)
        h = conv(out, (3, 3), padding=_pad(1), name="conv1", **kw)(h)

        if self.temb_channels is not None:
            if temb is None:
                raise ValueError(
                    f"{self.name or 'ResnetBlock2D'} was built with temb_channels="
                    f"{self.temb_channels} and needs a time embedding"
                )
            t = temb if self.skip_time_act else act(temb)
            width = out if self.time_embedding_norm == "default" else 2 * out
            t = dense(width, axes=("embed", "conv_out"), name="time_emb_proj", **kw)(t)
            t = t[:, None, None, :]
        else:
            t = None

        if self.time_embedding_norm == "scale_shift":
            if t is None:
                raise ValueError("time_embedding_norm='scale_shift' needs temb_channels and a time embedding")
            scale, shift = jnp.split(t, 2, axis=-1)
            h = group_norm(groups_out, epsilon=self.eps, name="norm2", **kw)(h)
            h = h * (1 + scale) + shift
        else:
            if t is not None:
                h = h + t
            h = group_norm(groups_out, epsilon=self.eps, name="norm2", **kw)(h)

        h = act(h)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = conv(out, (3, 3), padding=_pad(1), name="conv2", **kw)(h)

        shortcut = x
        if self.has_shortcut:
            shortcut = conv(
                out, (1, 1), padding=_pad(0), use_bias=self.conv_shortcut_bias, name="conv_shortcut", **kw
            )(x)
        y = shortcut + h
        if self.output_scale_factor != 1.0:
            y = y / self.output_scale_factor
        return tag(y, "resnet")


class Downsample2D(nn.Module):
    """Halves H and W: a 3x3 stride-2 convolution `conv` (or 2x2 average pooling when `use_conv=False`).

    `padding=1` pads one pixel on every side (U-Nets); `padding=0` first pads one zero row/column at the
    bottom and right only and then convolves without padding (the VAE encoder). padding=1 gives ceil(H/2),
    padding=0 gives floor(H/2) (the same for even sizes), exactly as diffusers.

    Attributes:
      out_channels: output channels of the convolution (must equal the input's when `use_conv=False`).
      padding: 1 or 0 as above.
      use_conv: convolution (True) or average pooling (False, no parameters).
      kernel_size: convolution size (3).
    """

    out_channels: int
    padding: int = 1
    use_conv: bool = True
    kernel_size: int = 3
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        """x (B, H, W, C) -> (B, H', W', out_channels)."""
        if not self.use_conv:
            if x.shape[-1] != self.out_channels:
                raise ValueError("Downsample2D without a convolution keeps the channel count")
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(
            self.out_channels,
            (self.kernel_size, self.kernel_size),
            strides=(2, 2),
            padding=_pad(self.padding),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of PyTorch's `F.interpolate(mode="nearest", size=...)` along one (static) axis."""
    if out_size == in_size:
        return np.arange(out_size)
    if out_size == 2 * in_size:
        return np.arange(out_size) // 2
    scale = np.float32(in_size) / np.float32(out_size)
    idx = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, in_size - 1)


def upsample_nearest(x, output_size: tuple[int, int] | None = None):
    """Nearest-neighbour resize of (B, H, W, C) by 2 (default) or to `output_size` = (H', W'), as PyTorch."""
    b, h, w, c = x.shape
    if output_size is None or tuple(output_size) == (2 * h, 2 * w):
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        return x.reshape(b, 2 * h, 2 * w, c)
    oh, ow = (int(s) for s in output_size)
    return x[:, nearest_indices(h, oh)][:, :, nearest_indices(w, ow)]


class Upsample2D(nn.Module):
    """Doubles H and W by nearest-neighbour interpolation (or resizes to an explicit `output_size`, as the
    U-Net does when a skip connection has an odd size), then a 3x3 convolution `conv` when `use_conv`.

    Attributes:
      out_channels: output channels of the convolution.
      use_conv: apply the 3x3 convolution after interpolating.
    """

    out_channels: int
    use_conv: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: tuple[int, int] | None = None):
        """x (B, H, W, C) -> (B, 2H, 2W, out_channels), or (B, *output_size, out_channels)."""
        x = upsample_nearest(x, output_size)
        if self.use_conv:
            x = conv(
                self.out_channels,
                (3, 3),
                padding=_pad(1),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv",
            )(x)
        return x
