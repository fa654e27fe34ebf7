"""Kind `vae`: diffusers `AutoencoderKL` <-> `magdiff_jax.models.vae.AutoencoderKL`.

The table is written out block by block from the config. On import, the legacy attention names of
checkpoints converted before diffusers renamed them (`attentions.N.query/key/value/proj_attn`, possibly stored
as (C, C, 1, 1) 1x1-conv weights) are accepted as `to_q/to_k/to_v/to_out.0`.
"""

from __future__ import annotations

import dataclasses
import re
import warnings

from magdiff_jax.convert.blocks import attention_rules, resnet_rules
from magdiff_jax.convert.core import Rule, TorchFormat, attach, conv, norm
from magdiff_jax.models.registry import config_from_dict
from magdiff_jax.models.vae import AutoencoderKLConfig

DIFFUSERS_VERSION = "0.42.1"
_OURS_ONLY = ("attention_impl", "dtype")
_TUPLE_FIELDS = (
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "latents_mean",
    "latents_std",
    "sample_size",
)


# --- config -------------------------------------------------------------------------------------------------
def config_from_torch(d: dict) -> AutoencoderKLConfig:
    names = {f.name for f in dataclasses.fields(AutoencoderKLConfig)} - set(_OURS_ONLY)
    unknown = sorted(k for k in d if not k.startswith("_") and k not in names)
    if unknown:
        # diffusers ignores config keys its class does not take; so do we, but say so.
        warnings.warn(f"[vae] ignoring config.json keys AutoencoderKL does not take: {unknown}", stacklevel=2)
    kw = {}
    for k, v in d.items():
        if k in names:
            kw[k] = tuple(v) if k in _TUPLE_FIELDS and isinstance(v, list) else v
    return config_from_dict(AutoencoderKLConfig, kw)


def config_to_torch(config: AutoencoderKLConfig) -> dict:
    out = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION}
    for f in dataclasses.fields(config):
        if f.name in _OURS_ONLY:
            continue
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


# --- the table ----------------------------------------------------------------------------------------------
def _attention_rules(t: str, f: str) -> list[Rule]:
    return norm(f"{t}.group_norm", f"{f}/group_norm") + attention_rules(t, f, qkv_bias=True)


def _mid_rules(t: str, f: str, c: AutoencoderKLConfig) -> list[Rule]:
    ch = c.block_out_channels[-1]
    rules = resnet_rules(f"{t}.resnets.0", f"{f}/resnets_0", ch, ch)
    if c.mid_block_add_attention:
        rules += _attention_rules(f"{t}.attentions.0", f"{f}/attentions_0")
    return rules + resnet_rules(f"{t}.resnets.1", f"{f}/resnets_1", ch, ch)


def rules(c: AutoencoderKLConfig) -> list[Rule]:
    boc = c.block_out_channels
    last = len(boc) - 1
    r = conv("encoder.conv_in", "encoder/conv_in")
    out_ch = boc[0]
    for i in range(len(boc)):
        in_ch, out_ch = out_ch, boc[i]
        t, f = f"encoder.down_blocks.{i}", f"encoder/down_blocks_{i}"
        for j in range(c.layers_per_block):
            r += resnet_rules(f"{t}.resnets.{j}", f"{f}/resnets_{j}", in_ch if j == 0 else out_ch, out_ch)
        if i < last:
            r += conv(f"{t}.downsamplers.0.conv", f"{f}/downsamplers_0/conv")
    r += _mid_rules("encoder.mid_block", "encoder/mid_block", c)
    r += norm("encoder.conv_norm_out", "encoder/conv_norm_out") + conv("encoder.conv_out", "encoder/conv_out")
    if c.use_quant_conv:
        r += conv("quant_conv", "quant_conv")
    if c.use_post_quant_conv:
        r += conv("post_quant_conv", "post_quant_conv")

    rev = tuple(reversed(boc))
    r += conv("decoder.conv_in", "decoder/conv_in")
    r += _mid_rules("decoder.mid_block", "decoder/mid_block", c)
    out_ch = rev[0]
    for i in range(len(rev)):
        in_ch, out_ch = out_ch, rev[i]
        t, f = f"decoder.up_blocks.{i}", f"decoder/up_blocks_{i}"
        for j in range(c.layers_per_block + 1):
            r += resnet_rules(f"{t}.resnets.{j}", f"{f}/resnets_{j}", in_ch if j == 0 else out_ch, out_ch)
        if i < last:
            r += conv(f"{t}.upsamplers.0.conv", f"{f}/upsamplers_0/conv")
    r += norm("decoder.conv_norm_out", "decoder/conv_norm_out") + conv("decoder.conv_out", "decoder/conv_out")
    return r


# --- legacy names (import only) -----------------------------------------------------------------------------
_LEGACY = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_RE = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def normalise_keys(state: dict) -> dict:
    """Rename legacy `attentions.N.query/key/value/proj_attn` to `to_q/to_k/to_v/to_out.0`. A legacy key whose
    new name is also present is left as it is (and reported as unexpected)."""
    out = dict(state)
    for k in list(state):
        m = _LEGACY_RE.match(k)
        if m is None:
            continue
        new = f"{m.group(1)}.{_LEGACY[m.group(2)]}.{m.group(3)}"
        if new not in state:
            out[new] = out.pop(k)
    return out


FORMAT = attach("vae", TorchFormat(
    library="diffusers",
    torch_class=lambda config: "AutoencoderKL",
    config_from_torch=config_from_torch,
    config_to_torch=config_to_torch,
    rules=rules,
    normalise_keys=normalise_keys,
))
