"""VGG16's convolutional trunk (torchvision's `vgg16().features`) and the LPIPS network on its features.

    taps = VGG16(config).apply({"params": p}, x)          # x (B, H, W, 3), normalised by the caller
    relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = taps     # (B, H, W, w0), (B, H/2, W/2, w1), ... (B, H/16, W/16, w4)
    d = LPIPS(LPIPSConfig()).apply({"params": q}, x, y)    # (B,): x, y in [-1, 1]

VGG16: five stages of 3x3 convolutions (padding 1, bias) each followed by ReLU, with (2, 2, 3, 3, 3) convolutions of
widths `widths` (64, 128, 256, 512, 512 in VGG16) and a 2x2 stride-2 max-pool before every stage but the first.
The parameters are named by torchvision's index in `features` (`features_0/kernel` <-> `features.0.weight`; the
ReLUs and pools hold the indices between: the convolutions are 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28).
The outputs are the ReLUs that end each stage (torchvision indices 3, 8, 15, 22, 29), the five taps of LPIPS; the
final pool (index 30) and the classifier are not part of it.

LPIPS (Zhang et al. 2018, the `lpips` package's `LPIPS(net="vgg", version="0.1")`): inputs in [-1, 1] are scaled
per channel, (x - shift) / scale with shift (-0.030, -0.088, -0.188) and scale (0.458, 0.448, 0.450) (the ImageNet
normalisation expressed on [-1, 1] inputs); for each tap k the features f of both images are unit-normalised over
channels, f / (||f||_2 + 1e-10), and

    d(x, y) = sum_k mean_{h,w} sum_c w_kc (f_k(x) - f_k(y))_{hwc}^2

with w_k the tap's 1x1 linear head (`lin{k}`, no bias; trained weights are non-negative), or w_kc = 1 with
`linear=False` (the package's `lpips=False` baseline). Both are feature networks of a metric, with no PyTorch
model class of their own: `magdiff_jax.convert.vgg` reads torchvision's VGG16 file and the lpips package's linear
heads into them.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from magdiff_jax.layers.common import compute_dtype, conv, dense
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_names, check_positive, register

CONVS_PER_STAGE = (2, 2, 3, 3, 3)


def conv_indices() -> tuple[tuple[int, ...], ...]:
    """torchvision's `features` index of every convolution, per stage: ((0, 2), (5, 7), (10, 12, 14), ...). Each
    convolution is followed by its ReLU (index + 1); a max-pool precedes every stage but the first."""
    stages, i = [], 0
    for s, n in enumerate(CONVS_PER_STAGE):
        if s:
            i += 1  # the max-pool
        stages.append(tuple(range(i, i + 2 * n, 2)))
        i += 2 * n
    return tuple(stages)


def tap_indices() -> tuple[int, ...]:
    """torchvision's `features` index of each LPIPS tap (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3): 3, 8, 15,
    22, 29."""
    return tuple(stage[-1] + 1 for stage in conv_indices())


@dataclasses.dataclass(frozen=True)
class VGG16Config:
    """`widths`: the convolution width of each of the five stages (VGG16: 64, 128, 256, 512, 512; smaller ones make
    a CPU-sized feature network of the same layout)."""

    widths: tuple[int, ...] = (64, 128, 256, 512, 512)
    in_channels: int = 3
    dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "widths", "in_channels")
        check_names(self)
        if len(self.widths) != len(CONVS_PER_STAGE):
            raise ConfigError(f"expected {len(CONVS_PER_STAGE)} stage widths, got {list(self.widths)}", "widths")


class VGG16(nn.Module):
    """VGG16's `features` up to relu5_3; (B, H, W, in_channels) -> the five taps (module docstring), each in the
    compute dtype. H and W need not be multiples of 16: each pool floors, as torch's MaxPool2d(2, 2)."""

    config: VGG16Config

    @nn.compact
    def __call__(self, x) -> tuple[jax.Array, ...]:
        c = self.config
        dt = compute_dtype(c.dtype)
        x = x.astype(dt)
        taps = []
        for s, (width, stage) in enumerate(zip(c.widths, conv_indices(), strict=True)):
            if s:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            for i in stage:
                x = nn.relu(conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=dt, name=f"features_{i}")(x))
            taps.append(x)
        return tuple(taps)


# lpips.pretrained_networks' ScalingLayer: ImageNet's mean and std re-expressed for inputs in [-1, 1]
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10


@dataclasses.dataclass(frozen=True)
class LPIPSConfig:
    """`vgg`: the feature network; `linear`: the learned 1x1 heads (`lin0` .. `lin4`) weigh each tap's channels,
    else they are summed with weight 1."""

    vgg: VGG16Config = VGG16Config()
    linear: bool = True

    def __post_init__(self):
        if self.vgg.in_channels != 3:
            raise ConfigError(f"LPIPS scales RGB inputs, got in_channels={self.vgg.in_channels}", "vgg.in_channels")


def scale_inputs(x: jax.Array) -> jax.Array:
    """lpips' ScalingLayer on (..., 3) inputs in [-1, 1]: (x - shift) / scale per RGB channel."""
    return (x - jnp.asarray(LPIPS_SHIFT, x.dtype)) / jnp.asarray(LPIPS_SCALE, x.dtype)


def unit_normalise(f: jax.Array, eps: float = LPIPS_EPS) -> jax.Array:
    """f / (||f||_2 + eps) over the last (channel) axis, lpips' `normalize_tensor`. The norm of an all-zero vector
    is 0 with a zero gradient (a plain sqrt would give NaN gradients there, e.g. at a location where every ReLU of
    a tap is off)."""
    s = jnp.sum(jnp.square(f), axis=-1, keepdims=True)
    positive = s > 0
    norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)
    return f / (norm + eps)


class LPIPS(nn.Module):
    """The LPIPS distance network (module docstring): (x, y) each (B, H, W, 3) in [-1, 1] -> (B,) float32.
    Parameters: `vgg` (a `VGG16`) and, with `linear`, `lin{k}/kernel` of shape (widths[k], 1), initialised to 1
    (the unweighted channel sum: a non-negative distance before any trained heads are loaded)."""

    config: LPIPSConfig

    @nn.compact
    def __call__(self, x, y) -> jax.Array:
        c = self.config
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {x.shape} and {y.shape}")
        b = x.shape[0]
        # one pass over both images: the network's batch is [x; y]
        taps = VGG16(c.vgg, name="vgg")(scale_inputs(jnp.concatenate([x, y]).astype(jnp.float32)))
        total = jnp.zeros((b,), jnp.float32)
        for k, f in enumerate(taps):
            f = unit_normalise(f.astype(jnp.float32))
            diff = jnp.mean(jnp.square(f[:b] - f[b:]), axis=(1, 2))  # (B, C_k): the spatial mean of the squares
            if c.linear:  # the 1x1 head commutes with the spatial mean
                head = dense(1, use_bias=False, kernel_init=nn.initializers.ones_init(), name=f"lin{k}")
                total = total + head(diff)[:, 0]
            else:
                total = total + jnp.sum(diff, axis=-1)
        return total


def example_inputs(config: VGG16Config) -> tuple:
    return (jnp.zeros((1, 16, 16, config.in_channels)),)


def lpips_example_inputs(config: LPIPSConfig) -> tuple:
    return (jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))


SPEC = register(ModelSpec("vgg16", VGG16Config, VGG16, example_inputs))
LPIPS_SPEC = register(ModelSpec("lpips", LPIPSConfig, LPIPS, lpips_example_inputs))
