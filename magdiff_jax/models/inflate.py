"""Inflate a 2D U-Net into a video U-Net: spatial weights copied, temporal layers fresh at their zero init.

    video_params = inflate(unet2d_params, UNetMotionModel(UNetMotionConfig(...)), key)

The video U-Nets name their spatial layers exactly as `unet2d` does, and zero-initialise the output of every
temporal layer (the last temporal conv, the temporal transformers' `proj_out`), so the inflated model applied
to a video equals the 2D model applied frame by frame until training moves the temporal weights.

`add_image_projections` extends a U-Net's params with decoupled image cross-attention (IP-Adapter's recipe: every
`to_k_ip`/`to_v_ip` starts as a copy of its layer's `to_k`/`to_v`); `models.magdiff.add_entity_attention` and
`models.unet_motion.add_image_attention` use it.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from magdiff_jax.models.registry import spec_of
from magdiff_jax.utils.errors import ConversionError, mismatch_message
from magdiff_jax.utils.prng import init_key


def inflate(params_2d, video_module: nn.Module, key: jax.Array | None = None, temporal_from=None):
    """unet2d params -> params of `video_module` (a unet3d or unet_motion); every 2D parameter must exist in the
    video model with the same shape, and every video parameter the 2D tree lacks is temporal: fresh from `key`, or,
    with `temporal_from` (the params of a video model of this layout, e.g. ModelScope's), copied from there (its
    spatial weights are ignored; nothing is initialised)."""
    spec = spec_of(video_module)
    cfg = video_module.config
    key = jax.random.key(0) if key is None else key
    args, kwargs = spec.example_inputs(cfg), spec.example_kwargs(cfg)
    flat_new = spec.abstract_params(video_module)  # shapes first: fail before compiling init
    flat_2d = traverse_util.flatten_dict(nn.meta.unbox(dict(params_2d)))
    missing = sorted("/".join(p) for p in flat_2d if p not in flat_new)
    misshaped = sorted(f"{'/'.join(p)}: 2D {tuple(v.shape)} vs video {tuple(flat_new[p].shape)}"
                       for p, v in flat_2d.items() if p in flat_new and tuple(v.shape) != tuple(flat_new[p].shape))
    if missing or misshaped:
        raise ConversionError(mismatch_message(
            f"cannot inflate into {type(video_module).__name__}: the 2D parameters do not match its spatial layers",
            unexpected=missing, misshaped=misshaped))
    dtypes = {p: a.dtype for p, a in flat_new.items()}
    if temporal_from is not None:
        donor = traverse_util.flatten_dict(nn.meta.unbox(dict(temporal_from)))
        wanted = [p for p in flat_new if p not in flat_2d]
        bad = sorted(f"{'/'.join(p)}: {tuple(donor[p].shape) if p in donor else 'absent'}, expected "
                     f"{tuple(flat_new[p].shape)}" for p in wanted if p not in donor
                     or tuple(donor[p].shape) != tuple(flat_new[p].shape))
        if bad:
            raise ConversionError(mismatch_message(
                f"the temporal layers given do not fit {type(video_module).__name__}", misshaped=bad))
        out = {p: jax.numpy.asarray(donor[p], dtypes[p]) for p in wanted}
        out.update({p: jax.numpy.asarray(v, dtypes[p]) for p, v in flat_2d.items()})
        return traverse_util.unflatten_dict(out)

    def temporal_init(k):  # the spatial initialisers are dead code here: XLA drops them (and their memory)
        flat = traverse_util.flatten_dict(nn.meta.unbox(video_module.init(init_key(k), *args, **kwargs)["params"]))
        return {"/".join(p): v for p, v in flat.items() if p not in flat_2d}

    fresh = jax.jit(temporal_init)(key)
    flat_new = {tuple(p.split("/")): v for p, v in fresh.items()}
    flat_new.update({p: jax.numpy.asarray(v, dtypes[p]) for p, v in flat_2d.items()})
    return traverse_util.unflatten_dict(flat_new)


def temporal_paths(params_2d, video_params) -> list[str]:
    """The parameter paths the video model has and the 2D model lacks (its temporal layers)."""
    flat_2d = traverse_util.flatten_dict(nn.meta.unbox(dict(params_2d)))
    return sorted("/".join(p) for p in traverse_util.flatten_dict(video_params) if p not in flat_2d)


# the image-branch projections of `layers.attention.EntityAttention` and the text projections they start from
IMAGE_PROJECTION_SOURCES = {"to_k_ip": "to_k", "to_v_ip": "to_v"}


def add_image_projections(unet_params, abstract: Mapping, what: str, fill: Mapping[str, float] | None = None) -> dict:
    """A U-Net's params without decoupled image attention -> the params whose flat shapes are `abstract` ({path:
    ShapeDtypeStruct} of the same U-Net with it): every `.../to_k_ip/kernel`, `.../to_v_ip/kernel` there is a copy of
    the same layer's `.../to_k/kernel`, `.../to_v/kernel` (IP-Adapter's initialisation); a new leaf named in `fill`
    ({leaf name: value}, e.g. MagDiff's learnable `text_scale`/`image_scale`) is that constant; every other parameter
    must already be in `unet_params` with its shape. All mismatches are reported at once (`ConversionError`, headed by
    `what`)."""
    fill = dict(fill or {})
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(unet_params)))
    out, missing = {}, []
    for path, leaf in abstract.items():
        if path in flat:
            out[path] = flat[path]
        elif len(path) >= 2 and path[-2] in IMAGE_PROJECTION_SOURCES:
            source = (*path[:-2], IMAGE_PROJECTION_SOURCES[path[-2]], path[-1])
            if source in flat:
                out[path] = jnp.array(flat[source], copy=True)
            else:
                missing.append(f"{'/'.join(source)} (the source of {'/'.join(path)})")
        elif path[-1] in fill:
            out[path] = jnp.full(leaf.shape, fill[path[-1]], leaf.dtype)
        else:
            missing.append("/".join(path))
    unexpected = sorted("/".join(p) for p in flat if p not in abstract)
    misshaped = sorted(f"{'/'.join(p)}: {tuple(np.shape(v))}, expected {tuple(abstract[p].shape)}"
                       for p, v in out.items() if tuple(np.shape(v)) != tuple(abstract[p].shape))
    if missing or unexpected or misshaped:
        raise ConversionError(mismatch_message(what, sorted(missing), unexpected, misshaped))
    return traverse_util.unflatten_dict(out)
