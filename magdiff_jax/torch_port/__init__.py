"""PyTorch modules for the parts of our models that diffusers lacks, so that exports run in PyTorch.

Importing this package imports torch (and diffusers when a model is loaded); nothing outside it imports it at
module level, so the core install (no torch) never needs it.

    from magdiff_jax.torch_port import load_magdiff_torch
    model = load_magdiff_torch("out/magdiff_torch")   # a `magdiff-jax convert to-torch --kind magdiff` folder
"""

from magdiff_jax.torch_port.magdiff import (
    EntityPyramidTorch,
    MagDiffAttnProcessor,
    MagDiffUNetTorch,
    load_magdiff_torch,
)

__all__ = ["EntityPyramidTorch", "MagDiffAttnProcessor", "MagDiffUNetTorch", "load_magdiff_torch"]
