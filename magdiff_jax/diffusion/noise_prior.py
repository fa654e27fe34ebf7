"""Latent noise priors for image-to-video sampling: correlated per-frame noise and starts anchored on the
reference image's latent (MagicVideo-V2's "noise whose mean is shifted toward the reference latent").

Video latents are channels-last (B, F, h, w, c) with frames on axis 1; a reference latent is (B, h, w, c) and is
repeated over the frames. Every random draw takes an explicit key. All functions are pure and jit-able; shapes,
kinds and configs are static.

Per-frame noise (PYoCo, Ge et al. ICCV 2023), with a >= 0 and every frame marginally N(0, I):

    mixed:        eps_i = eps_shared + eps_ind_i,   eps_shared ~ N(0, a^2/(1+a^2)) (one draw for all frames),
                                                    eps_ind_i  ~ N(0, 1/(1+a^2));  corr(eps_i, eps_j) = a^2/(1+a^2)
    progressive:  eps_0 ~ N(0, I),  eps_i = a/sqrt(1+a^2) * eps_{i-1} + N(0, 1/(1+a^2));
                                                    corr(eps_i, eps_j) = (a/sqrt(1+a^2))^|i-j|

(these are standard deviations sqrt(a^2/(1+a^2)), sqrt(1/(1+a^2)); MagDiff's released code scales by the variances).

Starts (x_T handed to `samplers.sample_loop(..., start=start_index)`):

- `mean_shift`: z = eps + gamma * z_ref (MagicVideo-V2's prior taken literally), optionally renormalised.
- `diffused_reference`: the reference forward-diffused to the timestep of step `start` of the sampler, start given
  by an SDEdit strength as diffusers' img2img pipelines compute it (`strength_start_index`).
- `frame_init`: ConsistI2V's FrameInit: the low-frequency 3D-FFT band of the diffused reference video with the
  high-frequency band of the noise (`gaussian_low_pass_filter`, the filter of ConsistI2V / FreeInit).

Sample spaces. DDPM, DDIM and DPM-Solver++ keep x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (variance
preserving). `EulerSampler` keeps the variance-exploding x = x0 + sigma eps, sigma = sqrt((1 - abar) / abar), i.e.
x_t * sqrt(sigma^2 + 1); its plain noise is scaled by `init_noise_sigma` (sigma_max, or sqrt(sigma_max^2 + 1) with
"leading" spacing, as diffusers). `diffuse_to_step` returns the sample in the space of the given sampler (for Euler,
x0 + sigma_i * eps with the sampler's own, possibly interpolated, sigma_i: diffusers' `EulerDiscreteScheduler.
add_noise`); the noise-like starts (`none`, `mean_shift`, `frame_init`, all at step 0) are scaled by
`init_noise_sigma`, as a diffusers pipeline scales its initial latents.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.diffusion.samplers import DDIMInverseSampler, EulerSampler, Sampler, SamplerState
from magdiff_jax.diffusion.schedules import NoiseSchedule, add_noise
from magdiff_jax.utils.errors import json_excerpt

CORRELATIONS = ("iid", "mixed", "progressive")
PRIOR_KINDS = ("diffused", "mean_shift", "frame_init", "none")
# ScheduleConfig fields that define the alpha-bar table: a schedule and a sampler must agree on them
_TABLE_FIELDS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)


# ----------------------------------------------------------------------------------------------------------
# Correlated per-frame noise (PYoCo)
# ----------------------------------------------------------------------------------------------------------


def _is_real(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_alpha(alpha: Any) -> None:
    """Refuses a concrete alpha that is negative or not finite (a traced alpha passes unchecked)."""
    if isinstance(alpha, jax.core.Tracer):
        return
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(alpha, bool) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {json_excerpt(alpha)}")


def _check_video_shape(shape: Sequence[int], what: str = "shape") -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"{what} {shape} has no frame axis: expected (B, F, ...), frames on axis 1")
    return shape


def mixed_noise(key: jax.Array, shape: Sequence[int], alpha: float, dtype=jnp.float32) -> jax.Array:
    """PYoCo mixed noise of `shape` (B, F, ...): eps_shared (B, 1, ...) with std sqrt(a^2/(1+a^2)), shared by the
    F frames, plus eps_ind (B, F, ...) with std sqrt(1/(1+a^2)). Unit variance per element; the correlation between
    any two frames is a^2/(1+a^2); alpha = 0 gives i.i.d. N(0, I)."""
    _check_alpha(alpha)
    shape = _check_video_shape(shape)
    a2 = jnp.asarray(alpha, jnp.float32) ** 2
    k_shared, k_ind = jax.random.split(key)
    shared = jax.random.normal(k_shared, (shape[0], 1, *shape[2:]), jnp.float32) * jnp.sqrt(a2 / (1 + a2))
    ind = jax.random.normal(k_ind, shape, jnp.float32) * jnp.sqrt(1 / (1 + a2))
    return (shared + ind).astype(dtype)


def progressive_noise(key: jax.Array, shape: Sequence[int], alpha: float, dtype=jnp.float32) -> jax.Array:
    """PYoCo progressive noise of `shape` (B, F, ...), an AR(1) chain over frames: eps_0 ~ N(0, I) and
    eps_i = a/sqrt(1+a^2) * eps_{i-1} + sqrt(1/(1+a^2)) * n_i with n_i ~ N(0, I). Unit variance per element;
    the correlation between frames i and j is (a/sqrt(1+a^2))^|i-j|; alpha = 0 gives i.i.d. N(0, I)."""
    _check_alpha(alpha)
    shape = _check_video_shape(shape)
    alpha = jnp.asarray(alpha, jnp.float32)
    scale = 1 / jnp.sqrt(1 + alpha * alpha)
    decay = alpha * scale
    draws = jax.random.normal(key, shape, jnp.float32)

    def next_frame(prev, n):
        eps = decay * prev + scale * n
        return eps, eps

    first = draws[:, 0]
    _, rest = jax.lax.scan(next_frame, first, jnp.moveaxis(draws[:, 1:], 1, 0))
    return jnp.concatenate([first[:, None], jnp.moveaxis(rest, 0, 1)], axis=1).astype(dtype)


def frame_noise(
    key: jax.Array, shape: Sequence[int], kind: str = "iid", alpha: float = 0.0, dtype=jnp.float32
) -> jax.Array:
    """Unit-variance noise of `shape` (B, F, ...), correlated over the frame axis per `kind`: "iid" (alpha is
    ignored), "mixed" (`mixed_noise`) or "progressive" (`progressive_noise`)."""
    if kind == "iid":
        return jax.random.normal(key, _check_video_shape(shape), dtype)
    if kind == "mixed":
        return mixed_noise(key, shape, alpha, dtype)
    if kind == "progressive":
        return progressive_noise(key, shape, alpha, dtype)
    raise ValueError(f"noise kind={kind!r}; expected one of {CORRELATIONS}")


# ----------------------------------------------------------------------------------------------------------
# Mean shift and the forward-diffused reference
# ----------------------------------------------------------------------------------------------------------


def _reference_video(ref_latent: jax.Array, like: jax.Array) -> jax.Array:
    """(B, h, w, c) -> (B, 1, h, w, c) in `like`'s dtype, checked against like (B, F, h, w, c)."""
    if ref_latent.ndim != like.ndim - 1 or ref_latent.shape != (like.shape[0], *like.shape[2:]):
        raise ValueError(
            f"ref_latent has shape {tuple(ref_latent.shape)}; expected {(like.shape[0], *like.shape[2:])} "
            f"(the video latent's {tuple(like.shape)} without its frame axis)"
        )
    return ref_latent[:, None].astype(like.dtype)


def mean_shift(
    noise: jax.Array, ref_latent: jax.Array, gamma: float | jax.Array, renormalize: bool = False
) -> jax.Array:
    """Noise with its mean shifted toward the reference: z = noise + gamma * z_ref, z_ref (B, h, w, c) repeated over
    the frames of noise (B, F, h, w, c).

    renormalize: each sample is divided by its own standard deviation over all of its elements,
        z_b <- z_b / sqrt(mean((z_b - mean(z_b))^2)),   means over (F, h, w, c),
    so that every sample has variance exactly 1 again (its mean is scaled, not removed)."""
    z = noise + jnp.asarray(gamma, noise.dtype) * _reference_video(ref_latent, noise)
    if renormalize:
        axes = tuple(range(1, z.ndim))
        z = z / jnp.sqrt(jnp.var(z, axis=axes, keepdims=True))
    return z


def strength_start_index(num_inference_steps: int, strength: float) -> int:
    """The first step an SDEdit-style run of `num_inference_steps` takes at `strength` in (0, 1], as diffusers'
    img2img pipelines compute it: init = min(int(N * strength), N), start = N - init (0 at strength 1).
    A strength too small to leave one step is refused."""
    n = int(num_inference_steps)
    if not _is_real(strength) or not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {json_excerpt(strength)}")
    init = min(int(n * strength), n)
    if init < 1:
        raise ValueError(
            f"strength={strength} leaves no step of {n} to run (int({n} * strength) = 0); "
            f"raise strength to at least {1 / n:g}"
        )
    return n - init


def _check_sampler(schedule: NoiseSchedule, sampler: Sampler) -> None:
    if isinstance(sampler, DDIMInverseSampler):
        raise ValueError(
            "DDIMInverseSampler runs from a clean sample to noise: it has no noise prior; pass the "
            "sampler that generates"
        )
    differ = [f for f in _TABLE_FIELDS if getattr(schedule.config, f) != getattr(sampler.config, f)]
    if differ:
        pairs = ", ".join(f"{f} ({getattr(schedule.config, f)!r} vs {getattr(sampler.config, f)!r})" for f in differ)
        raise ValueError(f"schedule and sampler were built from different noise schedules: they differ in {pairs}")


def step_alpha_bar(schedule: NoiseSchedule, sampler: Sampler, state: SamplerState, i: int | jax.Array) -> jax.Array:
    """alpha-bar of the sample that step i of `sampler` starts from: alphas_cumprod[timesteps[i]], or for
    `EulerSampler` (whose timesteps may be fractional) 1 / (1 + sigmas[i]^2)."""
    _check_sampler(schedule, sampler)
    if isinstance(sampler, EulerSampler):
        sigma = state.sigmas[i]
        return 1 / (1 + sigma * sigma)
    return schedule.alphas_cumprod[state.timesteps[i]]


def diffuse_to_step(
    schedule: NoiseSchedule, sampler: Sampler, state: SamplerState, x0: jax.Array, noise: jax.Array, i: int | jax.Array
) -> jax.Array:
    """x0 forward-diffused with `noise` to the noise level of step i of `sampler`, in the space that step expects
    (what `sample_loop(..., start=i)` takes):

        DDPM, DDIM, DPM-Solver++:  add_noise(schedule, x0, noise, timesteps[i])
                                   = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise,   t = timesteps[i]
        Euler:                     x0 + sigmas[i] * noise
                                   = that VP sample * sqrt(sigmas[i]^2 + 1) where timesteps[i] is an integer

    x0 and noise are (B, ...) arrays of one shape."""
    _check_sampler(schedule, sampler)
    if x0.shape != noise.shape:
        raise ValueError(f"x0 has shape {tuple(x0.shape)} but noise has {tuple(noise.shape)}")
    x0 = x0.astype(noise.dtype)
    if isinstance(sampler, EulerSampler):
        return x0 + state.sigmas[i].astype(noise.dtype) * noise
    return add_noise(schedule, x0, noise, state.timesteps[i])


def diffused_reference(
    schedule: NoiseSchedule,
    sampler: Sampler,
    state: SamplerState,
    ref_latent: jax.Array,
    noise: jax.Array,
    strength: float,
) -> tuple[jax.Array, int]:
    """The reference latent (B, h, w, c), repeated over the frames of noise (B, F, h, w, c), forward-diffused to
    the step an SDEdit run at `strength` starts from (SDEdit, Meng et al. 2022):

        start = strength_start_index(N, strength)
        x     = diffuse_to_step(..., z_ref, noise, start)   (sqrt(abar_t) z_ref + sqrt(1 - abar_t) noise, t the
                                                             start step's timestep; Euler: z_ref + sigma noise)

    Returns (x, start) for `sample_loop(..., x, start=start)`."""
    start = strength_start_index(state.num_inference_steps, strength)
    ref = jnp.broadcast_to(_reference_video(ref_latent, noise), noise.shape)
    return diffuse_to_step(schedule, sampler, state, ref, noise, start), start


# ----------------------------------------------------------------------------------------------------------
# ConsistI2V FrameInit
# ----------------------------------------------------------------------------------------------------------


def gaussian_low_pass_filter(shape: Sequence[int], d_s: float = 0.25, d_t: float = 0.25) -> np.ndarray:
    """The Gaussian low-pass mask of FreeInit / ConsistI2V on the centred (fftshifted) frequency grid, (F, h, w) fp32:

        mask[t, y, x] = exp(-D^2 / (2 d_s^2)),
        D^2 = ((d_s / d_t) * (2t/F - 1))^2 + (2y/h - 1)^2 + (2x/w - 1)^2,

    d_s, d_t the normalised spatial and temporal stop frequencies; all zeros when either is 0. The grid 2k/n - 1
    is the sources' own: it is 0 at k = n // 2, the zero frequency of an fftshifted axis of even length n (for odd
    n, half a bin off, as in the sources; a single frame gets the constant factor exp(-1 / (2 d_t^2)))."""
    if len(shape) != 3:
        raise ValueError(f"filter shape {tuple(shape)}: expected (F, h, w)")
    for name, d in (("d_s", d_s), ("d_t", d_t)):
        if not _is_real(d) or not d >= 0 or not math.isfinite(d):
            raise ValueError(f"{name} must be a finite number >= 0, got {json_excerpt(d)}")
    frames, height, width = (int(s) for s in shape)
    if d_s == 0 or d_t == 0:
        return np.zeros((frames, height, width), np.float32)
    t = (d_s / d_t) * (2 * np.arange(frames, dtype=np.float64) / frames - 1)
    y = 2 * np.arange(height, dtype=np.float64) / height - 1
    x = 2 * np.arange(width, dtype=np.float64) / width - 1
    d2 = t[:, None, None] ** 2 + y[None, :, None] ** 2 + x[None, None, :] ** 2
    return np.exp(-d2 / (2 * d_s * d_s)).astype(np.float32)


def frame_init(
    key: jax.Array | None,
    ref_latent: jax.Array,
    noise: jax.Array,
    schedule: NoiseSchedule,
    t: int | jax.Array,
    d_s: float = 0.25,
    d_t: float = 0.25,
) -> jax.Array:
    """ConsistI2V's FrameInit (Ren et al. 2024): the low frequencies of the diffused static reference video with the
    high frequencies of the noise. ref_latent (B, h, w, c), noise (B, F, h, w, c) -> (B, F, h, w, c):

        z_t  = add_noise(schedule, repeat_F(z_ref), n, t)       n = noise (ConsistI2V) or, with a key,
                                                                independent N(0, I) noise drawn from it (FreeInit)
        L    = gaussian_low_pass_filter((F, h, w), d_s, d_t)    on the centred grid, per channel
        out  = Re ifftn(ifftshift(fftshift(fftn(z_t)) * L + fftshift(fftn(noise)) * (1 - L)))

    with every FFT over (F, h, w). ConsistI2V diffuses to t = 850 (its `frameinit_noise_level`) and then runs every
    sampling step; very large d_s, d_t return z_t, and d_s = 0 returns the noise."""
    if noise.ndim != 5:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected a video latent (B, F, h, w, c)")
    ref = jnp.broadcast_to(_reference_video(ref_latent, noise), noise.shape)
    diffusion_noise = noise if key is None else jax.random.normal(key, noise.shape, noise.dtype)
    if not isinstance(t, jax.core.Tracer) and np.ndim(t) == 0:
        t_value = int(t)
        if not 0 <= t_value < schedule.config.num_train_timesteps:
            raise ValueError(
                f"t={t_value} is outside the schedule's timesteps [0, {schedule.config.num_train_timesteps - 1}]"
            )
    z_t = add_noise(schedule, ref, diffusion_noise, t)
    # fftshift(A) * L then ifftshift is A * ifftshift(L): the mask moved to the unshifted order instead
    low = jnp.asarray(np.fft.ifftshift(gaussian_low_pass_filter(noise.shape[1:4], d_s, d_t)))[None, ..., None]
    axes = (1, 2, 3)
    spectrum = jnp.fft.fftn(z_t.astype(jnp.float32), axes=axes) * low
    spectrum = spectrum + jnp.fft.fftn(noise.astype(jnp.float32), axes=axes) * (1 - low)
    return jnp.fft.ifftn(spectrum, axes=axes).real.astype(noise.dtype)


# ----------------------------------------------------------------------------------------------------------
# Config-level entry point
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NoisePriorConfig:
    """How an image-to-video run builds its first latent from the reference latent.

    kind: "diffused" (forward-diffused reference from an SDEdit start, `diffused_reference`), "mean_shift"
        (`mean_shift`), "frame_init" (`frame_init`) or "none" (plain noise). The default is PAPERS.md B.7's:
        forward-diffused reference with PYoCo mixed noise, alpha 0.5.
    gamma: mean_shift's weight on z_ref; None ties it to sqrt(alpha-bar) of the sampler's first step (the weight
        the forward process gives the clean latent there).
    strength: "diffused": SDEdit strength in (0, 1]; the run starts at `strength_start_index(N, strength)`.
    cutoff_spatial, cutoff_temporal: frame_init's normalised stop frequencies d_s, d_t (> 0).
    frame_init_timestep: the timestep frame_init diffuses the reference to (ConsistI2V: 850).
    correlation, alpha: the per-frame noise (`frame_noise`): "iid", "mixed" or "progressive", with alpha >= 0.
    renormalize: mean_shift only: every sample divided by its standard deviation (see `mean_shift`).
    """

    kind: str = "diffused"
    gamma: float | None = None
    strength: float = 0.95
    cutoff_spatial: float = 0.25
    cutoff_temporal: float = 0.25
    frame_init_timestep: int = 850
    correlation: str = "mixed"
    alpha: float = 0.5
    renormalize: bool = False

    def __post_init__(self):
        def bad(name: str, expected: str):
            return ValueError(f"NoisePriorConfig.{name}: expected {expected}, got {json_excerpt(getattr(self, name))}")

        if self.kind not in PRIOR_KINDS:
            raise bad("kind", f"one of {list(PRIOR_KINDS)}")
        if self.correlation not in CORRELATIONS:
            raise bad("correlation", f"one of {list(CORRELATIONS)}")
        if self.gamma is not None and not (_is_real(self.gamma) and math.isfinite(self.gamma) and self.gamma >= 0):
            raise bad("gamma", "a finite number >= 0, or null (tied to sqrt(alpha-bar) of the first step)")
        if not (_is_real(self.strength) and 0 < self.strength <= 1):
            raise bad("strength", "a number in (0, 1]")
        for name in ("cutoff_spatial", "cutoff_temporal"):
            value = getattr(self, name)
            if not (_is_real(value) and math.isfinite(value) and value > 0):
                raise bad(name, "a finite number > 0")
        if not (
            isinstance(self.frame_init_timestep, numbers.Integral)
            and not isinstance(self.frame_init_timestep, bool)
            and self.frame_init_timestep >= 0
        ):
            raise bad("frame_init_timestep", "an integer timestep >= 0")
        if not (_is_real(self.alpha) and math.isfinite(self.alpha) and self.alpha >= 0):
            raise bad("alpha", "a finite number >= 0")
        if not isinstance(self.renormalize, bool):
            raise bad("renormalize", "true or false")

    def replace(self, **changes) -> NoisePriorConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> NoisePriorConfig:
        """The inverse of `to_dict`; keys that are not fields are refused, by name."""
        if not isinstance(config, Mapping):
            raise ValueError(f"NoisePriorConfig: expected a mapping of its fields, got {json_excerpt(config)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if unknown:
            raise ValueError(f"NoisePriorConfig: unknown keys {unknown}; fields are {sorted(names)}")
        return cls(**config)

    def start_index(self, num_inference_steps: int) -> int:
        """The step sampling starts at: `strength_start_index` for "diffused", else 0."""
        if self.kind == "diffused":
            return strength_start_index(num_inference_steps, self.strength)
        return 0


def initial_latents(
    config: NoisePriorConfig,
    key: jax.Array,
    ref_latent: jax.Array,
    shape: Sequence[int],
    schedule: NoiseSchedule,
    sampler: Sampler,
    state: SamplerState,
) -> tuple[jax.Array, int]:
    """The first sample of an image-to-video run and the step to start from:

        x_T, start = initial_latents(config, key, z_ref, (B, F, h, w, c), schedule, sampler, state)
        video = sample_loop(sampler, state, model_fn, x_T, key2, start=start)

    ref_latent (B, h, w, c) is the reference image's (scaled) VAE latent; noise = frame_noise(key, shape,
    config.correlation, config.alpha) in ref_latent's dtype. Per `config.kind`:

        none:        noise * init_noise_sigma,                                           start 0
        mean_shift:  mean_shift(noise, z_ref, gamma, renormalize) * init_noise_sigma,   start 0
        frame_init:  frame_init(None, z_ref, noise, schedule, frame_init_timestep,
                                cutoff_spatial, cutoff_temporal) * init_noise_sigma,    start 0
        diffused:    diffused_reference(schedule, sampler, state, z_ref, noise, strength)  (start from strength)

    `start` is a Python int (from the static config and the number of steps: `config.start_index(N)`), so under
    `jax.jit` take it from `config.start_index` and keep x_T alone as the output."""
    shape = _check_video_shape(shape)
    if len(shape) != 5:
        raise ValueError(f"shape {shape}: expected a video latent shape (B, F, h, w, c)")
    if tuple(ref_latent.shape) != (shape[0], *shape[2:]):
        raise ValueError(
            f"ref_latent has shape {tuple(ref_latent.shape)}; expected {(shape[0], *shape[2:])} "
            f"(shape {shape} without its frame axis)"
        )
    _check_sampler(schedule, sampler)
    dtype = ref_latent.dtype if jnp.issubdtype(ref_latent.dtype, jnp.floating) else jnp.float32
    noise = frame_noise(key, shape, config.correlation, config.alpha, dtype)
    scale = state.init_noise_sigma.astype(dtype)
    if config.kind == "none":
        return noise * scale, 0
    if config.kind == "mean_shift":
        gamma = config.gamma
        if gamma is None:
            gamma = jnp.sqrt(step_alpha_bar(schedule, sampler, state, 0))
        return mean_shift(noise, ref_latent, gamma, config.renormalize) * scale, 0
    if config.kind == "frame_init":
        if config.frame_init_timestep >= schedule.config.num_train_timesteps:
            raise ValueError(
                f"NoisePriorConfig.frame_init_timestep={config.frame_init_timestep} is not below the "
                f"schedule's num_train_timesteps={schedule.config.num_train_timesteps}"
            )
        z = frame_init(
            None, ref_latent, noise, schedule, config.frame_init_timestep, config.cutoff_spatial, config.cutoff_temporal
        )
        return z * scale, 0
    return diffused_reference(schedule, sampler, state, ref_latent, noise, config.strength)
