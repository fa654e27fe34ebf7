"""MagDiff's video U-Net: the entity pyramid (HFA), the image-prompt resampler and decoupled entity/text
cross-attention (APA) around the ModelScope-style `unet3d`.

    sample          (B, F, h, w, 4)       noisy video latents
    entity_latents  3 x (B, F, h_i, w_i, 4)  VAE latents of each frame's subject at 384, 320 and 256 px (largest first;
                                           48, 40 and 32 px grids for 256 px video), black frames where there is none
    image_embeds    (B, F, 257, 1280)     CLIP vision hidden states of each frame's subject (by default the last
                                           layer's, before `post_layernorm`: PAPERS.md A.2)
    encoder_hidden_states (B, 77, 1024)   text tokens

      entity_pyramid(entity_latents)            -> (B, F, h, w, entity_channels)
      concat(sample, entity)                    -> (B, F, h, w, 4 + entity_channels)   the U-Net's input
      image_proj(image_embeds), frame by frame  -> (B, F * num_queries, 1024), frame-major: image_hidden_states
      unet(input, t, text, image_hidden_states) -> (B, F, h, w, 4)

Parameters: `unet` (a `UNet3DConditionModel` with `entity_attention`: every spatial transformer's `attn2` has
`to_k_ip`, `to_v_ip`, `text_scale`, `image_scale` beside `to_q`, `to_k`, `to_v`, `to_out_0`), `image_proj` (the
IP-Adapter-Plus `Resampler`) and `entity_pyramid` (absent with `pyramid="single"`, which has no weights).

Starting from a text-to-video U-Net (`magdiff_params_from_unet3d`): conv_in gains `entity_channels` input channels
set to zero, every spatial attn2's `to_k_ip`/`to_v_ip` start as copies of its `to_k`/`to_v` (IP-Adapter's init),
`text_scale` = 1.0 and `image_scale` = 1.5 (MagDiff's), and the resampler and pyramid are freshly initialised.
What that start preserves, exactly: the U-Net given all-zero image tokens equals the base U-Net on the noisy latents
(the zero conv_in channels ignore the entity latents, and bias-free `to_v_ip` makes the image branch exactly zero);
with real image tokens the image branch is live from the first step (as in IP-Adapter), so the full model does not
equal its base.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from magdiff_jax.layers.attention import EntityAttention
from magdiff_jax.layers.common import compute_dtype, conv
from magdiff_jax.layers.resampler import Resampler, ResamplerConfig
from magdiff_jax.models import unet3d
from magdiff_jax.models.inflate import add_image_projections
from magdiff_jax.models.registry import ModelSpec, check_positive, config_from_dict, register
from magdiff_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig
from magdiff_jax.models.vae import encode_video
from magdiff_jax.utils.errors import ConversionError, mismatch_message
from magdiff_jax.utils.images import CLIP_MEAN, CLIP_STD
from magdiff_jax.utils.prng import init_key

PYRAMID_MODES = ("multi", "single")
# The CLIP vision hidden state the image tokens read. PAPERS.md A.2: the paper's code takes the visual transformer's
# output before `ln_post` (all 257 tokens), i.e. `hidden_states[-1]` = `last_hidden_state`. A run's config records
# its layer (`task_options.image_layer`); a config without the key is read with the layer such configs were trained
# with before the paper's became the default (-2, the penultimate, as IP-Adapter-Plus).
IMAGE_LAYER = -1
UNRECORDED_IMAGE_LAYER = -2
# subject image sizes of the pyramid relative to the video's (384, 320, 256 px for a 256 px video)
PYRAMID_SCALES = (1.5, 1.25, 1.0)


@dataclasses.dataclass(frozen=True)
class MagDiffConfig:
    """The MagDiff U-Net. `unet.entity_attention` is always on, and `unet.in_channels` is latent_channels +
    entity_channels (a base config with latent_channels inputs, e.g. SD2.1-base inflated, is widened here; any
    other count is refused). Nested configs may be given as dicts (the JSON form, see `to_dict`/`from_dict`)."""

    unet: UNet3DConfig = dataclasses.field(default_factory=UNet3DConfig.sd21_base)
    resampler: ResamplerConfig = dataclasses.field(default_factory=ResamplerConfig)
    pyramid: str = "multi"  # "multi": the entity pyramid; "single": the smallest latent is the entity input as is
    pyramid_channels: int = 64
    entity_channels: int = 4
    latent_channels: int = 4

    def __post_init__(self):
        check_positive(self, "pyramid_channels", "entity_channels", "latent_channels")
        unet = self.unet if isinstance(self.unet, UNet3DConfig) else config_from_dict(UNet3DConfig, self.unet)
        resampler = self.resampler
        if not isinstance(resampler, ResamplerConfig):
            resampler = config_from_dict(ResamplerConfig, resampler)
        if self.pyramid not in PYRAMID_MODES:
            raise ValueError(f"pyramid must be one of {PYRAMID_MODES}, got {self.pyramid!r}")
        if self.pyramid == "single" and self.entity_channels != self.latent_channels:
            raise ValueError(f"pyramid 'single' feeds the latent itself: entity_channels must equal latent_channels="
                             f"{self.latent_channels}, got {self.entity_channels}")
        total = self.latent_channels + self.entity_channels
        if unet.in_channels not in (self.latent_channels, total):
            raise ValueError(f"unet.in_channels={unet.in_channels}: expected {total} (latent_channels + "
                             f"entity_channels) or a base U-Net's {self.latent_channels}")
        if unet.out_channels != self.latent_channels:
            raise ValueError(f"unet.out_channels={unet.out_channels} must equal latent_channels={self.latent_channels}")
        if resampler.output_dim != unet.cross_attention_dim:
            raise ValueError(f"resampler.output_dim={resampler.output_dim} must equal unet.cross_attention_dim="
                             f"{unet.cross_attention_dim} (the image tokens share the text's attention width)")
        object.__setattr__(self, "unet", dataclasses.replace(unet, in_channels=total, entity_attention=True))
        object.__setattr__(self, "resampler", resampler)

    def to_dict(self) -> dict:
        """Nested plain dicts (tuples as tuples; `json.dumps` writes them as lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> MagDiffConfig:
        """The inverse of `to_dict` (lists accepted for tuples); unknown keys are refused at every level."""
        return config_from_dict(cls, d)


class EntityPyramid(nn.Module):
    """MagDiff's High-Fidelity Alignment (the Reference Entity Pyramid): per frame, the subject's VAE latents at
    three scales fused down to the smallest grid.

        p = scale_0(z_large)                          Conv3x3 latent -> C
        p = resize(p, mid) + scale_1(z_mid)           bilinear (no antialias), Conv3x3 latent -> C
        p = fuse(p)                                   Conv3x3 C -> C
        p = resize(p, small) + scale_2(z_small)       Conv3x3 latent -> C
        e = proj_out(p)                               Conv1x1 C -> out_channels

    latents: three (B, F, h_i, w_i, c) grids, largest first -> (B, F, h_2, w_2, out_channels). mode "single" (the
    released code) returns the smallest grid itself (a tuple's last entry, or one array) and has no parameters.

    Every convolution here, `proj_out` included, has the default non-zero init: the U-Net's conv_in channels that
    read `e` start at zero instead, which already makes the start equal to the base model. Two zero-initialised
    layers in series would never train (each one's gradient is the other one's value).
    """

    mode: str = "multi"
    channels: int = 64
    out_channels: int = 4
    dtype: Any = None

    @nn.compact
    def __call__(self, latents):
        if self.mode not in PYRAMID_MODES:
            raise ValueError(f"pyramid mode must be one of {PYRAMID_MODES}, got {self.mode!r}")
        grids = (latents,) if not isinstance(latents, Sequence) else tuple(latents)
        for z in grids:
            if z.ndim != 5:
                raise ValueError(f"entity latents must be (B, F, h, w, c) grids, got shape {z.shape}")
        if self.mode == "single":
            z = grids[-1]
            if z.shape[-1] != self.out_channels:
                raise ValueError(f"pyramid 'single' passes the latent through: it must have out_channels="
                                 f"{self.out_channels} channels, got {z.shape}")
            return z
        if len(grids) != 3:
            raise ValueError(f"the entity pyramid takes three latent grids (largest first), got {len(grids)}")
        b, f = grids[0].shape[:2]
        frames = [z.reshape(b * f, *z.shape[2:]).astype(self.dtype or z.dtype) for z in grids]  # (B*F, h, w, c)
        conv3 = lambda name: conv(self.channels, (3, 3), padding=1, dtype=self.dtype, name=name)

        def resize(p, like):
            return jax.image.resize(p, (p.shape[0], *like.shape[1:3], p.shape[-1]), "bilinear", antialias=False)

        p = conv3("scale_0")(frames[0])
        p = resize(p, frames[1]) + conv3("scale_1")(frames[1])
        p = conv3("fuse")(p)
        p = resize(p, frames[2]) + conv3("scale_2")(frames[2])
        e = conv(self.out_channels, (1, 1), dtype=self.dtype, name="proj_out")(p)
        return e.reshape(b, f, *e.shape[1:])


class MagDiffUNet(nn.Module):
    """The MagDiff U-Net (module docstring): submodules `unet`, `image_proj`, `entity_pyramid`."""

    config: MagDiffConfig

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, *, entity_latents, image_embeds,
                 deterministic: bool = True):
        """sample (B, F, h, w, latent_channels) noisy latents, timesteps (B,) or scalar, encoder_hidden_states
        (B, L, D) text tokens; entity_latents: three (B, F, h_i, w_i, latent_channels) grids largest first (the
        smallest at h x w; "single" takes one grid or the last); image_embeds (B, F, T, embedding_dim) CLIP
        tokens of each frame's subject. Returns (B, F, h, w, latent_channels)."""
        cfg = self.config
        dt = compute_dtype(cfg.unet.dtype)
        if sample.ndim != 5 or sample.shape[-1] != cfg.latent_channels:
            raise ValueError(f"sample must be (B, F, h, w, {cfg.latent_channels}) noisy latents, got {sample.shape}")
        b, f, h, w, _ = sample.shape
        entity = EntityPyramid(cfg.pyramid, cfg.pyramid_channels, cfg.entity_channels, dtype=dt,
                               name="entity_pyramid")(entity_latents)
        if entity.shape[:4] != (b, f, h, w):
            raise ValueError(f"the entity input {entity.shape} does not match the noisy latents {sample.shape}: the "
                             "smallest entity latent grid must have the video's frames and latent size")
        x = jnp.concatenate([sample, entity.astype(sample.dtype)], axis=-1)  # (B, F, h, w, latent + entity)

        r = cfg.resampler
        if image_embeds.ndim != 4 or image_embeds.shape[:2] != (b, f) or image_embeds.shape[-1] != r.embedding_dim:
            raise ValueError(f"image_embeds must be (B={b}, F={f}, T, {r.embedding_dim}) CLIP tokens per frame, got "
                             f"{image_embeds.shape}")
        tokens = Resampler(r, cfg.unet.attention_impl, dt, name="image_proj")(
            image_embeds.reshape(b * f, *image_embeds.shape[2:]))  # (B*F, Q, D)
        tokens = tokens.reshape(b, f * r.num_queries, r.output_dim)  # frame-major, frame 0's tokens first
        return UNet3DConditionModel(cfg.unet, name="unet")(
            x, timesteps, encoder_hidden_states, image_hidden_states=tokens, deterministic=deterministic)


# --- the subject's conditioning -------------------------------------------------------------------------------------
def subject_keys(sizes) -> tuple[str, ...]:
    """The batch entries of the subject for pyramid `sizes` (largest first), and the CLIP one."""
    return (*(f"subject_{s}" for s in sizes), "subject_clip")


def image_layer_of(task_options) -> int:
    """The CLIP vision hidden state a MagDiff run's image tokens read: its config's `task_options.image_layer`, or
    `UNRECORDED_IMAGE_LAYER` for a config that does not record one (exports written before the key had the paper's
    default keep their behaviour)."""
    options = task_options or {}
    layer = options.get("image_layer", UNRECORDED_IMAGE_LAYER)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"task_options.image_layer must be an integer index into the CLIP vision hidden states, got "
                         f"{layer!r}")
    return int(layer)


def subject_condition(models: dict, params: dict, subject: dict, *, sizes, image_layer: int = IMAGE_LAYER,
                      key=None) -> dict:
    """The MagDiff U-Net's subject inputs from the data's `subject_<size>` (B, F, s, s, 3) pixels in [-1, 1] and
    `subject_clip` (B, F, 224, 224, 3) in CLIP's mean/std: {"entity_latents": tuple of (B, F, h_i, w_i, c) VAE
    latents (largest first; posterior draws with `key`, else means), "image_embeds": (B, F, T, E) CLIP vision hidden
    states of layer `image_layer` (-1: the last layer's output before `post_layernorm`, PAPERS.md A.2; -2 the
    penultimate)}. `models`/`params` hold "vae" and "image_encoder"; no gradient flows back into either."""
    vae = models["vae"]
    keys = jax.random.split(key, len(sizes)) if key is not None else [None] * len(sizes)
    entity = tuple(encode_video(vae, params["vae"], subject[f"subject_{s}"], k) for s, k in zip(sizes, keys))
    clip = subject["subject_clip"]
    frames = clip.reshape(clip.shape[0] * clip.shape[1], *clip.shape[2:])
    out = models["image_encoder"].apply({"params": params["image_encoder"]}, frames, output_hidden_states=True)
    embeds = out.hidden_states[image_layer]
    return {"entity_latents": jax.tree.map(jax.lax.stop_gradient, entity),
            "image_embeds": jax.lax.stop_gradient(embeds.reshape(*clip.shape[:2], *embeds.shape[1:]))}


def black_subject(subject: dict) -> dict:
    """The dropped subject of two-scale guidance and of subject dropout: every frame black, in the model's ranges
    (pixels -1, CLIP inputs (0 - mean) / std): what the data pipeline gives for a clip whose subject was dropped
    (`data.transforms`, mode "none"). Its image tokens and entity latents are those of a black image, not zeros
    (PAPERS.md A.5: the VAE latent of a black image is not zero)."""
    out = {}
    for k, v in subject.items():
        if k == "subject_clip":
            black = (0.0 - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
            out[k] = jnp.broadcast_to(jnp.asarray(black), v.shape)
        else:
            out[k] = jnp.full(v.shape, -1.0, jnp.float32)
    return out


# --- registry -------------------------------------------------------------------------------------------------------
def example_inputs(cfg: MagDiffConfig) -> tuple:
    """Small positional inputs: 2 frames (so the temporal layers exist), the smallest latent the U-Net takes."""
    size = 2 ** (len(cfg.unet.block_out_channels) - 1)
    return (jnp.zeros((1, 2, size, size, cfg.latent_channels)), jnp.zeros((1,)),
            jnp.zeros((1, 2, cfg.unet.cross_attention_dim)))


def example_kwargs(cfg: MagDiffConfig) -> dict:
    size = 2 ** (len(cfg.unet.block_out_channels) - 1)
    grids = tuple(jnp.zeros((1, 2, round(s * size), round(s * size), cfg.latent_channels)) for s in PYRAMID_SCALES)
    return {"entity_latents": grids, "image_embeds": jnp.zeros((1, 2, 1, cfg.resampler.embedding_dim))}


SPEC = register(ModelSpec("magdiff", MagDiffConfig, MagDiffUNet, example_inputs, example_kwargs))


# --- from a text-to-video U-Net --------------------------------------------------------------------------------------
def widen_conv_in(unet_params, extra: int) -> dict:
    """`conv_in/kernel` (3, 3, C, C0) -> (3, 3, C + extra, C0): the new input channels (read after the C old ones)
    start at zero, so the U-Net ignores them until they train."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(unet_params)))
    key = ("conv_in", "kernel")
    if key not in flat:
        raise ConversionError(mismatch_message("cannot widen conv_in: the U-Net parameters have none",
                                               missing=["conv_in/kernel"]))
    kernel = flat[key]
    zeros = jnp.zeros((*kernel.shape[:-2], extra, kernel.shape[-1]), kernel.dtype)
    flat[key] = jnp.concatenate([jnp.asarray(kernel), zeros], axis=-2)
    return traverse_util.unflatten_dict(flat)


def add_entity_attention(unet_params, config: UNet3DConfig, abstract: dict | None = None) -> dict:
    """A unet3d's params (no entity attention) -> the params of `UNet3DConditionModel(config)` with
    `config.entity_attention`: in every spatial attn2, `to_k_ip`/`to_v_ip` = copies of `to_k`/`to_v`,
    `text_scale` = 1.0 and `image_scale` = 1.5; every other parameter must already be there with its shape.
    `abstract`: that model's flat parameter shapes, when the caller has them (tracing a big U-Net takes seconds)."""
    if not config.entity_attention:
        raise ValueError("add_entity_attention needs a config with entity_attention=True")
    if abstract is None:
        abstract = unet3d.SPEC.abstract_params(UNet3DConditionModel(config))
    scales = {"text_scale": EntityAttention.text_scale_init, "image_scale": EntityAttention.image_scale_init}
    return add_image_projections(unet_params, abstract, "the unet3d parameters do not match the entity-attention "
                                 "U-Net", fill=scales)


def magdiff_params_from_unet3d(unet3d_params, module: MagDiffUNet, key: jax.Array) -> dict:
    """A text-to-video unet3d's params (e.g. SD2.1-base inflated) -> `module`'s params: conv_in widened with zero
    channels, entity attention added (`add_entity_attention`), resampler and pyramid freshly initialised from `key`.
    At that start the U-Net with all-zero image tokens equals the base (module docstring)."""
    cfg = module.config
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(unet3d_params)))
    kernel = flat.get(("conv_in", "kernel"))
    if kernel is not None and kernel.shape[-2] != cfg.latent_channels:
        raise ValueError(f"the base U-Net's conv_in reads {kernel.shape[-2]} channels; a text-to-video U-Net with "
                         f"latent_channels={cfg.latent_channels} inputs is expected")
    kwargs = example_kwargs(cfg)
    expected = SPEC.abstract_params(module)
    unet_abstract = {p[1:]: v for p, v in expected.items() if p[0] == "unet"}
    unet = add_entity_attention(widen_conv_in(unet3d_params, cfg.entity_channels), cfg.unet, unet_abstract)
    dt = compute_dtype(cfg.unet.dtype)
    pyramid = EntityPyramid(cfg.pyramid, cfg.pyramid_channels, cfg.entity_channels, dtype=dt)

    @jax.jit
    def fresh(k):  # one small program (initialising op by op compiles each op on its own)
        k_proj, k_pyramid = jax.random.split(init_key(k))
        image_proj = Resampler(cfg.resampler, dtype=dt).init(k_proj, kwargs["image_embeds"][0])["params"]
        return nn.meta.unbox(image_proj), nn.meta.unbox(pyramid.init(k_pyramid, kwargs["entity_latents"]))

    image_proj, pyramid_vars = fresh(key)
    params = {"unet": unet, "image_proj": image_proj}
    if pyramid_vars.get("params"):
        params["entity_pyramid"] = pyramid_vars["params"]
    got = traverse_util.flatten_dict(params)
    misshaped = sorted("/".join(p) for p, v in got.items() if p in expected and v.shape != expected[p].shape)
    if set(got) != set(expected) or misshaped:
        raise ConversionError(mismatch_message(
            "MagDiff parameters do not match the module", sorted("/".join(p) for p in expected if p not in got),
            sorted("/".join(p) for p in got if p not in expected), misshaped))
    return params
