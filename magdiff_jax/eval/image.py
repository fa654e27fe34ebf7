"""Full-reference image quality: PSNR and SSIM, per image, pure jnp (batched, jit- and vmap-able).

    psnr(x, y)                  # (...,): x, y (..., H, W, C) in [-1, 1] (data_range 2)
    ssim(x, y, data_range=1.0)  # (...,): images in [0, 1]

Every leading axis is a batch axis: (B, H, W, C) gives (B,), a video batch (B, F, H, W, C) gives (B, F). Integer
and low-precision inputs are computed in float32 (float64 stays float64).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# SSIM as Wang et al. (2004): an 11x11 Gaussian window of sigma 1.5 (radius int(3.5 * 1.5 + 0.5) = 5, as
# scipy.ndimage truncates it at 3.5 sigma), K1 = 0.01, K2 = 0.03, population (co)variances
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _float(x) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check(x, y, what: str, min_size: int = 1) -> None:
    if x.shape != y.shape:
        raise ValueError(f"{what}: the images differ in shape, {x.shape} and {y.shape}")
    if x.ndim < 3:
        raise ValueError(f"{what}: expected images (..., H, W, C), got shape {x.shape}")
    if min(x.shape[-3:-1]) < min_size:
        raise ValueError(f"{what}: images of {x.shape[-3]}x{x.shape[-2]} pixels are smaller than its "
                         f"{min_size}x{min_size} window")


def mse(x, y) -> jax.Array:
    """Mean squared error per image over (H, W, C): (..., H, W, C) -> (...)."""
    _check(x, y, "mse")
    x, y = _float(x), _float(y)
    return jnp.mean(jnp.square(x - y), axis=(-3, -2, -1))


def psnr(x, y, data_range: float = 2.0) -> jax.Array:
    """Peak signal-to-noise ratio per image, 10 log10(data_range^2 / MSE) in dB: (..., H, W, C) -> (...). Identical
    images give +inf. `data_range` is max - min of the value range (2 for [-1, 1], 1 for [0, 1], 255 for uint8),
    as scikit-image's `peak_signal_noise_ratio`."""
    _check(x, y, "psnr")
    err = mse(x, y)
    return 10.0 * jnp.log10(jnp.asarray(data_range, err.dtype) ** 2 / err)


def gaussian_window(sigma: float = SSIM_SIGMA, radius: int = SSIM_RADIUS) -> jax.Array:
    """The normalised 1-D Gaussian exp(-t^2 / (2 sigma^2)) / sum, t = -radius .. radius: (2 radius + 1,) float32."""
    t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    w = jnp.exp(-0.5 * jnp.square(t / sigma))
    return w / jnp.sum(w)


def _filter_valid(x: jax.Array, window: jax.Array) -> jax.Array:
    """x (..., H, W, C) filtered separably by `window` (n,) along H and W, 'valid' positions only:
    (..., H - n + 1, W - n + 1, C). A window tap is a shifted slice of x, so this is exact and cheap for n = 11."""
    n = window.shape[0]
    h, w = x.shape[-3] - n + 1, x.shape[-2] - n + 1
    window = window.astype(x.dtype)
    x = sum(window[i] * x[..., i:i + h, :, :] for i in range(n))
    return sum(window[i] * x[..., :, i:i + w, :] for i in range(n))


def ssim_map(x, y, data_range: float = 2.0) -> jax.Array:
    """The SSIM index at every pixel whose 11x11 window lies inside the image, per channel:
    (..., H, W, C) -> (..., H - 10, W - 10, C). With local Gaussian-weighted means mu, variances var and covariance
    cov (population form, E[xy] - E[x] E[y]), C1 = (K1 R)^2, C2 = (K2 R)^2 and R = data_range:

        S = (2 mu_x mu_y + C1) (2 cov_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (var_x + var_y + C2))
    """
    _check(x, y, "ssim", 2 * SSIM_RADIUS + 1)
    x, y = _float(x), _float(y)
    window = gaussian_window()
    f = lambda z: _filter_valid(z, window)
    mx, my = f(x), f(y)
    vx = f(x * x) - mx * mx
    vy = f(y * y) - my * my
    cxy = f(x * y) - mx * my
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))


def ssim(x, y, data_range: float = 2.0) -> jax.Array:
    """Mean structural similarity per image (Wang et al. 2004): the mean of `ssim_map` over the pixels whose window
    lies inside the image and over the channels, (..., H, W, C) -> (...); H and W must be at least 11. Equal to
    scikit-image's `structural_similarity(x, y, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=data_range, channel_axis=-1)`, which filters the whole image with reflected borders and then crops
    the 5 border pixels whose window reached outside it."""
    return jnp.mean(ssim_map(x, y, data_range), axis=(-3, -2, -1))

