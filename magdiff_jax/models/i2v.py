"""MagicVideo-V2's image-to-video denoiser (PAPERS.md B.3): the AnimateDiff video U-Net with an appearance encoder
(IP-Adapter-Plus resampler + decoupled cross-attention) and a ControlNet on the reference image.

    sample                (B, F, h, w, 4)      noisy video latents (F == 1: an image, the motion modules bypassed)
    encoder_hidden_states (B, L, D)            text tokens, one set per video
    image_embeds          (B, T, E)            CLIP vision hidden states of the reference image (`image_layer`)
    reference             (B, kh, kw, 3)       the reference image's pixels in [0, 1] (the ControlNet's condition; k = 8
                                               for SD: `reference_factor`)

      tokens = image_proj(image_embeds)                          (B, Q, D)       the appearance tokens
      r_down, r_mid = controlnet(frames, t, text, reference)     per frame: the reference is repeated over F
      unet(sample, t, text, image_hidden_states=tokens,
           down_block_additional_residuals=scale * r_down, mid_block_additional_residual=scale * r_mid)

Parameters: `unet` (a `UNetMotionModel` with `image_attention`: every spatial attn2 has `to_k_ip`/`to_v_ip` and
the fixed image weight lambda = `unet.image_attention_scale`, MagicVideo's 1.0), `image_proj` (the Resampler) and
`controlnet` (a diffusers-layout `ControlNetModel`, absent when `use_controlnet` is False). The layer and the
resampler are MagDiff's (`layers.attention.EntityAttention`, `layers.resampler.Resampler`), configured with fixed
instead of learnable branch weights.

Starting from pretrained parts (`convert.i2v_init.build_i2v_init`, `magdiff-jax convert i2v-init`): an SD U-Net
plus an AnimateDiff motion adapter make the `unet`; an IP-Adapter-Plus file gives `image_proj` and the
`to_k_ip`/`to_v_ip` (or they start as copies of `to_k`/`to_v`, the IP-Adapter recipe); the ControlNet starts as a copy
of the U-Net's encoder with zero convs (`controlnet_from_unet`), so at that start it changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.layers.common import compute_dtype
from magdiff_jax.layers.resampler import Resampler, ResamplerConfig
from magdiff_jax.models.controlnet import ControlNetConfig, ControlNetModel, spatial_unet2d_config
from magdiff_jax.models.registry import ModelSpec, config_from_dict, register
from magdiff_jax.models.unet_motion import UNetMotionConfig, UNetMotionModel
from magdiff_jax.utils.images import CLIP_MEAN, CLIP_STD

# how a V2V stage (the I2V denoiser fine-tuned for super-resolution) reads its low-resolution clip
# (`task_options.low_res_input`; train.tasks.v2v): noised to a strength and denoised, or concatenated at every step
LOW_RES_INPUTS = ("sdedit", "concat")


def _sd15_resampler() -> ResamplerConfig:
    """IP-Adapter-Plus for SD1.5: OpenCLIP ViT-H/14 penultimate tokens (1280 wide) -> 16 tokens of 768."""
    return ResamplerConfig(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280,
                           output_dim=768, ff_mult=4)


@dataclasses.dataclass(frozen=True)
class I2VConfig:
    """The I2V denoiser. `unet.image_attention` is always on. The ControlNet is derived from the U-Net's spatial
    layout (`ControlNetConfig.from_unet2d_config`) with `conditioning_embedding_out_channels` (its condition encoder:
    one stride-2 step per entry after the first, so the reference is 2^(n-1) times the latent size: 8 for SD's
    (16, 32, 96, 256)); a given `controlnet` must fit the U-Net's skips. `use_controlnet` False drops it.
    `conditioning_scale` multiplies its residuals (diffusers' `controlnet_conditioning_scale`)."""

    unet: UNetMotionConfig = dataclasses.field(default_factory=UNetMotionConfig.animatediff_sd15)
    resampler: ResamplerConfig = dataclasses.field(default_factory=_sd15_resampler)
    use_controlnet: bool = True
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    conditioning_scale: float = 1.0
    controlnet: ControlNetConfig | None = None

    def __post_init__(self):
        unet = self.unet if isinstance(self.unet, UNetMotionConfig) else config_from_dict(UNetMotionConfig, self.unet)
        unet = dataclasses.replace(unet, image_attention=True)
        resampler = self.resampler
        if not isinstance(resampler, ResamplerConfig):
            resampler = config_from_dict(ResamplerConfig, resampler)
        cross = unet.per_block("cross_attention_dim")
        if any(c != resampler.output_dim for c in cross):
            raise ValueError(f"resampler.output_dim={resampler.output_dim} must equal the U-Net's cross_attention_dim "
                             f"{cross[0]} (the image tokens share the text's attention width)")
        channels = tuple(self.conditioning_embedding_out_channels)
        if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"conditioning_embedding_out_channels must be positive ints, got {channels}")
        controlnet = self.controlnet
        if controlnet is not None and not isinstance(controlnet, ControlNetConfig):
            controlnet = config_from_dict(ControlNetConfig, controlnet)
        if self.use_controlnet:
            derived = ControlNetConfig.from_unet2d_config(spatial_unet2d_config(unet),
                                                          conditioning_embedding_out_channels=channels)
            if controlnet is None:
                controlnet = derived
            else:
                _check_controlnet_fits(controlnet, derived)
        else:
            controlnet = None
        if not np.isfinite(self.conditioning_scale):
            raise ValueError(f"conditioning_scale must be finite, got {self.conditioning_scale}")
        object.__setattr__(self, "unet", unet)
        object.__setattr__(self, "resampler", resampler)
        object.__setattr__(self, "conditioning_embedding_out_channels", channels)
        object.__setattr__(self, "controlnet", controlnet)

    @property
    def latent_channels(self) -> int:
        return self.unet.out_channels

    @property
    def reference_factor(self) -> int:
        """The reference image's size over the latent's (the condition encoder's downsampling; 1 without one)."""
        return self.controlnet.conditioning_downscale if self.controlnet is not None else 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> I2VConfig:
        return config_from_dict(cls, d)


def _check_controlnet_fits(given: ControlNetConfig, derived: ControlNetConfig) -> None:
    """A ControlNet's residuals must have the U-Net's skip shapes: same blocks, widths, layers and input channels."""
    for name in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types",
                 "conditioning_embedding_out_channels"):
        if getattr(given, name) != getattr(derived, name):
            raise ValueError(f"controlnet.{name}={getattr(given, name)} does not fit the U-Net's "
                             f"{getattr(derived, name)}: its residuals enter the U-Net's skips")


class I2VUNet(nn.Module):
    """The I2V denoiser (module docstring): submodules `unet`, `image_proj`, `controlnet`."""

    config: I2VConfig

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, *, image_embeds, reference,
                 conditioning_scale=None, deterministic: bool = True):
        """sample (B, F, h, w, C) noisy latents, timesteps (B,) or scalar, encoder_hidden_states (B, L, D) text,
        image_embeds (B, T, E) the reference's CLIP tokens, reference (B, H, W, 3) its pixels in [0, 1] (H = 8h);
        `conditioning_scale` overrides the config's: a float, or (B,) one per example (0: no control). Returns
        (B, F, h, w, C)."""
        cfg = self.config
        dt = compute_dtype(cfg.unet.dtype)
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, F, h, w, C) noisy latents, got {sample.shape}")
        b, f, h, w, _ = sample.shape
        r = cfg.resampler
        if image_embeds.ndim != 3 or image_embeds.shape[0] != b or image_embeds.shape[-1] != r.embedding_dim:
            raise ValueError(f"image_embeds must be (B={b}, T, {r.embedding_dim}) CLIP tokens of the reference, got "
                             f"{image_embeds.shape}")
        tokens = Resampler(r, cfg.unet.attention_impl, dt, name="image_proj")(image_embeds)  # (B, Q, D)
        residuals = {}
        if cfg.controlnet is not None:
            k = cfg.controlnet.conditioning_downscale
            if reference.shape != (b, h * k, w * k, 3):
                raise ValueError(f"reference must be (B={b}, {h * k}, {w * k}, 3) pixels in [0, 1] ({k} times the "
                                 f"latent size), got {reference.shape}")
            t = jnp.broadcast_to(jnp.asarray(timesteps).reshape(-1), (b,))
            frames = sample.reshape(b * f, h, w, sample.shape[-1])
            ctx = jnp.repeat(encoder_hidden_states, f, axis=0)
            cond = jnp.repeat(reference, f, axis=0)  # the reference on every frame
            scale = cfg.conditioning_scale if conditioning_scale is None else conditioning_scale
            scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (b,))
            scale = jnp.repeat(scale, f)[:, None, None, None]  # (B*F, 1, 1, 1): one per example
            down, mid = ControlNetModel(cfg.controlnet, name="controlnet")(
                frames, jnp.repeat(t, f), ctx, cond, conditioning_scale=1.0, deterministic=deterministic)
            residuals = {"down_block_additional_residuals": tuple((r * scale).astype(r.dtype) for r in down),
                         "mid_block_additional_residual": (mid * scale).astype(mid.dtype)}
        return UNetMotionModel(cfg.unet, name="unet")(
            sample, timesteps, encoder_hidden_states, image_hidden_states=tokens, deterministic=deterministic,
            **residuals)


# --- the reference's conditioning -----------------------------------------------------------------------------------
def clip_input(frames, size: int) -> jax.Array:
    """Frames (B, H, W, 3) in [-1, 1] -> the CLIP vision input (B, size, size, 3) in CLIP's mean/std (bicubic with
    antialias where the size changes)."""
    x = (frames.astype(jnp.float32) + 1.0) / 2.0
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, 3), "bicubic", antialias=True)
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


def black_clip_input(shape) -> jax.Array:
    """A black image in CLIP's mean/std: the CLIP input of a dropped reference."""
    black = (0.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return jnp.broadcast_to(jnp.asarray(black), shape)


def reference_condition(models: dict, params: dict, reference, *, image_layer: int = -2, drop: float = 0.0,
                        key=None) -> dict:
    """The I2V denoiser's reference inputs for reference images (B, H, W, 3) in [-1, 1]: {"image_embeds": (B, T, E)
    CLIP vision hidden states of layer `image_layer` (-2: the penultimate, IP-Adapter-Plus's), "reference": (B, H, W,
    3) in [0, 1] (the ControlNet's condition), "conditioning_scale": (B,) the config's scale}. With `drop` > 0 (and
    `key`) each reference is dropped with that probability (drop=1: all): its CLIP input black, as IP-Adapter trains,
    and its ControlNet scale 0, so that guidance can leave the reference out. `models`/`params` hold "unet" and
    "image_encoder"; no gradient flows into the encoder."""
    enc = models["image_encoder"]
    b = reference.shape[0]
    clip = clip_input(reference, enc.config.image_size)
    scale = jnp.full((b,), models["unet"].config.conditioning_scale, jnp.float32)
    if drop > 0:
        dropped = (jnp.ones((b,), bool) if drop >= 1 or key is None
                   else jax.random.uniform(key, (b,)) < drop)
        clip = jnp.where(dropped[:, None, None, None], black_clip_input(clip.shape), clip)
        scale = jnp.where(dropped, 0.0, scale)
    out = enc.apply({"params": params["image_encoder"]}, clip, output_hidden_states=True)
    return {"image_embeds": jax.lax.stop_gradient(out.hidden_states[image_layer]),
            "reference": (reference.astype(jnp.float32) + 1.0) / 2.0, "conditioning_scale": scale}


# --- registry -------------------------------------------------------------------------------------------------------
def example_inputs(cfg: I2VConfig) -> tuple:
    """Two frames (so the motion modules exist), the smallest latent the U-Net takes."""
    size = 2 ** (len(cfg.unet.block_out_channels) - 1)
    cross = cfg.unet.per_block("cross_attention_dim")[0]
    return (jnp.zeros((1, 2, size, size, cfg.unet.in_channels)), jnp.zeros((1,)), jnp.zeros((1, 2, cross)))


def example_kwargs(cfg: I2VConfig) -> dict:
    size = 2 ** (len(cfg.unet.block_out_channels) - 1)
    return {"image_embeds": jnp.zeros((1, 1, cfg.resampler.embedding_dim)),
            "reference": jnp.zeros((1, cfg.reference_factor * size, cfg.reference_factor * size, 3))}


SPEC = register(ModelSpec("i2v", I2VConfig, I2VUNet, example_inputs, example_kwargs))
