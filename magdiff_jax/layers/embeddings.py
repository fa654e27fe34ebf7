"""Timestep embeddings (diffusers `Timesteps` + `TimestepEmbedding`)."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from magdiff_jax.layers.common import activation, dense


def timestep_embedding(
    timesteps, dim: int, flip_sin_to_cos: bool = False, downscale_freq_shift: float = 1.0,
    scale: float = 1.0, max_period: float = 10000.0,
):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim), float32, as in DDPM/diffusers."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
    args = jnp.asarray(timesteps, jnp.float32)[:, None] * jnp.exp(exponent)[None, :] * scale
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 (-> post_act), with an optional `cond_proj` of a guidance/condition vector."""

    time_embed_dim: int
    act_fn: str = "silu"
    out_dim: int | None = None
    post_act_fn: str | None = None
    cond_proj_dim: int | None = None
    dtype: Any = None

    @nn.compact
    def __call__(self, sample, condition=None):
        if self.cond_proj_dim is not None and condition is not None:
            sample = sample + dense(sample.shape[-1], axes=("embed", "mlp"), use_bias=False,
                                    dtype=self.dtype, name="cond_proj")(condition)
        x = dense(self.time_embed_dim, axes=("embed", "mlp"), dtype=self.dtype, name="linear_1")(sample)
        x = activation(self.act_fn)(x)
        x = dense(self.out_dim or self.time_embed_dim, axes=("mlp", "embed"), dtype=self.dtype, name="linear_2")(x)
        if self.post_act_fn is not None:
            x = activation(self.post_act_fn)(x)
        return x
