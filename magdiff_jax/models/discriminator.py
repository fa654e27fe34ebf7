"""A patch discriminator (pix2pix / taming-transformers' `NLayerDiscriminator`) and the hinge losses it trains with.

    logits = PatchDiscriminator(config).apply({"params": p}, images)      # (B, H', W', 1): one logit per patch

Images (B, H, W, in_channels) in [-1, 1]. Layers: a 4x4 stride-2 convolution and LeakyReLU(0.2); `num_layers` - 1
more 4x4 stride-2 convolutions doubling the channels (at most 8x `channels`), each with a normalisation and
LeakyReLU; a 4x4 stride-1 one; a 4x4 stride-1 convolution to one logit. Normalisation is GroupNorm where the
reference uses BatchNorm: the same role with no running statistics to carry between steps. Its receptive field is
70x70 pixels at `num_layers` 3. No PyTorch counterpart is converted: it trains with a stage and is not exported for
inference.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from magdiff_jax.layers.common import compute_dtype, conv, group_norm
from magdiff_jax.models.registry import ModelSpec, check_names, check_positive, register


@dataclasses.dataclass(frozen=True)
class PatchDiscriminatorConfig:
    in_channels: int = 3
    channels: int = 64
    num_layers: int = 3
    norm_num_groups: int = 32
    dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "in_channels", "channels", "num_layers", "norm_num_groups")
        check_names(self)
        if self.channels % self.norm_num_groups:
            raise ValueError(f"PatchDiscriminatorConfig: channels={self.channels} do not split into "
                             f"norm_num_groups={self.norm_num_groups}")


class PatchDiscriminator(nn.Module):
    config: PatchDiscriminatorConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        dt = compute_dtype(c.dtype)
        pad = ((1, 1), (1, 1))
        x = conv(c.channels, (4, 4), strides=(2, 2), padding=pad, dtype=dt, name="conv_in")(x.astype(dt))
        x = nn.leaky_relu(x, 0.2)
        for i in range(1, c.num_layers + 1):
            stride = 2 if i < c.num_layers else 1
            features = c.channels * min(2**i, 8)
            x = conv(features, (4, 4), strides=(stride, stride), padding=pad, use_bias=False, dtype=dt,
                     name=f"convs_{i}")(x)
            x = group_norm(c.norm_num_groups, dtype=dt, name=f"norms_{i}")(x)
            x = nn.leaky_relu(x, 0.2)
        return conv(1, (4, 4), padding=pad, dtype=dt, name="conv_out")(x).astype(jnp.float32)


def hinge_discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """The discriminator's hinge loss: (mean relu(1 - D(real)) + mean relu(1 + D(fake))) / 2."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real_logits)) + jnp.mean(jax.nn.relu(1.0 + fake_logits)))


def generator_adversarial_loss(fake_logits: jax.Array) -> jax.Array:
    """The generator's side of the hinge GAN: -mean D(fake)."""
    return -jnp.mean(fake_logits)


def example_inputs(config: PatchDiscriminatorConfig) -> tuple:
    return (jnp.zeros((1, 2**(config.num_layers + 2), 2**(config.num_layers + 2), config.in_channels)),)


SPEC = register(ModelSpec("patch_discriminator", PatchDiscriminatorConfig, PatchDiscriminator, example_inputs))
