"""A MagDiff `init_from` folder from a text-to-image (or text-to-video) checkpoint: what `configs/magdiff.py:base`
starts from.

    magdiff-jax convert magdiff-init --pipeline stable-diffusion-2-1-base --temporal modelscope-t2v/unet \\
        --image-encoder IP-Adapter/models/image_encoder --out out/magdiff_init

    DST/
      unet/                kind magdiff: the base U-Net as a unet3d (a UNet2D is inflated: its spatial weights kept,
                           temporal layers copied from --temporal when given, else fresh at their zero init), then
                           `magdiff_params_from_unet3d`: conv_in widened with zero input channels, every spatial
                           attn2 given to_k_ip/to_v_ip (copies of to_k/to_v) and text_scale 1.0 / image_scale 1.5,
                           the resampler (embedding width = the image encoder's hidden size) and pyramid fresh
      vae/ text_encoder/ image_encoder/     Flax folders (`magdiff-jax convert to-flax`), converted or copied
      tokenizer/ scheduler/                 copied from the pipeline when it has them
      magdiff_init.json                     the sources, the seed, and which U-Net parameters started fresh

Every source may be a PyTorch folder (diffusers/transformers: config.json + safetensors) or a Flax folder written by
`magdiff-jax convert to-flax`; its kind is read from its config. `--pipeline` names a whole pipeline folder (either
form) whose `unet`, `vae` and `text_encoder` subfolders are used unless given one by one. Everything is checked
before anything is computed (missing folders, wrong kinds, a text encoder whose width is not the U-Net's
cross-attention width, temporal layers of another layout), and DST is written whole or not at all
(`utils.files.atomic_dir`: a local rename, or in an object store a completion marker written last). Sources and DST
may be local or in an object store (gs://...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
from etils import epath

from magdiff_jax.convert.core import ConversionError, load_torch, read_config, torch_config
from magdiff_jax.convert.pipeline import CLASS_TO_KIND
from magdiff_jax.export.model import FORMAT, load_model, read_model_config, save_model
from magdiff_jax.utils.files import as_path, atomic_dir, check_destination, copy_tree, user_path

INIT_META = "magdiff_init.json"
COMPONENTS = ("unet", "vae", "text_encoder", "image_encoder")
ACCEPTED = {"unet": ("unet2d", "unet3d"), "temporal": ("unet3d",), "vae": ("vae",), "text_encoder": ("clip_text",),
            "image_encoder": ("clip_vision",)}
TORCH_CLASS_TO_KIND = {**CLASS_TO_KIND, "UNet3DConditionModel": "unet3d"}


def source_kind(folder: str | os.PathLike) -> tuple[str, str]:
    """(kind, "flax" | "torch") of a model folder, from its config.json alone (nothing loaded)."""
    folder = user_path(folder)
    d = read_config(folder)  # a missing folder or config.json is reported with its path
    if d.get("format") == FORMAT and "kind" in d:
        return d["kind"], "flax"
    names = [d.get("_class_name"), *(d.get("architectures") or [])]
    for name in names:
        if name in TORCH_CLASS_TO_KIND:
            return TORCH_CLASS_TO_KIND[name], "torch"
    raise ConversionError(f"{folder}/config.json: neither a magdiff_jax Flax folder nor a known PyTorch model "
                          f"(class {[n for n in names if n]}; known: {sorted(TORCH_CLASS_TO_KIND)})")


def _model_config(folder: epath.Path, kind: str, form: str):
    """The config dataclass of a model folder, without loading its weights (errors name its config.json)."""
    if form == "flax":
        return read_model_config(folder, kind)[1]
    return torch_config(kind, folder)


def _load(folder: epath.Path, kind: str, form: str):
    """-> (module, params) of a model folder of either form."""
    if form == "flax":
        _, module, params = load_model(folder, kind=kind)
        return module, params
    return load_torch(kind, folder)


def _layout(cfg):
    """A unet3d config without the fields that do not change its parameters."""
    return dataclasses.replace(cfg, sample_size=None, attention_impl="xla", dtype="float32", remat_policy="none",
                               remat_save_names=())


def _resolve(pipeline, **given) -> dict[str, epath.Path]:
    """Each component's folder: given one by one, else the pipeline's subfolder."""
    out = {}
    for name in (*COMPONENTS, "temporal"):
        if given.get(name):
            out[name] = as_path(given[name])
        elif pipeline is not None and name in COMPONENTS[:3]:
            out[name] = as_path(pipeline) / name
    missing = [n for n in COMPONENTS if n not in out]
    if missing:
        raise ValueError(f"magdiff-init: no source for {missing} (pass --{missing[0].replace('_', '-')} or a "
                         "--pipeline folder that has it)")
    return out


def build_magdiff_init(dst: str | os.PathLike, *, pipeline: str | os.PathLike | None = None, unet=None,
                       temporal=None, vae=None, text_encoder=None, image_encoder=None, resampler: dict | None = None,
                       pyramid: str = "multi", pyramid_channels: int = 64, seed: int = 0,
                       overwrite: bool = False) -> epath.Path:
    """Write the MagDiff init folder described in the module docstring; returns DST."""
    from magdiff_jax.layers.resampler import ResamplerConfig
    from magdiff_jax.models.inflate import inflate, temporal_paths
    from magdiff_jax.models.magdiff import MagDiffConfig, MagDiffUNet, magdiff_params_from_unet3d
    from magdiff_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig

    dst = as_path(dst)
    check_destination(dst, overwrite)
    folders = _resolve(pipeline, unet=unet, temporal=temporal, vae=vae, text_encoder=text_encoder,
                       image_encoder=image_encoder)
    kinds, configs = {}, {}
    for name, folder in folders.items():  # every folder's kind and config first: nothing heavy runs before
        if not folder.is_dir():
            raise FileNotFoundError(f"magdiff-init: the {name} source {folder} is not a folder")
        kind, form = source_kind(folder)
        if kind not in ACCEPTED[name]:
            raise ConversionError(f"magdiff-init: {name} source {folder} holds a {kind!r} model; expected "
                                  f"{' or '.join(ACCEPTED[name])}")
        kinds[name], configs[name] = (kind, form), _model_config(folder, kind, form)
    unet_cfg = configs["unet"]
    video_cfg = UNet3DConfig.from_unet2d(unet_cfg) if kinds["unet"][0] == "unet2d" else unet_cfg
    if "temporal" in folders:
        if kinds["unet"][0] != "unet2d":
            raise ValueError("magdiff-init: --temporal adds temporal layers to a UNet2D; the unet source "
                             f"{folders['unet']} is already a unet3d")
        if _layout(configs["temporal"]) != _layout(video_cfg):  # before any weight is read
            raise ConversionError(f"magdiff-init: the temporal source {folders['temporal']} does not fit the "
                                  f"inflated U-Net:\n  temporal: {configs['temporal']}\n  inflated: {video_cfg}")
    width = configs["text_encoder"].hidden_size
    if width != video_cfg.cross_attention_dim:
        raise ConversionError(f"magdiff-init: the text encoder {folders['text_encoder']} is {width} wide but the "
                              f"U-Net's cross-attention reads {video_cfg.cross_attention_dim}")
    res = ResamplerConfig(**{"embedding_dim": configs["image_encoder"].hidden_size,
                             "output_dim": video_cfg.cross_attention_dim, **(resampler or {})})
    cfg = MagDiffConfig(unet=video_cfg, resampler=res, pyramid=pyramid, pyramid_channels=pyramid_channels)

    key_inflate, key_new = jax.random.split(jax.random.key(seed))
    _, base = _load(folders["unet"], *kinds["unet"])
    fresh = []
    if kinds["unet"][0] == "unet2d":
        donor = _load(folders["temporal"], *kinds["temporal"])[1] if "temporal" in folders else None
        video_params = inflate(base, UNet3DConditionModel(video_cfg), key_inflate, temporal_from=donor)
        if donor is None:
            fresh = temporal_paths(base, video_params)
        base, donor = video_params, None
    params = magdiff_params_from_unet3d(base, MagDiffUNet(cfg), key_new)
    del base
    new = ("image_proj", "entity_pyramid")
    fresh = [*fresh, *(f"{n}/..." for n in new if n in params), "unet/.../attn2/{to_k_ip,to_v_ip} (copies of to_k, "
             "to_v)", "unet/conv_in/kernel (new input channels: zeros)"]

    with atomic_dir(dst) as tmp:
        save_model("magdiff", MagDiffUNet(cfg), params, tmp / "unet")
        del params
        for name in COMPONENTS[1:]:
            kind, form = kinds[name]
            if form == "flax":
                copy_tree(folders[name], tmp / name)
            else:
                module, p = load_torch(kind, folders[name])
                save_model(kind, module, p, tmp / name)
        for extra in ("tokenizer", "scheduler"):
            if pipeline is not None and (as_path(pipeline) / extra).is_dir():
                copy_tree(as_path(pipeline) / extra, tmp / extra)
        meta = {"sources": {k: str(v) for k, v in folders.items()}, "pipeline": str(pipeline or ""),
                "seed": seed, "fresh": fresh, "config": cfg.to_dict()}
        (tmp / INIT_META).write_text(json.dumps(meta, indent=1))
    logging.info("magdiff-init: wrote %s (U-Net from %s%s)", dst, folders["unet"],
                 f" + temporal layers from {folders['temporal']}" if "temporal" in folders else "")
    return dst

