"""Guidance: combining conditional and unconditional model outputs at sampling time.

All helpers act on model outputs of any prediction type and any rank (B, ...); scales may be Python floats or
arrays broadcastable against the outputs (e.g. (B, 1, 1, 1) per-sample scales).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def classifier_free_guidance(uncond: jax.Array, cond: jax.Array, scale: float | jax.Array) -> jax.Array:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def image_text_guidance(
    uncond: jax.Array,
    image_cond: jax.Array,
    full_cond: jax.Array,
    image_scale: float | jax.Array = 1.5,
    text_scale: float | jax.Array = 7.5,
) -> jax.Array:
    """Two-scale guidance of InstructPix2Pix (Brooks et al. 2023, eq. 3).

    With uncond = e(z, 0, 0), image_cond = e(z, c_I, 0) and full_cond = e(z, c_I, c_T):
    uncond + image_scale * (image_cond - uncond) + text_scale * (full_cond - image_cond).
    """
    return uncond + image_scale * (image_cond - uncond) + text_scale * (full_cond - image_cond)


def rescale_guidance(cfg: jax.Array, cond: jax.Array, guidance_rescale: float | jax.Array) -> jax.Array:
    """Guidance rescale (Lin et al. 2023, sec. 3.4): match the per-sample std of the guided output to that of
    the conditional output, then blend: phi * cfg * std(cond) / std(cfg) + (1 - phi) * cfg.

    The std is taken over all non-batch axes (unbiased, as diffusers' `rescale_noise_cfg`).
    """
    axes = tuple(range(1, cfg.ndim))
    std_cond = jnp.std(cond, axis=axes, keepdims=True, ddof=1)
    std_cfg = jnp.std(cfg, axis=axes, keepdims=True, ddof=1)
    rescaled = cfg * (std_cond / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * cfg
