"""The Stable Diffusion U-Net: diffusers `UNet2DConditionModel` (SD1.5 and SD2.1 layouts), channels-last.

    sample (B, H, W, C_in), timesteps (B,) or scalar, encoder_hidden_states (B, L, cross_attention_dim)
      -> (B, H, W, C_out)

Config quirk kept for checkpoint compatibility: in diffusers configs `attention_head_dim` is the NUMBER of heads
unless `num_attention_heads` is given (SD1.5: 8 heads everywhere; SD2.1: 5/10/20/20 heads of width 64).
`UNet2DConfig.heads_per_block` resolves it; the head width of a block is its channels / heads.

The blocks take optional ControlNet-style residuals (`down_block_additional_residuals`,
`mid_block_additional_residual`), which the video U-Nets and the I2V/V2V stages build on.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from magdiff_jax.layers.common import activation, compute_dtype, conv, dense, embedding, group_norm
from magdiff_jax.layers.embeddings import TimestepEmbedding, timestep_embedding
from magdiff_jax.layers.remat import checkpoint_policy, remat
from magdiff_jax.layers.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from magdiff_jax.layers.transformer import Transformer2DModel
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_names, check_positive, register

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)


def check_block_layout(cfg, down_blocks: tuple, up_blocks: tuple) -> None:
    """Validate a U-Net config's block lists (shared by the 2D and video U-Net configs)."""
    n = len(cfg.down_block_types)
    if len(cfg.up_block_types) != n or len(cfg.block_out_channels) != n:
        raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
    for t in cfg.down_block_types:
        if t not in down_blocks:
            raise ValueError(f"down block type {t!r} is not supported; supported: {down_blocks}")
    for t in cfg.up_block_types:
        if t not in up_blocks:
            raise ValueError(f"up block type {t!r} is not supported; supported: {up_blocks}")
    if cfg.remat_policy != "none":
        checkpoint_policy(cfg.remat_policy, cfg.remat_save_names)  # raises on an unknown policy or name


def check_groups(groups: int, channels) -> None:
    """GroupNorm splits every block's channels into `groups` groups: each width must be a multiple of it."""
    bad = [c for c in channels if c % groups]
    if bad:
        raise ConfigError(f"{groups} groups do not divide block_out_channels {bad}", "norm_num_groups")


def _per_block(value, n: int, name: str) -> tuple:
    if isinstance(value, (tuple, list)):
        if len(value) != n:
            raise ConfigError(f"has {len(value)} entries but there are {n} down blocks", name)
        return tuple(value)
    return (value,) * n


@dataclasses.dataclass(frozen=True)
class UNet2DConfig:
    """diffusers UNet2DConditionModel config (the options SD1.x/SD2.x checkpoints use), with its field names."""

    sample_size: int | None = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: int | None = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    # ours (not in diffusers' config.json)
    attention_impl: str = "auto"
    dtype: str = "float32"
    remat_policy: str = "none"  # layers/remat.py: none | full | dots_saveable | dots_no_batch | names
    remat_save_names: tuple[str, ...] = ("attention",)

    @classmethod
    def sd15(cls, **kw) -> UNet2DConfig:
        """SD1.5: 320/640/1280/1280, 8 heads, cross-attention 768 (CLIP ViT-L/14), conv projections."""
        return cls(**kw)

    @classmethod
    def sd21(cls, **kw) -> UNet2DConfig:
        """SD2.1: heads 5/10/20/20 of width 64, cross-attention 1024 (OpenCLIP ViT-H/14), linear projections."""
        base = dict(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
                    sample_size=96)
        return cls(**{**base, **kw})

    def __post_init__(self):
        check_positive(self, "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                       "norm_num_groups", "cross_attention_dim", "transformer_layers_per_block", "attention_head_dim",
                       "num_attention_heads", "sample_size", "conv_in_kernel", "conv_out_kernel", "encoder_hid_dim",
                       "time_embedding_dim", "num_class_embeds", "projection_class_embeddings_input_dim",
                       "time_cond_proj_dim")
        check_names(self)
        check_block_layout(self, DOWN_BLOCKS, UP_BLOCKS)
        for name in ("only_cross_attention", "layers_per_block", "cross_attention_dim", "transformer_layers_per_block"):
            self.per_block(name)  # a per-block value of the wrong length fails here, not when the model is built
        if self.norm_num_groups is not None:
            check_groups(self.norm_num_groups, self.block_out_channels)
        if self.mid_block_type not in MID_BLOCKS:
            raise ValueError(f"mid block type {self.mid_block_type!r} is not supported; supported: {MID_BLOCKS}")
        if self.time_embedding_type != "positional":
            raise ValueError(f"time_embedding_type {self.time_embedding_type!r} is not supported (positional only)")
        if self.resnet_time_scale_shift != "default":
            raise ValueError("resnet_time_scale_shift other than 'default' is not supported")
        if self.encoder_hid_dim_type not in (None, "text_proj"):
            raise ValueError(f"encoder_hid_dim_type {self.encoder_hid_dim_type!r} is not supported")
        if self.class_embed_type not in (None, "timestep", "identity", "projection"):
            raise ValueError(f"class_embed_type {self.class_embed_type!r} is not supported")
        heads = "num_attention_heads" if self.num_attention_heads is not None else "attention_head_dim"
        for h, c in zip(self.heads_per_block, self.block_out_channels):
            if c % h:
                raise ConfigError(f"block width {c} is not divisible by its {h} attention heads", heads)

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        heads = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return _per_block(heads, len(self.down_block_types), "num_attention_heads")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    def per_block(self, name: str) -> tuple:
        return _per_block(getattr(self, name), len(self.down_block_types), name)


def _resnet(cfg: UNet2DConfig, cin: int, cout: int, name: str, scale: float = 1.0) -> ResnetBlock2D:
    """A U-Net resnet. `scale` is its output_scale_factor: `mid_block_scale_factor` in the mid block, 1 elsewhere
    (diffusers reads `resnet_out_scale_factor` but does not pass it to the block types SD uses)."""
    return ResnetBlock2D(
        in_channels=cin, out_channels=cout, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups,
        eps=cfg.norm_eps, non_linearity=cfg.act_fn, output_scale_factor=scale,
        dropout=cfg.dropout, dtype=compute_dtype(cfg.dtype), name=name,
    )


def _transformer(cfg: UNet2DConfig, block: int, channels: int, layers: int, name: str,
                 only_cross: bool, cross_dim: int) -> Transformer2DModel:
    heads = cfg.heads_per_block[block]
    return Transformer2DModel(
        heads=heads, dim_head=channels // heads, num_layers=layers, cross_attention_dim=cross_dim,
        norm_num_groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
        only_cross_attention=only_cross, dropout=cfg.dropout, attention_impl=cfg.attention_impl,
        dtype=compute_dtype(cfg.dtype), name=name,
    )


class DownBlock(nn.Module):
    """CrossAttnDownBlock2D (resnet + transformer pairs) or DownBlock2D (resnets), then an optional downsampler."""

    config: UNet2DConfig
    index: int

    @nn.compact
    def __call__(self, x, temb, context, deterministic=True):
        cfg, i = self.config, self.index
        cout = cfg.block_out_channels[i]
        cin = cfg.block_out_channels[i - 1] if i else cfg.block_out_channels[0]
        cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D"
        outputs = []
        for j in range(cfg.per_block("layers_per_block")[i]):
            x = _resnet(cfg, cin if j == 0 else cout, cout, f"resnets_{j}")(x, temb, deterministic)
            if cross:
                x = _transformer(cfg, i, cout, cfg.per_block("transformer_layers_per_block")[i], f"attentions_{j}",
                                 cfg.per_block("only_cross_attention")[i], cfg.per_block("cross_attention_dim")[i],
                                 )(x, context, deterministic)
            outputs.append(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Downsample2D(cout, padding=cfg.downsample_padding, dtype=compute_dtype(cfg.dtype),
                             name="downsamplers_0")(x)
            outputs.append(x)
        return x, outputs


class MidBlock(nn.Module):
    """UNetMidBlock2DCrossAttn: resnet, transformer, resnet at the lowest resolution."""

    config: UNet2DConfig

    @nn.compact
    def __call__(self, x, temb, context, deterministic=True):
        cfg = self.config
        c = cfg.block_out_channels[-1]
        x = _resnet(cfg, c, c, "resnets_0", cfg.mid_block_scale_factor)(x, temb, deterministic)
        x = _transformer(cfg, len(cfg.block_out_channels) - 1, c, cfg.per_block("transformer_layers_per_block")[-1],
                         "attentions_0", False, cfg.per_block("cross_attention_dim")[-1])(x, context, deterministic)
        return _resnet(cfg, c, c, "resnets_1", cfg.mid_block_scale_factor)(x, temb, deterministic)


class UpBlock(nn.Module):
    """CrossAttnUpBlock2D or UpBlock2D: layers_per_block+1 resnets over [x, skip] concatenations, then upsample."""

    config: UNet2DConfig
    index: int  # position among the up blocks (0 = lowest resolution)

    @nn.compact
    def __call__(self, x, skips, temb, context, deterministic=True, upsample_size=None):
        cfg, i = self.config, self.index
        n = len(cfg.block_out_channels)
        rev = cfg.block_out_channels[::-1]
        cout, cskip_last = rev[i], rev[min(i + 1, n - 1)]
        prev = rev[max(i - 1, 0)]
        block = n - 1 - i  # the matching down block (per-block options are listed in down order)
        cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D"
        layers = cfg.per_block("layers_per_block")[block] + 1
        for j in range(layers):
            skip = skips[-(j + 1)]
            cskip = cskip_last if j == layers - 1 else cout
            cin = prev if j == 0 else cout
            if skip.shape[-1] != cskip:
                raise ValueError(f"up block {i}: skip has {skip.shape[-1]} channels, expected {cskip}")
            x = jnp.concatenate([x, skip], axis=-1)
            x = _resnet(cfg, cin + cskip, cout, f"resnets_{j}")(x, temb, deterministic)
            if cross:
                x = _transformer(cfg, block, cout, cfg.per_block("transformer_layers_per_block")[block],
                                 f"attentions_{j}", cfg.per_block("only_cross_attention")[block],
                                 cfg.per_block("cross_attention_dim")[block])(x, context, deterministic)
        if i < n - 1:
            x = Upsample2D(cout, dtype=compute_dtype(cfg.dtype), name="upsamplers_0")(x, output_size=upsample_size)
        return x


def time_embedding(cfg: UNet2DConfig, timesteps, batch: int, timestep_cond=None, class_labels=None):
    """The U-Net's embedding of the timesteps (B,) or scalar, (B, time_embed_dim): `time_embedding` (+
    `class_embedding`) submodules of the module whose compact method calls it (the U-Net, or a ControlNet that
    copies the U-Net's encoder)."""
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32).reshape(-1), (batch,))
    t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    dt = compute_dtype(cfg.dtype)
    emb = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, post_act_fn=cfg.timestep_post_act,
                            cond_proj_dim=cfg.time_cond_proj_dim, dtype=dt, name="time_embedding",
                            )(t_emb.astype(dt or jnp.float32), timestep_cond)
    if cfg.class_embed_type is not None or cfg.num_class_embeds is not None:
        if class_labels is None:
            raise ValueError("this model has a class embedding: pass class_labels")
        if cfg.class_embed_type == "timestep":
            c = timestep_embedding(class_labels, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                   cfg.freq_shift)
            c = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype=dt, name="class_embedding")(c)
        elif cfg.class_embed_type == "identity":
            c = class_labels
        elif cfg.class_embed_type == "projection":
            c = TimestepEmbedding(cfg.time_embed_dim, cfg.act_fn, dtype=dt, name="class_embedding")(
                class_labels)
        else:
            c = embedding(cfg.num_class_embeds, cfg.time_embed_dim, dtype=dt, name="class_embedding")(
                class_labels)
        emb = emb + c.astype(emb.dtype)
    if cfg.time_embedding_act_fn is not None:
        emb = activation(cfg.time_embedding_act_fn)(emb)
    return emb


class UNet2DConditionModel(nn.Module):
    """diffusers UNet2DConditionModel, channels-last (module docstring)."""

    config: UNet2DConfig

    def time_embedding(self, timesteps, batch: int, timestep_cond=None, class_labels=None):
        return time_embedding(self.config, timesteps, batch, timestep_cond, class_labels)

    @nn.compact
    def __call__(
        self, sample, timesteps, encoder_hidden_states, *, timestep_cond=None, class_labels=None,
        down_block_additional_residuals=None, mid_block_additional_residual=None, deterministic: bool = True,
    ):
        cfg = self.config
        dt = compute_dtype(cfg.dtype)
        policy = (cfg.remat_policy, cfg.remat_save_names)
        b, h, w, _ = sample.shape
        n_up = len(cfg.block_out_channels) - 1
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        x = sample.astype(dt)
        context = encoder_hidden_states.astype(dt)
        emb = self.time_embedding(timesteps, b, timestep_cond, class_labels)
        if cfg.encoder_hid_dim_type == "text_proj":
            context = dense(cfg.per_block("cross_attention_dim")[0], axes=("embed", "mlp"), dtype=dt,
                            name="encoder_hid_proj")(context)

        k = cfg.conv_in_kernel
        x = conv(cfg.block_out_channels[0], (k, k), padding=(k - 1) // 2, dtype=dt, name="conv_in")(x)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_height", "activation_width",
                                           "activation_embed"))
        skips = [x]
        for i in range(len(cfg.down_block_types)):
            x, outs = remat(DownBlock, *policy, static_argnums=(4,))(cfg, i, name=f"down_blocks_{i}")(
                x, emb, context, deterministic)
            skips.extend(outs)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down-block residuals, got "
                                 f"{len(down_block_additional_residuals)}")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        if cfg.mid_block_type is not None:
            x = remat(MidBlock, *policy, static_argnums=(4,))(cfg, name="mid_block")(x, emb, context, deterministic)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)

        for i in range(len(cfg.up_block_types)):
            layers = cfg.per_block("layers_per_block")[n_up - i] + 1
            block_skips, skips = skips[-layers:], skips[:-layers]
            size = skips[-1].shape[1:3] if (i < n_up and (h % 2**n_up or w % 2**n_up)) else None
            x = remat(UpBlock, *policy, static_argnums=(5, 6))(cfg, i, name=f"up_blocks_{i}")(
                x, block_skips, emb, context, deterministic, size)

        if cfg.norm_num_groups is not None:
            x = group_norm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=dt, name="conv_norm_out")(x)
            x = activation(cfg.act_fn)(x)
        k = cfg.conv_out_kernel
        x = conv(cfg.out_channels, (k, k), padding=(k - 1) // 2, dtype=dt, name="conv_out")(x)
        return x.astype(sample.dtype)


# --- registry -------------------------------------------------------------------------------------------------------
def example_inputs(cfg: UNet2DConfig) -> tuple:
    """The smallest inputs an init takes: one latent as large as the down blocks need, a 2-token context."""
    size = 2 ** (len(cfg.block_out_channels) - 1)
    cross = cfg.encoder_hid_dim if cfg.encoder_hid_dim_type == "text_proj" else cfg.per_block("cross_attention_dim")[0]
    return (jnp.zeros((1, size, size, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 2, cross)))


def example_kwargs(cfg: UNet2DConfig) -> dict:
    kw = {}
    if cfg.time_cond_proj_dim is not None:
        kw["timestep_cond"] = jnp.zeros((1, cfg.time_cond_proj_dim))
    if cfg.class_embed_type in ("timestep", None) and (cfg.class_embed_type or cfg.num_class_embeds):
        kw["class_labels"] = jnp.zeros((1,), jnp.int32)
    elif cfg.class_embed_type == "identity":
        kw["class_labels"] = jnp.zeros((1, cfg.time_embed_dim))
    elif cfg.class_embed_type == "projection":
        kw["class_labels"] = jnp.zeros((1, cfg.projection_class_embeddings_input_dim))
    return kw


SPEC = register(ModelSpec("unet2d", UNet2DConfig, UNet2DConditionModel, example_inputs, example_kwargs))
