"""Mapping rules for the layers every model shares (`magdiff_jax.layers`): resnets, attention, transformers.

Each function lists the rules of one PyTorch module at prefix `t` and its Flax counterpart at path `f`.
"""

from __future__ import annotations

from magdiff_jax.convert.core import Rule, conv, linear, norm


def resnet_rules(
    t: str,
    f: str,
    in_channels: int,
    out_channels: int,
    temb: bool = False,
    use_in_shortcut: bool | None = None,
    conv_shortcut_bias: bool = True,
) -> list[Rule]:
    """diffusers `ResnetBlock2D` at PyTorch prefix `t` <-> `layers.resnet.ResnetBlock2D` at Flax path `f`."""
    rules = norm(f"{t}.norm1", f"{f}/norm1") + conv(f"{t}.conv1", f"{f}/conv1")
    if temb:
        rules += linear(f"{t}.time_emb_proj", f"{f}/time_emb_proj")
    rules += norm(f"{t}.norm2", f"{f}/norm2") + conv(f"{t}.conv2", f"{f}/conv2")
    shortcut = in_channels != out_channels if use_in_shortcut is None else use_in_shortcut
    if shortcut:
        rules += conv(f"{t}.conv_shortcut", f"{f}/conv_shortcut", bias=conv_shortcut_bias)
    return rules



def attention_rules(t: str, f: str, qkv_bias: bool = False) -> list[Rule]:
    """diffusers Attention: to_q, to_k, to_v, to_out.0."""
    return (linear(f"{t}.to_q", f"{f}/to_q", qkv_bias) + linear(f"{t}.to_k", f"{f}/to_k", qkv_bias)
            + linear(f"{t}.to_v", f"{f}/to_v", qkv_bias) + linear(f"{t}.to_out.0", f"{f}/to_out_0"))


def transformer_block_rules(t: str, f: str, cross: bool) -> list[Rule]:
    """BasicTransformerBlock: norm1, attn1, [norm2, attn2], norm3, ff (GEGLU)."""
    rules = norm(f"{t}.norm1", f"{f}/norm1") + attention_rules(f"{t}.attn1", f"{f}/attn1")
    if cross:
        rules += norm(f"{t}.norm2", f"{f}/norm2") + attention_rules(f"{t}.attn2", f"{f}/attn2")
    rules += norm(f"{t}.norm3", f"{f}/norm3")
    rules += linear(f"{t}.ff.net.0.proj", f"{f}/ff/net_0/proj") + linear(f"{t}.ff.net.2", f"{f}/ff/net_2")
    return rules


def transformer_rules(t: str, f: str, layers: int, linear_projection: bool, cross: bool = True) -> list[Rule]:
    """Transformer2DModel: norm, proj_in, transformer_blocks.*, proj_out."""
    proj = linear if linear_projection else conv
    rules = norm(f"{t}.norm", f"{f}/norm") + proj(f"{t}.proj_in", f"{f}/proj_in")
    for k in range(layers):
        rules += transformer_block_rules(f"{t}.transformer_blocks.{k}", f"{f}/transformer_blocks_{k}", cross)
    return rules + proj(f"{t}.proj_out", f"{f}/proj_out")
