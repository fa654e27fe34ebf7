"""The Kinetics-400 I3D (Inception-v1 inflated to 3D, Carreira & Zisserman 2017): FVD's feature network.

    logits, pooled = I3D(I3DConfig()).apply({"params": p}, x)   # x (B, T, H, W, 3) in [-1, 1]
    logits: (B, num_classes)   the 400 Kinetics logits, FVD's features (StyleGAN-V, VideoGPT / TATS, cd-fvd)
    pooled: (B, 1024)          the average-pooled Mixed_5c features before the logits layer

The layout and parameter names are pytorch-i3d's `InceptionI3d` (as VideoGPT, TATS and the `cd-fvd` package carry
it, with the weight file `i3d_pretrained_400.pt`): the stem Conv3d_1a_7x7 (stride 2) -> MaxPool3d_2a_3x3 (1x3x3,
stride 1x2x2) -> Conv3d_2b_1x1 -> Conv3d_2c_3x3 -> MaxPool3d_3a_3x3 (1x3x3, stride 1x2x2) -> Mixed_3b, Mixed_3c ->
MaxPool3d_4a_3x3 (3x3x3, stride 2) -> Mixed_4b .. Mixed_4f -> MaxPool3d_5a_2x2 (2x2x2, stride 2) -> Mixed_5b,
Mixed_5c (1024 channels) -> AvgPool3d (2, 7, 7), stride 1, no padding -> the 1x1x1 `logits` convolution (with bias)
-> the mean over the remaining time positions. Each `Unit3D` is a bias-free convolution, BatchNorm (inference:
running statistics, eps `bn_eps`) and ReLU; each Inception module concatenates four branches: 1x1; 1x1 -> 3x3x3;
1x1 -> 3x3x3; 3x3x3 max-pool (stride 1) -> 1x1.

Padding is TensorFlow's "SAME" as pytorch-i3d computes it from the input size, per dimension of size s, kernel k,
stride r: pad = max(k - r, 0) if s % r == 0 else max(k - s % r, 0), split as (pad // 2, pad - pad // 2) (the extra
one after), filled with zeros before convolutions and max-pools alike (the max-pools follow ReLUs, so a zero pad
is never above the values). The final average pool has no padding: the Mixed_5c map must be at least (2, 7, 7),
i.e. at least 9 frames and 193 x 193 pixels with the default `pool_size`, and its spatial output must be 1 x 1
(193..224 pixels), as pytorch-i3d's squeeze requires.

BatchNorm's running mean and variance are parameters here (`bn/mean`, `bn/var` beside `bn/scale`, `bn/bias`): the
network is a frozen feature extractor, never trained, so one `params` tree holds everything a checkpoint holds.
`magdiff_jax.convert.i3d` reads pytorch-i3d's state dict into it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from magdiff_jax.layers.common import compute_dtype, conv
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_names, check_positive, register

# Inception modules: (name, the six widths of pytorch-i3d's InceptionModule: b0, b1a, b1b, b2a, b2b, b3b)
MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
# the network in order: ("unit", name, width, kernel, stride) | ("pool", name, kernel, stride) | ("mixed", name)
LAYOUT = (
    ("unit", "Conv3d_1a_7x7", 64, (7, 7, 7), (2, 2, 2)),
    ("pool", "MaxPool3d_2a_3x3", (1, 3, 3), (1, 2, 2)),
    ("unit", "Conv3d_2b_1x1", 64, (1, 1, 1), (1, 1, 1)),
    ("unit", "Conv3d_2c_3x3", 192, (3, 3, 3), (1, 1, 1)),
    ("pool", "MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    ("mixed", "Mixed_3b"),
    ("mixed", "Mixed_3c"),
    ("pool", "MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("mixed", "Mixed_4b"),
    ("mixed", "Mixed_4c"),
    ("mixed", "Mixed_4d"),
    ("mixed", "Mixed_4e"),
    ("mixed", "Mixed_4f"),
    ("pool", "MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
    ("mixed", "Mixed_5b"),
    ("mixed", "Mixed_5c"),
)
BRANCHES = ("b0", "b1a", "b1b", "b2a", "b2b", "b3b")


@dataclasses.dataclass(frozen=True)
class I3DConfig:
    """`num_classes`: logits (400 for Kinetics-400). `width_divisor`: every channel count c becomes max(c // d, 1)
    (1: the released network; 8 or 16: a CPU-sized one of the same layout for tests). `pool_size`: the final
    average pool (T, H, W), (2, 7, 7) in pytorch-i3d (for 16 x 224 x 224 inputs). `bn_eps`: BatchNorm's epsilon,
    1e-5 in the port cd-fvd ships and runs with TATS's `i3d_pretrained_400.pt` (piergiaj's original pytorch-i3d
    module uses 1e-3: pass `bn_eps=1e-3` for weights meant for it)."""

    num_classes: int = 400
    in_channels: int = 3
    width_divisor: int = 1
    pool_size: tuple[int, int, int] = (2, 7, 7)
    bn_eps: float = 1e-5
    dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "num_classes", "in_channels", "width_divisor", "pool_size")
        check_names(self)
        if len(self.pool_size) != 3:
            raise ConfigError(f"expected a (T, H, W) pool size, got {list(self.pool_size)}", "pool_size")
        if not (isinstance(self.bn_eps, int | float) and self.bn_eps > 0):
            raise ConfigError(f"expected a positive number, got {self.bn_eps!r}", "bn_eps")

    def width(self, c: int) -> int:
        return max(c // self.width_divisor, 1)

    def mixed_widths(self, name: str) -> tuple[int, ...]:
        return tuple(self.width(c) for c in MIXED[name])

    @property
    def feature_dim(self) -> int:
        """The width of Mixed_5c, the pooled features (1024 in the released network)."""
        w = self.mixed_widths("Mixed_5c")
        return w[0] + w[2] + w[4] + w[5]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """pytorch-i3d's TensorFlow-style "SAME" padding of one dimension of `size` (module docstring)."""
    pad = max(kernel - stride, 0) if size % stride == 0 else max(kernel - size % stride, 0)
    return pad // 2, pad - pad // 2


def _pad_same(x: jax.Array, kernel, stride) -> jax.Array:
    """Zero-pad the (T, H, W) axes of (B, T, H, W, C) as `same_padding` says."""
    pads = [same_padding(s, k, r) for s, k, r in zip(x.shape[1:4], kernel, stride, strict=True)]
    return jnp.pad(x, ((0, 0), *pads, (0, 0)))


def max_pool_same(x: jax.Array, kernel, stride) -> jax.Array:
    """pytorch-i3d's MaxPool3dSamePadding: zero "SAME" padding, then a max-pool without padding."""
    return nn.max_pool(_pad_same(x, kernel, stride), tuple(kernel), strides=tuple(stride), padding="VALID")


class BatchNorm(nn.Module):
    """Inference BatchNorm over the last axis, (x - mean) / sqrt(var + eps) * scale + bias, with the running
    statistics as parameters (`mean`, `var`; torch's `running_mean`, `running_var`)."""

    features: int
    eps: float
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones_init(), (self.features,))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        mean = self.param("mean", nn.initializers.zeros_init(), (self.features,))
        var = self.param("var", nn.initializers.ones_init(), (self.features,))
        mul = scale * jax.lax.rsqrt(var + self.eps)
        dt = self.dtype or x.dtype
        return x * mul.astype(dt) + (bias - mean * mul).astype(dt)


class Unit3D(nn.Module):
    """pytorch-i3d's Unit3D: "SAME"-padded convolution (`conv3d`, no bias) -> BatchNorm (`bn`) -> ReLU; the logits
    layer is the variant with a bias and neither norm nor activation."""

    features: int
    kernel: tuple[int, int, int] = (1, 1, 1)
    stride: tuple[int, int, int] = (1, 1, 1)
    bn_eps: float = 1e-5
    logits: bool = False
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        x = _pad_same(x, self.kernel, self.stride)
        x = conv(self.features, self.kernel, strides=self.stride, padding="VALID", use_bias=self.logits,
                 dtype=self.dtype, name="conv3d")(x)
        if self.logits:
            return x
        return nn.relu(BatchNorm(self.features, self.bn_eps, self.dtype, name="bn")(x))


class InceptionModule(nn.Module):
    """Four branches concatenated over channels (module docstring); `widths` are (b0, b1a, b1b, b2a, b2b, b3b)."""

    widths: tuple[int, ...]
    bn_eps: float = 1e-5
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, x):
        w = dict(zip(BRANCHES, self.widths, strict=True))

        def unit(name, kernel=(1, 1, 1)):
            return Unit3D(w[name], kernel, bn_eps=self.bn_eps, dtype=self.dtype, name=name)

        b0 = unit("b0")(x)
        b1 = unit("b1b", (3, 3, 3))(unit("b1a")(x))
        b2 = unit("b2b", (3, 3, 3))(unit("b2a")(x))
        b3 = unit("b3b")(max_pool_same(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class I3D(nn.Module):
    """(B, T, H, W, in_channels) in [-1, 1] -> (logits (B, num_classes), pooled (B, feature_dim)), float32.

    pooled is the final average pool's output averaged over its time positions (one position for 16 frames);
    logits are the 1x1x1 `logits` convolution of each pooled position, averaged over time (pytorch-i3d's forward,
    dropout being the identity at inference)."""

    config: I3DConfig

    @nn.compact
    def __call__(self, x) -> tuple[jax.Array, jax.Array]:
        c = self.config
        dt = compute_dtype(c.dtype)
        if x.ndim != 5 or x.shape[-1] != c.in_channels:
            raise ValueError(f"I3D expects videos (B, T, H, W, {c.in_channels}), got shape {tuple(x.shape)}")
        self._check_size(x.shape[1:4])
        x = x.astype(dt)
        for layer in LAYOUT:
            if layer[0] == "unit":
                _, name, width, kernel, stride = layer
                x = Unit3D(c.width(width), kernel, stride, c.bn_eps, dtype=dt, name=name)(x)
            elif layer[0] == "pool":
                x = max_pool_same(x, layer[2], layer[3])
            else:
                x = InceptionModule(c.mixed_widths(layer[1]), c.bn_eps, dtype=dt, name=layer[1])(x)
        x = nn.avg_pool(x.astype(jnp.float32), c.pool_size, strides=(1, 1, 1), padding="VALID")  # (B, T', 1, 1, C)
        logits = Unit3D(c.num_classes, logits=True, dtype=jnp.float32, name="logits")(x)
        return jnp.mean(logits[:, :, 0, 0], axis=1), jnp.mean(x[:, :, 0, 0], axis=1)

    def _check_size(self, thw) -> None:
        """The final average pool's input must hold the pool, and its spatial output must be 1 x 1."""
        c = self.config
        out = list(thw)
        for layer in LAYOUT:
            stride = layer[4] if layer[0] == "unit" else layer[3] if layer[0] == "pool" else (1, 1, 1)
            out = [-(-s // r) for s, r in zip(out, stride, strict=True)]
        t, h, w = out
        pt, ph, pw = c.pool_size
        if t < pt or h < ph or w < pw or h - ph + 1 != 1 or w - pw + 1 != 1:
            raise ValueError(
                f"I3D input of {thw[0]} frames x {thw[1]} x {thw[2]} gives a Mixed_5c map of {t} x {h} x {w}; the "
                f"final average pool {tuple(c.pool_size)} needs at least {pt} time positions and exactly {ph} x {pw} "
                f"spatial ones (with the default pool: at least 9 frames and 193..224 pixels a side; FVD resizes to "
                f"224)")


def example_inputs(config: I3DConfig) -> tuple:
    pt, ph, pw = config.pool_size
    # the smallest input the final pool accepts: 8 (pt - 1) + 1 frames and 32 (p - 1) + 1 pixels a side
    return (jnp.zeros((1, 8 * (pt - 1) + 1, 32 * (ph - 1) + 1, 32 * (pw - 1) + 1, config.in_channels)),)


SPEC = register(ModelSpec("i3d", I3DConfig, I3D, example_inputs))
