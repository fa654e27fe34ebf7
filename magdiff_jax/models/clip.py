"""CLIP text and vision towers with transformers' parameter tree (`CLIPTextModel`, `CLIPVisionModel`, and
their `...WithProjection` variants).

Parameter paths mirror the PyTorch module names (`embeddings/token_embedding`,
`encoder/layers_3/self_attn/q_proj`, `final_layer_norm`, `text_projection`), without the `text_model.` /
`vision_model.` prefix that transformers puts on the checkpoint keys; the converter
(`magdiff_jax.convert.clip`) adds and strips it. The projection layer exists only when
`config.with_projection` is set, so a projected and an unprojected tower share every other parameter.

Text:   `CLIPTextModel(config).apply({"params": p}, input_ids (B, L) int, attention_mask=None (B, L),
        output_hidden_states=False)` -> `CLIPTextOutput`.
Vision: `CLIPVisionModel(config).apply({"params": p}, pixel_values (B, H, W, C) channels-last,
        output_hidden_states=False)` -> `CLIPVisionOutput`.

`hidden_states`, when asked for, is a tuple of `num_hidden_layers + 1` arrays as in transformers: the encoder
input (text: the embeddings; vision: the embeddings after `pre_layrnorm`), then the output of every encoder
layer (the last one before `final_layer_norm` / without `post_layernorm`).
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from magdiff_jax.layers.attention import dot_product_attention
from magdiff_jax.layers.common import activation, conv, dense, embedding, layer_norm
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_names, check_positive, register

_ACT_AXES = ("activation_batch", "activation_length", None)


# --- configs ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """transformers' `CLIPTextConfig` fields (same names and defaults), plus `with_projection`,
    `attention_impl` (see `magdiff_jax.layers.attention`) and the compute `dtype` (parameters stay
    float32)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407
    with_projection: bool = False
    attention_impl: str = "auto"
    dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                       "num_attention_heads", "max_position_embeddings")
        check_names(self)
        _check_heads(self)
        if not isinstance(self.eos_token_id, int) or isinstance(self.eos_token_id, bool):
            raise ValueError(f"CLIPTextConfig.eos_token_id must be one integer, got {self.eos_token_id!r}")

    @classmethod
    def sd15(cls, **overrides) -> CLIPTextConfig:
        """Stable Diffusion 1.x text encoder: OpenAI CLIP ViT-L/14 text tower, as in SD1.5's
        `text_encoder/config.json` (its legacy `eos_token_id` 2 selects the argmax pooling)."""
        base = dict(
            vocab_size=49408,
            hidden_size=768,
            intermediate_size=3072,
            projection_dim=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def sd21(cls, **overrides) -> CLIPTextConfig:
        """Stable Diffusion 2.x text encoder: OpenCLIP ViT-H/14 text tower with its last layer removed (23 of
        24 layers, the penultimate-layer features SD2 conditions on), as in SD2.1's
        `text_encoder/config.json`."""
        base = dict(
            vocab_size=49408,
            hidden_size=1024,
            intermediate_size=4096,
            projection_dim=512,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        )
        return cls(**{**base, **overrides})


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' `CLIPVisionConfig` fields (same names and defaults), plus `with_projection`,
    `attention_impl` and the compute `dtype`. `image_size` and `patch_size` are square sizes (single
    integers)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    with_projection: bool = False
    attention_impl: str = "auto"
    dtype: str = "float32"

    def __post_init__(self):
        check_positive(self, "hidden_size", "intermediate_size", "projection_dim", "num_hidden_layers",
                       "num_attention_heads", "image_size", "patch_size", "num_channels")
        check_names(self)
        _check_heads(self)
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}",
                              "patch_size")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def vit_h14(cls, **overrides) -> CLIPVisionConfig:
        """OpenCLIP ViT-H/14 (laion2B) image tower with its projection: the IP-Adapter / IP-Adapter-Plus image
        encoder (`CLIPVisionModelWithProjection`)."""
        base = dict(
            hidden_size=1280,
            intermediate_size=5120,
            projection_dim=1024,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            num_channels=3,
            hidden_act="gelu",
            layer_norm_eps=1e-5,
            with_projection=True,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def vit_l14(cls, **overrides) -> CLIPVisionConfig:
        """OpenAI CLIP ViT-L/14 (224 px) image tower with its projection."""
        base = dict(
            hidden_size=1024,
            intermediate_size=4096,
            projection_dim=768,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            num_channels=3,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            with_projection=True,
        )
        return cls(**{**base, **overrides})


def _check_heads(config) -> None:
    if config.hidden_size % config.num_attention_heads:
        raise ConfigError(f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                          f"{config.num_attention_heads}", "num_attention_heads")


# --- outputs ------------------------------------------------------------------------------------------------
@struct.dataclass
class CLIPTextOutput:
    last_hidden_state: jax.Array  # (B, L, D), after final_layer_norm
    pooler_output: jax.Array  # (B, D), the end-of-text token's state
    hidden_states: tuple[jax.Array, ...] | None = None  # num_hidden_layers + 1 arrays (B, L, D)
    text_embeds: jax.Array | None = None  # (B, projection_dim) when with_projection


@struct.dataclass
class CLIPVisionOutput:
    last_hidden_state: jax.Array  # (B, 1 + num_patches, D), without post_layernorm
    pooler_output: jax.Array  # (B, D): post_layernorm of the class token
    hidden_states: tuple[jax.Array, ...] | None = None  # num_hidden_layers + 1 arrays
    image_embeds: jax.Array | None = None  # (B, projection_dim) when with_projection


# --- shared encoder -----------------------------------------------------------------------------------------
class CLIPAttention(nn.Module):
    """Multi-head self-attention with transformers' `q_proj`/`k_proj`/`v_proj`/`out_proj` (all with bias)."""

    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads

        def proj(name):
            y = dense(cfg.hidden_size, axes=("embed", "heads"), dtype=dt, name=name)(x)
            return y.reshape(*y.shape[:-1], heads, head_dim)  # (B, L, H, Dh)

        q, k, v = proj("q_proj"), proj("k_proj"), proj("v_proj")
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads", None))
        out = dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=cfg.attention_impl)
        if mask is not None:
            # A query whose keys are all masked (e.g. a left-padded position) gets a zero attention output, as
            # PyTorch's scaled_dot_product_attention (transformers' default) gives it.
            any_key = jnp.any(mask, axis=-1)  # (B, 1 or H, Lq)
            out = out * jnp.moveaxis(any_key, 1, -1)[..., None].astype(out.dtype)
        out = out.reshape(*out.shape[:-2], cfg.hidden_size)
        return dense(cfg.hidden_size, axes=("heads", "embed"), dtype=dt, name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        x = dense(cfg.intermediate_size, axes=("embed", "mlp"), dtype=dt, name="fc1")(x)
        x = activation(cfg.hidden_act)(x)
        return dense(cfg.hidden_size, axes=("mlp", "embed"), dtype=dt, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False):
        cfg = self.config
        ln = dict(epsilon=cfg.layer_norm_eps, dtype=jnp.dtype(cfg.dtype))
        x = x + CLIPAttention(cfg, name="self_attn")(layer_norm(name="layer_norm1", **ln)(x), mask, is_causal)
        x = x + CLIPMLP(cfg, name="mlp")(layer_norm(name="layer_norm2", **ln)(x))
        return nn.with_logical_constraint(x, _ACT_AXES)


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` encoder layers, named `layers_0 ...`; returns (output, every layer's output)."""

    config: CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, x, mask=None, is_causal=False):
        states = [x]
        for i in range(self.config.num_hidden_layers):
            x = CLIPEncoderLayer(self.config, name=f"layers_{i}")(x, mask, is_causal)
            states.append(x)
        return x, tuple(states)


# --- text tower ---------------------------------------------------------------------------------------------
class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        length = input_ids.shape[-1]
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"CLIP text: sequence length {length} exceeds max_position_embeddings {cfg.max_position_embeddings}"
            )
        tokens = embedding(cfg.vocab_size, cfg.hidden_size, dtype=dt, name="token_embedding")(input_ids)
        positions = embedding(cfg.max_position_embeddings, cfg.hidden_size, dtype=dt, name="position_embedding")(
            jnp.arange(length)[None]
        )
        return tokens + positions


def pooled_token_index(input_ids: jax.Array, eos_token_id: int) -> jax.Array:
    """The position whose state becomes `pooler_output`, chosen as transformers' CLIPTextModel chooses it.

    Configs with the legacy `eos_token_id == 2` take the largest token id (the end-of-text token has the
    largest id in the original vocabulary); any other config takes the first occurrence of `eos_token_id`
    (position 0 when the sequence has none).
    """
    ids = input_ids.astype(jnp.int32)
    if eos_token_id == 2:
        return jnp.argmax(ids, axis=-1)
    return jnp.argmax((ids == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextModel(nn.Module):
    """CLIP text tower: token + position embeddings, causal pre-norm encoder, `final_layer_norm`, pooled
    end-of-text state, and `text_projection` (no bias) when `config.with_projection`."""

    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, output_hidden_states: bool = False) -> CLIPTextOutput:
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        if input_ids.ndim != 2:
            raise ValueError(f"CLIP text: input_ids must be (batch, length), got shape {input_ids.shape}")
        x = CLIPTextEmbeddings(cfg, name="embeddings")(input_ids)
        x = nn.with_logical_constraint(x, _ACT_AXES)
        mask = None
        if attention_mask is not None:
            length = input_ids.shape[1]
            causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
            mask = causal[None, None] & (attention_mask.astype(jnp.bool_)[:, None, None, :])  # (B, 1, L, L)
        x, states = CLIPEncoder(cfg, name="encoder")(x, mask, is_causal=mask is None)
        last = layer_norm(epsilon=cfg.layer_norm_eps, dtype=dt, name="final_layer_norm")(x)
        index = pooled_token_index(input_ids, cfg.eos_token_id)
        pooled = last[jnp.arange(last.shape[0]), index]
        text_embeds = None
        if cfg.with_projection:
            text_embeds = dense(
                cfg.projection_dim, axes=("embed", "mlp"), use_bias=False, dtype=dt, name="text_projection"
            )(pooled)
        return CLIPTextOutput(
            last_hidden_state=last,
            pooler_output=pooled,
            hidden_states=states if output_hidden_states else None,
            text_embeds=text_embeds,
        )


# --- vision tower -------------------------------------------------------------------------------------------
class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        b, h, w, c = pixel_values.shape
        if (h, w) != (cfg.image_size, cfg.image_size) or c != cfg.num_channels:
            raise ValueError(
                f"CLIP vision: pixel_values must be (batch, {cfg.image_size}, {cfg.image_size}, "
                f"{cfg.num_channels}) channels-last, got {pixel_values.shape}"
            )
        p = cfg.patch_size
        patches = conv(
            cfg.hidden_size,
            (p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=dt,
            name="patch_embedding",
        )(pixel_values)
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major over the patch grid, as torch's flatten(2)
        class_embedding = self.param(
            "class_embedding",
            nn.with_logical_partitioning(nn.initializers.normal(cfg.hidden_size**-0.5), ("embed",)),
            (cfg.hidden_size,),
            jnp.float32,
        )
        cls = jnp.broadcast_to(class_embedding.astype(dt), (b, 1, cfg.hidden_size))
        x = jnp.concatenate([cls, patches.astype(dt)], axis=1)
        positions = embedding(cfg.num_patches + 1, cfg.hidden_size, dtype=dt, name="position_embedding")(
            jnp.arange(cfg.num_patches + 1)[None]
        )
        return x + positions


class CLIPVisionModel(nn.Module):
    """CLIP image tower: patch conv (no bias) + class token + position embeddings, `pre_layrnorm`, encoder,
    `post_layernorm` on the class token, and `visual_projection` (no bias) when `config.with_projection`."""

    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values, output_hidden_states: bool = False) -> CLIPVisionOutput:
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        ln = dict(epsilon=cfg.layer_norm_eps, dtype=dt)
        x = CLIPVisionEmbeddings(cfg, name="embeddings")(pixel_values.astype(dt))
        x = layer_norm(name="pre_layrnorm", **ln)(x)
        x = nn.with_logical_constraint(x, _ACT_AXES)
        x, states = CLIPEncoder(cfg, name="encoder")(x)
        pooled = layer_norm(name="post_layernorm", **ln)(x[:, 0])
        image_embeds = None
        if cfg.with_projection:
            image_embeds = dense(
                cfg.projection_dim, axes=("embed", "mlp"), use_bias=False, dtype=dt, name="visual_projection"
            )(pooled)
        return CLIPVisionOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=states if output_hidden_states else None,
            image_embeds=image_embeds,
        )


__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextOutput",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CLIPVisionOutput",
    "pooled_token_index",
]


# --- registry -------------------------------------------------------------------------------------------------------
def text_example_inputs(config: CLIPTextConfig) -> tuple:
    return (jnp.zeros((1, 2), jnp.int32),)


def vision_example_inputs(config: CLIPVisionConfig) -> tuple:
    return (jnp.zeros((1, config.image_size, config.image_size, config.num_channels), jnp.float32),)


TEXT_SPEC = register(ModelSpec("clip_text", CLIPTextConfig, CLIPTextModel, text_example_inputs))
VISION_SPEC = register(ModelSpec("clip_vision", CLIPVisionConfig, CLIPVisionModel, vision_example_inputs))
