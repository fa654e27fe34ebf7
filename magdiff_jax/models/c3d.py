"""C3D fine-tuned on UCF-101: the classifier behind the video Inception Score of TGAN / TGAN2 / StyleGAN-V.

    out = C3D(C3DConfig()).apply({"params": p}, videos)    # videos (B, 16, H, W, 3) RGB in [-1, 1]
    out.logits                                              # (B, 101) fc8; softmax(out.logits) is p(y|x)
    out.fc7                                                 # (B, 4096) the features after fc7's ReLU

The network is TGAN2's `C3DVersion1UCF101` (pfnet-research/tgan2, tgan2/models/c3d/c3d_ucf101.py), the Caffe C3D
v1.0 model fine-tuned on UCF-101 (`c3d_ucf101_finetune_whole_iter_20000`). StyleGAN-V's `c3d_ucf101.pt` detector is
described there as a TorchScript reproduction of the same Chainer model. Its input step ("pre") maps a video in
[-1, 1] to the Caffe model's input:

    x <- x[..., ::-1]                                 RGB -> BGR (Caffe's channel order)
    x <- resize each frame to sample_size^2           bilinear with aligned corners (Chainer's `resize_images`:
                                                      source = target * (in - 1) / (out - 1))
    x <- 128 x + 128 - mean                           pixel values in [0, 256] minus the UCF-101 training mean,
                                                      a (3, 16, 112, 112) BGR array per channel, frame and pixel
                                                      (TGAN2's `mean2.npz` cropped to [8:120, 8:120])

then conv1a (64) - pool1 (1x2x2) - conv2a (128) - pool2 - conv3a, conv3b (256) - pool3 - conv4a, conv4b (512) -
pool4 - conv5a, conv5b (512) - pool5 - fc6 (4096) - fc7 (4096) - fc8 (101): 3x3x3 convolutions with padding 1 and
ReLU, 2x2x2 max-pools of stride 2 (pool1 keeps the time axis), ReLU after fc6 and fc7 (dropout is off at evaluation).
The pools round up as Chainer's `max_pooling_nd(cover_all=True)` does: pool5 takes 7x7 to 4x4 (a last window of one
row / column), so fc6 reads 512 x 1 x 4 x 4 = 8192 values, flattened in PyTorch's / Chainer's (C, T, H, W) order.

Parameter names follow the reference's layers (`conv1a/kernel` <-> `conv1a.weight` <-> Chainer's `conv1a/W`), and
`mean` is the (3, num_frames, sample_size, sample_size) channel-first BGR mean, stored as the reference holds it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from magdiff_jax.layers.common import compute_dtype, conv, dense
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_names, check_positive, register

# the convolutions in order, and the index of the convolution each max-pool follows (pool1 after conv1a, ...)
CONV_NAMES = ("conv1a", "conv2a", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b")
POOL_AFTER = {"conv1a": (1, 2, 2), "conv2a": (2, 2, 2), "conv3b": (2, 2, 2), "conv4b": (2, 2, 2),
              "conv5b": (2, 2, 2)}
FC_NAMES = ("fc6", "fc7", "fc8")


@dataclasses.dataclass(frozen=True)
class C3DConfig:
    """`widths`: the eight convolutions' widths (conv1a .. conv5b); `fc_widths`: fc6 and fc7; `num_classes`: fc8;
    `num_frames` and `sample_size`: the clip the network sees (16 frames of 112 x 112 in the reference) and the shape
    of the `mean` it subtracts."""

    widths: tuple[int, ...] = (64, 128, 256, 256, 512, 512, 512, 512)
    fc_widths: tuple[int, ...] = (4096, 4096)
    num_classes: int = 101
    num_frames: int = 16
    sample_size: int = 112
    dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "widths", "fc_widths", "num_classes", "num_frames", "sample_size")
        check_names(self)
        if len(self.widths) != len(CONV_NAMES):
            raise ConfigError(f"expected {len(CONV_NAMES)} convolution widths ({', '.join(CONV_NAMES)}), got "
                              f"{list(self.widths)}", "widths")
        if len(self.fc_widths) != 2:
            raise ConfigError(f"expected the widths of fc6 and fc7, got {list(self.fc_widths)}", "fc_widths")


@struct.dataclass
class C3DOutput:
    logits: jax.Array  # (B, num_classes): fc8
    fc7: jax.Array  # (B, fc_widths[1]): fc7 after its ReLU


def aligned_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) linear interpolation weights with aligned corners (source = target * (n_in - 1) / (n_out - 1)),
    Chainer's `resize_images` and PyTorch's `interpolate(mode="bilinear", align_corners=True)` along one axis."""
    if n_in == n_out:
        return np.eye(n_in, dtype=np.float64)
    src = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    lo = np.clip(np.floor(src).astype(int), 0, n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    w = np.zeros((n_out, n_in), np.float64)
    np.add.at(w, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w


def resize_frames(x: jax.Array, size: int) -> jax.Array:
    """(..., H, W, C) -> (..., size, size, C), bilinear with aligned corners (`aligned_resize_matrix`)."""
    h, w = x.shape[-3], x.shape[-2]
    if (h, w) == (size, size):
        return x
    wh = jnp.asarray(aligned_resize_matrix(h, size), x.dtype)
    ww = jnp.asarray(aligned_resize_matrix(w, size), x.dtype)
    x = jnp.einsum("oh,...hwc->...owc", wh, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,...owc->...opc", ww, x, precision=jax.lax.Precision.HIGHEST)


def _max_pool_ceil(x: jax.Array, window: tuple[int, int, int]) -> jax.Array:
    """Max-pool of (B, T, H, W, C) with window = stride, rounding the output size up (Chainer's cover_all): a
    partial last window covers what is left. Inputs follow a ReLU, but the padding is -inf all the same."""
    pad = [(0, (-d) % k) for d, k in zip(x.shape[1:4], window, strict=True)]
    return nn.max_pool(x, window, strides=window, padding=pad)


class C3D(nn.Module):
    """(B, num_frames, H, W, 3) RGB in [-1, 1] -> `C3DOutput` (module docstring). Frames of any size are resized to
    `sample_size`; the number of frames must be `num_frames` (the mean is per frame)."""

    config: C3DConfig

    @nn.compact
    def __call__(self, videos) -> C3DOutput:
        c = self.config
        dt = compute_dtype(c.dtype)
        if videos.ndim != 5 or videos.shape[1] != c.num_frames or videos.shape[-1] != 3:
            raise ValueError(f"C3D: expected videos (batch, {c.num_frames}, height, width, 3) RGB in [-1, 1], got "
                             f"shape {videos.shape}")
        mean = self.param("mean", nn.initializers.zeros_init(), (3, c.num_frames, c.sample_size, c.sample_size),
                          jnp.float32)
        x = resize_frames(videos.astype(jnp.float32)[..., ::-1], c.sample_size)  # BGR, (B, T, S, S, 3)
        x = 128.0 * x + 128.0 - jnp.transpose(mean, (1, 2, 3, 0))[None]
        x = x.astype(dt)
        for name, width in zip(CONV_NAMES, c.widths, strict=True):
            x = nn.relu(conv(width, (3, 3, 3), padding=((1, 1),) * 3, dtype=dt, name=name)(x))
            if name in POOL_AFTER:
                x = _max_pool_ceil(x, POOL_AFTER[name])
        x = jnp.transpose(x, (0, 4, 1, 2, 3)).reshape(x.shape[0], -1)  # (B, C*T*H*W) in the reference's order
        x = nn.relu(dense(c.fc_widths[0], dtype=dt, name="fc6")(x))
        fc7 = nn.relu(dense(c.fc_widths[1], dtype=dt, name="fc7")(x))
        logits = dense(c.num_classes, dtype=dt, name="fc8")(fc7)
        return C3DOutput(logits=logits.astype(jnp.float32), fc7=fc7.astype(jnp.float32))


def example_inputs(config: C3DConfig) -> tuple:
    return (jnp.zeros((1, config.num_frames, config.sample_size, config.sample_size, 3)),)


SPEC = register(ModelSpec("c3d", C3DConfig, C3D, example_inputs))
