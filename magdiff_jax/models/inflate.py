"""Inflate a 2D U-Net into a video U-Net: spatial weights copied, temporal layers fresh at their zero init.

    video_params = inflate(unet2d_params, UNetMotionModel(UNetMotionConfig(...)), key)

The video U-Nets name their spatial layers exactly as `unet2d` does, and zero-initialise the output of every
temporal layer (the last temporal conv, the temporal transformers' `proj_out`), so the inflated model applied
to a video equals the 2D model applied frame by frame until training moves the temporal weights.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from flax import traverse_util

from magdiff_jax.convert.core import KINDS, ConversionError, get_kind


def _kind_of(module: nn.Module):
    get_kind("unet2d")  # registers every kind
    for spec in KINDS.values():
        if isinstance(module.config, spec.config_cls):
            return spec
    raise TypeError(f"no registered model kind uses config {type(module.config).__name__}")


def inflate(params_2d, video_module: nn.Module, key: jax.Array | None = None):
    """unet2d params -> params of `video_module` (a unet3d or unet_motion); every 2D parameter must exist in the
    video model with the same shape, and every video parameter the 2D tree lacks is temporal (fresh)."""
    spec = _kind_of(video_module)
    cfg = video_module.config
    key = jax.random.key(0) if key is None else key
    args, kwargs = spec.example_inputs(cfg), spec.example_kwargs(cfg)
    flat_new = spec.abstract_params(video_module)  # shapes first: fail before compiling init
    flat_2d = traverse_util.flatten_dict(nn.meta.unbox(dict(params_2d)))
    missing = sorted("/".join(p) for p in flat_2d if p not in flat_new)
    misshaped = sorted(f"{'/'.join(p)}: 2D {tuple(v.shape)} vs video {tuple(flat_new[p].shape)}"
                       for p, v in flat_2d.items() if p in flat_new and tuple(v.shape) != tuple(flat_new[p].shape))
    if missing or misshaped:
        raise ConversionError(
            f"cannot inflate into {type(video_module).__name__}: the 2D parameters do not match its spatial layers"
            + (f"\n  not in the video model ({len(missing)}): {missing[:20]}" if missing else "")
            + (f"\n  mis-shaped ({len(misshaped)}): {misshaped[:20]}" if misshaped else "")
        )
    fresh = nn.meta.unbox(jax.jit(video_module.init)(key, *args, **kwargs)["params"])
    flat_new = traverse_util.flatten_dict(fresh)
    flat_new.update({p: jax.numpy.asarray(v, flat_new[p].dtype) for p, v in flat_2d.items()})
    return traverse_util.unflatten_dict(flat_new)


def temporal_paths(params_2d, video_params) -> list[str]:
    """The parameter paths the video model has and the 2D model lacks (its temporal layers)."""
    flat_2d = traverse_util.flatten_dict(nn.meta.unbox(dict(params_2d)))
    return sorted("/".join(p) for p in traverse_util.flatten_dict(video_params) if p not in flat_2d)
