"""Model `magdiff`: `models.magdiff.MagDiffUNet` <-> a PyTorch folder that diffusers plus `magdiff_jax.torch_port` run.

diffusers has no class for the whole model, so its PyTorch form is a folder of several files instead of one
`config.json` + state dict (so no single-folder `TorchFormat` is attached to it; these functions do the work):

    DST/
      unet/                          a diffusers UNet3DConditionModel folder (config.json +
                                     diffusion_pytorch_model.safetensors): every U-Net weight except the entity
                                     attention's; in_channels = latent_channels + entity_channels (conv_in reads
                                     the entity input after the noisy latents)
      ip_adapter.safetensors         IP-Adapter-Plus style flat keys:
                                       image_proj.<key>               diffusers IPAdapterPlusImageProjection
                                       ip_adapter.<i>.to_k_ip.weight  (inner, cross_attention_dim), bias-free
                                       ip_adapter.<i>.to_v_ip.weight
                                       ip_adapter.<i>.text_scale      (1,): one value (a () scalar in Flax)
                                       ip_adapter.<i>.image_scale     (1,)
      entity_pyramid.safetensors     Conv2d layouts: scale_0/1/2, fuse, proj_out .weight (out, in, kh, kw) and
                                     .bias; absent with pyramid "single" (no weights)
      magdiff.json                   {"format": "magdiff_torch", "format_version": 1,
                                      "config": MagDiffConfig.to_dict(),
                                      "resampler": IPAdapterPlusImageProjection's constructor arguments,
                                      "processors": the spatial attn2 processor paths, in order}

`processors` lists, in the order of diffusers' `UNet3DConditionModel.attn_processors`, the keys that end in
`attn2.processor` and belong to a spatial transformer (`attentions.{j}`, never `temp_attentions.{j}` or
`transformer_in`): down blocks, up blocks, then the mid block. The k-th of them has index i = 2k + 1, IP-Adapter's
numbering (which counts every attn1 before its attn2): for the spatial U-Net alone (`UNet3DConfig.to_unet2d()`,
whose attn_processors come in the same order) `image_proj.*` and `ip_adapter.<i>.to_k_ip/to_v_ip.weight` are the
keys of an IP-Adapter-Plus file (in diffusers' resampler layout); `text_scale` and `image_scale` are MagDiff's
additions. The resampler table, the processor order and the indices are `convert.ip_adapter`'s, shared with the
IP-Adapter-Plus files of the MagicVideo U-Net.

    magdiff_to_torch(module, params, "out/magdiff_torch")          # the folder above
    module, params = magdiff_from_torch("out/magdiff_torch")       # back, bit-exact
    model = torch_port.load_magdiff_torch("out/magdiff_torch")     # run it in PyTorch

Every missing, unexpected and mis-shaped key of every file is reported (`ConversionError`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
from etils import epath
from flax import traverse_util

from magdiff_jax.convert import ip_adapter, safetensors_io
from magdiff_jax.convert.core import (
    ConversionError,
    Rule,
    check_table,
    conv,
    flax_to_torch,
    read_config,
    save_torch,
    torch_to_flax,
)
from magdiff_jax.convert.ip_adapter import ip_adapter_index, resampler_rules
from magdiff_jax.convert.ip_adapter import resampler_from_torch as resampler_from_torch  # re-exported
from magdiff_jax.convert.ip_adapter import resampler_to_torch as resampler_to_torch  # re-exported
from magdiff_jax.convert.unet3d import config_to_torch as unet3d_config_to_torch
from magdiff_jax.convert.unet3d import unet3d_rules
from magdiff_jax.models import magdiff
from magdiff_jax.models.registry import ConfigError, get_model
from magdiff_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig
from magdiff_jax.utils.files import as_path, atomic_dir, check_destination, user_path
from magdiff_jax.utils.magdiff_layout import (
    FORMAT,
    FORMAT_VERSION,
    IP_ADAPTER_FILE,
    META_FILE,
    PYRAMID_FILE,
    PYRAMID_LAYERS,
    SCALARS,
    UNET_DIR,
)


def base_unet_config(cfg: magdiff.MagDiffConfig) -> UNet3DConfig:
    """The diffusers UNet3DConditionModel part of the MagDiff U-Net: the same config without entity attention."""
    return dataclasses.replace(cfg.unet, entity_attention=False)


def spatial_attn2(unet_cfg: UNet3DConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(diffusers module path, Flax path) of every spatial transformer's attn2, in the order of diffusers'
    `attn_processors` (down blocks, up blocks, mid block; by block, then layer): `convert.ip_adapter.spatial_attn2`
    of the UNet3DConditionModel table."""
    return ip_adapter.spatial_attn2(unet3d_rules(dataclasses.replace(unet_cfg, entity_attention=False)))


def processor_paths(unet_cfg: UNet3DConfig) -> list[str]:
    """The `attn_processors` keys of the spatial attn2 layers, in order (module docstring)."""
    return [f"{path}.processor" for path, _ in spatial_attn2(unet_cfg)]


def resampler_torch_kwargs(cfg: magdiff.MagDiffConfig) -> dict:
    """diffusers `IPAdapterPlusImageProjection` constructor arguments of the config's resampler."""
    r = cfg.resampler
    return dict(embed_dims=r.embedding_dim, output_dims=r.output_dim, hidden_dims=r.dim, depth=r.depth,
                dim_head=r.dim_head, heads=r.heads, num_queries=r.num_queries, ffn_ratio=r.ff_mult)


def magdiff_rules(cfg: magdiff.MagDiffConfig) -> dict[str, list[Rule]]:
    """The conversion tables of the three weight files ({"unet", "ip_adapter", "entity_pyramid"}: PyTorch key in
    that file <-> path in the MagDiffUNet params); together they cover every parameter exactly once."""
    unet = [Rule(r.torch, ("unet", *r.flax), r.transform) for r in unet3d_rules(base_unet_config(cfg))]
    ip = [Rule(f"image_proj.{r.torch}", ("image_proj", *r.flax), r.transform)
          for r in resampler_rules(cfg.resampler)]
    for k, (_, flax) in enumerate(spatial_attn2(cfg.unet)):
        t, f = f"ip_adapter.{ip_adapter_index(k)}", ("unet", *flax)
        ip += [Rule(f"{t}.to_k_ip.weight", (*f, "to_k_ip", "kernel"), "linear"),
               Rule(f"{t}.to_v_ip.weight", (*f, "to_v_ip", "kernel"), "linear"),
               Rule(f"{t}.text_scale", (*f, "text_scale")), Rule(f"{t}.image_scale", (*f, "image_scale"))]
    pyramid = []
    if cfg.pyramid == "multi":
        for name in PYRAMID_LAYERS:
            pyramid += [Rule(r.torch, ("entity_pyramid", *r.flax), r.transform) for r in conv(name, name)]
    return {"unet": unet, "ip_adapter": ip, "entity_pyramid": pyramid}


def _meta(cfg: magdiff.MagDiffConfig) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
            "resampler": resampler_torch_kwargs(cfg), "processors": processor_paths(cfg.unet)}


def _is_scalar(key: str) -> bool:
    return key.startswith("ip_adapter.") and key.endswith(SCALARS)


def _to_file(key: str, x: np.ndarray) -> np.ndarray:
    x = x if x.dtype == np.float16 else np.asarray(x, np.float32)
    return x.reshape(1) if _is_scalar(key) else x


def _from_file(key: str, x: np.ndarray) -> np.ndarray:
    return x.reshape(()) if _is_scalar(key) and x.shape == (1,) else x


# --- Flax -> PyTorch folder ------------------------------------------------------------------------------------------
def magdiff_to_torch(module: magdiff.MagDiffUNet, params, dst: str | os.PathLike,
                     max_shard_bytes: int | None = None, overwrite: bool = False) -> epath.Path:
    """Write `module`'s params as the folder of the module docstring. It is assembled in a temporary sibling and
    swapped into place; a non-empty DST (an older export included) is refused unless `overwrite`."""
    cfg = module.config
    dst = as_path(dst)
    check_destination(dst, overwrite)
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(jax.device_get(params))))
    tables = magdiff_rules(cfg)
    check_table([r for rules in tables.values() for r in rules], flat, "magdiff")
    part = lambda rules: traverse_util.unflatten_dict({r.flax: flat[r.flax] for r in rules})

    with atomic_dir(dst) as tmp:
        unet_params = part(tables["unet"])["unet"]
        save_torch("unet3d", UNet3DConditionModel(base_unet_config(cfg)), unet_params, tmp / UNET_DIR,
                   max_shard_bytes=max_shard_bytes)
        for name, file in (("ip_adapter", IP_ADAPTER_FILE), ("entity_pyramid", PYRAMID_FILE)):
            if tables[name]:
                state = flax_to_torch(part(tables[name]), tables[name], "magdiff")
                safetensors_io.write_state_dict({k: _to_file(k, v) for k, v in state.items()}, tmp,
                                                file.removesuffix(".safetensors"))
        safetensors_io.atomic_write_bytes(tmp / META_FILE, json.dumps(_meta(cfg), indent=2).encode())
    return dst


# --- PyTorch folder -> Flax ------------------------------------------------------------------------------------------
def read_meta(src: str | os.PathLike) -> dict:
    """magdiff.json of an export, checked for its format and version."""
    path = user_path(src) / META_FILE
    if not path.exists():
        raise safetensors_io.CheckpointFormatError(f"{user_path(src)}: no {META_FILE}; expected a folder written by "
                                                   "`magdiff-jax convert to-torch --kind magdiff`")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise safetensors_io.CheckpointFormatError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise safetensors_io.CheckpointFormatError(f"{path}: not a MagDiff PyTorch export (format != {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise safetensors_io.CheckpointFormatError(f"{path}: format_version {meta.get('format_version')!r} is not "
                                                   f"the supported {FORMAT_VERSION}")
    missing = [k for k in ("config", "resampler", "processors") if k not in meta]
    if missing:
        raise safetensors_io.CheckpointFormatError(f"{path}: missing entries {missing}")
    return meta


def _check_consistent(src: epath.Path, meta: dict, cfg: magdiff.MagDiffConfig) -> None:
    """magdiff.json's resampler and processors, and unet/config.json, must be what the config implies."""
    expected = _meta(cfg)
    problems = [f"{META_FILE} {key}: {meta[key]!r}, the config implies {expected[key]!r}"
                for key in ("resampler", "processors") if meta[key] != expected[key]]
    unet_json = {k: v for k, v in read_config(src / UNET_DIR).items() if not k.startswith("_")}
    want = {k: v for k, v in unet3d_config_to_torch(base_unet_config(cfg)).items() if not k.startswith("_")}
    for key in sorted(set(unet_json) | set(want)):
        if unet_json.get(key, "<absent>") != want.get(key, "<absent>"):
            problems.append(f"{UNET_DIR}/config.json {key}: {unet_json.get(key, '<absent>')!r}, the config in "
                            f"{META_FILE} implies {want.get(key, '<absent>')!r}")
    if problems:
        raise ConversionError(f"[magdiff] {src} is inconsistent:\n  " + "\n  ".join(problems))


def magdiff_from_torch(src: str | os.PathLike, dtype=np.float32) -> tuple[magdiff.MagDiffUNet, dict]:
    """Read a folder written by `magdiff_to_torch` (or by anyone in its layout) -> (module, params), params as
    numpy arrays of `dtype` (a float32 export reads back bit-exactly)."""
    src = as_path(src)
    meta = read_meta(src)
    try:
        cfg = magdiff.MagDiffConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise ConfigError(f"{src / META_FILE}: {e.within('config')}") from e
    _check_consistent(src, meta, cfg)
    module = magdiff.MagDiffUNet(cfg)
    abstract = get_model("magdiff").abstract_params(module)
    tables = magdiff_rules(cfg)
    check_table([r for rules in tables.values() for r in rules], abstract, "magdiff")
    files = {"unet": src / UNET_DIR, "ip_adapter": src / IP_ADAPTER_FILE, "entity_pyramid": src / PYRAMID_FILE}
    flat = {}
    for name, rules in tables.items():
        if not rules:
            if files[name].exists():
                raise ConversionError(f"[magdiff] {files[name]}: unexpected file; pyramid {cfg.pyramid!r} has no "
                                      "weights")
            continue
        state = safetensors_io.read_state_dict(files[name], "diffusion_pytorch_model" if name == "unet" else None)
        state = {k: _from_file(k, v) for k, v in state.items()}
        part = torch_to_flax(state, rules, {r.flax: abstract[r.flax] for r in rules}, "magdiff",
                             source=str(files[name]), dtype=dtype)
        flat.update(traverse_util.flatten_dict(part))
    return module, traverse_util.unflatten_dict(flat)
