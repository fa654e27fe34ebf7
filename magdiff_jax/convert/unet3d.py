"""Kind `unet3d`: diffusers UNet3DConditionModel <-> `magdiff_jax.models.unet3d`.

The spatial layers carry the SD U-Net's names, so the table is `unet2d_rules` on `UNet3DConfig.to_unet2d()` with its
`block_extra` hook adding a `temp_convs.{j}` after every resnet and a `temp_attentions.{j}` after every spatial
transformer, plus `transformer_in`. Config keys are diffusers' own (`attention_head_dim` is the head width here);
our entity-attention fields (`entity_attention`, `image_token_mode`) are neither written nor read. A U-Net with
entity attention (the `magdiff` kind, `convert.magdiff`) exports this table on its config without them, and its
entity-attention weights beside it.
"""

from __future__ import annotations

from magdiff_jax.convert.blocks import transformer_rules
from magdiff_jax.convert.core import Rule, TorchFormat, attach, conv, norm
from magdiff_jax.convert.unet2d import config_from_diffusers, config_to_diffusers, unet2d_rules
from magdiff_jax.models.unet3d import UNet3DConfig

CLASS_NAME = "UNet3DConditionModel"
# our UNet3DConfig fields beyond the shared unet2d ones (convert.unet2d.OURS_ONLY): not in diffusers' config.json
OURS_ONLY_3D = ("entity_attention", "image_token_mode")


def temp_conv_rules(t: str, f: str) -> list[Rule]:
    """diffusers TemporalConvLayer: conv1 = (GroupNorm, SiLU, Conv3d); conv2..4 = (GroupNorm, SiLU, Dropout, Conv3d)."""
    rules = norm(f"{t}.conv1.0", f"{f}/conv1_0") + conv(f"{t}.conv1.2", f"{f}/conv1_2")
    for k in (2, 3, 4):
        rules += norm(f"{t}.conv{k}.0", f"{f}/conv{k}_0") + conv(f"{t}.conv{k}.3", f"{f}/conv{k}_3")
    return rules


def temporal_transformer_rules(t: str, f: str, layers: int = 1) -> list[Rule]:
    """diffusers TransformerTemporalModel: norm, linear proj_in, blocks with attn1 and attn2 (both self), proj_out."""
    return transformer_rules(t, f, layers, linear_projection=True, cross=True)


def unet3d_rules(cfg: UNet3DConfig) -> list[Rule]:
    """Every parameter of a UNet3DConditionModel."""
    if cfg.entity_attention:
        raise NotImplementedError("a unet3d with entity_attention (to_k_ip, to_v_ip, text_scale, image_scale) has no "
                                  "diffusers UNet3DConditionModel layout; the `magdiff` kind (convert.magdiff) "
                                  "exports this table on the config without it, and those weights beside it")

    def extra(kind, t, f, index, **_):
        if kind == "resnet":
            return temp_conv_rules(f"{t}.temp_convs.{index}", f"{f}/temp_convs_{index}")
        return temporal_transformer_rules(f"{t}.temp_attentions.{index}", f"{f}/temp_attentions_{index}")

    return unet2d_rules(cfg.to_unet2d(), block_extra=extra) + temporal_transformer_rules("transformer_in",
                                                                                          "transformer_in")


def config_from_torch(d: dict) -> UNet3DConfig:
    ours = sorted(k for k in d if k in OURS_ONLY_3D)
    if ours:
        raise ValueError(f"unknown key {ours[0]!r} for UNet3DConfig (not a diffusers key)")
    return config_from_diffusers(d, cls=UNet3DConfig, accepted={})


def config_to_torch(cfg: UNet3DConfig) -> dict:
    if cfg.entity_attention:
        raise NotImplementedError("a unet3d with entity_attention has no diffusers UNet3DConditionModel config")
    return {k: v for k, v in config_to_diffusers(cfg, CLASS_NAME, accepted={}).items() if k not in OURS_ONLY_3D}


FORMAT = attach("unet3d", TorchFormat(
    library="diffusers",
    torch_class=lambda cfg: CLASS_NAME,
    config_from_torch=config_from_torch,
    config_to_torch=config_to_torch,
    rules=unet3d_rules,
))

