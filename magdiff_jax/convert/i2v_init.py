"""The MagicVideo-V2 image-to-video `init_from` folder from pretrained parts: what `configs/i2v.py:base` starts from.

    magdiff-jax convert i2v-init --pipeline stable-diffusion-v1-5 --motion-adapter animatediff-motion-adapter \\
        --ip-adapter ip-adapter-plus_sd15.safetensors --image-encoder IP-Adapter/models/image_encoder \\
        --out out/i2v_init

    DST/
      unet/        kind i2v (`models.i2v.I2VUNet`):
                     unet        the SD U-Net + the AnimateDiff motion adapter (`load_motion_adapter`: diffusers'
                                 `UNetMotionModel.from_unet2d`), with image attention: every spatial attn2's
                                 to_k_ip/to_v_ip from --ip-adapter (by IP-Adapter index), else copies of its to_k/to_v
                     image_proj  the IP-Adapter-Plus resampler (the file's `image_proj.*`), else fresh: --resampler
                                 over IP-Adapter-Plus SD1.5's config, embedding_dim = the image encoder's hidden_size,
                                 output_dim = the U-Net's cross-attention width
                     controlnet  --controlnet (a diffusers ControlNetModel or Flax controlnet folder that fits the
                                 U-Net), else `controlnet_from_unet` of the SD U-Net: its encoder copied, the
                                 condition encoder fresh (`--conditioning-embedding-out-channels`, SD's (16, 32, 96,
                                 256) by default: the reference at 8x the latent size), every 1x1 output conv zero
      vae/ text_encoder/ image_encoder/     Flax folders (`magdiff-jax convert to-flax`), converted or copied; the
                                            image encoder a CLIPVisionModel(WithProjection)
      tokenizer/ (scheduler/)               copied from --tokenizer or the pipeline (its scheduler when it has one)
      i2v_init.json                         the sources, the seed, which parameters started fresh, the I2V config

At this start the ControlNet adds nothing, so the denoiser equals diffusers' AnimateDiff `UNetMotionModel` with the
IP-Adapter loaded (`load_ip_adapter`, scale 1: `unet.image_attention_scale`).

Sources as for `magdiff-init` (`convert.magdiff_init`): PyTorch folders (diffusers/transformers: config.json +
safetensors) or Flax folders; `--pipeline` names a pipeline folder whose `unet`, `vae`, `text_encoder` and
`tokenizer` are used unless given one by one. The U-Net must be a diffusers UNet2DConditionModel folder (the adapter
is applied to it as diffusers does). The motion adapter is a MotionAdapter folder or one .safetensors/.ckpt file in
diffusers' or the original AnimateDiff layout; the IP-Adapter-Plus file a .safetensors or the original nested .bin.
Checked before any weight is converted: every folder's kind and config, the tokenizer's vocabulary, the adapter
against the U-Net (blocks, widths, layers, norm groups), the text encoder's width against the cross-attention, the
IP-Adapter's resampler (its input width against the image encoder's, its output against the cross-attention) and its
attention layers (index by index, shape by shape) against the U-Net, a given ControlNet's layout against the U-Net's
skips, and the ControlNet's condition downscale against the VAE's. Each error names the file and the key or field.
DST is written whole or not at all (`utils.files.atomic_dir`); sources and DST may be local or in an object store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from flax import traverse_util

from magdiff_jax.convert.core import ConversionError, load_torch, read_config
from magdiff_jax.convert.magdiff_init import _load, _model_config, source_kind
from magdiff_jax.export.model import save_model
from magdiff_jax.utils.errors import mismatch_message
from magdiff_jax.utils.files import as_path, atomic_dir, check_destination, copy_tree, user_path

INIT_META = "i2v_init.json"
COMPONENTS = ("unet", "vae", "text_encoder", "image_encoder", "tokenizer")
FROM_PIPELINE = ("unet", "vae", "text_encoder", "tokenizer")
ACCEPTED = {"unet": ("unet2d",), "vae": ("vae",), "text_encoder": ("clip_text",), "image_encoder": ("clip_vision",),
            "controlnet": ("controlnet",)}
SD_CONDITIONING = (16, 32, 96, 256)  # ControlNetModel's condition encoder for SD: 8x, the SD VAE's factor
# ControlNet config fields its residuals or its inputs tie to the U-Net: (field, why)
CONTROLNET_FIT = (
    ("in_channels", "it reads the U-Net's latents"),
    ("block_out_channels", "its residuals enter the U-Net's skips"),
    ("layers_per_block", "its residuals enter the U-Net's skips"),
    ("down_block_types", "its residuals enter the U-Net's skips"),
    ("cross_attention_dim", "it reads the U-Net's text tokens"),
    ("conditioning_channels", "its condition is the RGB reference image"),
)


def _kind(folder: epath.Path) -> tuple[str, str]:
    """(kind, "flax" | "torch") of a model folder from its config.json: `source_kind`, and diffusers'
    ControlNetModel."""
    if read_config(folder).get("_class_name") == "ControlNetModel":
        return "controlnet", "torch"
    return source_kind(folder)


def _resolve(pipeline, **given) -> dict[str, epath.Path]:
    """Each component's folder: given one by one, else the pipeline's subfolder (unet, vae, text_encoder,
    tokenizer)."""
    out = {}
    for name in (*COMPONENTS, "controlnet"):
        if given.get(name):
            out[name] = as_path(given[name])
        elif pipeline is not None and name in FROM_PIPELINE:
            out[name] = as_path(pipeline) / name
    missing = [n for n in COMPONENTS if n not in out]
    if missing:
        raise ValueError(f"i2v-init: no source for {missing} (pass --{missing[0].replace('_', '-')} or a --pipeline "
                         "folder that has it)")
    return out


def _check_controlnet(given, derived, source: epath.Path) -> None:
    """A given ControlNet config against the one copied from the U-Net (`CONTROLNET_FIT`), every misfit named."""
    bad = [f"{name}={getattr(given, name)!r} where the U-Net needs {getattr(derived, name)!r} ({why})"
           for name, why in CONTROLNET_FIT if getattr(given, name) != getattr(derived, name)]
    if bad:
        raise ConversionError(f"i2v-init: the ControlNet {source} does not fit the U-Net:\n  " + "\n  ".join(bad))


def _check_params(params: Mapping, abstract: Mapping, what: str) -> None:
    flat = traverse_util.flatten_dict(params)
    missing = sorted("/".join(p) for p in abstract if p not in flat)
    unexpected = sorted("/".join(p) for p in flat if p not in abstract)
    misshaped = sorted(f"{'/'.join(p)}: {tuple(np.shape(v))}, expected {tuple(abstract[p].shape)}"
                       for p, v in flat.items() if p in abstract and tuple(np.shape(v)) != tuple(abstract[p].shape))
    if missing or unexpected or misshaped:
        raise ConversionError(mismatch_message(what, missing, unexpected, misshaped))


def build_i2v_init(dst: str | os.PathLike, *, pipeline: str | os.PathLike | None = None, unet=None, vae=None,
                   text_encoder=None, tokenizer=None, motion_adapter: str | os.PathLike,
                   ip_adapter: str | os.PathLike | None = None, image_encoder: str | os.PathLike, controlnet=None,
                   resampler_config: Mapping | None = None,
                   conditioning_embedding_out_channels: Sequence[int] | None = None, seed: int = 0,
                   overwrite: bool = False) -> epath.Path:
    """Write the I2V init folder described in the module docstring; returns DST.

    `resampler_config`: without `ip_adapter`, ResamplerConfig fields over IP-Adapter-Plus SD1.5's (dim 768, depth 4,
    12 heads of 64, 16 queries, ff x4); with one, only `dim_head` (the head width the weights do not show, 64 as
    diffusers assumes), the rest being read from the file. `conditioning_embedding_out_channels`: the fresh
    ControlNet's condition encoder (default SD's (16, 32, 96, 256)); with `controlnet`, it must be that one's.
    `seed` draws the fresh resampler and condition encoder."""
    from magdiff_jax.convert.ip_adapter import apply_ip_adapter, read_ip_adapter
    from magdiff_jax.convert.unet_motion import load_motion_adapter, motion_config_from_unet2d, read_motion_adapter
    from magdiff_jax.layers.resampler import Resampler, ResamplerConfig
    from magdiff_jax.models.controlnet import ControlNetConfig, controlnet_from_unet, spatial_unet2d_config
    from magdiff_jax.models.i2v import SPEC, I2VConfig, I2VUNet, _sd15_resampler
    from magdiff_jax.models.tokenizer import resolve_tokenizer_folder
    from magdiff_jax.models.unet_motion import add_image_attention
    from magdiff_jax.utils.prng import init_key

    dst = as_path(dst)
    check_destination(dst, overwrite)
    folders = _resolve(pipeline, unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                       image_encoder=image_encoder, controlnet=controlnet)
    kinds, configs = {}, {}
    for name, folder in folders.items():  # every folder's kind and config first: no weight is read before
        if not folder.is_dir():
            raise FileNotFoundError(f"i2v-init: the {name} source {folder} is not a folder")
        if name == "tokenizer":
            folders[name] = as_path(resolve_tokenizer_folder(folder))  # names the missing vocabulary files
            continue
        kind, form = _kind(folder)
        if kind not in ACCEPTED[name]:
            raise ConversionError(f"i2v-init: {name} source {folder} holds a {kind!r} model; expected "
                                  f"{' or '.join(ACCEPTED[name])}")
        kinds[name], configs[name] = (kind, form), _model_config(folder, kind, form)
    if kinds["unet"][1] != "torch":
        raise ConversionError(f"i2v-init: the unet source {folders['unet']} is a Flax folder; the motion adapter is "
                              "applied to a diffusers UNet2DConditionModel folder (`magdiff-jax convert to-torch "
                              "--kind unet2d` writes one)")

    # the motion adapter against the SD U-Net (the weights are read here; the U-Net's later)
    adapter = read_motion_adapter(motion_adapter)
    try:
        motion_cfg = motion_config_from_unet2d(
            configs["unet"], {"motion_norm_num_groups": configs["unet"].norm_num_groups, **adapter.config},
            adapter.source)
    except ValueError as e:
        raise ConversionError(f"i2v-init: the motion adapter does not fit the SD U-Net {folders['unet']}: {e}") from e
    cross = motion_cfg.per_block("cross_attention_dim")[0]
    width = configs["text_encoder"].hidden_size
    if width != cross:
        raise ConversionError(f"i2v-init: the text encoder {folders['text_encoder']} is {width} wide (hidden_size) "
                              f"but the U-Net's cross-attention reads {cross}")
    embed = configs["image_encoder"].hidden_size

    # the appearance encoder: the IP-Adapter file's resampler, or a fresh one
    given = dict(resampler_config or {})
    ip_state = None
    if ip_adapter is not None:
        if set(given) - {"dim_head"}:
            raise ValueError(f"i2v-init: with --ip-adapter the resampler config is read from the file; only dim_head "
                             f"may be given, not {sorted(set(given) - {'dim_head'})}")
        ip_source = str(user_path(ip_adapter))
        rcfg, ip_state = read_ip_adapter(ip_adapter, **given)
        bad = []
        if rcfg.embedding_dim != embed:
            bad.append(f"image_proj.proj_in.weight: reads {rcfg.embedding_dim}-wide image tokens, the image encoder "
                       f"{folders['image_encoder']} gives {embed} (its hidden_size)")
        if rcfg.output_dim != cross:
            bad.append(f"image_proj.proj_out.weight: writes {rcfg.output_dim}-wide tokens, the U-Net's "
                       f"cross-attention reads {cross}")
        if bad:
            raise ConversionError(mismatch_message(f"i2v-init: the IP-Adapter {ip_source} does not fit:",
                                                   misshaped=bad))
    else:
        fields = {f.name for f in dataclasses.fields(ResamplerConfig)}
        if set(given) - fields:
            raise ValueError(f"i2v-init: unknown resampler config fields {sorted(set(given) - fields)} (known: "
                             f"{sorted(fields)})")
        rcfg = ResamplerConfig(**{**dataclasses.asdict(_sd15_resampler()), "embedding_dim": embed,
                                  "output_dim": cross, **given})

    # the ControlNet: a given one must fit the U-Net; its condition downscale must be the VAE's
    channels = tuple(conditioning_embedding_out_channels) if conditioning_embedding_out_channels else None
    cn_cfg = None
    if "controlnet" in folders:
        cn_cfg = configs["controlnet"]
        if channels is not None and channels != tuple(cn_cfg.conditioning_embedding_out_channels):
            raise ConversionError(f"i2v-init: {folders['controlnet']}/config.json has conditioning_embedding_out_"
                                  f"channels={list(cn_cfg.conditioning_embedding_out_channels)}, but {list(channels)} "
                                  "was given")
        channels = tuple(cn_cfg.conditioning_embedding_out_channels)
        _check_controlnet(cn_cfg, ControlNetConfig.from_unet2d_config(
            spatial_unet2d_config(motion_cfg), conditioning_embedding_out_channels=channels), folders["controlnet"])
    channels = channels or SD_CONDITIONING
    factor, vae_factor = 2 ** (len(channels) - 1), configs["vae"].downsample_factor
    if factor != vae_factor:
        raise ConversionError(f"i2v-init: the ControlNet's conditioning_embedding_out_channels={list(channels)} take "
                              f"the reference down {factor}x, the VAE {folders['vae']} its frames {vae_factor}x: the "
                              "ControlNet reads the reference at the video's resolution, so the two must agree")
    cfg = I2VConfig(unet=dataclasses.replace(motion_cfg, image_attention=True), resampler=rcfg,
                    conditioning_embedding_out_channels=channels, controlnet=cn_cfg)
    module = I2VUNet(cfg)
    abstract = SPEC.abstract_params(module)
    unet_abstract = {p[1:]: a for p, a in abstract.items() if p[0] == "unet"}

    # the weights
    key_proj, key_cond = jax.random.split(jax.random.key(seed))
    base_module, base = load_motion_adapter(folders["unet"], adapter)
    del adapter
    fresh = []
    if ip_state is not None:
        try:
            unet_params = apply_ip_adapter(cfg.unet, base, ip_state, abstract=unet_abstract)
        except ConversionError as e:
            raise ConversionError(f"i2v-init: {ip_source}: {e}") from e
        image_proj = ip_state["image_proj"]
        del ip_state
    else:
        unet_params = add_image_attention(base, cfg.unet, unet_abstract)
        zeros = np.zeros((1, 1, rcfg.embedding_dim), np.float32)
        image_proj = nn.meta.unbox(jax.jit(lambda k: Resampler(rcfg).init(init_key(k), zeros)["params"])(key_proj))
        fresh += ["image_proj/...", "unet/.../attn2/{to_k_ip,to_v_ip} (copies of to_k, to_v)"]
    if cn_cfg is not None:
        controlnet_params = _load(folders["controlnet"], *kinds["controlnet"])[1]
    else:
        copied_cfg, controlnet_params = controlnet_from_unet(
            base_module.config, base, conditioning_embedding_out_channels=channels, key=key_cond)
        if copied_cfg != cfg.controlnet:  # the same derivation as I2VConfig's: a difference is a bug, not bad input
            raise AssertionError(f"controlnet_from_unet gave {copied_cfg}, the I2V config derives {cfg.controlnet}")
        fresh += ["controlnet/controlnet_cond_embedding/... (conv_out zero)",
                  "controlnet/controlnet_down_blocks_*, controlnet/controlnet_mid_block (zero)"]
    del base
    params = {"unet": unet_params, "image_proj": image_proj, "controlnet": controlnet_params}
    _check_params(params, abstract, "i2v-init: the assembled parameters do not match the I2V model:")

    with atomic_dir(dst) as tmp:
        save_model("i2v", module, params, tmp / "unet")
        del params
        for name in ("vae", "text_encoder", "image_encoder"):
            kind, form = kinds[name]
            if form == "flax":
                copy_tree(folders[name], tmp / name)
            else:
                m, p = load_torch(kind, folders[name])
                save_model(kind, m, p, tmp / name)
        copy_tree(folders["tokenizer"], tmp / "tokenizer")
        if pipeline is not None and (as_path(pipeline) / "scheduler").is_dir():
            copy_tree(as_path(pipeline) / "scheduler", tmp / "scheduler")
        sources = {k: str(v) for k, v in folders.items()}
        sources["motion_adapter"] = str(user_path(motion_adapter))
        if ip_adapter is not None:
            sources["ip_adapter"] = ip_source
        meta = {"sources": sources, "pipeline": str(pipeline or ""), "seed": seed, "fresh": fresh,
                "config": cfg.to_dict()}
        (tmp / INIT_META).write_text(json.dumps(meta, indent=1))
    logging.info("i2v-init: wrote %s (U-Net %s + motion adapter %s%s)", dst, folders["unet"], motion_adapter,
                 f" + IP-Adapter {ip_adapter}" if ip_adapter is not None else "")
    return dst
