"""Kind `controlnet`: diffusers ControlNetModel <-> `magdiff_jax.models.controlnet`.

The copied encoder (`conv_in`, `time_embedding`, `down_blocks.*`, `mid_block`) maps with the SD U-Net's rules
(`convert.unet2d`, on `ControlNetConfig.to_unet2d()`); the ControlNet's own layers are the condition encoder
(`controlnet_cond_embedding.conv_in`, `.blocks.{i}`, `.conv_out`) and the 1x1 output convs
(`controlnet_down_blocks.{k}`, `controlnet_mid_block`).
"""

from __future__ import annotations

from magdiff_jax.convert.core import Rule, TorchFormat, attach, conv
from magdiff_jax.convert.unet2d import (
    config_from_diffusers,
    config_to_diffusers,
    down_block_rules,
    embedding_rules,
    mid_block_rules,
)
from magdiff_jax.models.controlnet import ControlNetConfig

# diffusers ControlNetModel config keys we read past when they hold these (default) values; others are refused.
ACCEPTED_DEFAULTS = {
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "projection_class_embeddings_input_dim": None,
    "addition_embed_type_num_heads": 64,
}


def controlnet_rules(cfg: ControlNetConfig) -> list[Rule]:
    """Every parameter of a ControlNetModel."""
    unet = cfg.to_unet2d()
    rules = conv("conv_in", "conv_in") + embedding_rules(unet)
    t, f = "controlnet_cond_embedding", "controlnet_cond_embedding"
    rules += conv(f"{t}.conv_in", f"{f}/conv_in")
    for i in range(2 * (len(cfg.conditioning_embedding_out_channels) - 1)):
        rules += conv(f"{t}.blocks.{i}", f"{f}/blocks_{i}")
    rules += conv(f"{t}.conv_out", f"{f}/conv_out")
    rules += down_block_rules(unet)
    for k in range(cfg.num_skips):
        rules += conv(f"controlnet_down_blocks.{k}", f"controlnet_down_blocks_{k}")
    return rules + mid_block_rules(unet) + conv("controlnet_mid_block", "controlnet_mid_block")


def config_from_torch(d: dict) -> ControlNetConfig:
    return config_from_diffusers(d, cls=ControlNetConfig, accepted=ACCEPTED_DEFAULTS)


def config_to_torch(cfg: ControlNetConfig) -> dict:
    return config_to_diffusers(cfg, "ControlNetModel", accepted=ACCEPTED_DEFAULTS)


FORMAT = attach("controlnet", TorchFormat(
    library="diffusers",
    torch_class=lambda cfg: "ControlNetModel",
    config_from_torch=config_from_torch,
    config_to_torch=config_to_torch,
    rules=controlnet_rules,
))

__all__ = ["controlnet_rules"]
