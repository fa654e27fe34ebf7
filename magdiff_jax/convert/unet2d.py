"""Kind `unet2d`: diffusers UNet2DConditionModel <-> `magdiff_jax.models.unet2d`.

The table is written block by block from the config with the shared-layer rules of `convert.blocks`; the video
U-Nets reuse `unet2d_rules` through its `block_extra` hook, since their spatial layers carry the same names.
"""

from __future__ import annotations

import dataclasses

from magdiff_jax.convert.blocks import resnet_rules, transformer_rules
from magdiff_jax.convert.core import Rule, TorchFormat, attach, conv, embedding, linear, norm
from magdiff_jax.models.registry import ConfigError, config_from_dict
from magdiff_jax.models.unet2d import UNet2DConfig

OURS_ONLY = ("attention_impl", "dtype", "remat_policy", "remat_save_names", "image_attention",
             "image_attention_scale")
# diffusers config keys we read past when they hold these (default) values; any other value is refused.
ACCEPTED_DEFAULTS = {
    "dual_cross_attention": False,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "addition_embed_type_num_heads": 64,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "reverse_transformer_layers_per_block": None,
}


def config_from_diffusers(d: dict, cls=UNet2DConfig, accepted=ACCEPTED_DEFAULTS):
    fields = {f.name for f in dataclasses.fields(cls)} - set(OURS_ONLY)
    kw = {}
    for k, v in d.items():
        if k.startswith("_"):
            continue
        if k in fields:
            kw[k] = tuple(v) if isinstance(v, list) else v
        elif k in accepted:
            if v != accepted[k]:
                raise ConfigError(f"{v!r} is not supported (only {accepted[k]!r})", k)
        else:
            raise ConfigError(f"unknown key {k!r} for {cls.__name__}")
    return config_from_dict(cls, kw)


def config_to_diffusers(config, class_name: str, accepted=ACCEPTED_DEFAULTS) -> dict:
    d = {"_class_name": class_name, "_diffusers_version": "0.42.1"}
    d.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()
              if k not in OURS_ONLY})
    d.update(accepted)
    return d


def unet2d_rules(cfg: UNet2DConfig, block_extra=None) -> list[Rule]:
    """Every parameter of a UNet2DConditionModel. `block_extra(kind, t, f, **info)` lets the video U-Nets add
    their temporal layers beside each resnet/transformer without rewriting the spatial table."""
    rules = conv("conv_in", "conv_in") + conv("conv_out", "conv_out")
    if cfg.norm_num_groups is not None:
        rules += norm("conv_norm_out", "conv_norm_out")
    rules += embedding_rules(cfg)
    rules += down_block_rules(cfg, block_extra) + mid_block_rules(cfg, block_extra)
    return rules + up_block_rules(cfg, block_extra)


def embedding_rules(cfg: UNet2DConfig) -> list[Rule]:
    """`time_embedding` (and its `cond_proj`), `class_embedding` and `encoder_hid_proj`, as the config has them."""
    rules = linear("time_embedding.linear_1", "time_embedding/linear_1")
    rules += linear("time_embedding.linear_2", "time_embedding/linear_2")
    if cfg.time_cond_proj_dim is not None:
        rules += linear("time_embedding.cond_proj", "time_embedding/cond_proj", bias=False)
    if cfg.class_embed_type in ("timestep", "projection"):
        rules += linear("class_embedding.linear_1", "class_embedding/linear_1")
        rules += linear("class_embedding.linear_2", "class_embedding/linear_2")
    elif cfg.class_embed_type is None and cfg.num_class_embeds is not None:
        rules += embedding("class_embedding", "class_embedding")
    if cfg.encoder_hid_dim_type == "text_proj":
        rules += linear("encoder_hid_proj", "encoder_hid_proj")
    return rules


def _no_extra(*args, **kwargs) -> list[Rule]:
    return []


def down_block_rules(cfg: UNet2DConfig, block_extra=None) -> list[Rule]:
    """`down_blocks.{i}`: resnets, transformers (CrossAttnDownBlock2D), downsamplers (also a ControlNet's copy)."""
    extra = block_extra or _no_extra
    n = len(cfg.block_out_channels)
    tl = cfg.per_block("transformer_layers_per_block")
    rules = []
    for i, kind in enumerate(cfg.down_block_types):
        t, f = f"down_blocks.{i}", f"down_blocks_{i}"
        cout = cfg.block_out_channels[i]
        cin = cfg.block_out_channels[i - 1] if i else cfg.block_out_channels[0]
        for j in range(cfg.per_block("layers_per_block")[i]):
            c0 = cin if j == 0 else cout
            rules += resnet_rules(f"{t}.resnets.{j}", f"{f}/resnets_{j}", c0, cout, temb=True)
            rules += extra("resnet", f"{t}", f"{f}", index=j, channels=cout)
            if kind == "CrossAttnDownBlock2D":
                rules += transformer_rules(f"{t}.attentions.{j}", f"{f}/attentions_{j}", tl[i],
                                           cfg.use_linear_projection)
                rules += extra("transformer", f"{t}", f"{f}", index=j, channels=cout, block=i)
        if i < n - 1:
            rules += conv(f"{t}.downsamplers.0.conv", f"{f}/downsamplers_0/conv")
    return rules


def mid_block_rules(cfg: UNet2DConfig, block_extra=None) -> list[Rule]:
    """`mid_block` (UNetMidBlock2DCrossAttn: resnet, transformer, resnet), if the config has one."""
    extra = block_extra or _no_extra
    if cfg.mid_block_type is None:
        return []
    n = len(cfg.block_out_channels)
    c = cfg.block_out_channels[-1]
    rules = []
    for j in range(2):
        rules += resnet_rules(f"mid_block.resnets.{j}", f"mid_block/resnets_{j}", c, c, temb=True)
        rules += extra("resnet", "mid_block", "mid_block", index=j, channels=c)
    rules += transformer_rules("mid_block.attentions.0", "mid_block/attentions_0",
                               cfg.per_block("transformer_layers_per_block")[-1], cfg.use_linear_projection)
    return rules + extra("transformer", "mid_block", "mid_block", index=0, channels=c, block=n - 1)


def up_block_rules(cfg: UNet2DConfig, block_extra=None) -> list[Rule]:
    """`up_blocks.{i}`: resnets over [x, skip] concatenations, transformers (CrossAttnUpBlock2D), upsamplers."""
    extra = block_extra or _no_extra
    n = len(cfg.block_out_channels)
    tl = cfg.per_block("transformer_layers_per_block")
    rev = cfg.block_out_channels[::-1]
    rules = []
    for i, kind in enumerate(cfg.up_block_types):
        t, f = f"up_blocks.{i}", f"up_blocks_{i}"
        block = n - 1 - i
        cout, cskip_last, prev = rev[i], rev[min(i + 1, n - 1)], rev[max(i - 1, 0)]
        layers = cfg.per_block("layers_per_block")[block] + 1
        for j in range(layers):
            cin = (prev if j == 0 else cout) + (cskip_last if j == layers - 1 else cout)
            rules += resnet_rules(f"{t}.resnets.{j}", f"{f}/resnets_{j}", cin, cout, temb=True)
            rules += extra("resnet", f"{t}", f"{f}", index=j, channels=cout)
            if kind == "CrossAttnUpBlock2D":
                rules += transformer_rules(f"{t}.attentions.{j}", f"{f}/attentions_{j}", tl[block],
                                           cfg.use_linear_projection)
                rules += extra("transformer", f"{t}", f"{f}", index=j, channels=cout, block=block)
        if i < n - 1:
            rules += conv(f"{t}.upsamplers.0.conv", f"{f}/upsamplers_0/conv")
    return rules


FORMAT = attach("unet2d", TorchFormat(
    library="diffusers",
    torch_class=lambda cfg: "UNet2DConditionModel",
    config_from_torch=config_from_diffusers,
    config_to_torch=lambda cfg: config_to_diffusers(cfg, "UNet2DConditionModel"),
    rules=unet2d_rules,
))
