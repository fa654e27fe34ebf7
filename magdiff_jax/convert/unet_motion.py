"""Kind `unet_motion`: diffusers UNetMotionModel <-> `magdiff_jax.models.unet_motion`; and `load_motion_adapter`.

The table is written block by block from the config. The spatial layers carry the SD U-Net's names
(`convert.blocks` rules); each motion module (`...motion_modules.j`) maps its GroupNorm `norm`, linear `proj_in`
and `proj_out`, and per transformer block the frame-position table `pos_embed.pe` (a persistent buffer in
diffusers, a parameter here), norm1-3, the two self-attentions and the GEGLU feed-forward.

`load_motion_adapter(unet2d_folder, adapter_folder)` builds the video U-Net from an SD U-Net folder
(UNet2DConditionModel) and an AnimateDiff `MotionAdapter` folder, as diffusers'
`UNetMotionModel.from_unet2d(unet, motion_adapter)` does.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from magdiff_jax.convert import safetensors_io
from magdiff_jax.convert.blocks import resnet_rules, transformer_block_rules, transformer_rules
from magdiff_jax.convert.core import (
    Rule,
    TorchFormat,
    attach,
    check_table,
    conv,
    linear,
    norm,
    param,
    read_config,
    torch_config,
    torch_format,
    torch_to_flax,
)
from magdiff_jax.convert.unet2d import config_from_diffusers, config_to_diffusers
from magdiff_jax.models.registry import ConfigError, config_from_dict, get_model
from magdiff_jax.models.unet2d import UNet2DConfig
from magdiff_jax.models.unet_motion import UNetMotionConfig, UNetMotionModel
from magdiff_jax.utils.files import user_path

KIND_NAME = "unet_motion"
# diffusers UNetMotionModel config keys we read past when they hold these (default) values; others are refused.
ACCEPTED_DEFAULTS = {
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "projection_class_embeddings_input_dim": None,
    "reverse_motion_num_attention_heads": None,
}
# MotionAdapter config keys and their diffusers defaults.
ADAPTER_DEFAULTS = {
    "block_out_channels": (320, 640, 1280, 1280),
    "motion_layers_per_block": 2,
    "motion_transformer_layers_per_block": 1,
    "motion_mid_block_layers_per_block": 1,
    "motion_transformer_layers_per_mid_block": 1,
    "motion_num_attention_heads": 8,
    "motion_norm_num_groups": 32,
    "motion_max_seq_length": 32,
    "use_motion_mid_block": True,
    "conv_in_channels": None,
}
# UNet2DConditionModel options that UNetMotionModel has no equivalent for (from_unet2d drops them): an SD U-Net
# that sets any of them to a non-default value would silently become a different model, so it is refused.
UNET2D_ONLY = (
    "center_input_sample", "flip_sin_to_cos", "freq_shift", "mid_block_type", "only_cross_attention",
    "encoder_hid_dim", "encoder_hid_dim_type", "class_embed_type", "num_class_embeds",
    "projection_class_embeddings_input_dim", "resnet_time_scale_shift", "resnet_out_scale_factor",
    "time_embedding_type", "time_embedding_dim", "time_embedding_act_fn", "timestep_post_act", "conv_in_kernel",
    "conv_out_kernel",
)
# fields that from_unet2d copies from the SD U-Net config unchanged
FROM_UNET2D = (
    "sample_size", "in_channels", "out_channels", "block_out_channels", "downsample_padding",
    "mid_block_scale_factor", "act_fn", "norm_num_groups", "norm_eps", "cross_attention_dim",
    "transformer_layers_per_block", "use_linear_projection", "time_cond_proj_dim", "attention_impl", "dtype",
    "remat_policy", "remat_save_names",
)


# --- the table ------------------------------------------------------------------------------------------------
def motion_module_rules(t: str, f: str, layers: int) -> list[Rule]:
    """AnimateDiffTransformer3D: norm, proj_in, transformer_blocks.* (pos_embed.pe, norm1, attn1, norm2, attn2,
    norm3, ff), proj_out."""
    rules = norm(f"{t}.norm", f"{f}/norm") + linear(f"{t}.proj_in", f"{f}/proj_in")
    for k in range(layers):
        tb, fb = f"{t}.transformer_blocks.{k}", f"{f}/transformer_blocks_{k}"
        rules += param(f"{tb}.pos_embed.pe", f"{fb}/pos_embed/pe")
        rules += transformer_block_rules(tb, fb, cross=True)  # attn2 is a second self-attention, same layout
    return rules + linear(f"{t}.proj_out", f"{f}/proj_out")


def unet_motion_rules(cfg: UNetMotionConfig) -> list[Rule]:
    """Every parameter (and the `pos_embed.pe` buffers) of a UNetMotionModel."""
    n = len(cfg.block_out_channels)
    lin = cfg.use_linear_projection
    rules = conv("conv_in", "conv_in") + conv("conv_out", "conv_out") + norm("conv_norm_out", "conv_norm_out")
    rules += linear("time_embedding.linear_1", "time_embedding/linear_1")
    rules += linear("time_embedding.linear_2", "time_embedding/linear_2")
    if cfg.time_cond_proj_dim is not None:
        rules += linear("time_embedding.cond_proj", "time_embedding/cond_proj", bias=False)

    for i, kind in enumerate(cfg.down_block_types):
        t, f = f"down_blocks.{i}", f"down_blocks_{i}"
        cout = cfg.block_out_channels[i]
        cin = cfg.block_out_channels[i - 1] if i else cfg.block_out_channels[0]
        for j in range(cfg.down_layers(i)):
            rules += resnet_rules(f"{t}.resnets.{j}", f"{f}/resnets_{j}", cin if j == 0 else cout, cout, temb=True)
            if kind == "CrossAttnDownBlockMotion":
                rules += transformer_rules(f"{t}.attentions.{j}", f"{f}/attentions_{j}",
                                           cfg.down_transformer_layers(i, j), lin)
            rules += motion_module_rules(f"{t}.motion_modules.{j}", f"{f}/motion_modules_{j}",
                                         cfg.down_temporal_layers(i, j))
        if i < n - 1:
            rules += conv(f"{t}.downsamplers.0.conv", f"{f}/downsamplers_0/conv")

    c = cfg.block_out_channels[-1]
    rules += resnet_rules("mid_block.resnets.0", "mid_block/resnets_0", c, c, temb=True)
    for k in range(cfg.mid_block_layers):
        rules += transformer_rules(f"mid_block.attentions.{k}", f"mid_block/attentions_{k}",
                                   cfg.mid_transformer_layers(k), lin)
        if cfg.use_motion_mid_block:
            rules += motion_module_rules(f"mid_block.motion_modules.{k}", f"mid_block/motion_modules_{k}",
                                         cfg.mid_temporal_layers(k))
        rules += resnet_rules(f"mid_block.resnets.{k + 1}", f"mid_block/resnets_{k + 1}", c, c, temb=True)

    rev = cfg.block_out_channels[::-1]
    for i, kind in enumerate(cfg.up_block_types):
        t, f = f"up_blocks.{i}", f"up_blocks_{i}"
        cout, cskip_last, prev = rev[i], rev[min(i + 1, n - 1)], rev[max(i - 1, 0)]
        layers = cfg.down_layers(n - 1 - i) + 1
        for j in range(layers):
            cin = (prev if j == 0 else cout) + (cskip_last if j == layers - 1 else cout)
            rules += resnet_rules(f"{t}.resnets.{j}", f"{f}/resnets_{j}", cin, cout, temb=True)
            if kind == "CrossAttnUpBlockMotion":
                rules += transformer_rules(f"{t}.attentions.{j}", f"{f}/attentions_{j}",
                                           cfg.up_transformer_layers(i, j), lin)
            rules += motion_module_rules(f"{t}.motion_modules.{j}", f"{f}/motion_modules_{j}",
                                         cfg.up_temporal_layers(i, j))
        if i < n - 1:
            rules += conv(f"{t}.upsamplers.0.conv", f"{f}/upsamplers_0/conv")
    return rules


def config_from_torch(d: dict) -> UNetMotionConfig:
    return config_from_diffusers(d, cls=UNetMotionConfig, accepted=ACCEPTED_DEFAULTS)


def config_to_torch(cfg: UNetMotionConfig) -> dict:
    return config_to_diffusers(cfg, "UNetMotionModel", accepted=ACCEPTED_DEFAULTS)


FORMAT = attach(KIND_NAME, TorchFormat(
    library="diffusers",
    torch_class=lambda cfg: "UNetMotionModel",
    config_from_torch=config_from_torch,
    config_to_torch=config_to_torch,
    rules=unet_motion_rules,
))


# --- SD U-Net + MotionAdapter -> unet_motion ------------------------------------------------------------------
def _adapter_config(d: dict, source: str) -> dict:
    unknown = sorted(k for k in d if not k.startswith("_") and k not in ADAPTER_DEFAULTS)
    if unknown:
        raise ValueError(f"{source}: unknown MotionAdapter config keys {unknown}")
    cfg = {**ADAPTER_DEFAULTS, **{k: v for k, v in d.items() if not k.startswith("_")}}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def motion_config_from_unet2d(unet: UNet2DConfig, adapter: dict, adapter_source: str = "MotionAdapter",
                              ) -> UNetMotionConfig:
    """The UNetMotionConfig that diffusers' `UNetMotionModel.from_unet2d(unet, adapter)` builds, from the SD U-Net's
    config and the MotionAdapter's config.json (a dict); refuses pairs that would not make the intended model."""
    adapter = _adapter_config(adapter, adapter_source)
    defaults = UNet2DConfig()
    for name in UNET2D_ONLY:
        if getattr(unet, name) != getattr(defaults, name):
            raise ValueError(f"the SD U-Net sets {name}={getattr(unet, name)!r}, which UNetMotionModel cannot "
                             f"represent (only {getattr(defaults, name)!r})")
    n = len(unet.down_block_types)
    if len(adapter["block_out_channels"]) != n:
        raise ValueError(f"{adapter_source}: incompatible MotionAdapter, it has {len(adapter['block_out_channels'])} "
                         f"blocks and the U-Net {n}")
    if tuple(adapter["block_out_channels"]) != tuple(unet.block_out_channels):
        raise ValueError(f"{adapter_source}: MotionAdapter block_out_channels={adapter['block_out_channels']} differ "
                         f"from the U-Net's {unet.block_out_channels}")
    expand = lambda v: tuple(v) if isinstance(v, tuple) else (v,) * n
    if expand(adapter["motion_layers_per_block"]) != expand(unet.layers_per_block):
        raise ValueError(f"{adapter_source}: incompatible MotionAdapter, motion_layers_per_block="
                         f"{adapter['motion_layers_per_block']} but the U-Net has layers_per_block="
                         f"{unet.layers_per_block}")
    if adapter["conv_in_channels"]:
        raise ValueError(f"{adapter_source}: MotionAdapter conv_in_channels={adapter['conv_in_channels']} (a PIA "
                         "input convolution) is not supported")
    if adapter["motion_norm_num_groups"] != unet.norm_num_groups:
        raise ValueError(f"{adapter_source}: MotionAdapter motion_norm_num_groups={adapter['motion_norm_num_groups']}"
                         f" differs from the U-Net's norm_num_groups={unet.norm_num_groups} (UNetMotionModel uses "
                         "the U-Net's for its motion modules)")
    kw = {name: getattr(unet, name) for name in FROM_UNET2D}
    kw["num_attention_heads"] = unet.num_attention_heads or unet.attention_head_dim
    kw["down_block_types"] = tuple("CrossAttnDownBlockMotion" if "CrossAttn" in t else "DownBlockMotion"
                                   for t in unet.down_block_types)
    kw["up_block_types"] = tuple("CrossAttnUpBlockMotion" if "CrossAttn" in t else "UpBlockMotion"
                                 for t in unet.up_block_types)
    kw.update(
        layers_per_block=adapter["motion_layers_per_block"],
        motion_num_attention_heads=adapter["motion_num_attention_heads"],
        motion_max_seq_length=adapter["motion_max_seq_length"],
        use_motion_mid_block=adapter["use_motion_mid_block"],
        temporal_transformer_layers_per_block=adapter["motion_transformer_layers_per_block"],
        temporal_transformer_layers_per_mid_block=adapter["motion_transformer_layers_per_mid_block"],
    )
    try:
        return config_from_dict(UNetMotionConfig, kw)
    except ConfigError as e:
        raise ConfigError(f"{adapter_source}: {e}") from e


def load_motion_adapter(unet2d_folder: str | os.PathLike, adapter_folder: str | os.PathLike, dtype=jnp.float32):
    """An SD U-Net folder (UNet2DConditionModel) + an AnimateDiff MotionAdapter folder -> `(module, params)` of
    kind `unet_motion`, equal to diffusers' `UNetMotionModel.from_unet2d(unet, motion_adapter)`.

    The spatial weights come from the U-Net's safetensors and the motion modules (`down_blocks.i.motion_modules.j`,
    `mid_block.motion_modules.k`, `up_blocks.i.motion_modules.j`) from the adapter's; any missing, unexpected or
    mis-shaped key is reported, naming the folder it belongs to.
    """
    unet_dir, adapter_dir = user_path(unet2d_folder), user_path(adapter_folder)
    unet_format = torch_format("unet2d")
    unet_cfg = torch_config("unet2d", unet_dir)
    config = motion_config_from_unet2d(unet_cfg, read_config(adapter_dir), str(adapter_dir / "config.json"))
    module = UNetMotionModel(config)
    abstract = get_model(KIND_NAME).abstract_params(module)
    rules = unet_motion_rules(config)
    check_table(rules, abstract, KIND_NAME)

    flat = {}
    for source, motion in ((unet_dir, False), (adapter_dir, True)):
        part = [r for r in rules if ("motion_modules" in r.torch) == motion]
        state = safetensors_io.read_state_dict(source, FORMAT.weights_stem)
        if not motion:
            state = unet_format.normalise_keys(state)
        sub = {r.flax: abstract[r.flax] for r in part}
        what = "motion_adapter" if motion else "unet2d"
        flat.update(traverse_util.flatten_dict(torch_to_flax(state, part, sub, f"{KIND_NAME} <- {what}",
                                                             source=str(source))))
    params = traverse_util.unflatten_dict({k: jnp.asarray(np.asarray(v), dtype=dtype) for k, v in flat.items()})
    return module, params


__all__ = ["load_motion_adapter", "motion_config_from_unet2d", "motion_module_rules", "unet_motion_rules"]

