"""ControlNet (Zhang et al. 2023): diffusers `ControlNetModel`, channels-last.

    sample (B, h, w, C_in), timesteps (B,) or scalar, encoder_hidden_states (B, L, cross_attention_dim),
    controlnet_cond (B, H, W, conditioning_channels) in [0, 1], H = 2^(k-1) h for k conditioning_embedding_out_channels
      -> (down_block_res_samples: one (B, h_i, w_i, c_i) per skip of the U-Net, in its order,
          mid_block_res_sample (B, h / 2^(n-1), w / 2^(n-1), c_{n-1}))

A trainable copy of the SD U-Net's encoder (`conv_in`, `time_embedding`, `down_blocks_{i}`, `mid_block`: the
`unet2d` blocks, with the U-Net's parameter names) whose input is conv_in(sample) + E(controlnet_cond), where the
condition encoder E (`controlnet_cond_embedding`) is

    conv3x3(C_cond -> c_0), SiLU, then per step k: conv3x3(c_k -> c_k), SiLU, conv3x3 stride 2 (c_k -> c_{k+1}), SiLU,
    then conv_out: conv3x3(c_last -> block_out_channels[0])

Every skip s_k the copied encoder produces (the U-Net's: conv_in's output, each resnet[+transformer] output, each
downsampler output) and the mid-block output m pass through a 1x1 conv (`controlnet_down_blocks_{k}`,
`controlnet_mid_block`) and are scaled:

    down_k = conditioning_scale * conv1x1_k(s_k),   mid = conditioning_scale * conv1x1_mid(m)

`guess_mode` scales them instead by 10^(-1 + k / K) (K = number of skips; the mid output by 1) times
conditioning_scale; `global_pool_conditions` averages each output over its spatial positions ((B, 1, 1, c), which
broadcasts when added to the U-Net's skips). The condition encoder's `conv_out` and every 1x1 conv start at zero, so
a fresh ControlNet adds nothing to the U-Net it was copied from (`controlnet_from_unet`).

The outputs feed `unet2d` / `unet_motion` as `down_block_additional_residuals` / `mid_block_additional_residual`.
For video (MagicVideo-V2 I2V) run it on the B*F frames with the reference image repeated per frame: its outputs are
then the per-frame residuals (B*F, h, w, c) that `UNetMotionModel` takes.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from magdiff_jax.layers.common import activation, compute_dtype, conv
from magdiff_jax.layers.remat import remat
from magdiff_jax.models.registry import ConfigError, ModelSpec, check_positive, get_model, register, spec_of
from magdiff_jax.models.unet2d import DownBlock, MidBlock, UNet2DConditionModel, UNet2DConfig, time_embedding
from magdiff_jax.models.unet_motion import UNetMotionConfig
from magdiff_jax.utils.errors import ConversionError, mismatch_message
from magdiff_jax.utils.prng import init_key

CHANNEL_ORDERS = ("rgb", "bgr")
MID_BLOCKS = ("UNetMidBlock2DCrossAttn",)
# UNet2DConfig options a ControlNetModel has no equivalent for (diffusers' from_unet drops or cannot load them): an SD
# U-Net setting any of them to another value than this would not give a copy of its encoder, so it is refused.
UNET2D_ONLY = {
    "center_input_sample": False,
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "dropout": 0.0,
}
# UNet2DConfig fields a ControlNetConfig takes over unchanged (the encoder's layout, and our own options)
FROM_UNET2D = (
    "in_channels", "flip_sin_to_cos", "freq_shift", "down_block_types", "mid_block_type", "only_cross_attention",
    "block_out_channels", "downsample_padding", "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps",
    "transformer_layers_per_block", "attention_head_dim", "num_attention_heads", "use_linear_projection",
    "upcast_attention", "attention_impl", "dtype", "remat_policy", "remat_save_names",
)


def _one_value(value, name: str):
    """A per-block option that a ControlNetModel holds as one value: an int, or a tuple of equal entries."""
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ConfigError(f"per-block values {list(value)} are not supported by ControlNetModel (one value for "
                              "every block)", name)
        return value[0]
    return value


@dataclasses.dataclass(frozen=True)
class ControlNetConfig:
    """diffusers ControlNetModel config (the options SD1.x/SD2.x ControlNets use), with its field names and defaults.

    As in `UNet2DConfig`, `attention_head_dim` is the NUMBER of heads unless `num_attention_heads` is given. The
    diffusers options without a field here (class and addition embeddings, `encoder_hid_dim`, `resnet_time_scale_shift`
    other than "default") are refused by the converter.
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    upcast_attention: bool = False
    controlnet_conditioning_channel_order: str = "rgb"
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    # ours (not in diffusers' config.json)
    attention_impl: str = "auto"
    dtype: str = "float32"
    remat_policy: str = "none"  # layers/remat.py: none | full | dots_saveable | dots_no_batch | names
    remat_save_names: tuple[str, ...] = ("attention",)

    def __post_init__(self):
        for f in ("down_block_types", "block_out_channels", "conditioning_embedding_out_channels", "remat_save_names",
                  "only_cross_attention", "transformer_layers_per_block", "attention_head_dim",
                  "num_attention_heads"):
            value = getattr(self, f)
            if isinstance(value, list):
                object.__setattr__(self, f, tuple(value))
        for name in ("layers_per_block", "cross_attention_dim"):
            if isinstance(getattr(self, name), (tuple, list)):
                raise ConfigError(f"must be one integer for every block (ControlNetModel), got "
                                  f"{list(getattr(self, name))}", name)
        check_positive(self, "conditioning_channels", "conditioning_embedding_out_channels", "layers_per_block",
                       "cross_attention_dim", "norm_num_groups")
        if not self.conditioning_embedding_out_channels:
            raise ConfigError("needs at least one entry", "conditioning_embedding_out_channels")
        if self.controlnet_conditioning_channel_order not in CHANNEL_ORDERS:
            raise ConfigError(f"{self.controlnet_conditioning_channel_order!r} is not one of {list(CHANNEL_ORDERS)}",
                              "controlnet_conditioning_channel_order")
        if self.mid_block_type not in MID_BLOCKS:
            raise ConfigError(f"{self.mid_block_type!r} is not supported (only {list(MID_BLOCKS)})", "mid_block_type")
        self.to_unet2d()  # the copied encoder's own checks: block types, widths, heads, groups, per-block lengths

    def to_unet2d(self) -> UNet2DConfig:
        """The UNet2DConfig whose encoder (conv_in, time_embedding, down blocks, mid block) this ControlNet copies,
        with the same parameter paths and shapes; its up blocks mirror the down blocks."""
        up = tuple("CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
                   for t in reversed(self.down_block_types))
        return UNet2DConfig(
            sample_size=None, in_channels=self.in_channels, out_channels=self.in_channels,
            flip_sin_to_cos=self.flip_sin_to_cos, freq_shift=self.freq_shift, down_block_types=self.down_block_types,
            mid_block_type=self.mid_block_type, up_block_types=up, only_cross_attention=self.only_cross_attention,
            block_out_channels=self.block_out_channels, layers_per_block=self.layers_per_block,
            downsample_padding=self.downsample_padding, mid_block_scale_factor=self.mid_block_scale_factor,
            act_fn=self.act_fn, norm_num_groups=self.norm_num_groups, norm_eps=self.norm_eps,
            cross_attention_dim=self.cross_attention_dim,
            transformer_layers_per_block=self.transformer_layers_per_block,
            attention_head_dim=self.attention_head_dim, num_attention_heads=self.num_attention_heads,
            use_linear_projection=self.use_linear_projection, upcast_attention=self.upcast_attention,
            attention_impl=self.attention_impl, dtype=self.dtype, remat_policy=self.remat_policy,
            remat_save_names=self.remat_save_names,
        )

    @classmethod
    def from_unet2d_config(cls, unet: UNet2DConfig, **overrides) -> ControlNetConfig:
        """The config of a ControlNet copying the SD U-Net `unet`'s encoder, as diffusers'
        `ControlNetModel.from_unet(unet)` takes it (`overrides`: e.g. `conditioning_embedding_out_channels`,
        `conditioning_channels`, `controlnet_conditioning_channel_order`). A U-Net option that the copy cannot
        represent (a class embedding, a time-embedding variant, a centred input, ...) is refused, naming it."""
        for name, default in UNET2D_ONLY.items():
            if getattr(unet, name) != default:
                raise ConfigError(f"the U-Net sets {getattr(unet, name)!r}, which a ControlNetModel cannot copy "
                                  f"(only {default!r})", name)
        kw = {name: getattr(unet, name) for name in FROM_UNET2D}
        kw["layers_per_block"] = _one_value(unet.layers_per_block, "layers_per_block")
        kw["cross_attention_dim"] = _one_value(unet.cross_attention_dim, "cross_attention_dim")
        return cls(**{**kw, **overrides})

    @property
    def num_skips(self) -> int:
        """How many down-block residuals the ControlNet gives (the U-Net's skip count): conv_in's output, one per
        resnet layer, one per downsampler."""
        n = len(self.block_out_channels)
        return 1 + n * self.layers_per_block + n - 1

    @property
    def conditioning_downscale(self) -> int:
        """controlnet_cond's resolution over the latent's: 2 ** (number of stride-2 convs of the condition encoder)."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ControlNetConditioningEmbedding(nn.Module):
    """The condition encoder E: (B, H, W, C_cond) -> (B, H / 2^(k-1), W / 2^(k-1), out_channels) (module docstring);
    `conv_out` starts at zero."""

    out_channels: int
    block_out_channels: tuple[int, ...]
    dtype: jnp.dtype | None = None

    @nn.compact
    def __call__(self, cond):
        silu = activation("silu")
        ch = self.block_out_channels
        x = silu(conv(ch[0], (3, 3), padding=1, dtype=self.dtype, name="conv_in")(cond))
        for k in range(len(ch) - 1):
            x = silu(conv(ch[k], (3, 3), padding=1, dtype=self.dtype, name=f"blocks_{2 * k}")(x))
            x = silu(conv(ch[k + 1], (3, 3), strides=(2, 2), padding=1, dtype=self.dtype,
                          name=f"blocks_{2 * k + 1}")(x))
        return conv(self.out_channels, (3, 3), padding=1, dtype=self.dtype,
                    kernel_init=nn.initializers.zeros_init(), name="conv_out")(x)


def _zero_conv(channels: int, name: str, dtype) -> nn.Conv:
    return conv(channels, (1, 1), padding=0, dtype=dtype, kernel_init=nn.initializers.zeros_init(), name=name)


class ControlNetModel(nn.Module):
    """diffusers ControlNetModel, channels-last (module docstring)."""

    config: ControlNetConfig

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, *,
                 guess_mode: bool = False, deterministic: bool = True):
        """sample (B, h, w, C_in), timesteps (B,) or scalar, encoder_hidden_states (B, L, D), controlnet_cond
        (B, H, W, conditioning_channels) in [0, 1] with H, W = conditioning_downscale * (h, w), conditioning_scale a
        scalar or one per sample (B,) -> (tuple of num_skips (B, h_i, w_i, c_i), (B, h_mid, w_mid, c_mid)), in
        sample's dtype."""
        cfg = self.config
        ucfg = cfg.to_unet2d()
        dt = compute_dtype(cfg.dtype)
        policy = (cfg.remat_policy, cfg.remat_save_names)
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, h, w, {cfg.in_channels}) (video frames as B*F images), got shape "
                             f"{sample.shape}")
        b = sample.shape[0]
        want = (b, sample.shape[1] * cfg.conditioning_downscale, sample.shape[2] * cfg.conditioning_downscale,
                cfg.conditioning_channels)
        if controlnet_cond.shape != want:
            raise ValueError(f"controlnet_cond must be (B, H, W, C) = {want} for a sample of shape {sample.shape} "
                             f"(the condition encoder downsamples {cfg.conditioning_downscale}x), got shape "
                             f"{controlnet_cond.shape}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(f"encoder_hidden_states must be (B={b}, L, D), got shape {encoder_hidden_states.shape}")
        if cfg.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond[..., ::-1]
        context = encoder_hidden_states.astype(dt)
        emb = time_embedding(ucfg, timesteps, b)

        x = conv(cfg.block_out_channels[0], (3, 3), padding=1, dtype=dt, name="conv_in")(sample.astype(dt))
        x = x + ControlNetConditioningEmbedding(cfg.block_out_channels[0], cfg.conditioning_embedding_out_channels,
                                                dtype=dt, name="controlnet_cond_embedding")(controlnet_cond.astype(dt))
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_height", "activation_width",
                                           "activation_embed"))
        skips = [x]
        for i in range(len(cfg.down_block_types)):
            x, outs = remat(DownBlock, *policy, static_argnums=(4,))(ucfg, i, name=f"down_blocks_{i}")(
                x, emb, context, deterministic)
            skips.extend(outs)
        x = remat(MidBlock, *policy, static_argnums=(4,))(ucfg, name="mid_block")(x, emb, context, deterministic)

        down = [_zero_conv(s.shape[-1], f"controlnet_down_blocks_{k}", dt)(s) for k, s in enumerate(skips)]
        mid = _zero_conv(x.shape[-1], "controlnet_mid_block", dt)(x)
        scale = jnp.asarray(conditioning_scale, jnp.float32)
        if scale.ndim == 1:  # one per sample
            scale = scale.reshape(-1, 1, 1, 1)
        if guess_mode and not cfg.global_pool_conditions:
            ramp = jnp.logspace(-1.0, 0.0, len(down) + 1)
            down = [r * (ramp[k] * scale) for k, r in enumerate(down)]
            mid = mid * (ramp[-1] * scale)
        else:
            down = [r * scale for r in down]
            mid = mid * scale
        if cfg.global_pool_conditions:
            down = [jnp.mean(r, axis=(1, 2), keepdims=True) for r in down]
            mid = jnp.mean(mid, axis=(1, 2), keepdims=True)
        return tuple(r.astype(sample.dtype) for r in down), mid.astype(sample.dtype)


# --- from an SD U-Net ------------------------------------------------------------------------------------------------
def spatial_unet2d_config(config: UNetMotionConfig) -> UNet2DConfig:
    """The UNet2DConfig of the SD U-Net inside an AnimateDiff video U-Net (its spatial layers); a layout the SD
    U-Net cannot express (per-layer transformer counts, a different mid block) is refused, naming the field."""
    rename = {"CrossAttnDownBlockMotion": "CrossAttnDownBlock2D", "DownBlockMotion": "DownBlock2D",
              "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D", "UpBlockMotion": "UpBlock2D"}
    n = len(config.down_block_types)
    layers = config.per_block("transformer_layers_per_block")
    if any(isinstance(v, tuple) for v in layers):
        raise ConfigError(f"per-layer counts {list(layers)} have no UNet2DConditionModel equivalent",
                          "transformer_layers_per_block")
    for i in range(n):
        for j in range(config.down_layers(n - 1 - i) + 1):
            if config.up_transformer_layers(i, j) != layers[n - 1 - i]:
                raise ConfigError("up-block transformer layer counts that differ from the down blocks' have no "
                                  "UNet2DConditionModel equivalent", "reverse_transformer_layers_per_block")
    if config.mid_block_layers != 1 or config.mid_transformer_layers(0) != layers[-1]:
        raise ConfigError("a UNet2DConditionModel mid block has one transformer of the last block's layer count",
                          "mid_block_layers")
    return UNet2DConfig(
        sample_size=config.sample_size, in_channels=config.in_channels, out_channels=config.out_channels,
        down_block_types=tuple(rename[t] for t in config.down_block_types),
        up_block_types=tuple(rename[t] for t in config.up_block_types),
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        downsample_padding=config.downsample_padding, mid_block_scale_factor=config.mid_block_scale_factor,
        act_fn=config.act_fn, norm_num_groups=config.norm_num_groups, norm_eps=config.norm_eps,
        cross_attention_dim=config.cross_attention_dim,
        transformer_layers_per_block=config.transformer_layers_per_block,
        attention_head_dim=config.num_attention_heads, use_linear_projection=config.use_linear_projection,
        time_cond_proj_dim=config.time_cond_proj_dim, attention_impl=config.attention_impl, dtype=config.dtype,
        remat_policy=config.remat_policy, remat_save_names=config.remat_save_names,
    )


def spatial_unet2d(config: UNetMotionConfig, params) -> tuple[UNet2DConfig, dict]:
    """The SD U-Net inside an AnimateDiff video U-Net (kind `unet_motion`): its UNet2DConfig and its parameters
    (every `motion_modules_*` subtree dropped; the spatial layers keep their names). The inverse of building the
    video U-Net from an SD U-Net (`convert.unet_motion.motion_config_from_unet2d` + `models.inflate`), up to the
    output activation: `UNetMotionModel` ends with SiLU whatever `act_fn` is, the SD U-Net with `act_fn`."""
    unet = spatial_unet2d_config(config)
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(params)))
    spatial = {p: v for p, v in flat.items() if not any(part.startswith("motion_modules_") for part in p)}
    abstract = get_model("unet2d").abstract_params(UNet2DConditionModel(unet))
    _check_fit(spatial, abstract, "the spatial layers of the unet_motion parameters do not match its config")
    return unet, traverse_util.unflatten_dict(spatial)


def _check_fit(given: dict, abstract: dict, what: str) -> None:
    missing = sorted("/".join(p) for p in abstract if p not in given)
    unexpected = sorted("/".join(p) for p in given if p not in abstract)
    misshaped = sorted(f"{'/'.join(p)}: given {tuple(v.shape)}, expected {tuple(abstract[p].shape)}"
                       for p, v in given.items() if p in abstract and tuple(v.shape) != tuple(abstract[p].shape))
    if missing or unexpected or misshaped:
        raise ConversionError(mismatch_message(what + ":", missing, unexpected, misshaped))


def _copied(path: tuple[str, ...]) -> bool:
    """Whether a ControlNet parameter is a copy of the U-Net's (everything else is the ControlNet's own)."""
    return path[0] in ("conv_in", "time_embedding", "mid_block") or path[0].startswith("down_blocks_")


def controlnet_from_unet(
    unet_config: UNet2DConfig | UNetMotionConfig, unet_params, *,
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256), conditioning_channels: int = 3,
    controlnet_conditioning_channel_order: str = "rgb", key: jax.Array | None = None,
    load_weights_from_unet: bool = True,
) -> tuple[ControlNetConfig, dict]:
    """A ControlNet for the SD U-Net `unet_config` (a `unet2d`, or a `unet_motion` whose spatial layers are used:
    `spatial_unet2d`), as diffusers' `ControlNetModel.from_unet(unet, ...)` builds it: the config taken from the
    U-Net's (`ControlNetConfig.from_unet2d_config`), `conv_in`, `time_embedding`, the down blocks and the mid block
    copied from `unet_params` (with `load_weights_from_unet`; without, every layer is freshly initialised), the
    condition encoder freshly initialised from `key` (its `conv_out` zero) and every 1x1 output conv zero. Returns
    (config, params)."""
    if isinstance(unet_config, UNetMotionConfig):
        unet_config, unet_params = spatial_unet2d(unet_config, unet_params)
    config = ControlNetConfig.from_unet2d_config(
        unet_config, conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        conditioning_channels=conditioning_channels,
        controlnet_conditioning_channel_order=controlnet_conditioning_channel_order)
    module = ControlNetModel(config)
    spec = spec_of(module)
    abstract = spec.abstract_params(module)
    key = init_key(jax.random.key(0) if key is None else key)
    if not load_weights_from_unet:
        args, kwargs = spec.example_inputs(config), spec.example_kwargs(config)
        return config, nn.meta.unbox(jax.jit(module.init)(key, *args, **kwargs)["params"])

    flat_unet = traverse_util.flatten_dict(nn.meta.unbox(dict(unet_params)))
    copied = {p: v for p, v in flat_unet.items() if _copied(p)}
    _check_fit(copied, {p: a for p, a in abstract.items() if _copied(p)},
               "the U-Net parameters do not fit the ControlNet copied from its config")
    flat = {p: jnp.asarray(v, abstract[p].dtype) for p, v in copied.items()}
    # the condition encoder: fresh (initialised on its own, the only layers with random weights); the 1x1 output
    # convs and the encoder's conv_out: zero, as the model initialises them
    embed = ControlNetConditioningEmbedding(config.block_out_channels[0], config.conditioning_embedding_out_channels)
    cond = jnp.zeros((1, config.conditioning_downscale, config.conditioning_downscale, config.conditioning_channels))
    fresh = traverse_util.flatten_dict(nn.meta.unbox(jax.jit(embed.init)(key, cond)["params"]))
    flat.update({("controlnet_cond_embedding", *p): v for p, v in fresh.items()})
    flat.update({p: jnp.zeros(a.shape, a.dtype) for p, a in abstract.items() if p not in flat})
    _check_fit(flat, abstract, "the ControlNet assembled from the U-Net does not match its config")
    return config, traverse_util.unflatten_dict(flat)


# --- registry -------------------------------------------------------------------------------------------------------
def example_inputs(cfg: ControlNetConfig) -> tuple:
    """The smallest inputs an init takes: one latent as large as the down blocks need, a 2-token context and a
    condition image at conditioning_downscale times its resolution."""
    size = 2 ** (len(cfg.block_out_channels) - 1)
    big = size * cfg.conditioning_downscale
    return (jnp.zeros((1, size, size, cfg.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 2, cfg.cross_attention_dim)),
            jnp.zeros((1, big, big, cfg.conditioning_channels)))


def example_kwargs(cfg: ControlNetConfig) -> dict:
    return {}


SPEC = register(ModelSpec("controlnet", ControlNetConfig, ControlNetModel, example_inputs, example_kwargs))
