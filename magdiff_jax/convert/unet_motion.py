"""Kind `unet_motion`: diffusers UNetMotionModel <-> `magdiff_jax.models.unet_motion`; AnimateDiff motion adapters.

The table is written block by block from the config. The spatial layers carry the SD U-Net's names
(`convert.blocks` rules); each motion module (`...motion_modules.j`) maps its GroupNorm `norm`, linear `proj_in`
and `proj_out`, and per transformer block the frame-position table `pos_embed.pe` (a persistent buffer in
diffusers, a parameter here), norm1-3, the two self-attentions and the GEGLU feed-forward.

Motion adapters (the motion modules alone, as AnimateDiff ships them):
  read_motion_adapter(src)          a diffusers MotionAdapter folder, or one .safetensors/.ckpt/.bin file with
                                    diffusers' keys or the original AnimateDiff ones (`original_key`); a file's
                                    config is read from its tensor shapes (`infer_adapter_config`)
  load_motion_adapter(unet, src)    SD U-Net folder + adapter -> unet_motion, as `UNetMotionModel.from_unet2d`
  apply_motion_adapter(cfg, p, src) a unet_motion's motion modules replaced by an adapter's
  motion_adapter_to_torch(cfg, p, dst)  the motion modules written as a MotionAdapter folder, or as one
                                    original-layout .safetensors file
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
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
    flax_to_torch,
    linear,
    norm,
    param,
    read_config,
    torch_config,
    torch_format,
    torch_to_flax,
)
from magdiff_jax.convert.unet2d import config_from_diffusers, config_to_diffusers
from magdiff_jax.layers.motion import sinusoidal_table
from magdiff_jax.models.registry import ConfigError, config_from_dict, get_model
from magdiff_jax.models.unet2d import UNet2DConfig
from magdiff_jax.models.unet_motion import UNetMotionConfig, UNetMotionModel
from magdiff_jax.utils.errors import ConversionError, key_list
from magdiff_jax.utils.files import as_path, atomic_dir, check_destination, user_path

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
    config and the MotionAdapter's config.json (a dict; or the fields `read_motion_adapter` read from a single
    file's shapes, the others defaulting as in diffusers); refuses pairs that would not make the intended model."""
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


# --- motion adapter checkpoints: diffusers' MotionAdapter and the original AnimateDiff layout ------------------
# the original AnimateDiff layout (animatediff/models/motion_module.py): see original_key
ORIGINAL_MODULE = "temporal_transformer"
ORIGINAL_SUBMODULES = {"attn1": "attention_blocks.0", "attn2": "attention_blocks.1", "norm1": "norms.0",
                       "norm2": "norms.1", "norm3": "ff_norm", "pos_embed": "attention_blocks.0.pos_encoder"}
FIRST_TABLE, SECOND_TABLE = ".attention_blocks.0.pos_encoder.pe", ".attention_blocks.1.pos_encoder.pe"
# MotionAdapter config fields that no tensor shape carries: a single file (no config.json) may be given them.
NOT_IN_SHAPES = ("motion_num_attention_heads", "motion_norm_num_groups", "motion_max_seq_length")


def original_key(key: str) -> str:
    """The original AnimateDiff name (`animatediff/models/motion_module.py`) of a diffusers motion-module key.

    A motion module's tensors sit one level deeper, under `temporal_transformer`, and in each transformer block
    the sub-modules are named as AnimateDiff's `TemporalTransformerBlock` names them:

        attn1 -> attention_blocks.0     norm1 -> norms.0     norm3 -> ff_norm
        attn2 -> attention_blocks.1     norm2 -> norms.1     pos_embed.pe -> attention_blocks.0.pos_encoder.pe

    e.g. `up_blocks.1.motion_modules.2.transformer_blocks.0.attn2.to_q.weight` ->
    `up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_q.weight`.
    AnimateDiff keeps one frame table per attention (`attention_blocks.{0,1}.pos_encoder.pe`, equal sinusoidal
    tables); diffusers one per block, here named after the first.
    """
    head, sep, tail = key.partition(".motion_modules.")
    if not sep:
        raise ValueError(f"{key!r} is not a motion-module key")
    index, _, rest = tail.partition(".")
    parts = rest.split(".")
    if parts[0] == "transformer_blocks" and len(parts) > 2:
        parts[2] = ORIGINAL_SUBMODULES.get(parts[2], parts[2])
    return ".".join([head, "motion_modules", index, ORIGINAL_MODULE, *parts])


@dataclasses.dataclass(frozen=True)
class MotionAdapterWeights:
    """The motion modules of one AnimateDiff checkpoint, as read (`read_motion_adapter`).

    config: MotionAdapter config.json fields: all of them (defaults filled) from a folder's config.json; from a single
      file, those its tensor shapes determine plus any given (`NOT_IN_SHAPES`), the rest left to the caller.
    state: the tensors under the file's own key names.
    layout: "diffusers" (MotionAdapter / UNetMotionModel keys) or "original" (AnimateDiff's, `original_key`).
    source: the folder or file read, for error messages.
    """

    config: dict
    state: dict
    layout: str
    source: str


def _module_of(key: str, layout: str) -> tuple[str, int, str] | None:
    """("down_blocks.1" | "mid_block" | "up_blocks.0", module index, the key's rest inside the module) of a
    motion-module key of `layout`, or None for any other key."""
    head, sep, tail = key.partition(".motion_modules.")
    index, _, rest = tail.partition(".")
    if not sep or not index.isdigit():
        return None
    if layout == "original":
        if not rest.startswith(f"{ORIGINAL_MODULE}."):
            return None
        rest = rest[len(ORIGINAL_MODULE) + 1:]
    kind, _, number = head.partition(".")
    if not (head == "mid_block" or (kind in ("down_blocks", "up_blocks") and number.isdigit())):
        return None
    return head, int(index), rest


def _collapse(values: list):
    """One value for all, or the list."""
    return values[0] if values and all(v == values[0] for v in values) else list(values)


def infer_adapter_config(state: Mapping[str, np.ndarray], layout: str = "diffusers", source: str = "") -> dict:
    """The MotionAdapter config fields that the tensor shapes of a motion-module state dict determine:
    block_out_channels (each block's GroupNorm width), motion_layers_per_block (modules per down block),
    motion_transformer_layers_per_block (transformer blocks per module), use_motion_mid_block,
    motion_mid_block_layers_per_block, motion_transformer_layers_per_mid_block and motion_max_seq_length (the
    frame tables' length: 24 for AnimateDiff v1, 32 for v2/v3; absent where the file holds no table).

    Structures that no MotionAdapter has are refused here, naming the keys: blocks or modules not numbered
    0..n-1, a block whose modules differ in width, up blocks that do not mirror the down blocks (n - 1 - i's
    width, one module more), frame tables that are not (1, max_len, width) or differ in length. Whatever else
    is wrong (a missing, extra or mis-shaped tensor) is reported by the key check against the model.
    """
    where = f"{source}: " if source else ""
    inner = f".{ORIGINAL_MODULE}" if layout == "original" else ""
    modules: dict[str, dict[int, dict[str, tuple]]] = {}
    for key, x in state.items():
        found = _module_of(key, layout)
        if found is not None:
            block, j, rest = found
            modules.setdefault(block, {}).setdefault(j, {})[rest] = tuple(np.shape(x))
    if not modules:
        raise ConversionError(f"{where}no AnimateDiff motion-module tensors (keys down_blocks.<i>.motion_modules.<j>"
                              f"{inner}..., mid_block.motion_modules.<k>{inner}..., up_blocks.<i>...)")

    def numbered(indices, what: str) -> list[int]:
        indices = sorted(indices)
        if indices != list(range(len(indices))):
            raise ConversionError(f"{where}{what} are numbered {indices}, expected 0..{len(indices) - 1}")
        return indices

    def shape_of(block: str, j: int) -> tuple[int, int, set[int]]:
        """(width, transformer blocks, frame-table lengths) of one motion module."""
        tensors, prefix = modules[block][j], f"{block}.motion_modules.{j}{inner}"
        for name, ndim, axis in (("norm.weight", 1, 0), ("norm.bias", 1, 0), ("proj_in.weight", 2, 1),
                                 ("proj_out.weight", 2, 0)):
            if name in tensors:
                if len(tensors[name]) != ndim:
                    raise ConversionError(f"{where}{prefix}.{name} has shape {tensors[name]}, expected {ndim} "
                                          "dimensions")
                width = tensors[name][axis]
                break
        else:
            raise ConversionError(f"{where}{prefix} has none of norm.weight, proj_in.weight, proj_out.weight: its "
                                  "width cannot be told")
        layers = {int(r.split(".")[1]) for r in tensors if r.startswith("transformer_blocks.")
                  and r.split(".")[1].isdigit()}
        layers = numbered(layers, f"the transformer blocks of {prefix}")
        if not layers:
            raise ConversionError(f"{where}{prefix} has no transformer_blocks")
        lengths = set()
        for rest, shape in tensors.items():
            if rest.endswith(".pe"):
                if len(shape) != 3 or shape[0] != 1 or shape[1] < 1:
                    raise ConversionError(f"{where}frame table {prefix}.{rest} has shape {shape}, expected (1, "
                                          "max_len, width)")
                lengths.add(shape[1])
        return width, len(layers), lengths

    summary = {}
    for block, found in modules.items():
        numbered(found, f"the motion modules of {block}")
        summary[block] = [shape_of(block, j) for j in sorted(found)]
        widths = sorted({w for w, _, _ in summary[block]})
        if len(widths) > 1:
            raise ConversionError(f"{where}the motion modules of {block} differ in width {widths} (norm.weight / "
                                  "proj_in.weight); a block's modules share one")
    downs = numbered([int(b.split(".")[1]) for b in modules if b.startswith("down_blocks.")], "the down blocks")
    ups = numbered([int(b.split(".")[1]) for b in modules if b.startswith("up_blocks.")], "the up blocks")
    if not downs or len(ups) != len(downs):
        raise ConversionError(f"{where}{len(downs)} down blocks and {len(ups)} up blocks hold motion modules; an "
                              "adapter has as many of each (at least one)")
    n = len(downs)
    width = lambda block: summary[block][0][0]
    channels = [width(f"down_blocks.{i}") for i in range(n)]
    for i in range(n):
        block, mirror = f"up_blocks.{i}", f"down_blocks.{n - 1 - i}"
        if width(block) != channels[n - 1 - i] or len(summary[block]) != len(summary[mirror]) + 1:
            raise ConversionError(f"{where}{block} has {len(summary[block])} motion modules {width(block)} wide, but "
                                  f"{mirror} has {len(summary[mirror])} {channels[n - 1 - i]} wide: the up block "
                                  "mirroring a down block has its width and one module more")
    if "mid_block" in summary and width("mid_block") != channels[-1]:
        raise ConversionError(f"{where}mid_block's motion modules are {width('mid_block')} wide, the last down "
                              f"block's {channels[-1]}")
    lengths = sorted(set().union(*(t for mods in summary.values() for _, _, t in mods)))
    if len(lengths) > 1:
        raise ConversionError(f"{where}the frame tables (pos_embed.pe / pos_encoder.pe) differ in length {lengths}")

    per_block = [[layers for _, layers, _ in summary[f"down_blocks.{i}"]] for i in range(n)]
    config = {
        "block_out_channels": channels,
        "motion_layers_per_block": _collapse([len(layers) for layers in per_block]),
        "motion_transformer_layers_per_block": _collapse([_collapse(layers) for layers in per_block]),
        "use_motion_mid_block": "mid_block" in summary,
    }
    if "mid_block" in summary:
        config["motion_mid_block_layers_per_block"] = len(summary["mid_block"])
        config["motion_transformer_layers_per_mid_block"] = _collapse([layers for _, layers, _ in
                                                                       summary["mid_block"]])
    if lengths:
        config["motion_max_seq_length"] = lengths[0]
    return config


def read_motion_adapter(source: str | os.PathLike, config: Mapping | None = None) -> MotionAdapterWeights:
    """Read an AnimateDiff motion adapter from any of its forms:

      * a diffusers MotionAdapter folder (config.json + diffusion_pytorch_model.safetensors, single or sharded);
      * one `.safetensors` file, or a pickle-based `.ckpt` / `.bin` / `.pt` (only through
        `safetensors_io.read_weights`: `torch.load(weights_only=True)`, a "state_dict" wrapper unwrapped), with
        either diffusers' MotionAdapter keys or the original AnimateDiff ones (`mm_sd_v15_v2.ckpt`,
        `v3_sd15_mm.ckpt`: keys with `.temporal_transformer.`, `original_key`), told apart by those keys.

    A single file has no config.json: its config is read from the tensor shapes (`infer_adapter_config`). What
    no shape carries may be given in `config` (`NOT_IN_SHAPES`): `motion_num_attention_heads` (else AnimateDiff's
    8, where the adapter is used), `motion_norm_num_groups` (else the U-Net's), `motion_max_seq_length` (only for
    a file without frame tables, else 32). For a folder, `config` must agree with its config.json.
    """
    path = user_path(source)
    if not path.exists():
        raise safetensors_io.CheckpointFormatError(f"{path}: no such file or folder")
    given = dict(config or {})
    unknown = sorted(k for k in given if k not in ADAPTER_DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown MotionAdapter config keys {unknown} (known: {sorted(ADAPTER_DEFAULTS)})")
    if path.is_dir():
        state = safetensors_io.read_state_dict(path, FORMAT.weights_stem)
    else:
        state = safetensors_io.read_weights(path)
    layout = "original" if any(f".{ORIGINAL_MODULE}." in k for k in state) else "diffusers"
    if path.is_dir() and (path / "config.json").exists():
        cfg = _adapter_config(read_config(path), str(path / "config.json"))
        for k, v in given.items():
            if _plain(v) != _plain(cfg[k]):
                raise ConfigError(f"{path / 'config.json'} sets {k}={_plain(cfg[k])!r}, but {_plain(v)!r} was given")
        return MotionAdapterWeights(cfg, state, layout, str(path))
    cfg = infer_adapter_config(state, layout, str(path))
    for k, v in given.items():
        if k not in NOT_IN_SHAPES or k in cfg:
            raise ConfigError(f"{path}: {k} is read from the tensor shapes ({_plain(cfg.get(k))!r}); only "
                              f"{[n for n in NOT_IN_SHAPES if n not in cfg]} may be given for this file")
        cfg[k] = v
    return MotionAdapterWeights(cfg, state, layout, str(path))


def _plain(v):
    """A config value with tuples as lists (the form config.json holds)."""
    return [_plain(x) for x in v] if isinstance(v, (list, tuple)) else v


def _adapter_weights(adapter, config: Mapping | None) -> MotionAdapterWeights:
    if isinstance(adapter, MotionAdapterWeights):
        if config:
            raise ValueError("adapter_config is for an adapter read from a path; these weights were read already")
        return adapter
    return read_motion_adapter(adapter, config)


def _motion_rules(cfg: UNetMotionConfig) -> list[Rule]:
    return [r for r in unet_motion_rules(cfg) if ".motion_modules." in r.torch]


def adapter_to_flax(weights: MotionAdapterWeights, cfg: UNetMotionConfig, abstract: Mapping[tuple[str, ...], Any],
                    ) -> dict:
    """The motion-module parameters of the unet_motion model `cfg` (a flat {path: array} dict, float32) from an
    adapter in either layout; `abstract` gives each parameter's shape (e.g. `abstract_params`, flattened).

    In the original layout the second frame table of each block (`attention_blocks.1.pos_encoder.pe`) must equal
    the first (our block has one); a file holding no frame table at all (AnimateDiff's current code keeps them
    out of its state dicts) gets the sinusoidal table they hold (`layers.motion.sinusoidal_table`). Every
    missing, unexpected or mis-shaped key is reported under the file's own names.
    """
    rules = _motion_rules(cfg)
    state = dict(weights.state)
    if weights.layout == "original":
        rules = [dataclasses.replace(r, torch=original_key(r.torch)) for r in rules]
        differ = []
        for r in rules:
            if r.torch.endswith(FIRST_TABLE):
                second = r.torch[: -len(FIRST_TABLE)] + SECOND_TABLE
                if second in state:
                    table = state.pop(second)
                    if r.torch not in state:
                        state[r.torch] = table
                    elif np.shape(table) != np.shape(state[r.torch]) or not np.array_equal(table, state[r.torch]):
                        differ.append(f"{r.torch} and {second}")
        if differ:
            raise ConversionError(f"[{KIND_NAME} <- motion_adapter] {weights.source}: the two frame tables of a "
                                  "transformer block differ (a motion block here has one):" + key_list(differ))
        if not any(k.endswith(".pe") for k in state):
            for r in rules:
                if r.torch.endswith(FIRST_TABLE) and r.flax in abstract:
                    _, length, dim = abstract[r.flax].shape
                    state[r.torch] = sinusoidal_table(length, dim)
    sub = {r.flax: abstract[r.flax] for r in rules if r.flax in abstract}  # a gap is reported as a table mismatch
    params = torch_to_flax(state, rules, sub, f"{KIND_NAME} <- motion_adapter", source=weights.source)
    return traverse_util.flatten_dict(params)


# --- SD U-Net + motion adapter -> unet_motion; a new adapter for a unet_motion ------------------------------------
def load_motion_adapter(unet2d_folder: str | os.PathLike, adapter, dtype=jnp.float32,
                        adapter_config: Mapping | None = None):
    """An SD U-Net folder (UNet2DConditionModel) + an AnimateDiff motion adapter -> `(module, params)` of kind
    `unet_motion`, equal to diffusers' `UNetMotionModel.from_unet2d(unet, motion_adapter)`.

    `adapter` is any form `read_motion_adapter` reads (a MotionAdapter folder, or one .safetensors / .ckpt / .bin
    file in diffusers' or the original AnimateDiff layout; `adapter_config` as there), or `MotionAdapterWeights`.
    The spatial weights come from the U-Net's safetensors and the motion modules from the adapter; any missing,
    unexpected or mis-shaped key is reported, naming the folder or file it belongs to.
    """
    unet_dir = user_path(unet2d_folder)
    weights = _adapter_weights(adapter, adapter_config)
    unet_cfg = torch_config("unet2d", unet_dir)
    fields = {"motion_norm_num_groups": unet_cfg.norm_num_groups, **weights.config}
    config = motion_config_from_unet2d(unet_cfg, fields, weights.source)
    module = UNetMotionModel(config)
    abstract = get_model(KIND_NAME).abstract_params(module)
    rules = unet_motion_rules(config)
    check_table(rules, abstract, KIND_NAME)

    spatial = [r for r in rules if ".motion_modules." not in r.torch]
    state = torch_format("unet2d").normalise_keys(safetensors_io.read_state_dict(unet_dir, FORMAT.weights_stem))
    flat = traverse_util.flatten_dict(torch_to_flax(state, spatial, {r.flax: abstract[r.flax] for r in spatial},
                                                    f"{KIND_NAME} <- unet2d", source=str(unet_dir)))
    flat.update(adapter_to_flax(weights, config, abstract))
    params = traverse_util.unflatten_dict({k: jnp.asarray(np.asarray(v), dtype=dtype) for k, v in flat.items()})
    return module, params


def apply_motion_adapter(config: UNetMotionConfig, params, adapter, adapter_config: Mapping | None = None) -> dict:
    """unet_motion `params` (of `config`) with every motion module replaced by the adapter's and every other
    parameter kept as it is (the same arrays): a trained video U-Net given new motion modules.

    `adapter` as for `load_motion_adapter`. It must fit `config`: the same blocks, modules, depths and frame-table
    length (checked key by key and shape by shape, every mismatch named), and, where the adapter says (a
    config.json, or `adapter_config`), the same motion heads and norm groups. Each new array takes the dtype (and
    sharding, for a jax.Array) of the one it replaces. Returns a plain nested dict.
    """
    weights = _adapter_weights(adapter, adapter_config)
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(params)))
    check_table(unet_motion_rules(config), flat, KIND_NAME)
    n = len(config.block_out_channels)
    heads, groups = weights.config.get("motion_num_attention_heads"), weights.config.get("motion_norm_num_groups")
    if heads is not None and (tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n) != tuple(
            config.per_block("motion_num_attention_heads")):
        raise ValueError(f"{weights.source}: the adapter has motion_num_attention_heads={_plain(heads)!r}, the model "
                         f"{_plain(config.motion_num_attention_heads)!r}")
    if groups is not None and groups != config.norm_num_groups:
        raise ValueError(f"{weights.source}: the adapter has motion_norm_num_groups={groups}, the model's motion "
                         f"modules use norm_num_groups={config.norm_num_groups}")
    if weights.config.get("conv_in_channels"):
        raise ValueError(f"{weights.source}: conv_in_channels={weights.config['conv_in_channels']} (a PIA input "
                         "convolution) is not supported")
    new = adapter_to_flax(weights, config, flat)
    out = {}
    for path, old in flat.items():
        if path not in new:
            out[path] = old
        elif isinstance(old, jax.Array):
            out[path] = jax.device_put(np.asarray(new[path], dtype=old.dtype), old.sharding)
        else:
            out[path] = np.asarray(new[path], dtype=np.asarray(old).dtype)
    return traverse_util.unflatten_dict(out)


# --- unet_motion -> motion adapter --------------------------------------------------------------------------------
def motion_adapter_config(config: UNetMotionConfig) -> dict:
    """The config.json of the diffusers MotionAdapter holding the motion modules of unet_motion `config`; refuses
    a model whose modules no MotionAdapter describes (its up blocks take each down block's temporal depth, one
    per block)."""
    n = len(config.block_out_channels)
    depth = config.per_block("temporal_transformer_layers_per_block")
    for i in range(n):
        mirror = depth[n - 1 - i]
        layers = [config.up_temporal_layers(i, j) for j in range(config.down_layers(n - 1 - i) + 1)]
        if not isinstance(mirror, int) or any(v != mirror for v in layers):
            given = (_plain(config.temporal_transformer_layers_per_block),
                     _plain(config.reverse_temporal_transformer_layers_per_block))
            raise ValueError(f"temporal_transformer_layers_per_block={given[0]} with reverse_temporal_transformer_"
                             f"layers_per_block={given[1]}: a MotionAdapter gives each block one temporal depth, and "
                             "its up block the mirrored down block's")
    return {
        "_class_name": "MotionAdapter",
        "_diffusers_version": "0.42.1",
        "block_out_channels": list(config.block_out_channels),
        "motion_layers_per_block": _plain(config.layers_per_block),
        "motion_transformer_layers_per_block": _plain(config.temporal_transformer_layers_per_block),
        "motion_mid_block_layers_per_block": config.mid_block_layers,
        "motion_transformer_layers_per_mid_block": _plain(config.temporal_transformer_layers_per_mid_block),
        "motion_num_attention_heads": _plain(config.motion_num_attention_heads),
        "motion_norm_num_groups": config.norm_num_groups,
        "motion_max_seq_length": config.motion_max_seq_length,
        "use_motion_mid_block": config.use_motion_mid_block,
        "conv_in_channels": None,
    }


def motion_adapter_state(config: UNetMotionConfig, params, layout: str = "diffusers") -> dict[str, np.ndarray]:
    """The motion modules of unet_motion `params` as a PyTorch state dict (float32; float16 kept) under
    diffusers' MotionAdapter keys, or the original AnimateDiff ones (`original_key`, each frame table written
    for both attentions as AnimateDiff's released checkpoints hold it)."""
    if layout not in ("diffusers", "original"):
        raise ValueError(f"layout must be 'diffusers' or 'original', got {layout!r}")
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(jax.device_get(params))))
    check_table(unet_motion_rules(config), flat, KIND_NAME)
    rules = _motion_rules(config)
    motion = traverse_util.unflatten_dict({r.flax: flat[r.flax] for r in rules})
    state = flax_to_torch(motion, rules, KIND_NAME)
    state = {k: np.asarray(v, dtype=np.float32) if v.dtype != np.float16 else v for k, v in state.items()}
    if layout == "diffusers":
        return state
    out = {original_key(k): v for k, v in state.items()}
    for k in [k for k in out if k.endswith(FIRST_TABLE)]:
        out[k[: -len(FIRST_TABLE)] + SECOND_TABLE] = out[k]
    return out


def motion_adapter_to_torch(config: UNetMotionConfig, params, dst: str | os.PathLike, layout: str = "diffusers",
                            overwrite: bool = False):
    """Write the motion modules of unet_motion `params` (of `config`) alone.

    layout="diffusers": DST a MotionAdapter folder (config.json + diffusion_pytorch_model.safetensors) that
      `diffusers.MotionAdapter.from_pretrained(DST)` loads with no missing or unexpected key; assembled beside DST
      and swapped into place; a non-empty DST is refused unless `overwrite`.
    layout="original": DST one `.safetensors` file with the original AnimateDiff keys (AnimateDiff's loaders and
      diffusers' `MotionAdapter.from_single_file` read them); an existing file is refused unless `overwrite`.
    Returns DST.
    """
    adapter_config = motion_adapter_config(config) if layout == "diffusers" else None
    state = motion_adapter_state(config, params, layout)
    out = as_path(dst)
    if layout == "original":
        if out.suffix != ".safetensors":
            raise ValueError(f"{out}: the original layout is written as one .safetensors file (name it *.safetensors)")
        if out.exists() and (out.is_dir() or not overwrite):
            raise FileExistsError(f"{out} exists; choose another destination"
                                  + ("" if out.is_dir() else " or pass overwrite to replace it"))
        safetensors_io.write_state_dict(state, out.parent, out.name.removesuffix(".safetensors"))
        return out
    check_destination(out, overwrite)
    with atomic_dir(out) as tmp:
        safetensors_io.write_state_dict(state, tmp, FORMAT.weights_stem)
        safetensors_io.atomic_write_bytes(tmp / "config.json", json.dumps(adapter_config, indent=2).encode())
    return out


__all__ = [
    "MotionAdapterWeights",
    "adapter_to_flax",
    "apply_motion_adapter",
    "infer_adapter_config",
    "load_motion_adapter",
    "motion_adapter_config",
    "motion_adapter_state",
    "motion_adapter_to_torch",
    "motion_config_from_unet2d",
    "motion_module_rules",
    "original_key",
    "read_motion_adapter",
    "unet_motion_rules",
]
