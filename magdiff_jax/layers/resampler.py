"""The Perceiver resampler of IP-Adapter-Plus (diffusers `IPAdapterPlusImageProjection`): CLIP image tokens ->
a fixed number of image prompt tokens for decoupled cross-attention.

    x (B, T, embedding_dim)  [OpenCLIP ViT-H/14: T = 257 penultimate-layer tokens of width 1280]
      proj_in                          -> (B, T, dim)
      latents (1, num_queries, dim), learned, repeated over the batch
      depth x layers_{i}:
        kv = concat(ln0(x), ln1(latents))                             (B, T + num_queries, dim)
        latents = attn(ln1(latents), kv) + latents                    heads x dim_head, bias-free, 1/sqrt(dim_head)
        latents = ff(latents) + latents                               LayerNorm, Linear(dim, ff_mult*dim), GELU, Linear
      proj_out, norm_out               -> (B, num_queries, output_dim)

Parameter names follow diffusers: `proj_in`, `latents`, `layers_{i}/{ln0, ln1, attn/{to_q, to_k, to_v, to_out_0}}`,
`layers_{i}/ff_0` (the LayerNorm of the `ff` Sequential) and `layers_{i}/ff_1/{net_0/proj, net_2}` (its
FeedForward), `proj_out`, `norm_out`. IP-Adapter's (q*s)(k*s)^T with s = dim_head^-1/4 is the usual 1/sqrt(dim_head)
scale. Attention and feed-forward linears are bias-free; `proj_in` and `proj_out` have biases.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from magdiff_jax.layers.attention import Attention
from magdiff_jax.layers.common import dense, gelu, layer_norm
from magdiff_jax.layers.remat import tag


@dataclasses.dataclass(frozen=True)
class ResamplerConfig:
    """IP-Adapter-Plus `Resampler` arguments (defaults: MagDiff's, for OpenCLIP ViT-H/14 tokens and SD2.1's
    1024-wide cross-attention). diffusers' `IPAdapterPlusImageProjection` calls them embed_dims=embedding_dim,
    hidden_dims=dim, output_dims=output_dim, ffn_ratio=ff_mult."""

    dim: int = 1024
    depth: int = 4
    dim_head: int = 64
    heads: int = 12
    num_queries: int = 16
    embedding_dim: int = 1280
    output_dim: int = 1024
    ff_mult: int = 4

    def __post_init__(self):
        for name in ("dim", "depth", "dim_head", "heads", "num_queries", "embedding_dim", "output_dim", "ff_mult"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ResamplerConfig.{name} must be a positive int, got {value!r}")


class GELUProj(nn.Module):
    """diffusers `GELU`: its linear `proj` (bias-free here), then the exact GELU."""

    features: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = dense(self.features, axes=("embed", "mlp"), use_bias=False, dtype=self.dtype, name="proj")(x)
        return gelu(x)


class ResamplerFeedForward(nn.Module):
    """diffusers `FeedForward(dim, dim, activation_fn="gelu", mult, bias=False)`: net_0 = GELUProj (dim -> mult*dim),
    net_2 = linear back to dim (no dropout in the resampler)."""

    dim: int
    mult: int
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        x = GELUProj(self.dim * self.mult, dtype=self.dtype, name="net_0")(x)
        return tag(dense(self.dim, axes=("mlp", "embed"), use_bias=False, dtype=self.dtype, name="net_2")(x), "mlp")


class ResamplerBlock(nn.Module):
    """diffusers `IPAdapterPlusImageProjectionBlock`: the latents attend to concat(ln0(x), ln1(latents)), then a
    pre-norm feed-forward; both with residuals. x (B, T, dim), latents (B, Q, dim) -> (B, Q, dim)."""

    dim: int
    dim_head: int
    heads: int
    ff_mult: int
    attention_impl: str = "xla"
    dtype: Any = None

    @nn.compact
    def __call__(self, x, latents):
        residual = latents
        x = layer_norm(dtype=self.dtype, name="ln0")(x)
        latents = layer_norm(dtype=self.dtype, name="ln1")(latents)
        kv = jnp.concatenate([x, latents.astype(x.dtype)], axis=1)  # (B, T + Q, dim)
        attn = Attention(self.dim, self.heads, self.dim_head, qkv_bias=False, out_bias=False,
                         implementation=self.attention_impl, dtype=self.dtype, name="attn")
        latents = attn(latents, kv) + residual
        h = layer_norm(dtype=self.dtype, name="ff_0")(latents)
        return ResamplerFeedForward(self.dim, self.ff_mult, dtype=self.dtype, name="ff_1")(h) + latents


class Resampler(nn.Module):
    """IP-Adapter-Plus Perceiver resampler (module docstring): x (B, T, embedding_dim) -> (B, num_queries,
    output_dim). Matches diffusers `IPAdapterPlusImageProjection` (fp32, max|diff| / max|ref| <= 1e-5,
    tests/test_magdiff_model.py); `convert.ip_adapter.resampler_from_torch` / `resampler_to_torch` map its state
    dict."""

    config: ResamplerConfig
    attention_impl: str = "xla"
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        if x.ndim != 3 or x.shape[-1] != cfg.embedding_dim:
            raise ValueError(f"resampler input must be (B, T, {cfg.embedding_dim}) image tokens, got {x.shape}")
        init = nn.initializers.normal(stddev=cfg.dim**-0.5)  # randn / sqrt(dim)
        latents = self.param("latents", nn.with_logical_partitioning(init, (None, None, "embed")),
                             (1, cfg.num_queries, cfg.dim), jnp.float32)
        x = dense(cfg.dim, axes=("embed", "mlp"), dtype=self.dtype, name="proj_in")(x)  # (B, T, dim)
        latents = jnp.broadcast_to(latents.astype(x.dtype), (x.shape[0], cfg.num_queries, cfg.dim))
        for i in range(cfg.depth):
            latents = ResamplerBlock(cfg.dim, cfg.dim_head, cfg.heads, cfg.ff_mult, self.attention_impl, self.dtype,
                                     name=f"layers_{i}")(x, latents)
        latents = dense(cfg.output_dim, axes=("embed", "mlp"), dtype=self.dtype, name="proj_out")(latents)
        return layer_norm(dtype=self.dtype, name="norm_out")(latents)  # (B, num_queries, output_dim)

