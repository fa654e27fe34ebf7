"""Guidance helpers: exact formulas (numpy references) and diffusers' `rescale_noise_cfg`."""

import jax
import numpy as np
import pytest
import torch
from diffusers.guiders.guider_utils import rescale_noise_cfg

from magdiff_jax.diffusion import classifier_free_guidance, image_text_guidance, rescale_guidance

SHAPE = (3, 4, 6, 6, 4)  # (B, F, H, W, C) video latents


def outputs(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


def test_classifier_free_guidance():
    """uncond + s * (cond - uncond), with a scalar and with per-sample (B, 1, 1, 1, 1) scales."""
    uncond, cond = outputs(2)
    np.testing.assert_allclose(
        np.asarray(classifier_free_guidance(uncond, cond, 7.5)), uncond + 7.5 * (cond - uncond), atol=1e-6
    )
    scale = np.array([1.0, 0.0, 3.0], np.float32).reshape(3, 1, 1, 1, 1)
    guided = np.asarray(jax.jit(classifier_free_guidance)(uncond, cond, scale))
    np.testing.assert_allclose(guided[0], cond[0], atol=1e-6)
    np.testing.assert_allclose(guided[1], uncond[1], atol=1e-6)
    np.testing.assert_allclose(guided[2], 3 * cond[2] - 2 * uncond[2], atol=1e-5)


def test_image_text_guidance_instruct_pix2pix():
    """e(0,0) + s_I (e(c_I,0) - e(0,0)) + s_T (e(c_I,c_T) - e(c_I,0)), defaults s_I = 1.5, s_T = 7.5; written
    here as diffusers' StableDiffusionInstructPix2PixPipeline combines its three chunks."""
    uncond, image, full = outputs(3, seed=1)
    expected = uncond + 7.5 * (full - image) + 1.5 * (image - uncond)
    np.testing.assert_allclose(np.asarray(image_text_guidance(uncond, image, full)), expected, atol=1e-5)
    expected = uncond + 4.0 * (full - image) + 1.2 * (image - uncond)
    got = jax.jit(image_text_guidance)(uncond, image, full, image_scale=1.2, text_scale=4.0)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    # With s_I = 1 the image term cancels: plain classifier-free guidance on the image-conditioned output.
    np.testing.assert_allclose(
        np.asarray(image_text_guidance(uncond, image, full, image_scale=1.0, text_scale=5.0)),
        np.asarray(classifier_free_guidance(image, full, 5.0)),
        atol=1e-5,
    )


@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7, 1.0])
def test_rescale_guidance_matches_diffusers(guidance_rescale):
    """vs diffusers `rescale_noise_cfg` (std over all non-batch axes): 1e-6 absolute + 1e-6 relative
    (the std reductions sum in different orders; the guided outputs reach |x| ~ 15)."""
    uncond, cond = outputs(2, seed=2)
    cond = cond * np.array([0.5, 1.0, 2.0], np.float32).reshape(3, 1, 1, 1, 1)  # per-sample scales differ
    cfg = np.asarray(classifier_free_guidance(uncond, cond, 7.5))
    ours = np.asarray(jax.jit(rescale_guidance)(cfg, cond, guidance_rescale))
    ref = rescale_noise_cfg(torch.from_numpy(cfg), torch.from_numpy(cond), guidance_rescale).numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=1e-6)
    if guidance_rescale == 1.0:  # fully rescaled: each sample has the conditional output's std
        np.testing.assert_allclose(ours.std(axis=(1, 2, 3, 4)), cond.std(axis=(1, 2, 3, 4)), rtol=1e-5)
    if guidance_rescale == 0.0:
        np.testing.assert_allclose(ours, cfg, atol=1e-6)
