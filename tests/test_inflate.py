"""`inflate`: a unet2d's parameters -> a video U-Net with fresh temporal layers at their zero init. The inflated
model on a video equals the unet2d applied frame by frame (<= 1e-5 abs, fp32)."""

import dataclasses

import jax
import numpy as np
import pytest
from helpers import random_params
from remat_configs import spatial_config, tiny_config

from magdiff_jax.convert import ConversionError
from magdiff_jax.models.inflate import inflate, temporal_paths
from magdiff_jax.models.registry import get_model

KINDS = ("unet3d", "unet_motion")


def _unet2d(kind):
    spec, cfg = get_model("unet2d"), spatial_config(kind)
    module = spec.build(cfg)
    return module, random_params(module, *spec.example_inputs(cfg), seed=3)


@pytest.mark.parametrize("kind", KINDS)
def test_inflated_video_model_equals_unet2d_per_frame(kind):
    module_2d, params_2d = _unet2d(kind)
    video = get_model(kind).build(tiny_config(kind))
    params = inflate(params_2d, video, jax.random.key(1))
    temporal = temporal_paths(params_2d, params)
    assert temporal, "a video model has temporal layers"
    rng = np.random.RandomState(0)
    x = rng.randn(2, 5, 8, 8, 4).astype(np.float32)
    t, ctx = np.array([3, 700]), rng.randn(2, 6, 16).astype(np.float32)
    apply = jax.jit(video.apply)
    ours = apply({"params": params}, x, t, ctx)
    frames = x.reshape(10, 8, 8, 4)
    ref = jax.jit(module_2d.apply)({"params": params_2d}, frames, np.repeat(t, 5), np.repeat(ctx, 5, axis=0))
    err = float(np.abs(np.asarray(ours).reshape(10, 8, 8, 4) - np.asarray(ref)).max())
    print(f"inflate {kind}: {len(temporal)} temporal params, max abs diff {err:.2e}")
    assert err <= 1e-5
    # the temporal layers really act on the video: moving their weights off the zero init changes the output
    from flax import traverse_util

    flat = traverse_util.flatten_dict(params)
    moved = traverse_util.unflatten_dict({
        p: (v + 0.1 if "/".join(p) in temporal else v) for p, v in flat.items()})
    changed = apply({"params": moved}, x, t, ctx)
    assert float(np.abs(np.asarray(changed) - np.asarray(ours)).max()) > 1e-2


def test_mismatched_spatial_layout_is_refused():
    _, params_2d = _unet2d("unet_motion")
    wider = get_model("unet_motion").build(dataclasses.replace(tiny_config("unet_motion"), block_out_channels=(16, 48)))
    with pytest.raises(ConversionError, match="mis-shaped"):
        inflate(params_2d, wider)
