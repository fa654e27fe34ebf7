"""Evaluation metrics and their feature networks.

    from magdiff_jax.eval import psnr, ssim, lpips_distance
    psnr(x, y), ssim(x, y)                       # (B,) per image; x, y (B, H, W, C) in [-1, 1] (data_range=2)
    lpips_distance(module, params, x, y)         # (B,); module, params from magdiff_jax.convert.vgg.lpips_from_torch

    compute_fvd(real, fake, I3DFeatures.from_torch("i3d_pretrained_400.pt"), "fvd2048_16f").fvd   # fvd.py, frechet.py

image.py: PSNR and SSIM (scikit-image's Wang et al. settings). lpips.py: LPIPS on VGG16 features. Pure jnp, jit-able;
nothing here imports PyTorch.
"""

from magdiff_jax.eval.frechet import FeatureStats, frechet_distance
from magdiff_jax.eval.fvd import PROTOCOLS, FVDProtocol, I3DFeatures, compute_fvd, fvd_from_stats
from magdiff_jax.eval.image import mse, psnr, ssim, ssim_map
from magdiff_jax.eval.lpips import LPIPS, LPIPSConfig, lpips_distance

__all__ = ["LPIPS", "LPIPSConfig", "lpips_distance", "mse", "psnr", "ssim", "ssim_map"]
__all__ += ["PROTOCOLS", "FVDProtocol", "FeatureStats", "I3DFeatures", "compute_fvd", "frechet_distance",
            "fvd_from_stats"]
