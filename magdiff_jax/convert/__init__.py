"""PyTorch (diffusers / transformers) <-> Flax converters for the registered models that have a PyTorch counterpart.

    module, params = load_torch("unet2d", "path/to/unet")      # a diffusers/transformers model folder
    save_torch("unet2d", module, params, "out/unet")             # loads with UNet2DConditionModel.from_pretrained
    pipe = load_pipeline_torch("path/to/stable-diffusion")      # a whole diffusers pipeline folder
    vgg.vgg16_from_torch("vgg16-397923af.pth"), vgg.lpips_from_torch(...)   # single files (torchvision, lpips)
    c3d.c3d_from_tgan2(weights_npz, mean_npz), dino.dino_from_torch("dino_deitsmall16_pretrain.pth")  # IS, DINO
"""

from magdiff_jax.convert.core import Rule, TorchFormat, load_torch, save_torch, torch_format, torch_formats
from magdiff_jax.convert.safetensors_io import CheckpointFormatError
from magdiff_jax.utils.errors import ConversionError

__all__ = [
    "CheckpointFormatError",
    "ConversionError",
    "Rule",
    "TorchFormat",
    "load_pipeline_torch",
    "load_torch",
    "save_torch",
    "torch_format",
    "torch_formats",
]


def __getattr__(name):
    if name == "load_pipeline_torch":
        from magdiff_jax.convert.pipeline import load_pipeline_torch

        return load_pipeline_torch
    raise AttributeError(name)
