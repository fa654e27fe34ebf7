"""The KL autoencoder of latent diffusion (diffusers `AutoencoderKL`), channels-last.

    module, params = magdiff_jax.convert.load_torch("vae", "path/to/vae")
    mean, logvar = module.apply({"params": params}, images, method="encode")  # images (B, H, W, 3), [-1, 1]
    z = module.config.scaling_factor * mean  # what the diffusion model sees
    images = module.apply({"params": params}, z / module.config.scaling_factor, method="decode")

`encode` and `decode` work on unscaled latents, as diffusers' `AutoencoderKL.encode/decode`: callers
multiply latents by `config.scaling_factor` (after subtracting `config.shift_factor` when it is set) before
diffusion and undo it before decoding.

Parameter paths mirror diffusers' state-dict keys (`encoder.down_blocks.0.resnets.1.conv1` is
`encoder/down_blocks_0/resnets_1/conv1`); the mid-block attention `encoder.mid_block.attentions.0.{group_norm,
to_q, to_k, to_v, to_out.0}` is `encoder/mid_block/attentions_0/{group_norm, to_q, to_k, to_v, to_out_0}`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magdiff_jax.layers.attention import Attention
from magdiff_jax.layers.common import conv, group_norm
from magdiff_jax.layers.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_names, check_positive, register

DOWN_BLOCK_TYPES = ("DownEncoderBlock2D",)
UP_BLOCK_TYPES = ("UpDecoderBlock2D",)
VAE_EPS = 1e-6  # diffusers' Encoder/Decoder use 1e-6 for every GroupNorm
LOGVAR_RANGE = (-30.0, 20.0)


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """diffusers `AutoencoderKL` config.json fields (same names and defaults), plus `attention_impl` (see
    `magdiff_jax.layers.attention`) and `dtype` (compute dtype; parameters stay float32)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    attention_impl: str = "auto"
    dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                       "latent_channels", "norm_num_groups", "sample_size")
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("AutoencoderKLConfig: block_out_channels is empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                f"AutoencoderKLConfig: down_block_types ({len(self.down_block_types)}), up_block_types "
                f"({len(self.up_block_types)}) and block_out_channels ({n}) must have the same length"
            )
        for t in self.down_block_types:
            if t not in DOWN_BLOCK_TYPES:
                raise ValueError(
                    f"AutoencoderKLConfig: down block type {t!r} is not supported ({DOWN_BLOCK_TYPES})"
                )
        for t in self.up_block_types:
            if t not in UP_BLOCK_TYPES:
                raise ValueError(
                    f"AutoencoderKLConfig: up block type {t!r} is not supported ({UP_BLOCK_TYPES})"
                )
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"{self.norm_num_groups} groups do not divide block_out_channels {bad}",
                              "norm_num_groups")
        if self.layers_per_block < 1:
            raise ValueError("AutoencoderKLConfig: layers_per_block must be >= 1")
        check_names(self, dtype=jnp.dtype)  # the VAE computes in any dtype jnp.dtype knows

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along H and W: 2 ** (number of blocks - 1)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd(cls, **overrides) -> AutoencoderKLConfig:
        """The Stable Diffusion 1.5 / 2.1 VAE (83.7M parameters, 8x downsampling, 4 latent channels)."""
        kw: dict[str, Any] = dict(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        )
        kw.update(overrides)
        return cls(**kw)


class VAEAttention(Attention):
    """diffusers' mid-block `Attention` with `group_norm`, residual connection and `rescale_output_factor`:
    y = (x + to_out_0(attention(group_norm(x)))) / rescale_output_factor over the H*W positions.

    Parameters sit next to each other as in diffusers: `group_norm`, `to_q`, `to_k`, `to_v`, `to_out_0`."""

    num_groups: int = 32
    eps: float = VAE_EPS
    rescale_output_factor: float = 1.0

    @nn.compact
    def __call__(self, x):
        """x (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        y = group_norm(
            self.num_groups,
            epsilon=self.eps,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="group_norm",
        )(x)
        y = super().__call__(y.reshape(b, h * w, c))
        y = y.reshape(b, h, w, c) + x
        if self.rescale_output_factor != 1.0:
            y = y / self.rescale_output_factor
        return y


class UNetMidBlock2D(nn.Module):
    """diffusers `UNetMidBlock2D` without a time embedding (VAE): resnets_0, then per layer attentions_i (when
    `add_attention`) and resnets_{i+1}. Heads = channels // attention_head_dim."""

    channels: int
    num_layers: int = 1
    groups: int = 32
    eps: float = VAE_EPS
    act_fn: str = "silu"
    add_attention: bool = True
    attention_head_dim: int | None = None
    attention_impl: str = "xla"
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        head_dim = self.attention_head_dim or self.channels
        res = dict(
            in_channels=self.channels,
            out_channels=self.channels,
            groups=self.groups,
            eps=self.eps,
            non_linearity=self.act_fn,
            dtype=self.dtype,
        )
        x = ResnetBlock2D(name="resnets_0", **res)(x)
        for i in range(self.num_layers):
            if self.add_attention:
                x = VAEAttention(
                    query_dim=self.channels,
                    heads=self.channels // head_dim,
                    dim_head=head_dim,
                    qkv_bias=True,
                    implementation=self.attention_impl,
                    num_groups=self.groups,
                    eps=self.eps,
                    dtype=self.dtype,
                    name=f"attentions_{i}",
                )(x)
            x = ResnetBlock2D(name=f"resnets_{i + 1}", **res)(x)
        return x


class DownEncoderBlock2D(nn.Module):
    """`num_layers` resnets (resnets_i) then, unless last, a padding-0 stride-2 conv (downsamplers_0/conv)."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_downsample: bool
    eps: float = VAE_EPS
    downsample_padding: int = 0
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                in_channels=self.in_channels if i == 0 else self.out_channels,
                out_channels=self.out_channels,
                groups=self.groups,
                eps=self.eps,
                non_linearity=self.act_fn,
                dtype=self.dtype,
                name=f"resnets_{i}",
            )(x)
        if self.add_downsample:
            x = Downsample2D(
                self.out_channels, padding=self.downsample_padding, dtype=self.dtype, name="downsamplers_0"
            )(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` resnets (resnets_i) then, unless last, nearest x2 + conv (upsamplers_0/conv)."""

    in_channels: int
    out_channels: int
    num_layers: int
    groups: int
    act_fn: str
    add_upsample: bool
    eps: float = VAE_EPS
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(
                in_channels=self.in_channels if i == 0 else self.out_channels,
                out_channels=self.out_channels,
                groups=self.groups,
                eps=self.eps,
                non_linearity=self.act_fn,
                dtype=self.dtype,
                name=f"resnets_{i}",
            )(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, dtype=self.dtype, name="upsamplers_0")(x)
        return x


def _mid_block(c: AutoencoderKLConfig, dtype) -> UNetMidBlock2D:
    return UNetMidBlock2D(
        channels=c.block_out_channels[-1],
        groups=c.norm_num_groups,
        act_fn=c.act_fn,
        add_attention=c.mid_block_add_attention,
        attention_head_dim=c.block_out_channels[-1],
        attention_impl=c.attention_impl,
        dtype=dtype,
        name="mid_block",
    )


class Encoder(nn.Module):
    """(B, H, W, in_channels) -> (B, H/f, W/f, 2*latent_channels) moments (mean and log-variance stacked)."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt = jnp.dtype(c.dtype)
        boc = c.block_out_channels
        x = conv(boc[0], (3, 3), padding=((1, 1), (1, 1)), dtype=dt, name="conv_in")(x)
        out_ch = boc[0]
        for i in range(len(c.down_block_types)):
            in_ch, out_ch = out_ch, boc[i]
            x = DownEncoderBlock2D(
                in_channels=in_ch,
                out_channels=out_ch,
                num_layers=c.layers_per_block,
                groups=c.norm_num_groups,
                act_fn=c.act_fn,
                add_downsample=i < len(boc) - 1,
                dtype=dt,
                name=f"down_blocks_{i}",
            )(x)
        x = _mid_block(c, dt)(x)
        x = group_norm(c.norm_num_groups, epsilon=VAE_EPS, dtype=dt, name="conv_norm_out")(x)
        x = jax.nn.silu(x)  # diffusers' conv_act is always SiLU, whatever act_fn says
        return conv(2 * c.latent_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dt, name="conv_out")(x)


class Decoder(nn.Module):
    """(B, h, w, latent_channels) -> (B, h*f, w*f, out_channels)."""

    config: AutoencoderKLConfig

    @nn.compact
    def __call__(self, z):
        c = self.config
        dt = jnp.dtype(c.dtype)
        rev = tuple(reversed(c.block_out_channels))
        x = conv(rev[0], (3, 3), padding=((1, 1), (1, 1)), dtype=dt, name="conv_in")(z)
        x = _mid_block(c, dt)(x)
        out_ch = rev[0]
        for i in range(len(c.up_block_types)):
            in_ch, out_ch = out_ch, rev[i]
            x = UpDecoderBlock2D(
                in_channels=in_ch,
                out_channels=out_ch,
                num_layers=c.layers_per_block + 1,
                groups=c.norm_num_groups,
                act_fn=c.act_fn,
                add_upsample=i < len(rev) - 1,
                dtype=dt,
                name=f"up_blocks_{i}",
            )(x)
        x = group_norm(c.norm_num_groups, epsilon=VAE_EPS, dtype=dt, name="conv_norm_out")(x)
        x = jax.nn.silu(x)
        return conv(c.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dt, name="conv_out")(x)


def sample_latent(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """A draw from the diagonal Gaussian posterior: mean + exp(logvar / 2) * N(0, 1) (unscaled latent)."""
    eps = jax.random.normal(key, mean.shape, dtype=jnp.float32).astype(mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(posterior || N(0, 1)) summed over (H, W, C), per batch element (diffusers' `latent_dist.kl()`)."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar, axis=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """diffusers `AutoencoderKL`, channels-last. Methods (all usable as `apply(..., method="...")`):

      encode(x)   images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each
                  (B, H/f, W/f, latent_channels); logvar clamped to [-30, 20] as diffusers'
                  DiagonalGaussianDistribution.
      decode(z)   unscaled latents (B, h, w, latent_channels) -> images (B, h*f, w*f, out_channels).
      __call__(x, sample_posterior=False, key=None)
                  encode then decode (the posterior mean, or a sample drawn with `key`); touches every
                  parameter (used by `init`).

    Latents are unscaled: callers multiply by `config.scaling_factor` before diffusion and divide before
    `decode`.
    f = `config.downsample_factor` (8 for the SD VAE).
    """

    config: AutoencoderKLConfig

    def setup(self):
        c = self.config
        dt = jnp.dtype(c.dtype)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)
        if c.use_quant_conv:
            self.quant_conv = conv(2 * c.latent_channels, (1, 1), padding="VALID", dtype=dt)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv(c.latent_channels, (1, 1), padding="VALID", dtype=dt)

    def encode(self, x):
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, sample_posterior: bool = False, key: jax.Array | None = None):
        if sample_posterior and key is None:
            raise ValueError("AutoencoderKL: sample_posterior=True needs a PRNG `key`")
        mean, logvar = self.encode(x)
        z = sample_latent(mean, logvar, key) if sample_posterior else mean
        return self.decode(z)

    sample_latent = staticmethod(sample_latent)
    kl_divergence = staticmethod(kl_divergence)


# --- videos -------------------------------------------------------------------------------------------------------
def _per_frame(fn, frames, frames_per_call: int):
    """fn over (N, ...) frames, `frames_per_call` at a time when 0 < frames_per_call < N (bounded memory), else at
    once."""
    if 0 < frames_per_call < frames.shape[0]:
        return jax.lax.map(lambda x: jax.tree.map(lambda a: a[0], fn(x[None])), frames, batch_size=frames_per_call)
    return fn(frames)


def encode_frames(vae: AutoencoderKL, params, video, frames_per_call: int = 0):
    """Videos (B, F, H, W, 3) in [-1, 1] -> the posterior's (mean, logvar), each (B, F, h, w, latent_channels),
    unscaled; every frame encoded alone."""
    b, f = video.shape[:2]
    mean, logvar = _per_frame(lambda x: vae.apply({"params": params}, x, method="encode"),
                              video.reshape(b * f, *video.shape[2:]), frames_per_call)
    return mean.reshape(b, f, *mean.shape[1:]), logvar.reshape(b, f, *logvar.shape[1:])


def _latents(vae: AutoencoderKL, mean, logvar, key):
    z = mean if key is None else sample_latent(mean, logvar, key)
    return z * vae.config.scaling_factor


def encode_images(vae: AutoencoderKL, params, images, key: jax.Array | None = None):
    """Images (B, H, W, 3) in [-1, 1] -> diffusion latents (B, h, w, c), scaled by `scaling_factor`: the posterior
    mean, or a draw from it with `key`."""
    return _latents(vae, *vae.apply({"params": params}, images, method="encode"), key)


def encode_video(vae: AutoencoderKL, params, video, key: jax.Array | None = None, frames_per_call: int = 0):
    """Videos (B, F, H, W, 3) in [-1, 1] -> diffusion latents (B, F, h, w, c), as `encode_images` per frame."""
    return _latents(vae, *encode_frames(vae, params, video, frames_per_call), key)


def decode_video(vae: AutoencoderKL, params, latents, frames_per_call: int = 0):
    """Diffusion latents (B, F, h, w, c) -> videos (B, F, H, W, 3) in float32, clipped to [-1, 1]."""
    b, f = latents.shape[:2]
    z = latents.reshape(b * f, *latents.shape[2:]) / vae.config.scaling_factor
    images = _per_frame(lambda x: vae.apply({"params": params}, x, method="decode"), z, frames_per_call)
    return jnp.clip(images.astype(jnp.float32), -1, 1).reshape(b, f, *images.shape[1:])


# --- registry -------------------------------------------------------------------------------------------------------
def example_inputs(config: AutoencoderKLConfig) -> tuple:
    s = 2 * config.downsample_factor
    return (jnp.zeros((1, s, s, config.in_channels), jnp.float32),)


# The VAE's parameters are small next to its activations: they stay replicated rather than sharded over fsdp (the
# U-Net's default), so encoding a data-parallel batch needs no parameter all-gathers.
SHARDING_RULES = (("embed", None), ("conv_in", None), ("mlp", None), ("heads", None))

SPEC = register(ModelSpec("vae", AutoencoderKLConfig, AutoencoderKL, example_inputs, sharding_rules=SHARDING_RULES))
