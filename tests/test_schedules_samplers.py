"""Noise schedules and samplers against diffusers' PyTorch schedulers.

Every sampler trajectory test runs the matching diffusers scheduler built from the same config
(`ScheduleConfig.to_diffusers_config()` fed to `<Scheduler>.from_config`), feeds both the same random model output
at each step, and checks the timesteps exactly and the sample after every step to max abs error <= 1e-5 (fp32).
Our samples are channels-last (B, H, W, C); torch's are the NCHW transpose.
"""

import inspect

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from magdiff_jax.diffusion import (
    DDIMInverseSampler,
    DDIMSampler,
    DDPMSampler,
    DPMSolverSampler,
    EulerSampler,
    NoiseSchedule,
    ScheduleConfig,
    add_noise,
    get_velocity,
    predict_x0_eps,
    sample_loop,
    training_target,
)

SHAPE = (2, 8, 8, 4)  # (B, H, W, C)
TOL = 1e-5

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_DDIM = dict(SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
ZERO_SNR = dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")

# (id, our sampler class, its options, diffusers class, ScheduleConfig fields, inference steps)
CASES = [
    ("ddpm-linear-eps-leading", DDPMSampler, {}, "DDPMScheduler", {}, 20),
    (
        "ddpm-cosine-v-trailing-fixed_large",
        DDPMSampler,
        {},
        "DDPMScheduler",
        dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            timestep_spacing="trailing",
            variance_type="fixed_large",
            clip_sample=False,
        ),
        10,
    ),
    ("ddim-sd-leading-offset1", DDIMSampler, {}, "DDIMScheduler", SD_DDIM, 25),
    (
        "ddim-eta1-sample-linspace-clip",
        DDIMSampler,
        {"eta": 1.0},
        "DDIMScheduler",
        dict(prediction_type="sample", timestep_spacing="linspace"),
        10,
    ),
    (
        "ddim-eta0.5-cosine-eps-trailing",
        DDIMSampler,
        {"eta": 0.5},
        "DDIMScheduler",
        dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", clip_sample=False),
        12,
    ),
    ("ddim-zero_snr-v-trailing", DDIMSampler, {}, "DDIMScheduler", dict(ZERO_SNR, clip_sample=False), 10),
    (
        "dpm2m-sd-linspace",
        DPMSolverSampler,
        {},
        "DPMSolverMultistepScheduler",
        dict(SD, timestep_spacing="linspace"),
        20,
    ),
    ("dpm2m-zero_snr-v-trailing", DPMSolverSampler, {}, "DPMSolverMultistepScheduler", ZERO_SNR, 10),
    (
        "dpm2m-linear-eps-leading-sigma_min",
        DPMSolverSampler,
        {},
        "DPMSolverMultistepScheduler",
        dict(timestep_spacing="leading", steps_offset=1, final_sigmas_type="sigma_min"),
        20,
    ),
    (
        "dpm1-cosine-sample-linspace",
        DPMSolverSampler,
        {},
        "DPMSolverMultistepScheduler",
        dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="sample",
            timestep_spacing="linspace",
            solver_order=1,
        ),
        10,
    ),
    (
        "euler-sd-linspace",
        EulerSampler,
        {},
        "EulerDiscreteScheduler",
        dict(SD, timestep_spacing="linspace"),
        20,
    ),
    (
        "euler-linear-v-leading-offset1",
        EulerSampler,
        {},
        "EulerDiscreteScheduler",
        dict(prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
        10,
    ),
    (
        "euler-sd-sample-trailing-sigma_min",
        EulerSampler,
        {},
        "EulerDiscreteScheduler",
        dict(SD, prediction_type="sample", timestep_spacing="trailing", final_sigmas_type="sigma_min"),
        10,
    ),
    ("ddim_inverse-sd-leading-offset1", DDIMInverseSampler, {}, "DDIMInverseScheduler", SD_DDIM, 25),
    (
        "ddim_inverse-cosine-v-trailing-clip",
        DDIMInverseSampler,
        {},
        "DDIMInverseScheduler",
        dict(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", timestep_spacing="trailing"),
        10,
    ),
]


def to_torch(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def from_torch(x: torch.Tensor) -> np.ndarray:
    return np.transpose(x.numpy(), (0, 2, 3, 1))


def diffusers_scheduler(class_name: str, config: ScheduleConfig):
    cls = getattr(diffusers, class_name)
    names = set(inspect.signature(cls.__init__).parameters)
    return cls.from_config({k: v for k, v in config.to_diffusers_config().items() if k in names})


@pytest.mark.parametrize(
    "sampler_cls, options, class_name, fields, steps", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_trajectory_matches_diffusers(sampler_cls, options, class_name, fields, steps):
    """Whole trajectory vs the diffusers scheduler named by the case (DDPMScheduler, DDIMScheduler,
    DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDIMInverseScheduler) with the same config:
    timesteps equal, samples within max abs error 1e-5 after every step."""
    config = ScheduleConfig(**fields)
    sampler = sampler_cls(config, **options)
    state = sampler.set_timesteps(steps)
    ref = diffusers_scheduler(class_name, config)
    ref.set_timesteps(steps)

    np.testing.assert_array_equal(np.asarray(state.timesteps), ref.timesteps.numpy())
    assert state.timesteps.dtype == (jnp.float32 if sampler_cls is EulerSampler else jnp.int32)
    init_sigma = float(ref.init_noise_sigma)
    np.testing.assert_allclose(float(state.init_noise_sigma), init_sigma, rtol=1e-6)

    rng = np.random.default_rng(0)
    x = x_start = (rng.standard_normal(SHAPE) * init_sigma).astype(np.float32)
    x_ref = to_torch(x)
    carry = sampler.init_carry(state, jnp.asarray(x))
    step = jax.jit(sampler.step)
    scale = jax.jit(sampler.scale_model_input)
    torch_gen = torch.Generator().manual_seed(0)

    errors = []
    for i, t in enumerate(ref.timesteps):
        model_in = scale(state, jnp.asarray(x), jnp.int32(i))
        model_in_ref = ref.scale_model_input(x_ref, t)
        np.testing.assert_allclose(np.asarray(model_in), from_torch(model_in_ref), atol=TOL, rtol=0)

        out = rng.standard_normal(SHAPE).astype(np.float32)
        noise, kwargs = None, {}
        if sampler_cls is DDPMSampler:
            # DDPMScheduler draws its noise from the generator when t > 0: draw the same numbers for ours.
            kwargs["generator"] = torch_gen
            gen_state = torch_gen.get_state()
            noise = from_torch(torch.randn(to_torch(out).shape, generator=torch_gen))
            torch_gen.set_state(gen_state)
        elif sampler_cls is DDIMSampler:
            kwargs["eta"] = sampler.eta
            if sampler.eta > 0:
                noise = rng.standard_normal(SHAPE).astype(np.float32)
                kwargs["variance_noise"] = to_torch(noise)
        x_ref = ref.step(to_torch(out), t, x_ref, **kwargs).prev_sample
        x, carry = step(
            state,
            carry,
            jnp.int32(i),
            jnp.asarray(out),
            jnp.asarray(x),
            noise=None if noise is None else jnp.asarray(noise),
        )
        x = np.asarray(x)
        assert np.isfinite(x).all()
        err = float(np.abs(x - from_torch(x_ref)).max())
        errors.append(err)
        assert err <= TOL, f"step {i} (t={t}): max abs error {err:.3g} > {TOL}"
    assert np.abs(x - x_start).max() > 0.1  # the trajectory went somewhere
    print(f"{sampler_cls.__name__} max abs error over {steps} steps: {max(errors):.3g}")
