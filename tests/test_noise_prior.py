"""Latent noise priors (magdiff_jax.diffusion.noise_prior), each against its formula.

- PYoCo noise: sample variances and inter-frame correlations of one large draw (65,536 samples per frame pair, so
  a standard error of ~0.006 on a variance and ~0.004 on a correlation) against the closed forms, to 0.03: wide in
  standard errors, yet narrow enough to catch stds passed as variances (alpha = 1: frame variance 0.5 instead of 1;
  alpha = 0.5: mixed correlation 0.06 instead of 0.2).
- mean shift, the SDEdit start index (diffusers' img2img rule written out), the forward-diffused start and FrameInit
  against numpy references of their formulas (np.fft with fftshift, as ConsistI2V's `freq_mix_3d`), fp32 to 1e-5.
- End to end: with a model that predicts the true epsilon, DDIM and Euler (sigma space) run from the diffused start
  land on the reference latent; the same start left in DDIM's (variance-preserving) space does not, for Euler.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magdiff_jax.diffusion import (
    DDIMInverseSampler,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerSampler,
    NoisePriorConfig,
    NoiseSchedule,
    ScheduleConfig,
    alphas_cumprod_np,
    diffuse_to_step,
    diffused_reference,
    frame_init,
    frame_noise,
    gaussian_low_pass_filter,
    initial_latents,
    mean_shift,
    mixed_noise,
    progressive_noise,
    sample_loop,
    strength_start_index,
)

SD = ScheduleConfig(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False
)
STATS_SHAPE = (4, 6, 64, 64, 4)  # (B, F, h, w, c): 65,536 samples per frame
STAT_TOL = 0.03
SHAPE = (2, 4, 8, 6, 3)  # small video latent for the exact checks
TOL = 1e-5


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.create(SD)


@pytest.fixture(scope="module")
def video():
    """(z_ref (B, h, w, c), noise (B, F, h, w, c)) as numpy fp32."""
    rng = np.random.default_rng(0)
    z_ref = rng.standard_normal((SHAPE[0], *SHAPE[2:])).astype(np.float32)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    return z_ref, noise


def frame_moments(x) -> np.ndarray:
    """(F, F) second moments E[x_i x_j] over every axis but frames (the noise has mean 0)."""
    x = np.moveaxis(np.asarray(x, np.float64), 1, 0).reshape(x.shape[1], -1)
    return x @ x.T / x.shape[1]


# ----------------------------------------------------------------------------------------------------------
# PYoCo noise
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_mixed_noise_variance_and_correlation(alpha):
    moments = frame_moments(mixed_noise(jax.random.key(1), STATS_SHAPE, alpha))
    frames = STATS_SHAPE[1]
    np.testing.assert_allclose(np.diag(moments), np.ones(frames), atol=STAT_TOL)
    off = moments[~np.eye(frames, dtype=bool)]
    np.testing.assert_allclose(off, alpha**2 / (1 + alpha**2), atol=STAT_TOL)


def test_mixed_noise_alpha_zero_is_iid():
    moments = frame_moments(mixed_noise(jax.random.key(2), STATS_SHAPE, 0.0))
    frames = STATS_SHAPE[1]
    np.testing.assert_allclose(moments, np.eye(frames), atol=STAT_TOL)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_progressive_noise_variance_and_correlation(alpha):
    x = progressive_noise(jax.random.key(3), STATS_SHAPE, alpha)
    frames = STATS_SHAPE[1]
    lag = np.abs(np.arange(frames)[:, None] - np.arange(frames)[None, :])
    expected = (alpha / math.sqrt(1 + alpha**2)) ** lag
    np.testing.assert_allclose(frame_moments(x), expected, atol=STAT_TOL)


def test_progressive_noise_is_the_recursion():
    """Frame 0 is the first draw; frame i = r * frame i-1 + s * draw i, r = a/sqrt(1+a^2), s = 1/sqrt(1+a^2)."""
    key, alpha = jax.random.key(4), 0.7
    draws = np.asarray(jax.random.normal(key, SHAPE, jnp.float32), np.float64)
    r, s = alpha / math.sqrt(1 + alpha**2), 1 / math.sqrt(1 + alpha**2)
    expected = draws.copy()
    for i in range(1, SHAPE[1]):
        expected[:, i] = r * expected[:, i - 1] + s * draws[:, i]
    np.testing.assert_allclose(progressive_noise(key, SHAPE, alpha), expected, atol=TOL)


def test_frame_noise_dispatch_and_errors():
    key = jax.random.key(5)
    np.testing.assert_array_equal(frame_noise(key, SHAPE, "iid", 3.0), jax.random.normal(key, SHAPE))
    np.testing.assert_array_equal(frame_noise(key, SHAPE, "mixed", 0.5), mixed_noise(key, SHAPE, 0.5))
    np.testing.assert_array_equal(frame_noise(key, SHAPE, "progressive", 0.5), progressive_noise(key, SHAPE, 0.5))
    with pytest.raises(ValueError, match="kind='pyoco'"):
        frame_noise(key, SHAPE, "pyoco", 0.5)
    with pytest.raises(ValueError, match="alpha"):
        mixed_noise(key, SHAPE, -1.0)
    with pytest.raises(ValueError, match="frame axis"):
        progressive_noise(key, (8,), 0.5)


# ----------------------------------------------------------------------------------------------------------
# Mean shift and the forward-diffused reference
# ----------------------------------------------------------------------------------------------------------


def test_mean_shift(video):
    z_ref, noise = video
    gamma = 0.2
    expected = noise + gamma * z_ref[:, None]
    np.testing.assert_allclose(mean_shift(jnp.asarray(noise), jnp.asarray(z_ref), gamma), expected, atol=TOL)
    renormalized = np.asarray(mean_shift(jnp.asarray(noise), jnp.asarray(z_ref), gamma, renormalize=True))
    std = expected.reshape(SHAPE[0], -1).std(axis=1)
    np.testing.assert_allclose(renormalized, expected / std[:, None, None, None, None], atol=TOL)
    np.testing.assert_allclose(renormalized.reshape(SHAPE[0], -1).var(axis=1), 1.0, atol=TOL)
    with pytest.raises(ValueError, match="ref_latent has shape"):
        mean_shift(jnp.asarray(noise), jnp.asarray(z_ref[:, :4]), gamma)


@pytest.mark.parametrize("steps", [1, 7, 25, 50])
@pytest.mark.parametrize("strength", [0.3, 0.58, 0.7, 0.95, 1.0])
def test_strength_start_index_is_diffusers_img2img_rule(steps, strength):
    init = min(int(steps * strength), steps)  # StableDiffusionImg2ImgPipeline.get_timesteps
    if init == 0:
        with pytest.raises(ValueError, match="strength"):
            strength_start_index(steps, strength)
    else:
        assert strength_start_index(steps, strength) == max(steps - init, 0)


@pytest.mark.parametrize("strength", [0.0, -0.5, 1.5, "0.9"])
def test_strength_out_of_range(strength):
    with pytest.raises(ValueError, match="strength"):
        strength_start_index(50, strength)


@pytest.mark.parametrize("sampler_cls", [DDIMSampler, DDPMSampler])
@pytest.mark.parametrize(("steps", "strength"), [(20, 0.75), (50, 0.95), (10, 1.0)])
def test_diffused_reference_vp_formula(schedule, video, sampler_cls, steps, strength):
    z_ref, noise = video
    sampler = sampler_cls(SD)
    state = sampler.set_timesteps(steps)
    x, start = diffused_reference(schedule, sampler, state, jnp.asarray(z_ref), jnp.asarray(noise), strength)
    assert start == strength_start_index(steps, strength)
    t = int(state.timesteps[start])
    abar = np.float64(alphas_cumprod_np(SD)[t])
    np.testing.assert_allclose(x, np.sqrt(abar) * z_ref[:, None] + np.sqrt(1 - abar) * noise, atol=TOL)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_diffused_reference_euler_is_sigma_space(schedule, video, spacing):
    """Euler's sample at step i is x0 + sigma_i * eps (diffusers' EulerDiscreteScheduler.add_noise), which for an
    integer timestep is the VP sample sqrt(abar) x0 + sqrt(1 - abar) eps times sqrt(sigma^2 + 1)."""
    z_ref, noise = video
    sampler = EulerSampler(SD.replace(timestep_spacing=spacing))
    state = sampler.set_timesteps(20)
    x, start = diffused_reference(schedule, sampler, state, jnp.asarray(z_ref), jnp.asarray(noise), 0.8)
    abar = np.float64(alphas_cumprod_np(SD)[int(state.timesteps[start])])
    sigma = np.sqrt((1 - abar) / abar)
    np.testing.assert_allclose(float(state.sigmas[start]), sigma, rtol=1e-5)
    vp = np.sqrt(abar) * z_ref[:, None] + np.sqrt(1 - abar) * noise
    np.testing.assert_allclose(x, vp * np.sqrt(sigma**2 + 1), rtol=1e-5, atol=1e-5)


SAMPLERS = {
    "ddim": (DDIMSampler, {}),
    "ddim-trailing": (DDIMSampler, dict(timestep_spacing="trailing")),
    "euler-linspace": (EulerSampler, dict(timestep_spacing="linspace")),  # fractional timesteps
    "euler-leading": (EulerSampler, {}),
    "dpm": (DPMSolverSampler, {}),  # its first step from a later start is first order (no memory of a step yet)
}


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("strength", [0.5, 1.0])
def test_denoising_from_the_diffused_start_recovers_the_reference(schedule, video, name, strength):
    """A model that predicts the true epsilon of the start keeps every deterministic step on the forward path of
    z_ref, so the run from the diffused start ends exactly at z_ref (DDIM with set_alpha_to_one; Euler's last sigma
    is 0). A start at the wrong noise level, or in the wrong space, ends elsewhere."""
    z_ref, noise = video
    cls, options = SAMPLERS[name]
    sampler = cls(SD.replace(**options))
    state = sampler.set_timesteps(10)  # DDIM steps by 1000 // N, which is the spacing only when N divides 1000
    eps = jnp.asarray(noise)
    x, start = diffused_reference(schedule, sampler, state, jnp.asarray(z_ref), eps, strength)
    out = sample_loop(sampler, state, lambda x, t: eps, x, start=start)
    np.testing.assert_allclose(out, np.broadcast_to(z_ref[:, None], SHAPE), atol=1e-4)
    if cls is EulerSampler:  # the VP sample, not scaled into sigma space, misses
        vp = x / jnp.sqrt(state.sigmas[start] ** 2 + 1)
        wrong = sample_loop(sampler, state, lambda x, t: eps, vp, start=start)
        assert float(jnp.abs(wrong - z_ref[:, None]).max()) > 0.1


def test_schedule_and_sampler_must_agree(schedule, video):
    z_ref, noise = video
    sampler = DDIMSampler(SD.replace(beta_schedule="linear"))
    state = sampler.set_timesteps(10)
    with pytest.raises(ValueError, match="beta_schedule"):
        diffused_reference(schedule, sampler, state, jnp.asarray(z_ref), jnp.asarray(noise), 0.9)
    inverse = DDIMInverseSampler(SD)
    with pytest.raises(ValueError, match="DDIMInverseSampler"):
        diffuse_to_step(schedule, inverse, inverse.set_timesteps(10), jnp.asarray(noise), jnp.asarray(noise), 0)


# ----------------------------------------------------------------------------------------------------------
# FrameInit
# ----------------------------------------------------------------------------------------------------------


def reference_filter(shape, d_s, d_t):
    """ConsistI2V's gaussian_low_pass_filter, element by element."""
    frames, height, width = shape
    mask = np.zeros(shape)
    if d_s == 0 or d_t == 0:
        return mask
    for t in range(frames):
        for h in range(height):
            for w in range(width):
                d2 = ((d_s / d_t) * (2 * t / frames - 1)) ** 2 + (2 * h / height - 1) ** 2 + (2 * w / width - 1) ** 2
                mask[t, h, w] = math.exp(-1 / (2 * d_s**2) * d2)
    return mask


@pytest.mark.parametrize(("shape", "d_s", "d_t"), [((4, 8, 6), 0.25, 0.25), ((5, 7, 9), 0.4, 0.1), ((3, 4, 4), 0, 0.2)])
def test_gaussian_low_pass_filter(shape, d_s, d_t):
    mask = gaussian_low_pass_filter(shape, d_s, d_t)
    assert mask.shape == shape and mask.dtype == np.float32
    np.testing.assert_allclose(mask, reference_filter(shape, d_s, d_t), rtol=1e-6, atol=1e-7)


def reference_frame_init(z_t, noise, mask):
    """ConsistI2V's freq_mix_3d on channels-last arrays: FFT over (F, h, w), fftshift, mix, ifftshift, inverse."""
    axes = (1, 2, 3)
    z_freq = np.fft.fftshift(np.fft.fftn(z_t, axes=axes), axes=axes)
    n_freq = np.fft.fftshift(np.fft.fftn(noise, axes=axes), axes=axes)
    low = mask[None, ..., None]
    mixed = z_freq * low + n_freq * (1 - low)
    return np.fft.ifftn(np.fft.ifftshift(mixed, axes=axes), axes=axes).real


def diffused_video(z_ref, noise, t):
    abar = np.float64(alphas_cumprod_np(SD)[t])
    return np.sqrt(abar) * z_ref[:, None] + np.sqrt(1 - abar) * noise


@pytest.mark.parametrize(("t", "d_s", "d_t"), [(850, 0.25, 0.25), (999, 0.5, 0.2)])
def test_frame_init_matches_numpy_fft(schedule, video, t, d_s, d_t):
    z_ref, noise = video
    out = frame_init(None, jnp.asarray(z_ref), jnp.asarray(noise), schedule, t, d_s, d_t)
    mask = reference_filter(SHAPE[1:4], d_s, d_t)
    np.testing.assert_allclose(out, reference_frame_init(diffused_video(z_ref, noise, t), noise, mask), atol=TOL)


def test_frame_init_with_a_key_diffuses_with_fresh_noise(schedule, video):
    z_ref, noise = video
    key = jax.random.key(6)
    out = frame_init(key, jnp.asarray(z_ref), jnp.asarray(noise), schedule, 850)
    fresh = np.asarray(jax.random.normal(key, SHAPE, jnp.float32))
    mask = reference_filter(SHAPE[1:4], 0.25, 0.25)
    np.testing.assert_allclose(out, reference_frame_init(diffused_video(z_ref, fresh, 850), noise, mask), atol=TOL)


def test_frame_init_limits(schedule, video):
    z_ref, noise = video
    args = (None, jnp.asarray(z_ref), jnp.asarray(noise), schedule, 850)
    # all-pass filter: the diffused reference itself
    np.testing.assert_allclose(frame_init(*args, 1e4, 1e4), diffused_video(z_ref, noise, 850), atol=TOL)
    # zero filter: the noise itself
    np.testing.assert_allclose(frame_init(*args, 0.0, 0.0), noise, atol=TOL)
    # a tiny cutoff keeps only the zero frequency (the centre of the even grid): the noise with the diffused
    # reference's mean over (F, h, w) in place of its own, per sample and channel
    z_t = diffused_video(z_ref, noise, 850)
    expected = noise - noise.mean(axis=(1, 2, 3), keepdims=True) + z_t.mean(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(frame_init(*args, 1e-3, 1e-3), expected, atol=TOL)


def test_frame_init_errors(schedule, video):
    z_ref, noise = video
    with pytest.raises(ValueError, match="t=1000"):
        frame_init(None, jnp.asarray(z_ref), jnp.asarray(noise), schedule, 1000)
    with pytest.raises(ValueError, match="d_s"):
        frame_init(None, jnp.asarray(z_ref), jnp.asarray(noise), schedule, 850, -0.1)
    with pytest.raises(ValueError, match="B, F, h, w, c"):
        frame_init(None, jnp.asarray(z_ref), jnp.asarray(noise[:, 0]), schedule, 850)


# ----------------------------------------------------------------------------------------------------------
# NoisePriorConfig and initial_latents
# ----------------------------------------------------------------------------------------------------------


def test_config_defaults_and_round_trip():
    config = NoisePriorConfig()
    assert (config.kind, config.correlation, config.alpha) == ("diffused", "mixed", 0.5)  # PAPERS.md B.7
    assert NoisePriorConfig.from_mapping(config.to_dict()) == config
    other = config.replace(kind="frame_init", gamma=0.1, renormalize=True)
    assert NoisePriorConfig.from_mapping(other.to_dict()) == other


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kind", "shift"),
        ("correlation", "pyoco"),
        ("gamma", -0.1),
        ("gamma", "0.1"),
        ("strength", 0.0),
        ("strength", 1.2),
        ("cutoff_spatial", 0.0),
        ("cutoff_temporal", math.inf),
        ("frame_init_timestep", -1),
        ("frame_init_timestep", 850.5),
        ("alpha", -0.5),
        ("alpha", True),
        ("renormalize", "yes"),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"NoisePriorConfig.{field}"):
        NoisePriorConfig(**{field: value})
    with pytest.raises(ValueError, match=f"NoisePriorConfig.{field}"):
        NoisePriorConfig.from_mapping({field: value})


def test_config_unknown_key():
    with pytest.raises(ValueError, match="unknown keys \\['noise_alpha'\\]"):
        NoisePriorConfig.from_mapping({"kind": "none", "noise_alpha": 1.0})


@pytest.mark.parametrize("sampler_name", ["ddim", "euler-leading"])
@pytest.mark.parametrize("kind", ["none", "mean_shift", "frame_init", "diffused"])
def test_initial_latents(schedule, video, sampler_name, kind):
    z_ref = jnp.asarray(video[0])
    cls, options = SAMPLERS[sampler_name]
    sampler = cls(SD.replace(**options))
    state = sampler.set_timesteps(20)
    config = NoisePriorConfig(kind=kind, strength=0.8, correlation="progressive", alpha=0.8)
    key = jax.random.key(7)
    x, start = initial_latents(config, key, z_ref, SHAPE, schedule, sampler, state)
    assert x.shape == SHAPE and x.dtype == jnp.float32
    assert start == config.start_index(20) == (strength_start_index(20, 0.8) if kind == "diffused" else 0)
    noise = progressive_noise(key, SHAPE, 0.8)
    scale = state.init_noise_sigma
    if kind == "none":
        expected = noise * scale
    elif kind == "mean_shift":  # gamma None: sqrt(alpha-bar) of the first (integer) timestep
        abar = alphas_cumprod_np(SD)[int(state.timesteps[0])]
        expected = (noise + np.sqrt(abar) * z_ref[:, None]) * scale
    elif kind == "frame_init":
        expected = frame_init(None, z_ref, noise, schedule, 850) * scale
    else:
        expected = diffuse_to_step(schedule, sampler, state, jnp.broadcast_to(z_ref[:, None], SHAPE), noise, start)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=TOL)


def test_initial_latents_jit_and_errors(schedule, video):
    z_ref = jnp.asarray(video[0])
    sampler = DDIMSampler(SD)
    state = sampler.set_timesteps(20)
    config = NoisePriorConfig()
    key = jax.random.key(8)

    @jax.jit
    def first_sample(key, z_ref, schedule, state):
        return initial_latents(config, key, z_ref, SHAPE, schedule, sampler, state)[0]

    eager, _ = initial_latents(config, key, z_ref, SHAPE, schedule, sampler, state)
    np.testing.assert_allclose(first_sample(key, z_ref, schedule, state), eager, atol=TOL)
    with pytest.raises(ValueError, match="ref_latent has shape"):
        initial_latents(config, key, z_ref[:1], SHAPE, schedule, sampler, state)
    with pytest.raises(ValueError, match="frame_init_timestep=1000"):
        initial_latents(
            config.replace(kind="frame_init", frame_init_timestep=1000), key, z_ref, SHAPE, schedule, sampler, state
        )
    with pytest.raises(ValueError, match="strength"):
        initial_latents(config.replace(strength=0.01), key, z_ref, SHAPE, schedule, sampler, state)
