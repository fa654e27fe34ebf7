"""Discrete-time noise schedules (the forward process) and conversions between model parameterisations.

A schedule is described by a frozen `ScheduleConfig`, which mirrors the fields of a diffusers
`scheduler_config.json` (so `scheduler/` folders of pretrained pipelines load with `from_diffusers_config`),
and realised as a `NoiseSchedule`: fp32 `betas` and `alphas_cumprod` tables of length
`num_train_timesteps`.

The tables are built with the same formulas and fp32 rounding steps as diffusers:

- `linear`: betas = linspace(beta_start, beta_end, T);
- `scaled_linear`: betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2 (Stable Diffusion);
- `squaredcos_cap_v2`: betas_i = min(1 - abar((i+1)/T) / abar(i/T), 0.999) with
  abar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2 (Nichol & Dhariwal 2021);
- `rescale_betas_zero_snr`: sqrt(alphas_cumprod) is shifted and scaled so that the last step has zero SNR
  while the first is unchanged (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", Algorithm 1).

`alphas_cumprod` is the running product of `1 - betas` accumulated in fp64 and rounded to fp32, as torch does
on CPU. torch's fp32 `linspace` rounds some entries differently depending on the CPU's vector width; ours is
the correctly rounded fp64 linspace, so `betas` agree with diffusers to about one fp32 ulp.

Array conventions: samples are channels-last arrays of any rank (B, ...); timesteps are integer arrays of
shape (B,) (or scalars) and broadcast over the non-batch axes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# Defaults that differ from the dataclass defaults for some diffusers scheduler classes; used when a
# `scheduler_config.json` leaves a key out.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DPMSolverMultistepScheduler": {"timestep_spacing": "linspace"},
    "EulerDiscreteScheduler": {"timestep_spacing": "linspace"},
}

# diffusers options this package does not implement: a config may carry them only at these values.
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "thresholding": (False,),
    "use_karras_sigmas": (False, None),
    "use_exponential_sigmas": (False, None),
    "use_beta_sigmas": (False, None),
    "use_lu_lambdas": (False,),
    "use_flow_sigmas": (False,),
    "use_dynamic_shifting": (False,),
    "euler_at_final": (False,),
    "algorithm_type": ("dpmsolver++",),
    "solver_type": ("midpoint",),
    "interpolation_type": ("linear",),
    "timestep_type": ("discrete",),
}


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Noise schedule plus sampler options, field names as in diffusers' `scheduler_config.json`.

    Defaults are those of diffusers' `DDPMScheduler` / `DDIMScheduler` (note `clip_sample=True` and
    `timestep_spacing="leading"`; Stable-Diffusion-style models use `clip_sample=False`, `steps_offset=1`,
    `set_alpha_to_one=False`, `beta_schedule="scaled_linear"`).

    Schedule: `num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`, `trained_betas` (explicit
    betas, overriding the schedule), `rescale_betas_zero_snr`, `prediction_type` (what the model predicts).
    Sampler options: `timestep_spacing`, `steps_offset` (added to `leading` timesteps), `set_alpha_to_one`
    (DDIM: alpha-bar after the last step is 1, else alphas_cumprod[0]), `clip_sample` and `clip_sample_range`
    (DDPM/DDIM clip the x0 prediction), `variance_type` (DDPM), `solver_order` (DPM-Solver++, 1 or 2),
    `lower_order_final` and `final_sigmas_type` (DPM-Solver++ and Euler), `lambda_min_clipped` (DPM-Solver++:
    timesteps whose log-SNR/2 falls below it are not visited).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: tuple[float, ...] | None = None
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    variance_type: str = "fixed_small"
    solver_order: int = 2
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"
    lambda_min_clipped: float = -math.inf

    def __post_init__(self):
        _check_choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _check_choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _check_choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS)
        _check_choice("variance_type", self.variance_type, VARIANCE_TYPES)
        _check_choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        _check_choice("solver_order", self.solver_order, (1, 2))
        if self.trained_betas is not None:
            object.__setattr__(self, "trained_betas", tuple(float(b) for b in self.trained_betas))
            if len(self.trained_betas) != self.num_train_timesteps:
                raise ValueError(
                    f"trained_betas has {len(self.trained_betas)} entries, "
                    f"expected num_train_timesteps={self.num_train_timesteps}"
                )

    def replace(self, **changes) -> ScheduleConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any], class_name: str | None = None) -> ScheduleConfig:
        """Reads a diffusers scheduler config dict (the contents of `scheduler_config.json`).

        Keys this class does not know are ignored; keys missing from `config` take the defaults of
        `class_name` (or of `config["_class_name"]`). A config that enables a diffusers feature not
        implemented here (Karras sigmas, thresholding, SDE solvers, ...) raises `NotImplementedError` rather
        than being silently sampled differently.
        """
        for key, allowed in _UNSUPPORTED_UNLESS.items():
            if key in config and config[key] not in allowed:
                raise NotImplementedError(f"scheduler option {key}={config[key]!r} is not supported")
        class_name = class_name or config.get("_class_name")
        values: dict[str, Any] = dict(_CLASS_DEFAULTS.get(class_name, {}))
        names = {f.name for f in dataclasses.fields(cls)}
        # None stands for "this class's default" in diffusers configs (e.g. DPM-Solver's variance_type).
        values.update({k: v for k, v in config.items() if k in names and (v is not None or k == "trained_betas")})
        if values.get("trained_betas") is not None:
            values["trained_betas"] = tuple(values["trained_betas"])
        return cls(**values)

    @classmethod
    def from_mapping(cls, config: Mapping[str, Any]) -> ScheduleConfig:
        """The fields of this class found in `config` (a training config's `schedule`, which also holds
        training-only keys such as `timestep_bias`); lists read as tuples."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in names})

    def to_diffusers_config(self, class_name: str | None = None) -> dict[str, Any]:
        """Writes a diffusers scheduler config dict; `class_name` sets `_class_name` when given."""
        out: dict[str, Any] = {"_class_name": class_name} if class_name else {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}; expected one of {choices}")


# ----------------------------------------------------------------------------------------------------------
# Host-side (numpy) tables
# ----------------------------------------------------------------------------------------------------------


def _cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return np.asarray(betas, dtype=np.float64).astype(np.float32)


def _cumprod_f32(x: np.ndarray) -> np.ndarray:
    """fp32 running product accumulated in fp64 (what torch.cumprod does for fp32 on CPU)."""
    return np.cumprod(x.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Lin et al. 2023, Algorithm 1: rescale betas so that alphas_cumprod[-1] == 0 (zero terminal SNR)."""
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(np.float32(1.0) - betas.astype(np.float32)))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (np.float32(1.0) - alphas).astype(np.float32)


def betas_np(config: ScheduleConfig) -> np.ndarray:
    """The (T,) fp32 beta table of `config`, on the host."""
    n = config.num_train_timesteps
    if config.trained_betas is not None:
        betas = np.asarray(config.trained_betas, dtype=np.float32)
    elif config.beta_schedule == "linear":
        betas = np.linspace(config.beta_start, config.beta_end, n).astype(np.float32)
    elif config.beta_schedule == "scaled_linear":
        betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n).astype(np.float32)
        betas = betas * betas
    else:  # squaredcos_cap_v2
        betas = _cosine_betas(n)
    if config.rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_np(config: ScheduleConfig) -> np.ndarray:
    """The (T,) fp32 alpha-bar table prod_{s<=t}(1 - beta_s) of `config`, on the host."""
    return _cumprod_f32(np.float32(1.0) - betas_np(config))


# ----------------------------------------------------------------------------------------------------------
# Device-side schedule and forward-process helpers
# ----------------------------------------------------------------------------------------------------------


@struct.dataclass
class NoiseSchedule:
    """fp32 `betas` and `alphas_cumprod` tables (T,) with their `config` (static)."""

    betas: jax.Array
    alphas_cumprod: jax.Array
    config: ScheduleConfig = struct.field(pytree_node=False)

    @classmethod
    def create(cls, config: ScheduleConfig) -> NoiseSchedule:
        betas = betas_np(config)
        return cls(
            betas=jnp.asarray(betas),
            alphas_cumprod=jnp.asarray(_cumprod_f32(np.float32(1.0) - betas)),
            config=config,
        )


def _per_sample(values: jax.Array, ndim: int) -> jax.Array:
    """(B,) or scalar coefficients -> shape broadcastable against a (B, ...) array of rank `ndim`."""
    values = jnp.asarray(values)
    return values.reshape(values.shape + (1,) * (ndim - values.ndim))


def _alpha_sigma(schedule: NoiseSchedule, t: jax.Array, ndim: int, dtype) -> tuple[jax.Array, jax.Array]:
    alpha_bar = schedule.alphas_cumprod.astype(dtype)[jnp.asarray(t)]
    alpha = _per_sample(jnp.sqrt(alpha_bar), ndim)
    sigma = _per_sample(jnp.sqrt(1 - alpha_bar), ndim)
    return alpha, sigma


def add_noise(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process q(x_t | x_0): sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise, t of shape (B,) or ()."""
    alpha, sigma = _alpha_sigma(schedule, t, x0.ndim, x0.dtype)
    return alpha * x0 + sigma * noise


def get_velocity(schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The v-prediction target (Salimans & Ho 2022): sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0."""
    alpha, sigma = _alpha_sigma(schedule, t, x0.ndim, x0.dtype)
    return alpha * noise - sigma * x0


def training_target(
    schedule: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array, prediction_type: str | None = None
) -> jax.Array:
    """The target of a model of `prediction_type` (default: the schedule's) at add_noise(x0, noise, t)."""
    prediction_type = prediction_type or schedule.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return get_velocity(schedule, x0, noise, t)
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def convert_prediction(
    model_output: jax.Array, sample: jax.Array, alpha: jax.Array, sigma: jax.Array, prediction_type: str
) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model output, given x_t = alpha * x0 + sigma * eps with alpha, sigma broadcastable."""
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    if prediction_type == "v_prediction":
        return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample
    if prediction_type == "sample":
        return model_output, (sample - alpha * model_output) / sigma
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def predict_x0_eps(
    schedule: NoiseSchedule,
    model_output: jax.Array,
    sample: jax.Array,
    t: jax.Array,
    prediction_type: str | None = None,
) -> tuple[jax.Array, jax.Array]:
    """(x0, eps) from a model output of any prediction type (default: the schedule's) at timesteps t."""
    alpha, sigma = _alpha_sigma(schedule, t, sample.ndim, sample.dtype)
    return convert_prediction(model_output, sample, alpha, sigma, prediction_type or schedule.config.prediction_type)
