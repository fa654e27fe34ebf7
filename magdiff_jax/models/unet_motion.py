"""The AnimateDiff video U-Net: diffusers `UNetMotionModel`, channels-last.

    sample (B, F, H, W, C_in), timesteps (B,) or scalar, encoder_hidden_states (B, L, cross_attention_dim)
      -> (B, F, H, W, C_out)

The spatial layers are the SD U-Net's (same names, same computation) and run on the B*F frames as images; the
text context is given once per video and repeated per frame here (diffusers' `UNetMotionModel` wants it
repeated already, (B*F, L, D)). After every spatial layer pair (resnet [+ transformer]) of every block, and
between the mid block's transformer and its second resnet, an AnimateDiff motion module
(`layers.motion.AnimateDiffTransformer3D`) attends over the F frames at every pixel.

Joint image/video: with a single frame (F == 1, static) the motion modules are bypassed, so the model is exactly
the `unet2d` SD U-Net on its spatial weights (diffusers would run the motion modules on the lone frame).

ControlNet residuals (`down_block_additional_residuals`, `mid_block_additional_residual`) are per frame, shaped as
`unet2d` takes them, (B*F, h, w, c), or equivalently (B, F, h, w, c).

Image attention (MagicVideo-V2's appearance encoder; `image_attention=True`): every SPATIAL transformer's `attn2`
(down, mid and up blocks; never a motion module's) is IP-Adapter's decoupled cross-attention with a fixed image
weight lambda = `image_attention_scale` (`layers.attention.EntityAttention`, branch_weights "fixed"):

    attn2(x) = to_out_0( Attn(Q, K_t, V_t) + lambda * Attn(Q, to_k_ip(c_i), to_v_ip(c_i)) )

over `image_hidden_states` (B, N, cross_attention_dim): one set of image tokens per video (e.g. the IP-Adapter-Plus
`Resampler`'s output for the reference image), repeated per frame inside like the text. This is diffusers'
UNetMotionModel after `load_ip_adapter` (`IPAdapterAttnProcessor2_0` in those layers, `set_ip_adapter_scale(lambda)`);
`convert.ip_adapter` reads and writes the IP-Adapter files, `add_image_attention` starts the new projections from a
model without them.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from magdiff_jax.layers.common import activation, compute_dtype, conv, group_norm
from magdiff_jax.layers.motion import AnimateDiffTransformer3D
from magdiff_jax.layers.remat import remat
from magdiff_jax.layers.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from magdiff_jax.layers.transformer import Transformer2DModel
from magdiff_jax.models.inflate import add_image_projections
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_names, check_positive, register
from magdiff_jax.models.unet2d import check_block_layout, check_groups
from magdiff_jax.models.video import check_video_inputs, per_frame_conditioning

DOWN_BLOCKS = ("CrossAttnDownBlockMotion", "DownBlockMotion")
UP_BLOCKS = ("CrossAttnUpBlockMotion", "UpBlockMotion")


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _expand(value, n: int, name: str) -> tuple:
    if isinstance(value, tuple):
        if len(value) != n:
            raise ConfigError(f"has {len(value)} entries, expected {n}", name)
        return value
    return (value,) * n


def _layer(value, j: int, n_layers: int, name: str) -> int:
    """`value` is an int for every layer of a block, or a tuple with one int per layer."""
    if isinstance(value, tuple):
        if len(value) != n_layers:
            raise ConfigError(f"{list(value)} has {len(value)} entries but the block has {n_layers} layers", name)
        return value[j]
    return value


@dataclasses.dataclass(frozen=True)
class UNetMotionConfig:
    """diffusers UNetMotionModel config with its field names (tuples for lists), plus `attention_impl`/`dtype`.

    Per-block options (`layers_per_block`, `num_attention_heads`, `cross_attention_dim`,
    `transformer_layers_per_block`, `temporal_transformer_layers_per_block`, `motion_num_attention_heads`) are an
    int or one entry per down block; the (temporal_)transformer layer counts may also give one int per layer of a
    block, in which case the up blocks' counts come from `reverse_(temporal_)transformer_layers_per_block` (one
    entry per up block, each an int or one int per up-block layer), as diffusers requires.
    `num_attention_heads` is the number of heads of the spatial transformers (width: channels / heads);
    `motion_num_attention_heads` that of the motion modules. `image_attention` / `image_attention_scale`: the
    decoupled image cross-attention of the spatial transformers and its fixed weight lambda (module docstring); it
    needs one `cross_attention_dim` shared by every block (the image tokens are one set).
    """

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlockMotion",) * 3 + ("DownBlockMotion",)
    up_block_types: tuple[str, ...] = ("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int | tuple[int, ...] = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple[int, ...] = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: int | tuple | None = None
    temporal_transformer_layers_per_block: int | tuple = 1
    reverse_temporal_transformer_layers_per_block: int | tuple | None = None
    transformer_layers_per_mid_block: int | tuple[int, ...] | None = None
    temporal_transformer_layers_per_mid_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    num_attention_heads: int | tuple[int, ...] = 8
    motion_max_seq_length: int = 32
    motion_num_attention_heads: int | tuple[int, ...] = 8
    use_motion_mid_block: bool = True
    mid_block_layers: int = 1
    time_cond_proj_dim: int | None = None
    # ours (not in diffusers' config.json)
    image_attention: bool = False  # IP-Adapter decoupled cross-attention in every spatial transformer's attn2
    image_attention_scale: float = 1.0  # its fixed image-branch weight lambda
    attention_impl: str = "auto"
    dtype: str = "float32"
    remat_policy: str = "none"  # layers/remat.py: none | full | dots_saveable | dots_no_batch | names
    remat_save_names: tuple[str, ...] = ("attention",)

    @classmethod
    def animatediff_sd15(cls, **kw) -> UNetMotionConfig:
        """SD1.5 spatial layout (320/640/1280/1280, 8 heads, cross-attention 768, conv projections) with
        AnimateDiff v1.5-v2-style motion modules (8 heads, 32 frame positions, one block each, a mid-block module).
        """
        base = dict(sample_size=64, cross_attention_dim=768, num_attention_heads=8, motion_num_attention_heads=8,
                    motion_max_seq_length=32, use_motion_mid_block=True)
        return cls(**{**base, **kw})

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuplify(getattr(self, f.name)))
        n = len(self.down_block_types)
        check_block_layout(self, DOWN_BLOCKS, UP_BLOCKS)
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"norm_num_groups must be an int, got {self.norm_num_groups!r}")
        check_positive(self, "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                       "norm_num_groups", "cross_attention_dim", "num_attention_heads", "motion_num_attention_heads",
                       "motion_max_seq_length", "mid_block_layers", "sample_size", "time_cond_proj_dim")
        check_groups(self.norm_num_groups, self.block_out_channels)
        check_names(self)
        for name in ("transformer_layers_per_block", "temporal_transformer_layers_per_block"):
            value = getattr(self, name)
            if (isinstance(value, tuple) and any(isinstance(v, tuple) for v in value)
                    and getattr(self, f"reverse_{name}") is None):
                raise ValueError(f"{name} gives per-layer counts {value}: reverse_{name} must give the up blocks'")
        # resolve every per-block / per-layer option once, so that a malformed config fails here
        for i in range(n):
            for j in range(self.down_layers(i)):
                self.down_transformer_layers(i, j), self.down_temporal_layers(i, j)
            for j in range(self.down_layers(n - 1 - i) + 1):
                self.up_transformer_layers(i, j), self.up_temporal_layers(i, j)
        for k in range(self.mid_block_layers):
            self.mid_transformer_layers(k), self.mid_temporal_layers(k)
        for name in ("num_attention_heads", "motion_num_attention_heads"):
            for h, c in zip(self.per_block(name), self.block_out_channels):
                if c % h:
                    raise ConfigError(f"block width {c} is not divisible by its {h} heads", name)
        cross = self.per_block("cross_attention_dim")
        if not isinstance(self.image_attention, bool):
            raise ConfigError(f"must be true or false, got {self.image_attention!r}", "image_attention")
        scale = self.image_attention_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ConfigError(f"must be a finite number, got {scale!r}", "image_attention_scale")
        if self.image_attention and len(set(cross)) != 1:
            raise ConfigError(f"{list(cross)} differ per block; image_attention needs one width for its one set of "
                              "image tokens", "cross_attention_dim")

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def per_block(self, name: str) -> tuple:
        return _expand(getattr(self, name), len(self.down_block_types), name)

    def down_layers(self, i: int) -> int:
        return self.per_block("layers_per_block")[i]

    def down_transformer_layers(self, i: int, j: int) -> int:
        name = "transformer_layers_per_block"
        return _layer(self.per_block(name)[i], j, self.down_layers(i), name)

    def down_temporal_layers(self, i: int, j: int) -> int:
        name = "temporal_transformer_layers_per_block"
        return _layer(self.per_block(name)[i], j, self.down_layers(i), name)

    def _up(self, name: str, i: int, j: int) -> int:
        n = len(self.down_block_types)
        rev = getattr(self, f"reverse_{name}")
        values = self.per_block(name)[::-1] if rev is None else _expand(rev, n, f"reverse_{name}")
        return _layer(values[i], j, self.down_layers(n - 1 - i) + 1, f"reverse_{name}")

    def up_transformer_layers(self, i: int, j: int) -> int:
        """Spatial transformer layers of layer j of up block i (0 = lowest resolution)."""
        return self._up("transformer_layers_per_block", i, j)

    def up_temporal_layers(self, i: int, j: int) -> int:
        return self._up("temporal_transformer_layers_per_block", i, j)

    def mid_transformer_layers(self, k: int) -> int:
        value = self.transformer_layers_per_mid_block
        if value is None:
            last = self.per_block("transformer_layers_per_block")[-1]
            value = last if isinstance(last, int) else 1
        return _layer(value, k, self.mid_block_layers, "transformer_layers_per_mid_block")

    def mid_temporal_layers(self, k: int) -> int:
        return _layer(self.temporal_transformer_layers_per_mid_block, k, self.mid_block_layers,
                      "temporal_transformer_layers_per_mid_block")


def _resnet(cfg: UNetMotionConfig, cin: int, cout: int, name: str, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=cfg.time_embed_dim,
                         groups=cfg.norm_num_groups, eps=cfg.norm_eps, non_linearity=cfg.act_fn,
                         output_scale_factor=scale, dtype=compute_dtype(cfg.dtype), name=name)


def _transformer(cfg: UNetMotionConfig, block: int, channels: int, layers: int, name: str) -> Transformer2DModel:
    heads = cfg.per_block("num_attention_heads")[block]
    return Transformer2DModel(heads=heads, dim_head=channels // heads, num_layers=layers,
                              cross_attention_dim=cfg.per_block("cross_attention_dim")[block],
                              norm_num_groups=cfg.norm_num_groups, use_linear_projection=cfg.use_linear_projection,
                              attention_impl=cfg.attention_impl, dtype=compute_dtype(cfg.dtype),
                              entity_attention=cfg.image_attention, branch_weights="fixed",
                              fixed_image_scale=cfg.image_attention_scale, name=name)


def _motion(cfg: UNetMotionConfig, x, num_frames: int, block: int, channels: int, layers: int, name: str,
            deterministic: bool):
    """Run a motion module on (B*F, H, W, C) frames; a single frame bypasses it (joint image/video)."""
    if num_frames == 1:
        return x
    bf, h, w, c = x.shape
    module = AnimateDiffTransformer3D(
        in_channels=channels, heads=cfg.per_block("motion_num_attention_heads")[block], num_layers=layers,
        norm_num_groups=cfg.norm_num_groups, max_seq_length=cfg.motion_max_seq_length,
        attention_impl=cfg.attention_impl, dtype=compute_dtype(cfg.dtype), name=name,
    )
    return module(x.reshape(bf // num_frames, num_frames, h, w, c), deterministic).reshape(bf, h, w, c)


class DownBlockMotion(nn.Module):
    """CrossAttnDownBlockMotion (resnet, transformer, motion module per layer) or DownBlockMotion (resnet,
    motion module), then an optional downsampler. Works on (B*F, H, W, C) frames; `image_context` (B*F, N, D) goes
    to the transformers' image attention."""

    config: UNetMotionConfig
    index: int
    num_frames: int

    @nn.compact
    def __call__(self, x, temb, context, deterministic=True, *, image_context=None):
        cfg, i = self.config, self.index
        cout = cfg.block_out_channels[i]
        cin = cfg.block_out_channels[i - 1] if i else cfg.block_out_channels[0]
        outputs = []
        for j in range(cfg.down_layers(i)):
            x = _resnet(cfg, cin if j == 0 else cout, cout, f"resnets_{j}")(x, temb, deterministic)
            if cfg.down_block_types[i] == "CrossAttnDownBlockMotion":
                x = _transformer(cfg, i, cout, cfg.down_transformer_layers(i, j), f"attentions_{j}")(
                    x, context, deterministic, image_context=image_context)
            x = _motion(cfg, x, self.num_frames, i, cout, cfg.down_temporal_layers(i, j), f"motion_modules_{j}",
                        deterministic)
            outputs.append(x)
        if i < len(cfg.block_out_channels) - 1:
            x = Downsample2D(cout, padding=cfg.downsample_padding, dtype=compute_dtype(cfg.dtype),
                             name="downsamplers_0")(x)
            outputs.append(x)
        return x, outputs


class MidBlockMotion(nn.Module):
    """UNetMidBlockCrossAttnMotion: resnet, then per layer transformer, motion module, resnet (the motion module is
    absent when `use_motion_mid_block` is False: diffusers' UNetMidBlock2DCrossAttn)."""

    config: UNetMotionConfig
    num_frames: int

    @nn.compact
    def __call__(self, x, temb, context, deterministic=True, *, image_context=None):
        cfg = self.config
        n = len(cfg.block_out_channels)
        c = cfg.block_out_channels[-1]
        scale = cfg.mid_block_scale_factor
        x = _resnet(cfg, c, c, "resnets_0", scale)(x, temb, deterministic)
        for k in range(cfg.mid_block_layers):
            x = _transformer(cfg, n - 1, c, cfg.mid_transformer_layers(k), f"attentions_{k}")(
                x, context, deterministic, image_context=image_context)
            if cfg.use_motion_mid_block:
                x = _motion(cfg, x, self.num_frames, n - 1, c, cfg.mid_temporal_layers(k), f"motion_modules_{k}",
                            deterministic)
            x = _resnet(cfg, c, c, f"resnets_{k + 1}", scale)(x, temb, deterministic)
        return x


class UpBlockMotion(nn.Module):
    """CrossAttnUpBlockMotion or UpBlockMotion: layers_per_block+1 layers over [x, skip] concatenations (resnet,
    [transformer,] motion module), then an optional upsampler. `index` 0 is the lowest resolution."""

    config: UNetMotionConfig
    index: int
    num_frames: int

    @nn.compact
    def __call__(self, x, skips, temb, context, deterministic=True, upsample_size=None, *, image_context=None):
        cfg, i = self.config, self.index
        n = len(cfg.block_out_channels)
        rev = cfg.block_out_channels[::-1]
        cout, cskip_last, prev = rev[i], rev[min(i + 1, n - 1)], rev[max(i - 1, 0)]
        block = n - 1 - i  # the matching down block: per-block options are listed in down order
        layers = cfg.down_layers(block) + 1
        for j in range(layers):
            skip = skips[-(j + 1)]
            cskip = cskip_last if j == layers - 1 else cout
            if skip.shape[-1] != cskip:
                raise ValueError(f"up block {i}: skip has {skip.shape[-1]} channels, expected {cskip}")
            x = jnp.concatenate([x, skip], axis=-1)
            x = _resnet(cfg, (prev if j == 0 else cout) + cskip, cout, f"resnets_{j}")(x, temb, deterministic)
            if cfg.up_block_types[i] == "CrossAttnUpBlockMotion":
                x = _transformer(cfg, block, cout, cfg.up_transformer_layers(i, j), f"attentions_{j}")(
                    x, context, deterministic, image_context=image_context)
            x = _motion(cfg, x, self.num_frames, block, cout, cfg.up_temporal_layers(i, j), f"motion_modules_{j}",
                        deterministic)
        if i < n - 1:
            x = Upsample2D(cout, dtype=compute_dtype(cfg.dtype), name="upsamplers_0")(x, output_size=upsample_size)
        return x


def _add_residual(x, r, what: str):
    """x (B*F, h, w, c) + a per-frame residual: (B*F, h, w, c), (B, F, h, w, c), or pooled (B*F, 1, 1, c) /
    (B, F, 1, 1, c) (a ControlNet with `global_pool_conditions`), broadcast over the pixels."""
    pooled = (x.shape[0], 1, 1, x.shape[-1])
    if r.size == x.size:
        return x + r.reshape(x.shape).astype(x.dtype)
    if r.size == np.prod(pooled):
        return x + r.reshape(pooled).astype(x.dtype)
    raise ValueError(f"{what}: residual of shape {r.shape} does not fit the feature map {x.shape} "
                     "(per frame: (B*F, h, w, c) or (B, F, h, w, c), or pooled (B*F, 1, 1, c))")


def per_frame_image_tokens(cfg: UNetMotionConfig, image_hidden_states, batch: int, num_frames: int, dt):
    """The image tokens of each video repeated per frame, frame-major as the text context: (B, N, D) -> (B*F, N, D);
    None without image attention. Required with `image_attention`, refused without."""
    cross = cfg.per_block("cross_attention_dim")[0]
    if not cfg.image_attention:
        if image_hidden_states is not None:
            raise ValueError("image_hidden_states were given but the config has image_attention=False")
        return None
    if image_hidden_states is None:
        raise ValueError(f"image_attention=True needs image_hidden_states: (B, N, {cross}) image tokens, one set per "
                         "video")
    shape = image_hidden_states.shape
    if len(shape) != 3 or shape[0] != batch or shape[2] != cross:
        raise ValueError(f"image_hidden_states must be (B={batch}, N, {cross}): one set of image tokens per video, "
                         f"got shape {shape}")
    return jnp.repeat(image_hidden_states.astype(dt), num_frames, axis=0)


class UNetMotionModel(nn.Module):
    """diffusers UNetMotionModel, channels-last (module docstring)."""

    config: UNetMotionConfig

    @nn.compact
    def __call__(
        self, sample, timesteps, encoder_hidden_states, *, image_hidden_states=None, timestep_cond=None,
        down_block_additional_residuals=None, mid_block_additional_residual=None, deterministic: bool = True,
    ):
        """sample (B, F, H, W, C_in), timesteps (B,) or scalar, encoder_hidden_states (B, L, D) one per video,
        image_hidden_states (B, N, D) one set of image tokens per video (required with `image_attention`, refused
        without), timestep_cond (B, time_cond_proj_dim) when configured -> (B, F, H, W, C_out)."""
        cfg = self.config
        dt = compute_dtype(cfg.dtype)
        policy = (cfg.remat_policy, cfg.remat_save_names)
        b, f, h, w = check_video_inputs(sample, encoder_hidden_states, cfg.in_channels)
        n_up = len(cfg.block_out_channels) - 1
        emb, context = per_frame_conditioning(cfg, timesteps, encoder_hidden_states, f, timestep_cond, dt)
        image = dict(image_context=per_frame_image_tokens(cfg, image_hidden_states, b, f, dt))  # (B*F, N, D) | None

        x = sample.astype(dt).reshape(b * f, h, w, sample.shape[-1])
        x = conv(cfg.block_out_channels[0], (3, 3), padding=1, dtype=dt, name="conv_in")(x)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_height", "activation_width",
                                           "activation_embed"))
        skips = [x]
        for i in range(len(cfg.down_block_types)):
            x, outs = remat(DownBlockMotion, *policy, static_argnums=(4,))(cfg, i, f, name=f"down_blocks_{i}")(
                x, emb, context, deterministic, **image)
            skips.extend(outs)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down-block residuals, got "
                                 f"{len(down_block_additional_residuals)}")
            skips = [_add_residual(s, r, f"down_block_additional_residuals[{k}]")
                     for k, (s, r) in enumerate(zip(skips, down_block_additional_residuals))]
        mid = remat(MidBlockMotion, *policy, static_argnums=(4,))(cfg, f, name="mid_block")
        x = mid(x, emb, context, deterministic, **image)
        if mid_block_additional_residual is not None:
            x = _add_residual(x, mid_block_additional_residual, "mid_block_additional_residual")

        for i in range(len(cfg.up_block_types)):
            layers = cfg.down_layers(n_up - i) + 1
            block_skips, skips = skips[-layers:], skips[:-layers]
            size = skips[-1].shape[1:3] if (i < n_up and (h % 2**n_up or w % 2**n_up)) else None
            x = remat(UpBlockMotion, *policy, static_argnums=(5, 6))(cfg, i, f, name=f"up_blocks_{i}")(
                x, block_skips, emb, context, deterministic, size, **image)

        x = group_norm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=dt, name="conv_norm_out")(x)
        x = activation("silu")(x)  # diffusers' UNetMotionModel: nn.SiLU whatever act_fn is
        x = conv(cfg.out_channels, (3, 3), padding=1, dtype=dt, name="conv_out")(x)
        return x.reshape(b, f, h, w, cfg.out_channels).astype(sample.dtype)


# --- registry -------------------------------------------------------------------------------------------------------
def example_inputs(cfg: UNetMotionConfig) -> tuple:
    """Two frames: a single frame bypasses (and so would not create) the motion modules."""
    size = 2 ** (len(cfg.block_out_channels) - 1)
    cross = cfg.per_block("cross_attention_dim")[0]
    return (jnp.zeros((1, 2, size, size, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 2, cross)))


def example_kwargs(cfg: UNetMotionConfig) -> dict:
    kw = {}
    if cfg.time_cond_proj_dim is not None:
        kw["timestep_cond"] = jnp.zeros((1, cfg.time_cond_proj_dim))
    if cfg.image_attention:
        kw["image_hidden_states"] = jnp.zeros((1, 1, cfg.per_block("cross_attention_dim")[0]))
    return kw


SPEC = register(ModelSpec("unet_motion", UNetMotionConfig, UNetMotionModel, example_inputs, example_kwargs))


# --- from a model without image attention ---------------------------------------------------------------------------
def add_image_attention(unet_motion_params, config: UNetMotionConfig, abstract: dict | None = None) -> dict:
    """The params of a unet_motion without image attention -> those of `UNetMotionModel(config)` with
    `config.image_attention`: every spatial attn2 gains `to_k_ip`/`to_v_ip`, copies of its `to_k`/`to_v`
    (IP-Adapter's initialisation); every other parameter must already be there with its shape (all mismatches in
    one `ConversionError`). `abstract`: that model's flat parameter shapes, when the caller has them."""
    if not config.image_attention:
        raise ValueError("add_image_attention needs a config with image_attention=True")
    if abstract is None:
        abstract = SPEC.abstract_params(UNetMotionModel(config))
    return add_image_projections(unet_motion_params, abstract,
                                 "the unet_motion parameters do not match the image-attention U-Net")
