"""The ModelScope video U-Net: diffusers `UNet3DConditionModel`, channels-last.

    sample (B, F, H, W, C_in), timesteps (B,) or scalar, encoder_hidden_states (B, L, cross_attention_dim)
      -> (B, F, H, W, C_out)

One text context per video: the model repeats it (and the time embedding) for every frame. Spatial layers (the SD
U-Net's resnets, spatial transformers, samplers) run on the (B*F, H, W, C) frames; temporal layers run on the
(B, F, H, W, C) video: `transformer_in` after conv_in, a `TemporalConvLayer` after every resnet and a
`TransformerTemporalModel` after every spatial transformer, in diffusers' order.

Config quirk kept for checkpoint compatibility: in UNet3DConditionModel `attention_head_dim` is the head WIDTH of
the U-Net's attentions (each block has channels // attention_head_dim heads, spatial and temporal alike), while
`transformer_in` has 8 heads of that width. ModelScope's `attention_head_dim=64` on 320/640/1280/1280 channels thus
gives 5/10/20/20 heads of width 64: exactly SD2.1's layout. diffusers always builds these spatial transformers with
linear `proj_in`/`proj_out` (SD2.1's projections), and refuses `num_attention_heads`.

Joint image/video: when F == 1 (known at trace time) every temporal layer is skipped, so the model computes the SD
U-Net (`models.unet2d` with `UNet3DConfig.to_unet2d()`, on the same spatial parameters). diffusers instead runs
its temporal layers on a single frame too; for F > 1 the two agree.

A fresh model's temporal layers are identities (the last temporal conv and the temporal transformers' `proj_out`
start at zero), so a `to_unet2d()`-shaped image U-Net (e.g. SD2.1-base) inflated into it (`models.inflate`) computes
that image U-Net frame by frame until training moves the temporal weights.

Entity attention (MagDiff's APA, `entity_attention=True`): every SPATIAL transformer's `attn2` becomes an
`EntityAttention` (layers/attention.py) that adds, with learnable weights, an attention over per-video image tokens
`image_hidden_states` (B, N, cross_attention_dim) to the one over the text. The tokens are repeated per frame like
the text; `image_token_mode` says which of them each frame sees:

  all            every frame attends to all N tokens (MagDiff's released code)
  own_and_first  the tokens are F groups of N // F, frame-major; frame i attends to group i and group 0 (the first
                 frame's) only, through an attention mask

The temporal transformers and `transformer_in` are unchanged.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from magdiff_jax.layers.common import activation, compute_dtype, conv, group_norm
from magdiff_jax.layers.remat import remat
from magdiff_jax.layers.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from magdiff_jax.layers.temporal import VIDEO_AXES, TemporalConvLayer, TransformerTemporalModel
from magdiff_jax.layers.transformer import Transformer2DModel
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_names, check_positive, register
from magdiff_jax.models.unet2d import UNet2DConfig, check_block_layout, check_groups
from magdiff_jax.models.video import check_video_inputs, per_frame_conditioning
from magdiff_jax.utils.magdiff_layout import IMAGE_TOKEN_MODES

DOWN_BLOCKS = ("CrossAttnDownBlock3D", "DownBlock3D")
UP_BLOCKS = ("CrossAttnUpBlock3D", "UpBlock3D")
TEMPORAL_CONV_DROPOUT = 0.1  # UNet3DConditionModel builds every TemporalConvLayer with dropout 0.1
TRANSFORMER_IN_HEADS = 8


@dataclasses.dataclass(frozen=True)
class UNet3DConfig:
    """diffusers UNet3DConditionModel config, with its field names and defaults (ModelScope text-to-video)."""

    sample_size: int | None = None
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock3D",) * 3 + ("DownBlock3D",)
    up_block_types: tuple[str, ...] = ("UpBlock3D",) + ("CrossAttnUpBlock3D",) * 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1024
    attention_head_dim: int = 64  # the head WIDTH in UNet3D (module docstring)
    num_attention_heads: int | None = None  # diffusers refuses any value here
    time_cond_proj_dim: int | None = None
    # ours (not in diffusers' config.json)
    attention_impl: str = "auto"
    dtype: str = "float32"
    remat_policy: str = "none"  # layers/remat.py: none | full | dots_saveable | dots_no_batch | names
    remat_save_names: tuple[str, ...] = ("attention",)
    entity_attention: bool = False  # decoupled text/image cross-attention in the spatial transformers
    image_token_mode: str = "all"  # which image tokens each frame attends to (module docstring)

    @classmethod
    def modelscope(cls, **kw) -> UNet3DConfig:
        """diffusers' defaults (ModelScope text-to-video): 320/640/1280/1280, heads of width 64, cross 1024."""
        return cls(**kw)

    @classmethod
    def sd21_base(cls, **kw) -> UNet3DConfig:
        """The MagDiff backbone: SD2.1-base's spatial U-Net (5/10/20/20 heads of width 64, linear projections,
        cross-attention 1024 for OpenCLIP ViT-H/14, 64x64 latents) with ModelScope's temporal layers."""
        base = dict(attention_head_dim=64, cross_attention_dim=1024, sample_size=64)
        return cls(**{**base, **kw})

    def __post_init__(self):
        check_block_layout(self, DOWN_BLOCKS, UP_BLOCKS)
        if self.num_attention_heads is not None:
            raise ValueError("UNet3DConditionModel does not accept num_attention_heads; set attention_head_dim, "
                             "which in this model is the width of every attention head")
        if not isinstance(self.attention_head_dim, int):
            raise ValueError(f"attention_head_dim must be one int for UNet3DConditionModel (its transformer_in "
                             f"uses it too), got {self.attention_head_dim!r}")
        if not isinstance(self.layers_per_block, int):
            raise ValueError(f"layers_per_block must be one int, got {self.layers_per_block!r}")
        if not isinstance(self.norm_num_groups, int):
            raise ValueError(f"norm_num_groups must be an int (every resnet and temporal layer normalises), got "
                             f"{self.norm_num_groups!r}")
        check_positive(self, "in_channels", "out_channels", "block_out_channels", "layers_per_block",
                       "norm_num_groups", "cross_attention_dim", "attention_head_dim", "sample_size",
                       "time_cond_proj_dim")
        for c in self.block_out_channels:
            if c % self.attention_head_dim:
                raise ConfigError(f"block width {c} is not divisible by attention_head_dim={self.attention_head_dim}",
                                  "attention_head_dim")
        check_groups(self.norm_num_groups, self.block_out_channels)
        check_names(self)
        if self.image_token_mode not in IMAGE_TOKEN_MODES:
            raise ValueError(f"image_token_mode must be one of {IMAGE_TOKEN_MODES}, got {self.image_token_mode!r}")

    @property
    def heads_per_block(self) -> tuple[int, ...]:
        """Attention heads of each block's spatial and temporal transformers (channels // attention_head_dim)."""
        return tuple(c // self.attention_head_dim for c in self.block_out_channels)

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    def to_unet2d(self) -> UNet2DConfig:
        """The `UNet2DConditionModel` config of this model's spatial layers (same parameter paths and shapes).

        With act_fn "silu" (the default; UNet3D's output activation is SiLU whatever act_fn is), the video model on
        single frames computes exactly this image model. Entity attention is not part of it: with
        `entity_attention` the video model has the extra `attn2` parameters of `EntityAttention`."""
        rename = {"CrossAttnDownBlock3D": "CrossAttnDownBlock2D", "DownBlock3D": "DownBlock2D",
                  "CrossAttnUpBlock3D": "CrossAttnUpBlock2D", "UpBlock3D": "UpBlock2D"}
        return UNet2DConfig(
            sample_size=self.sample_size, in_channels=self.in_channels, out_channels=self.out_channels,
            down_block_types=tuple(rename[t] for t in self.down_block_types),
            up_block_types=tuple(rename[t] for t in self.up_block_types),
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            downsample_padding=self.downsample_padding, mid_block_scale_factor=self.mid_block_scale_factor,
            act_fn=self.act_fn, norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
            cross_attention_dim=self.cross_attention_dim, attention_head_dim=self.heads_per_block,
            use_linear_projection=True, time_cond_proj_dim=self.time_cond_proj_dim,
            attention_impl=self.attention_impl, dtype=self.dtype,
        )

    @classmethod
    def from_unet2d(cls, cfg2d: UNet2DConfig, **kw) -> UNet3DConfig:
        """The video U-Net whose spatial layers are `cfg2d`'s (the inverse of `to_unet2d`, for `inflate`): SD2.x's
        U-Net (heads 5/10/20/20 of width 64, linear projections) gives `sd21_base`'s layout. A 2D option the video
        model cannot express (conv projections, heads of different widths per block, class embeddings, ...) is
        refused with its name, never dropped."""
        rename = {"CrossAttnDownBlock2D": "CrossAttnDownBlock3D", "DownBlock2D": "DownBlock3D",
                  "CrossAttnUpBlock2D": "CrossAttnUpBlock3D", "UpBlock2D": "UpBlock3D"}
        unknown = [t for t in (*cfg2d.down_block_types, *cfg2d.up_block_types) if t not in rename]
        if unknown:
            raise ValueError(f"UNet2D block types {unknown} have no UNet3D counterpart (supported: {sorted(rename)})")
        widths = sorted({c // h for c, h in zip(cfg2d.block_out_channels, cfg2d.heads_per_block)})
        if len(widths) != 1:
            raise ValueError(f"UNet2D heads {cfg2d.heads_per_block} over channels {cfg2d.block_out_channels} have "
                             f"widths {widths}; UNet3D needs one head width for every block")

        def one(name):
            values = set(cfg2d.per_block(name))
            if len(values) != 1:
                raise ValueError(f"UNet2D {name}={getattr(cfg2d, name)!r}: UNet3D needs one value for every block")
            return values.pop()

        video = cls(**{
            "sample_size": cfg2d.sample_size, "in_channels": cfg2d.in_channels, "out_channels": cfg2d.out_channels,
            "down_block_types": tuple(rename[t] for t in cfg2d.down_block_types),
            "up_block_types": tuple(rename[t] for t in cfg2d.up_block_types),
            "block_out_channels": tuple(cfg2d.block_out_channels), "layers_per_block": one("layers_per_block"),
            "downsample_padding": cfg2d.downsample_padding, "mid_block_scale_factor": cfg2d.mid_block_scale_factor,
            "act_fn": cfg2d.act_fn, "norm_num_groups": cfg2d.norm_num_groups, "norm_eps": cfg2d.norm_eps,
            "cross_attention_dim": one("cross_attention_dim"), "attention_head_dim": widths[0],
            "time_cond_proj_dim": cfg2d.time_cond_proj_dim, "attention_impl": cfg2d.attention_impl,
            "dtype": cfg2d.dtype, **kw})
        back = video.to_unet2d()
        per_block = ("layers_per_block", "cross_attention_dim", "transformer_layers_per_block",
                     "only_cross_attention")
        same = {"attention_head_dim", "num_attention_heads", "remat_policy", "remat_save_names", "upcast_attention",
                *per_block, *kw}  # heads compared as heads_per_block; upcasting changes fp16 rounding only
        differ = [f"{f.name}={getattr(cfg2d, f.name)!r} (UNet3D: {getattr(back, f.name)!r})"
                  for f in dataclasses.fields(cfg2d)
                  if f.name not in same and getattr(cfg2d, f.name) != getattr(back, f.name)]
        differ += [f"{name}={getattr(cfg2d, name)!r} (UNet3D: {getattr(back, name)!r})" for name in per_block
                   if cfg2d.per_block(name) != back.per_block(name)]
        if differ:
            raise ValueError("the UNet2D config has options UNet3D cannot express: " + "; ".join(differ))
        return video


# --- helpers: spatial layers see frames, temporal layers see videos ------------------------------------------------
def _frames(x):
    """(B, F, H, W, C) -> (B*F, H, W, C)."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _video(x, b: int):
    """(B*F, H, W, C) -> (B, F, H, W, C)."""
    return x.reshape(b, x.shape[0] // b, *x.shape[1:])


def _resnet(cfg: UNet3DConfig, cin: int, cout: int, name: str, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=cin, out_channels=cout, temb_channels=cfg.time_embed_dim, groups=cfg.norm_num_groups,
        eps=cfg.norm_eps, non_linearity=cfg.act_fn, output_scale_factor=scale, dtype=compute_dtype(cfg.dtype),
        name=name,
    )


def _transformer(cfg: UNet3DConfig, block: int, channels: int, name: str) -> Transformer2DModel:
    return Transformer2DModel(
        heads=cfg.heads_per_block[block], dim_head=cfg.attention_head_dim, num_layers=1,
        cross_attention_dim=cfg.cross_attention_dim, norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=True, attention_impl=cfg.attention_impl, dtype=compute_dtype(cfg.dtype),
        entity_attention=cfg.entity_attention, name=name,
    )


def _temp_conv(cfg: UNet3DConfig, channels: int, name: str) -> TemporalConvLayer:
    return TemporalConvLayer(channels, channels, dropout=TEMPORAL_CONV_DROPOUT, norm_num_groups=cfg.norm_num_groups,
                             dtype=compute_dtype(cfg.dtype), name=name)


def _temp_attention(cfg: UNet3DConfig, block: int, name: str) -> TransformerTemporalModel:
    return TransformerTemporalModel(
        heads=cfg.heads_per_block[block], dim_head=cfg.attention_head_dim, num_layers=1,
        norm_num_groups=cfg.norm_num_groups, attention_impl=cfg.attention_impl, dtype=compute_dtype(cfg.dtype),
        name=name,
    )


def per_frame_image_context(cfg: UNet3DConfig, image_hidden_states, batch: int, num_frames: int, dt):
    """The image tokens of each video repeated per frame, (B*F, N, D), and the attention mask of `image_token_mode`
    ((B*F, 1, 1, N) booleans for "own_and_first", None for "all"); (None, None) without entity attention."""
    if not cfg.entity_attention:
        if image_hidden_states is not None:
            raise ValueError("image_hidden_states were given but the config has entity_attention=False")
        return None, None
    if image_hidden_states is None:
        raise ValueError("entity_attention=True needs image_hidden_states: (B, N, cross_attention_dim) image tokens")
    shape = image_hidden_states.shape
    if len(shape) != 3 or shape[0] != batch or shape[2] != cfg.cross_attention_dim:
        raise ValueError(f"image_hidden_states must be (B={batch}, N, {cfg.cross_attention_dim}): one set of image "
                         f"tokens per video, got shape {shape}")
    context = jnp.repeat(image_hidden_states.astype(dt), num_frames, axis=0)  # frame-major, as the text context
    if cfg.image_token_mode == "all":
        return context, None
    n = shape[1]
    if n % num_frames:
        raise ValueError(f"image_token_mode 'own_and_first' needs the N={n} image tokens to be F={num_frames} equal "
                         "frame-major groups")
    token_frame = jnp.arange(n) // (n // num_frames)  # (N,): the frame each token belongs to
    frame = jnp.arange(num_frames)[:, None]
    keep = (token_frame[None] == frame) | (token_frame[None] == 0)  # (F, N)
    return context, jnp.tile(keep, (batch, 1))[:, None, None, :]


class _Layers:
    """Runs one block's layers on a video x (B, F, H, W, C); temporal layers only when F > 1."""

    def __init__(self, cfg: UNet3DConfig, temb, context, deterministic: bool, image_context=None, image_mask=None):
        self.cfg, self.temb, self.context, self.deterministic = cfg, temb, context, deterministic
        self.image_context, self.image_mask = image_context, image_mask

    def resnet(self, x, cin, cout, name, scale=1.0):
        return _video(_resnet(self.cfg, cin, cout, name, scale)(_frames(x), self.temb, self.deterministic),
                      x.shape[0])

    def temp_conv(self, x, channels, name):
        if x.shape[1] == 1:
            return x
        return _temp_conv(self.cfg, channels, name)(x, self.deterministic)

    def transformer(self, x, block, channels, name):
        y = _transformer(self.cfg, block, channels, name)(
            _frames(x), self.context, self.deterministic, image_context=self.image_context, image_mask=self.image_mask)
        return _video(y, x.shape[0])

    def temp_attention(self, x, block, name):
        if x.shape[1] == 1:
            return x
        return _temp_attention(self.cfg, block, name)(x, self.deterministic)


class DownBlock3D(nn.Module):
    """CrossAttnDownBlock3D (resnet, temp_conv, transformer, temp_attention per layer) or DownBlock3D (resnet,
    temp_conv per layer), then a downsampler except in the last block. Returns (x, per-layer outputs)."""

    config: UNet3DConfig
    index: int

    @nn.compact
    def __call__(self, x, temb, context, deterministic=True, *, image_context=None, image_mask=None):
        cfg, i = self.config, self.index
        run = _Layers(cfg, temb, context, deterministic, image_context, image_mask)
        cout = cfg.block_out_channels[i]
        cin = cfg.block_out_channels[i - 1] if i else cfg.block_out_channels[0]
        cross = cfg.down_block_types[i] == "CrossAttnDownBlock3D"
        outputs = []
        for j in range(cfg.layers_per_block):
            x = run.resnet(x, cin if j == 0 else cout, cout, f"resnets_{j}")
            x = run.temp_conv(x, cout, f"temp_convs_{j}")
            if cross:
                x = run.transformer(x, i, cout, f"attentions_{j}")
                x = run.temp_attention(x, i, f"temp_attentions_{j}")
            outputs.append(x)
        if i < len(cfg.block_out_channels) - 1:
            down = Downsample2D(cout, padding=cfg.downsample_padding, dtype=compute_dtype(cfg.dtype),
                                name="downsamplers_0")
            x = _video(down(_frames(x)), x.shape[0])
            outputs.append(x)
        return x, outputs


class MidBlock3D(nn.Module):
    """UNetMidBlock3DCrossAttn: resnet, temp_conv, transformer, temp_attention, resnet, temp_conv (resnet outputs
    divided by mid_block_scale_factor)."""

    config: UNet3DConfig

    @nn.compact
    def __call__(self, x, temb, context, deterministic=True, *, image_context=None, image_mask=None):
        cfg = self.config
        run = _Layers(cfg, temb, context, deterministic, image_context, image_mask)
        c, last = cfg.block_out_channels[-1], len(cfg.block_out_channels) - 1
        x = run.resnet(x, c, c, "resnets_0", cfg.mid_block_scale_factor)
        x = run.temp_conv(x, c, "temp_convs_0")
        x = run.transformer(x, last, c, "attentions_0")
        x = run.temp_attention(x, last, "temp_attentions_0")
        x = run.resnet(x, c, c, "resnets_1", cfg.mid_block_scale_factor)
        return run.temp_conv(x, c, "temp_convs_1")


class UpBlock3D(nn.Module):
    """CrossAttnUpBlock3D or UpBlock3D: layers_per_block+1 x (concat skip, resnet, temp_conv[, transformer,
    temp_attention]), then an upsampler except in the last block."""

    config: UNet3DConfig
    index: int  # position among the up blocks (0 = lowest resolution)

    @nn.compact
    def __call__(self, x, skips, temb, context, deterministic=True, upsample_size=None, *, image_context=None,
                 image_mask=None):
        cfg, i = self.config, self.index
        run = _Layers(cfg, temb, context, deterministic, image_context, image_mask)
        n = len(cfg.block_out_channels)
        rev = cfg.block_out_channels[::-1]
        cout, cskip_last, prev = rev[i], rev[min(i + 1, n - 1)], rev[max(i - 1, 0)]
        block = n - 1 - i
        cross = cfg.up_block_types[i] == "CrossAttnUpBlock3D"
        layers = cfg.layers_per_block + 1
        for j in range(layers):
            skip = skips[-(j + 1)]
            cskip = cskip_last if j == layers - 1 else cout
            if skip.shape[-1] != cskip:
                raise ValueError(f"up block {i}: skip has {skip.shape[-1]} channels, expected {cskip}")
            x = jnp.concatenate([x, skip], axis=-1)
            x = run.resnet(x, (prev if j == 0 else cout) + cskip, cout, f"resnets_{j}")
            x = run.temp_conv(x, cout, f"temp_convs_{j}")
            if cross:
                x = run.transformer(x, block, cout, f"attentions_{j}")
                x = run.temp_attention(x, block, f"temp_attentions_{j}")
        if i < n - 1:
            up = Upsample2D(cout, dtype=compute_dtype(cfg.dtype), name="upsamplers_0")
            x = _video(up(_frames(x), output_size=upsample_size), x.shape[0])
        return x


class UNet3DConditionModel(nn.Module):
    """diffusers UNet3DConditionModel, channels-last video (module docstring). Tolerance against PyTorch: fp32
    max|diff| / max|ref| <= 1e-4 (tests/test_unet3d.py)."""

    config: UNet3DConfig

    @nn.compact
    def __call__(
        self, sample, timesteps, encoder_hidden_states, *, image_hidden_states=None, timestep_cond=None,
        down_block_additional_residuals=None, mid_block_additional_residual=None, deterministic: bool = True,
    ):
        """sample (B, F, H, W, in_channels), timesteps (B,) or scalar, encoder_hidden_states (B, L, D): one text
        context per video; image_hidden_states (B, N, D): one set of image tokens per video, frame-major, required
        with `entity_attention` and refused without; timestep_cond (B, time_cond_proj_dim) when the config has a
        cond projection; the optional ControlNet-style residuals are videos (B, F, h, w, c) matching the skip
        connections / mid output. Returns (B, F, H, W, out_channels)."""
        cfg = self.config
        dt = compute_dtype(cfg.dtype)
        policy = (cfg.remat_policy, cfg.remat_save_names)  # gradient checkpointing of each block
        b, f, h, w = check_video_inputs(sample, encoder_hidden_states, cfg.in_channels)
        n_up = len(cfg.block_out_channels) - 1
        # time: one embedding per video, repeated per frame (as the text context): (B*F, T), (B*F, L, D)
        emb, context = per_frame_conditioning(cfg, timesteps, encoder_hidden_states, f, timestep_cond, dt)
        # image tokens for the spatial transformers' attn2 (entity attention): (B*F, N, D) and a mask or None
        image_context, image_mask = per_frame_image_context(cfg, image_hidden_states, b, f, dt)
        image = dict(image_context=image_context, image_mask=image_mask)

        x = conv(cfg.block_out_channels[0], (3, 3), padding=1, dtype=dt, name="conv_in")(_frames(sample.astype(dt)))
        x = nn.with_logical_constraint(_video(x, b), VIDEO_AXES)
        if f > 1:
            x = TransformerTemporalModel(
                heads=TRANSFORMER_IN_HEADS, dim_head=cfg.attention_head_dim, num_layers=1,
                norm_num_groups=cfg.norm_num_groups, attention_impl=cfg.attention_impl, dtype=dt,
                name="transformer_in",
            )(x, deterministic)

        skips = [x]
        for i in range(len(cfg.down_block_types)):
            x, outs = remat(DownBlock3D, *policy, static_argnums=(4,))(cfg, i, name=f"down_blocks_{i}")(
                x, emb, context, deterministic, **image)
            skips.extend(outs)
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(f"expected {len(skips)} down-block residuals, got "
                                 f"{len(down_block_additional_residuals)}")
            skips = [s + r.astype(s.dtype) for s, r in zip(skips, down_block_additional_residuals)]
        x = remat(MidBlock3D, *policy, static_argnums=(4,))(cfg, name="mid_block")(
            x, emb, context, deterministic, **image)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual.astype(x.dtype)

        for i in range(len(cfg.up_block_types)):
            layers = cfg.layers_per_block + 1
            block_skips, skips = skips[-layers:], skips[:-layers]
            size = skips[-1].shape[2:4] if (i < n_up and (h % 2**n_up or w % 2**n_up)) else None
            x = remat(UpBlock3D, *policy, static_argnums=(5, 6))(cfg, i, name=f"up_blocks_{i}")(
                x, block_skips, emb, context, deterministic, size, **image)

        x = group_norm(cfg.norm_num_groups, epsilon=cfg.norm_eps, dtype=dt, name="conv_norm_out")(_frames(x))
        x = activation("silu")(x)  # diffusers' UNet3D uses SiLU here whatever act_fn is
        x = conv(cfg.out_channels, (3, 3), padding=1, dtype=dt, name="conv_out")(x)
        return _video(x, b).astype(sample.dtype)


# --- registry -------------------------------------------------------------------------------------------------------
def example_inputs(cfg: UNet3DConfig) -> tuple:
    """Two frames (a single frame bypasses the temporal layers, which an init would then not create)."""
    size = 2 ** (len(cfg.block_out_channels) - 1)
    return (jnp.zeros((1, 2, size, size, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 2, cfg.cross_attention_dim)))


def example_kwargs(cfg: UNet3DConfig) -> dict:
    kw = {}
    if cfg.time_cond_proj_dim is not None:
        kw["timestep_cond"] = jnp.zeros((1, cfg.time_cond_proj_dim))
    if cfg.entity_attention:  # one image token per frame of example_inputs' two
        kw["image_hidden_states"] = jnp.zeros((1, 2, cfg.cross_attention_dim))
    return kw


SPEC = register(ModelSpec("unet3d", UNet3DConfig, UNet3DConditionModel, example_inputs, example_kwargs))
