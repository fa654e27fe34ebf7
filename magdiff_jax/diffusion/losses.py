"""The denoising loss every diffusion stage trains with, and its timestep sampling.

    loss = diffusion_loss(lambda x_t, t: unet(x_t, t, context), latents, k_noise, k_t, schedule,
                          timestep_bias=0.0)

MSE between the model's output at `add_noise(latents, noise, t)` and the training target of the schedule's
prediction type (epsilon, v or x0), in float32, averaged over every element.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from magdiff_jax.diffusion.schedules import NoiseSchedule, add_noise, training_target


def check_timestep_bias(bias: float) -> float:
    bias = float(bias)
    if bias < 0:
        raise ValueError(f"schedule.timestep_bias must be >= 0, got {bias}")
    return bias


def sample_timesteps(key, n: int, num_train_timesteps: int, bias: float = 0.0, max_timestep: int | None = None
                     ) -> jax.Array:
    """n training timesteps in [0, T) with T = `max_timestep` (default num_train_timesteps; smaller for a stage that
    only ever denoises from part-way, e.g. SDEdit at strength s needs t < s * num_train_timesteps): uniform (bias 0),
    or with density proportional to (t / T) ** bias (> 0: more of them at high noise, where the noisy input no
    longer shows what the conditioning alone must decide, e.g. which way a subject moves)."""
    bias = check_timestep_bias(bias)
    top = num_train_timesteps if max_timestep is None else int(max_timestep)
    if not 0 < top <= num_train_timesteps:
        raise ValueError(f"max_timestep must be in [1, {num_train_timesteps}], got {max_timestep}")
    if bias == 0:
        return jax.random.randint(key, (n,), 0, top)
    u = jax.random.uniform(key, (n,))
    return jnp.minimum((top * u ** (1.0 / (1.0 + bias))).astype(jnp.int32), top - 1)


def diffusion_loss(model_fn: Callable[[jax.Array, jax.Array], jax.Array], latents: jax.Array, key_noise: jax.Array,
                   key_t: jax.Array, schedule: NoiseSchedule, *, prediction_type: str | None = None,
                   timestep_bias: float = 0.0, max_timestep: int | None = None) -> jax.Array:
    """Scalar denoising loss of `model_fn(noisy latents, timesteps (B,))` on clean `latents` (B, ...): Gaussian
    noise from `key_noise`, timesteps from `key_t` (`sample_timesteps`), the target of `prediction_type` (default:
    the schedule's)."""
    noise = jax.random.normal(key_noise, latents.shape, latents.dtype)
    t = sample_timesteps(key_t, latents.shape[0], schedule.config.num_train_timesteps, timestep_bias, max_timestep)
    pred = model_fn(add_noise(schedule, latents, noise, t), t)
    target = training_target(schedule, latents, noise, t, prediction_type)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
