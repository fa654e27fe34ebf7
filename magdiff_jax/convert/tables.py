"""Imports every module that registers a model kind (each holds that kind's explicit mapping table)."""

from magdiff_jax.convert import clip, magdiff, unet2d, unet3d, unet_motion, vae  # noqa: F401
