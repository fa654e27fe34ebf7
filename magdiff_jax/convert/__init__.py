"""PyTorch (diffusers / transformers) <-> Flax converters.

    module, params = load_torch("unet2d", "path/to/unet")      # a diffusers/transformers model folder
    save_torch("unet2d", module, params, "out/unet")             # loads with UNet2DConditionModel.from_pretrained
    pipe = load_pipeline_torch("path/to/stable-diffusion")      # a whole diffusers pipeline folder
"""

from magdiff_jax.convert.core import KINDS, ConversionError, Rule, get_kind, load_torch, save_torch
from magdiff_jax.convert.safetensors_io import CheckpointFormatError

__all__ = [
    "KINDS",
    "CheckpointFormatError",
    "ConversionError",
    "Rule",
    "get_kind",
    "load_pipeline_torch",
    "load_torch",
    "save_torch",
]


def __getattr__(name):
    if name == "load_pipeline_torch":
        from magdiff_jax.convert.pipeline import load_pipeline_torch

        return load_pipeline_torch
    raise AttributeError(name)
