"""Stateless samplers (reverse-process solvers) that run inside `jax.jit` and `jax.lax.scan`.

Five samplers share one interface; each matches a diffusers scheduler step for step:

| sampler                | diffusers class                                                   |
|------------------------|-------------------------------------------------------------------|
| `DDPMSampler`          | `DDPMScheduler` (variance_type fixed_small / fixed_large)         |
| `DDIMSampler(eta=...)` | `DDIMScheduler` (`eta` as passed to its `step`)                   |
| `DPMSolverSampler`     | `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")`, 2M   |
| `EulerSampler`         | `EulerDiscreteScheduler` (no churn, linear sigma interpolation)   |
| `DDIMInverseSampler`   | `DDIMInverseScheduler` (x0 -> x_T, for inversion-based editing)   |

Interface (the same for all five):

    sampler = DDIMSampler(config)                       # frozen and hashable: config + options
    state = sampler.set_timesteps(num_inference_steps)  # SamplerState: jnp arrays, built on the host
    x = noise * state.init_noise_sigma                  # start (a clean latent for DDIMInverseSampler)
    carry = sampler.init_carry(state, x)                # solver memory; () for single-step samplers
    for i in range(len(state.timesteps)):               # or lax.scan over i: see `sample_loop`
        t = state.timesteps[i]                          # timestep to give the model
        model_in = sampler.scale_model_input(state, x, i)
        x, carry = sampler.step(state, carry, i, model(model_in, t), x, key=step_key)

`i` is the step index (a Python int or a traced int32 scalar). `step` returns the new sample (same shape and
dtype as `sample`) and the new carry. Stochastic samplers (`DDPMSampler`, `DDIMSampler` with eta > 0) draw
their noise from `key`, or take it as an explicit `noise=` array (same shape as the sample); the other
samplers ignore both. Samples are channels-last (B, ...) arrays of any rank; all step arithmetic is fp32,
in the order diffusers uses. Timesteps are int32, except `EulerSampler`'s, which are fp32 (its linspace
spacing is fractional), as in diffusers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from magdiff_jax.diffusion.schedules import ScheduleConfig, alphas_cumprod_np, convert_prediction

Carry = Any


@struct.dataclass
class SamplerState:
    """Per-run sampler tables, all (N,) or (N+1,) for N inference steps.

    timesteps: (N,) the model's timestep at each step, in call order.
    init_noise_sigma: () scale of the initial noise (1 except for `EulerSampler`).
    alpha_prod_t, alpha_prod_prev: (N,) alpha-bar at each step's start and target (DDPM, DDIM, inversion).
    sigmas: (N+1,) sigma = sqrt((1 - abar) / abar) at each step and after the last (DPM-Solver++, Euler).
    """

    timesteps: jax.Array
    init_noise_sigma: jax.Array
    alpha_prod_t: jax.Array | None = None
    alpha_prod_prev: jax.Array | None = None
    sigmas: jax.Array | None = None

    @property
    def num_inference_steps(self) -> int:
        return self.timesteps.shape[0]


# ----------------------------------------------------------------------------------------------------------
# Host-side timestep spacing
# ----------------------------------------------------------------------------------------------------------


def _check_steps(config: ScheduleConfig, n: int) -> None:
    if not 0 < n <= config.num_train_timesteps:
        raise ValueError(f"num_inference_steps={n} must be in [1, {config.num_train_timesteps}]")


def _spaced_timesteps(config: ScheduleConfig, n: int) -> np.ndarray:
    """Descending integer timesteps of DDPMScheduler / DDIMScheduler (int64)."""
    _check_steps(config, n)
    num_train = config.num_train_timesteps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, num_train - 1, n).round()[::-1].astype(np.int64)
    if config.timestep_spacing == "leading":
        ratio = num_train // n
        return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64) + config.steps_offset
    ratio = num_train / n  # trailing
    return np.round(np.arange(num_train, 0, -ratio)).astype(np.int64) - 1


def _sigma_table(config: ScheduleConfig) -> tuple[np.ndarray, np.ndarray]:
    """(alphas_cumprod, sigmas) on the host; a zero terminal alpha-bar becomes 2**-24 (finite sigma)."""
    alphas_cumprod = alphas_cumprod_np(config)
    if config.rescale_betas_zero_snr:
        alphas_cumprod[-1] = 2.0**-24
    return alphas_cumprod, np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


def _final_sigma(config: ScheduleConfig, alphas_cumprod: np.ndarray) -> np.float32:
    if config.final_sigmas_type == "zero":
        return np.float32(0.0)
    return np.sqrt((1 - alphas_cumprod[0]) / alphas_cumprod[0])


def _draw_noise(key: jax.Array | None, noise: jax.Array | None, like: jax.Array) -> jax.Array:
    if noise is not None:
        return noise
    if key is None:
        raise ValueError("this sampler is stochastic: pass key= or noise= to step()")
    return jax.random.normal(key, like.shape, like.dtype)


def _f32(x: np.ndarray) -> jax.Array:
    return jnp.asarray(np.asarray(x, dtype=np.float32))


# ----------------------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The shared interface (see the module docstring); subclasses define `set_timesteps` and `step`."""

    config: ScheduleConfig

    def set_timesteps(self, num_inference_steps: int) -> SamplerState:
        raise NotImplementedError

    def init_carry(self, state: SamplerState, sample: jax.Array) -> Carry:
        del state, sample
        return ()

    def scale_model_input(self, state: SamplerState, sample: jax.Array, i: jax.Array | int) -> jax.Array:
        del state, i
        return sample

    def step(
        self,
        state: SamplerState,
        carry: Carry,
        i: jax.Array | int,
        model_output: jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        noise: jax.Array | None = None,
    ) -> tuple[jax.Array, Carry]:
        raise NotImplementedError

    def _x0_eps(self, model_output, sample, alpha_bar):
        x0, eps = convert_prediction(
            model_output, sample, jnp.sqrt(alpha_bar), jnp.sqrt(1 - alpha_bar), self.config.prediction_type
        )
        if self.config.clip_sample:
            x0 = jnp.clip(x0, -self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps


@dataclasses.dataclass(frozen=True)
class DDPMSampler(Sampler):
    """Ancestral sampling of Ho et al. 2020 over spaced timesteps (diffusers `DDPMScheduler`).

    The posterior variance is `fixed_small` (beta-tilde) or `fixed_large` (beta) per `config.variance_type`;
    no noise is added on a step whose timestep is 0.
    """

    def set_timesteps(self, num_inference_steps: int) -> SamplerState:
        alphas_cumprod = alphas_cumprod_np(self.config)
        timesteps = _spaced_timesteps(self.config, num_inference_steps)
        prev = np.append(alphas_cumprod[timesteps[1:]], np.float32(1.0))
        return SamplerState(
            timesteps=jnp.asarray(timesteps.astype(np.int32)),
            init_noise_sigma=_f32(1.0),
            alpha_prod_t=_f32(alphas_cumprod[timesteps]),
            alpha_prod_prev=_f32(prev),
        )

    def step(self, state, carry, i, model_output, sample, key=None, noise=None):
        alpha_prod_t, alpha_prod_prev = state.alpha_prod_t[i], state.alpha_prod_prev[i]
        beta_prod_t, beta_prod_prev = 1 - alpha_prod_t, 1 - alpha_prod_prev
        current_alpha = alpha_prod_t / alpha_prod_prev
        current_beta = 1 - current_alpha
        x0, _ = self._x0_eps(model_output, sample, alpha_prod_t)
        # Posterior mean of q(x_{t-1} | x_t, x0), Ho et al. eq. 7.
        x0_coeff = jnp.sqrt(alpha_prod_prev) * current_beta / beta_prod_t
        sample_coeff = jnp.sqrt(current_alpha) * beta_prod_prev / beta_prod_t
        mean = x0_coeff * x0 + sample_coeff * sample
        if self.config.variance_type == "fixed_small":
            std = jnp.sqrt(jnp.maximum(beta_prod_prev / beta_prod_t * current_beta, 1e-20))
        else:
            std = jnp.sqrt(current_beta)
        noise = _draw_noise(key, noise, sample)
        prev_sample = jnp.where(state.timesteps[i] > 0, mean + std * noise, mean)
        return prev_sample.astype(sample.dtype), carry


@dataclasses.dataclass(frozen=True)
class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021) with stochasticity `eta` (0: deterministic; 1: DDPM-like), as diffusers
    `DDIMScheduler.step(eta=...)`.

    As in diffusers, each step goes from timestep t to t - num_train_timesteps // N, whatever the spacing, and
    the alpha-bar after the last step is 1 (`set_alpha_to_one`) or alphas_cumprod[0].
    """

    eta: float = 0.0

    def set_timesteps(self, num_inference_steps: int) -> SamplerState:
        alphas_cumprod = alphas_cumprod_np(self.config)
        timesteps = _spaced_timesteps(self.config, num_inference_steps)
        final = np.float32(1.0) if self.config.set_alpha_to_one else alphas_cumprod[0]
        prev_t = timesteps - self.config.num_train_timesteps // num_inference_steps
        prev = np.where(prev_t >= 0, alphas_cumprod[np.maximum(prev_t, 0)], final)
        return SamplerState(
            timesteps=jnp.asarray(timesteps.astype(np.int32)),
            init_noise_sigma=_f32(1.0),
            alpha_prod_t=_f32(alphas_cumprod[timesteps]),
            alpha_prod_prev=_f32(prev),
        )

    def step(self, state, carry, i, model_output, sample, key=None, noise=None):
        alpha_prod_t, alpha_prod_prev = state.alpha_prod_t[i], state.alpha_prod_prev[i]
        x0, eps = self._x0_eps(model_output, sample, alpha_prod_t)
        # sigma_t of DDIM eq. 16, scaled by eta.
        variance = ((1 - alpha_prod_prev) / (1 - alpha_prod_t)) * (1 - alpha_prod_t / alpha_prod_prev)
        std = self.eta * jnp.sqrt(variance)
        direction = jnp.sqrt(1 - alpha_prod_prev - std * std) * eps
        prev_sample = jnp.sqrt(alpha_prod_prev) * x0 + direction
        if self.eta > 0:
            prev_sample = prev_sample + std * _draw_noise(key, noise, sample)
        return prev_sample.astype(sample.dtype), carry


@dataclasses.dataclass(frozen=True)
class DDIMInverseSampler(Sampler):
    """Deterministic DDIM run backwards, clean sample -> noise (diffusers `DDIMInverseScheduler`).

    Timesteps ascend; step i moves from timestep t_i - num_train_timesteps // N (alpha-bar 1 or
    alphas_cumprod[0] below zero, per `set_alpha_to_one`) up to t_i, with the model evaluated at t_i.
    """

    def set_timesteps(self, num_inference_steps: int) -> SamplerState:
        config, n = self.config, num_inference_steps
        _check_steps(config, n)
        num_train = config.num_train_timesteps
        if config.timestep_spacing == "leading":
            timesteps = (np.arange(0, n) * (num_train // n)).round().astype(np.int64) + config.steps_offset
        elif config.timestep_spacing == "trailing":
            timesteps = np.round(np.arange(num_train, 0, -num_train / n)[::-1]).astype(np.int64) - 1
        else:
            raise ValueError("DDIM inversion supports timestep_spacing 'leading' or 'trailing'")
        alphas_cumprod = alphas_cumprod_np(config)
        initial = np.float32(1.0) if config.set_alpha_to_one else alphas_cumprod[0]
        from_t = np.minimum(timesteps - num_train // n, num_train - 1)
        start = np.where(from_t >= 0, alphas_cumprod[np.maximum(from_t, 0)], initial)
        return SamplerState(
            timesteps=jnp.asarray(timesteps.astype(np.int32)),
            init_noise_sigma=_f32(1.0),
            alpha_prod_t=_f32(start),
            alpha_prod_prev=_f32(alphas_cumprod[timesteps]),
        )

    def step(self, state, carry, i, model_output, sample, key=None, noise=None):
        alpha_prod_t, alpha_prod_next = state.alpha_prod_t[i], state.alpha_prod_prev[i]
        x0, eps = self._x0_eps(model_output, sample, alpha_prod_t)
        next_sample = jnp.sqrt(alpha_prod_next) * x0 + jnp.sqrt(1 - alpha_prod_next) * eps
        return next_sample.astype(sample.dtype), carry


def _alpha_sigma_lambda(sigma: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """VP (alpha_t, sigma_t) and half log-SNR lambda_t from the VE sigma = sigma_t / alpha_t."""
    alpha_t = 1 / jnp.sqrt(sigma * sigma + 1)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t, jnp.log(alpha_t) - jnp.log(sigma_t)


@dataclasses.dataclass(frozen=True)
class DPMSolverSampler(Sampler):
    """DPM-Solver++ multistep of order `config.solver_order` (2: "DPM++ 2M"; Lu et al. 2022, Alg. 2,
    midpoint form): diffusers `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")`.

    The carry is the previous step's x0 prediction and the number of steps taken. The first step a run takes
    (step 0, or a later start: SDEdit) is first order; so is the last when
    `final_sigmas_type == "zero"` or (`lower_order_final` and N < 15), as in diffusers.
    """

    def set_timesteps(self, num_inference_steps: int) -> SamplerState:
        config, n = self.config, num_inference_steps
        _check_steps(config, n)
        alphas_cumprod, sigma_table = _sigma_table(config)
        log_snr_half = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(1 - alphas_cumprod))
        clipped = int(np.searchsorted(log_snr_half[::-1], config.lambda_min_clipped))
        last = config.num_train_timesteps - clipped
        if config.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif config.timestep_spacing == "leading":
            ratio = last // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64)
            timesteps += config.steps_offset
        else:  # trailing
            ratio = config.num_train_timesteps / n
            timesteps = np.arange(last, 0, -ratio).round().astype(np.int64) - 1
        sigmas = np.append(sigma_table[timesteps], _final_sigma(config, alphas_cumprod))
        return SamplerState(
            timesteps=jnp.asarray(timesteps.astype(np.int32)), init_noise_sigma=_f32(1.0), sigmas=_f32(sigmas)
        )

    def init_carry(self, state, sample):
        """(the previous step's x0 prediction, the steps taken so far): the first step a run takes is first order
        wherever it starts (diffusers' `lower_order_nums`), so SDEdit-style starts at a later step are right too."""
        return jnp.zeros(sample.shape, jnp.float32), jnp.zeros((), jnp.int32)

    def step(self, state, carry, i, model_output, sample, key=None, noise=None):
        config = self.config
        carry, taken = carry
        n = state.num_inference_steps
        i = jnp.asarray(i, jnp.int32)
        sigma_next, sigma_cur, sigma_prev = (
            state.sigmas[i + 1],
            state.sigmas[i],
            state.sigmas[jnp.maximum(i - 1, 0)],
        )
        alpha_t, sigma_t, lambda_t = _alpha_sigma_lambda(sigma_next)
        alpha_s0, sigma_s0, lambda_s0 = _alpha_sigma_lambda(sigma_cur)
        x0, _ = convert_prediction(model_output, sample, alpha_s0, sigma_s0, config.prediction_type)
        x0 = x0.astype(jnp.float32)
        sample32 = sample.astype(jnp.float32)
        h = lambda_t - lambda_s0
        x0_coeff = alpha_t * (jnp.exp(-h) - 1.0)

        def first_order(_):
            return (sigma_t / sigma_s0) * sample32 - x0_coeff * x0

        def second_order(_):
            _, _, lambda_s1 = _alpha_sigma_lambda(sigma_prev)
            r0 = (lambda_s0 - lambda_s1) / h
            d1 = (1.0 / r0) * (x0 - carry.astype(jnp.float32))
            return (sigma_t / sigma_s0) * sample32 - x0_coeff * x0 - 0.5 * x0_coeff * d1

        final_first_order = config.final_sigmas_type == "zero" or (config.lower_order_final and n < 15)
        use_first = (taken == 0) | ((i == n - 1) & final_first_order) | (config.solver_order == 1)
        prev_sample = jax.lax.cond(use_first, first_order, second_order, None)
        return prev_sample.astype(sample.dtype), (x0, taken + 1)


@dataclasses.dataclass(frozen=True)
class EulerSampler(Sampler):
    """Euler steps of the probability-flow ODE in sigma (Karras et al. 2022): `EulerDiscreteScheduler`.

    Sigmas are linearly interpolated in timestep from the training sigma table (timesteps can be fractional
    with linspace spacing). The model input is x / sqrt(sigma^2 + 1) (`scale_model_input`) and the initial
    noise scale `init_noise_sigma` is sigma_max (linspace, trailing) or sqrt(sigma_max^2 + 1) (leading).
    """

    def set_timesteps(self, num_inference_steps: int) -> SamplerState:
        config, n = self.config, num_inference_steps
        _check_steps(config, n)
        if config.timestep_spacing == "linspace":
            timesteps = np.linspace(0, config.num_train_timesteps - 1, n, dtype=np.float32)[::-1].copy()
        else:
            timesteps = _spaced_timesteps(config, n).astype(np.float32)
        alphas_cumprod, sigma_table = _sigma_table(config)
        sigmas = np.interp(timesteps, np.arange(0, len(sigma_table)), sigma_table)
        sigmas = np.append(sigmas, _final_sigma(config, alphas_cumprod)).astype(np.float32)
        sigma_max = sigmas.max()
        if config.timestep_spacing == "leading":
            init_noise_sigma = np.sqrt(sigma_max * sigma_max + np.float32(1.0))
        else:
            init_noise_sigma = sigma_max
        return SamplerState(
            timesteps=jnp.asarray(timesteps), init_noise_sigma=_f32(init_noise_sigma), sigmas=_f32(sigmas)
        )

    def scale_model_input(self, state, sample, i):
        sigma = state.sigmas[i]
        return (sample / jnp.sqrt(sigma * sigma + 1)).astype(sample.dtype)

    def step(self, state, carry, i, model_output, sample, key=None, noise=None):
        sigma, sigma_next = state.sigmas[i], state.sigmas[jnp.asarray(i) + 1]
        sample32 = sample.astype(jnp.float32)
        if self.config.prediction_type == "epsilon":
            x0 = sample32 - sigma * model_output
        elif self.config.prediction_type == "v_prediction":
            x0 = model_output * (-sigma / jnp.sqrt(sigma * sigma + 1)) + sample32 / (sigma * sigma + 1)
        else:  # sample
            x0 = model_output
        derivative = (sample32 - x0) / sigma
        prev_sample = sample32 + derivative * (sigma_next - sigma)
        return prev_sample.astype(sample.dtype), carry


# ----------------------------------------------------------------------------------------------------------
# Whole loop
# ----------------------------------------------------------------------------------------------------------


def sample_loop(
    sampler: Sampler,
    state: SamplerState,
    model_fn: Callable[[jax.Array, jax.Array], jax.Array],
    x_T: jax.Array,
    key: jax.Array | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
    callback: Callable[[jax.Array], None] | None = None,
) -> jax.Array:
    """Runs steps `start` to `stop` (default: every step) of `sampler` in one `lax.scan`; returns the sample.

    model_fn(model_input, t) -> model output of the config's prediction type; `t` is the scalar timestep of
    the step (broadcast it to (B,) inside if the model needs that). `x_T` is the starting sample, already
    scaled: `noise * state.init_noise_sigma` (or the clean latent for `DDIMInverseSampler`), or, with `start` > 0,
    the sample at that step's timestep (SDEdit, editing from an inversion). Step i of a stochastic sampler uses the
    key `jax.random.fold_in(key, i)`. `callback(i)` runs on the host as each step finishes (`jax.debug.callback`:
    progress bars).
    """
    stop = state.num_inference_steps if stop is None else stop

    def body(loop_carry, i):
        x, solver_carry = loop_carry
        model_output = model_fn(sampler.scale_model_input(state, x, i), state.timesteps[i])
        step_key = None if key is None else jax.random.fold_in(key, i)
        x, solver_carry = sampler.step(state, solver_carry, i, model_output, x, key=step_key)
        if callback is not None:
            jax.debug.callback(callback, i)
        return (x, solver_carry), None

    init = (x_T, sampler.init_carry(state, x_T))
    (x, _), _ = jax.lax.scan(body, init, jnp.arange(start, stop, dtype=jnp.int32))
    return x
