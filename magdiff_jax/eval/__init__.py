"""Evaluation metrics and their feature networks.

    from magdiff_jax.eval import psnr, ssim, lpips_distance
    psnr(x, y), ssim(x, y)                       # (B,) per image; x, y (B, H, W, C) in [-1, 1] (data_range=2)
    lpips_distance(module, params, x, y)         # (B,); module, params from magdiff_jax.convert.vgg.lpips_from_torch
    inception_score(c3d_probs, num_splits=10)    # (mean, std); StyleGAN-V's isv2048_ucf protocol by default
    clipsim(clip, videos, ids), clip_i(...), dino_score(...), text_alignment(...), frame_consistency(...)  # (B,)
    compute_fvd(real, fake, I3DFeatures.from_torch("i3d_pretrained_400.pt"), "fvd2048_16f").fvd   # fvd.py, frechet.py

image.py: PSNR and SSIM (scikit-image's Wang et al. settings). lpips.py: LPIPS on VGG16 features. inception_score.py:
the (video) Inception Score. clip_scores.py: CLIPSIM, CLIP-I, DINO and MagDiff's DAVIS scores. frechet.py and fvd.py:
the Frechet distance and FVD under named protocols. videos.py, runner.py and report.py: folders of videos scored
streaming with on-disk caches, and the report `magdiff-jax eval` writes. Nothing here imports PyTorch.
"""

from magdiff_jax.eval.clip_scores import (
    CLIPEmbedder,
    DINOEmbedder,
    clip_i,
    clipsim,
    dino_score,
    frame_consistency,
    text_alignment,
)
from magdiff_jax.eval.frechet import FeatureStats, frechet_distance
from magdiff_jax.eval.fvd import PROTOCOLS, FVDProtocol, I3DFeatures, compute_fvd, fvd_from_stats
from magdiff_jax.eval.image import mse, psnr, ssim, ssim_map
from magdiff_jax.eval.inception_score import InceptionScore, inception_score
from magdiff_jax.eval.lpips import LPIPS, LPIPSConfig, lpips_distance

__all__ = [
    "LPIPS",
    "PROTOCOLS",
    "CLIPEmbedder",
    "DINOEmbedder",
    "FVDProtocol",
    "FeatureStats",
    "I3DFeatures",
    "InceptionScore",
    "LPIPSConfig",
    "clip_i",
    "clipsim",
    "compute_fvd",
    "dino_score",
    "frame_consistency",
    "frechet_distance",
    "fvd_from_stats",
    "inception_score",
    "lpips_distance",
    "mse",
    "psnr",
    "ssim",
    "ssim_map",
    "text_alignment",
]
