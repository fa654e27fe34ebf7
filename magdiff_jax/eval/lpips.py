"""LPIPS (Zhang et al. 2018), the learned perceptual distance on VGG16 features: a metric and a training loss.

    module, params = lpips_from_torch("vgg16-397923af.pth", "lpips/weights/v0.1/vgg.pth")   # magdiff_jax.convert.vgg
    d = lpips_distance(module, params, x, y)       # x, y (..., H, W, 3) in [-1, 1] -> (...,) float32

The network (`LPIPS`, `LPIPSConfig`, registered as model kind `lpips`) lives with its VGG16 trunk in
`magdiff_jax.models.vgg`, where the registry finds it; this module is the evaluation entry point. As a training
loss (the VFI stage's perceptual term) the parameters are constants: differentiate with respect to the images, e.g.
`jax.grad(lambda x: lpips_distance(module, params, x, y).mean())`; the gradient is finite everywhere, including where
a tap's features vanish (`unit_normalise`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magdiff_jax.models.vgg import LPIPS, LPIPSConfig, VGG16Config, scale_inputs, unit_normalise

__all__ = ["LPIPS", "LPIPSConfig", "VGG16Config", "lpips_distance", "scale_inputs", "unit_normalise"]


def lpips_distance(module: LPIPS, params, x, y) -> jax.Array:
    """The LPIPS distance of each pair of images: x, y (..., H, W, 3) in [-1, 1] -> (...,) float32 (leading axes
    are flattened into one batch and restored, so a video batch (B, F, H, W, 3) gives (B, F)). `params` is the
    `LPIPS` module's parameter tree (`{"vgg": ..., "lin0": ...}`), not wrapped in {"params": ...}."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.shape != y.shape:
        raise ValueError(f"lpips_distance: the images differ in shape, {x.shape} and {y.shape}")
    if x.ndim < 4 or x.shape[-1] != 3:
        raise ValueError(f"lpips_distance: expected RGB images (..., H, W, 3), got shape {x.shape}")
    lead = x.shape[:-3]
    flat = lambda z: z.reshape(-1, *z.shape[-3:])
    return module.apply({"params": params}, flat(x), flat(y)).reshape(lead)
