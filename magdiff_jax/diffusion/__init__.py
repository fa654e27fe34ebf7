"""Diffusion processes: noise schedules, samplers, guidance and the training loss."""

from magdiff_jax.diffusion.guidance import classifier_free_guidance, image_text_guidance, rescale_guidance
from magdiff_jax.diffusion.losses import diffusion_loss, sample_timesteps
from magdiff_jax.diffusion.samplers import (
    DDIMInverseSampler,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerSampler,
    Sampler,
    SamplerState,
    sample_loop,
)
from magdiff_jax.diffusion.schedules import (
    NoiseSchedule,
    ScheduleConfig,
    add_noise,
    alphas_cumprod_np,
    betas_np,
    convert_prediction,
    get_velocity,
    predict_x0_eps,
    rescale_zero_terminal_snr,
    training_target,
)

__all__ = [
    "DDIMInverseSampler",
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverSampler",
    "EulerSampler",
    "NoiseSchedule",
    "Sampler",
    "SamplerState",
    "ScheduleConfig",
    "add_noise",
    "alphas_cumprod_np",
    "betas_np",
    "classifier_free_guidance",
    "convert_prediction",
    "diffusion_loss",
    "get_velocity",
    "image_text_guidance",
    "predict_x0_eps",
    "rescale_guidance",
    "rescale_zero_terminal_snr",
    "sample_loop",
    "sample_timesteps",
    "training_target",
]
