"""Noise schedules and samplers against diffusers' PyTorch schedulers.

Every sampler trajectory test runs the matching diffusers scheduler built from the same config
(`ScheduleConfig.to_diffusers_config()` fed to `<Scheduler>.from_config`), feeds both the same random model at
each step, and checks the timesteps exactly and the sample after every step to max abs error <= 1e-5 (fp32).
Our samples are channels-last (B, H, W, C); torch's are the NCHW transpose.

For the denoising samplers the random model predicts a random clean sample: at each step x0_hat ~ N(0, 1) is
drawn from a fixed numpy RNG, and each side receives the fp32 epsilon / v / x0 that is consistent with x0_hat
and its own model input (the two inputs agree to 1e-5, which is checked too). Feeding one array to both would
be inconsistent with one side's sample: denoising amplifies that by up to 1/sqrt(alpha_bar) (160x) and fp32
rounding alone then exceeds 1e-5; pure noise as an epsilon prediction drives samples to |x| ~ 1e2-1e5.
Inversion runs the other way and contracts differences, so there both sides get the same N(0, 1) array.
`EulerSampler` keeps its sample in variance-exploding form (|x| up to ~50 here), so its samples are compared
after division by sqrt(sigma^2 + 1), i.e. as the model sees them; after the last step that factor is 1.
"""

import inspect
import math

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

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

SHAPE = (2, 8, 8, 4)  # (B, H, W, C)
TOL = 1e-5

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SD_DDIM = dict(SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
ZERO_SNR = dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing")

# (id, our sampler class, its options, diffusers class, ScheduleConfig fields, inference steps)
CASES = [
    ("ddpm-linear-eps-leading", DDPMSampler, {}, "DDPMScheduler", {}, 20),
    (
        "ddpm-cosine-v-linspace-fixed_large",  # ends at t = 0, where no noise is added
        DDPMSampler,
        {},
        "DDPMScheduler",
        dict(
            beta_schedule="squaredcos_cap_v2",
            prediction_type="v_prediction",
            timestep_spacing="linspace",
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
        "ddim-eta0.5-cosine-eps-leading",
        DDIMSampler,
        {"eta": 0.5},
        "DDIMScheduler",
        dict(beta_schedule="squaredcos_cap_v2", clip_sample=False),
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
        "dpm2m-sd-trailing-sigma_min-lower_order_final",  # N < 15: first-order last step
        DPMSolverSampler,
        {},
        "DPMSolverMultistepScheduler",
        dict(SD, timestep_spacing="trailing", final_sigmas_type="sigma_min"),
        12,
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
        "euler-sd-v-leading-offset1",
        EulerSampler,
        {},
        "EulerDiscreteScheduler",
        dict(SD, prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1),
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


def random_x0_model_output(x0: np.ndarray, model_in: np.ndarray, alpha_bar: float, prediction_type: str) -> np.ndarray:
    """Output of a model that predicts `x0` for the noisy `model_in` = sqrt(abar) x0 + sqrt(1-abar) eps."""
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    eps = (model_in.astype(np.float64) - alpha * x0) / sigma
    out = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0}[prediction_type]
    return out.astype(np.float32)


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
        model_in = np.asarray(scale(state, jnp.asarray(x), jnp.int32(i)))
        model_in_ref = ref.scale_model_input(x_ref, t)
        np.testing.assert_allclose(model_in, from_torch(model_in_ref), atol=TOL, rtol=0)

        if sampler_cls is EulerSampler:
            sigma = float(ref.sigmas[i])
            alpha_bar = 1 / (sigma * sigma + 1)
            next_scale = math.sqrt(float(ref.sigmas[i + 1]) ** 2 + 1)
        else:
            alpha_bar, next_scale = float(ref.alphas_cumprod[int(t)]), 1.0
        if sampler_cls is DDIMInverseSampler:  # inversion contracts differences: plain noise as the output
            out = rng.standard_normal(SHAPE).astype(np.float32)
            out_ref = to_torch(out)
        else:
            x0_hat = rng.standard_normal(SHAPE)
            out = random_x0_model_output(x0_hat, model_in, alpha_bar, config.prediction_type)
            out_ref = to_torch(
                random_x0_model_output(x0_hat, from_torch(model_in_ref), alpha_bar, config.prediction_type)
            )
        noise, kwargs = None, {}
        if sampler_cls is DDPMSampler:
            # DDPMScheduler draws its noise from the generator when t > 0: draw the same numbers for ours.
            kwargs["generator"] = torch_gen
            gen_state = torch_gen.get_state()
            noise = from_torch(torch.randn(out_ref.shape, generator=torch_gen))
            torch_gen.set_state(gen_state)
        elif sampler_cls is DDIMSampler:
            kwargs["eta"] = sampler.eta
            if sampler.eta > 0:
                noise = rng.standard_normal(SHAPE).astype(np.float32)
                kwargs["variance_noise"] = to_torch(noise)
        x_ref = ref.step(out_ref, t, x_ref, **kwargs).prev_sample
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
        err = float(np.abs(x - from_torch(x_ref)).max()) / next_scale
        errors.append(err)
        assert err <= TOL, f"step {i} (t={t}): max abs error {err:.3g} > {TOL}"
    assert np.abs(x - x_start).max() > 0.1  # the trajectory went somewhere
    print(f"{sampler_cls.__name__} max abs error over {steps} steps: {max(errors):.3g}")


# ----------------------------------------------------------------------------------------------------------
# Schedule tables and forward-process helpers
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {},
        SD,
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(SD, rescale_betas_zero_snr=True),
        dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
    ],
    ids=["linear", "scaled_linear", "squaredcos_cap_v2", "scaled_linear-zero_snr", "cosine-zero_snr"],
)
def test_schedule_tables_match_diffusers(fields):
    """betas / alphas_cumprod vs diffusers DDPMScheduler. Cosine betas are bit-exact; (scaled) linear ones
    within 5e-7 relative (torch's fp32 linspace and sqrt round some entries one ulp differently, depending on
    the CPU's vector unit); alphas_cumprod within 1e-6 relative (+1e-9 absolute); zero-SNR ends at exactly 0.
    Rescaled zero-SNR betas are 1 - (ratio of neighbouring alpha-bars), which turns one-ulp differences in
    alpha-bar into ~1e-4 relative ones: there only alphas_cumprod, what the samplers use, is compared."""
    config = ScheduleConfig(**fields)
    schedule = NoiseSchedule.create(config)
    ref = diffusers.DDPMScheduler(**fields)
    betas, alphas_cumprod = np.asarray(schedule.betas), np.asarray(schedule.alphas_cumprod)
    assert betas.dtype == alphas_cumprod.dtype == np.float32
    assert betas.shape == (1000,)
    if config.rescale_betas_zero_snr:
        assert alphas_cumprod[-1] == 0.0 == float(ref.alphas_cumprod[-1])
    elif config.beta_schedule == "squaredcos_cap_v2":
        np.testing.assert_array_equal(betas, ref.betas.numpy())
    else:
        np.testing.assert_allclose(betas, ref.betas.numpy(), rtol=5e-7, atol=0)
    np.testing.assert_allclose(alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-9)


def test_trained_betas_pass_through():
    betas = np.linspace(1e-3, 0.05, 50)
    config = ScheduleConfig(num_train_timesteps=50, trained_betas=tuple(betas))
    schedule = NoiseSchedule.create(config)
    np.testing.assert_array_equal(np.asarray(schedule.betas), betas.astype(np.float32))
    ref = diffusers.DDIMScheduler.from_config(config.to_diffusers_config())
    np.testing.assert_array_equal(np.asarray(schedule.alphas_cumprod), ref.alphas_cumprod.numpy())


@pytest.mark.parametrize("fields", [SD, dict(beta_schedule="squaredcos_cap_v2")], ids=["sd", "cosine"])
def test_add_noise_and_velocity_match_diffusers(fields):
    """add_noise / get_velocity vs diffusers DDPMScheduler.add_noise / get_velocity on (B, F, H, W, C) video
    latents with per-sample timesteps (B,): max abs error 1e-6."""
    rng = np.random.default_rng(1)
    shape = (3, 4, 6, 6, 4)
    x0 = rng.standard_normal(shape).astype(np.float32)
    noise = rng.standard_normal(shape).astype(np.float32)
    t = np.array([0, 517, 999])
    schedule = NoiseSchedule.create(ScheduleConfig(**fields))
    ref = diffusers.DDPMScheduler(**fields)
    args = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    noisy = np.asarray(jax.jit(add_noise)(schedule, x0, noise, t))
    velocity = np.asarray(jax.jit(get_velocity)(schedule, x0, noise, t))
    np.testing.assert_allclose(noisy, ref.add_noise(*args).numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(velocity, ref.get_velocity(*args).numpy(), atol=1e-6, rtol=0)
    # A scalar timestep broadcasts over the batch.
    np.testing.assert_allclose(np.asarray(add_noise(schedule, x0, noise, 517))[1], noisy[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predict_x0_eps_inverts_the_forward_process(prediction_type):
    """For x_t = add_noise(x0, eps, t) and the exact target of each prediction type, predict_x0_eps returns
    (x0, eps) (fp32, max abs error 1e-4 for t in [50, 950])."""
    rng = np.random.default_rng(2)
    x0 = rng.standard_normal((4, 2, 5, 5, 3)).astype(np.float32)
    eps = rng.standard_normal(x0.shape).astype(np.float32)
    t = np.array([50, 300, 700, 950])
    schedule = NoiseSchedule.create(ScheduleConfig(**SD, prediction_type=prediction_type))
    x_t = add_noise(schedule, x0, eps, t)
    target = training_target(schedule, x0, eps, t)
    x0_pred, eps_pred = predict_x0_eps(schedule, target, x_t, t)
    np.testing.assert_allclose(np.asarray(x0_pred), x0, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(eps_pred), eps, atol=1e-4, rtol=0)
    # An output of another parameterisation is read as that parameterisation.
    v = training_target(schedule, x0, eps, t, prediction_type="v_prediction")
    x0_from_v, _ = predict_x0_eps(schedule, v, x_t, t, prediction_type="v_prediction")
    np.testing.assert_allclose(np.asarray(x0_from_v), x0, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# scheduler_config.json round trip
# ----------------------------------------------------------------------------------------------------------


def test_diffusers_config_round_trip():
    config = ScheduleConfig(**SD_DDIM, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    as_dict = config.to_diffusers_config("DDIMScheduler")
    assert as_dict["_class_name"] == "DDIMScheduler"
    assert ScheduleConfig.from_diffusers_config(as_dict) == config
    # What diffusers itself writes reads back to the same config; unknown keys are ignored.
    ref = diffusers.DDIMScheduler.from_config(as_dict)
    written = dict(ref.config, _class_name="DDIMScheduler", _diffusers_version="0.42.1", some_future_key=3)
    assert ScheduleConfig.from_diffusers_config(written) == config


def test_diffusers_config_class_defaults():
    """Keys missing from a scheduler_config.json take the named class's defaults (linspace for DPM/Euler)."""
    minimal = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    dpm = ScheduleConfig.from_diffusers_config(dict(minimal, _class_name="DPMSolverMultistepScheduler"))
    assert dpm.timestep_spacing == "linspace"
    assert ScheduleConfig.from_diffusers_config(minimal).timestep_spacing == "leading"
    assert ScheduleConfig.from_diffusers_config(minimal, class_name="EulerDiscreteScheduler").timestep_spacing == (
        "linspace"
    )
    # A full DPMSolverMultistepScheduler config (variance_type=None, lambda_min_clipped=-inf, ...) parses.
    full = ScheduleConfig.from_diffusers_config(dict(diffusers.DPMSolverMultistepScheduler(**minimal).config))
    assert (full.timestep_spacing, full.solver_order, full.final_sigmas_type) == ("linspace", 2, "zero")
    assert full.variance_type == "fixed_small"


@pytest.mark.parametrize(
    "key, value", [("use_karras_sigmas", True), ("thresholding", True), ("algorithm_type", "sde-dpmsolver++")]
)
def test_diffusers_config_rejects_unsupported_features(key, value):
    with pytest.raises(NotImplementedError, match=key):
        ScheduleConfig.from_diffusers_config({key: value})


def test_config_validation():
    with pytest.raises(ValueError, match="beta_schedule"):
        ScheduleConfig(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="prediction_type"):
        ScheduleConfig(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="DDIM inversion"):
        DDIMInverseSampler(ScheduleConfig(timestep_spacing="linspace")).set_timesteps(10)


# ----------------------------------------------------------------------------------------------------------
# Stochastic steps and the fused loop
# ----------------------------------------------------------------------------------------------------------


def test_stochastic_step_noise_from_key():
    """DDPM with key=k equals DDPM with noise=normal(k); without either it refuses to run."""
    sampler = DDPMSampler(ScheduleConfig(**SD))
    state = sampler.set_timesteps(10)
    rng = np.random.default_rng(3)
    x, out = (jnp.asarray(rng.standard_normal(SHAPE), jnp.float32) for _ in range(2))
    key = jax.random.key(7)
    step = jax.jit(sampler.step)
    by_key, _ = step(state, (), 2, out, x, key=key)
    by_noise, _ = step(state, (), 2, out, x, noise=jax.random.normal(key, SHAPE))
    deterministic, _ = step(state, (), 2, out, x, noise=jnp.zeros(SHAPE))
    np.testing.assert_allclose(np.asarray(by_key), np.asarray(by_noise), atol=1e-6, rtol=0)
    assert np.abs(np.asarray(by_key) - np.asarray(deterministic)).max() > 1e-2
    with pytest.raises(ValueError, match="key= or noise="):
        sampler.step(state, (), 2, out, x)


def toy_model(x: jax.Array, t: jax.Array) -> jax.Array:
    return 0.8 * jnp.tanh(x) + 2e-4 * t - 0.1


@pytest.mark.parametrize(
    "sampler",
    [
        DDPMSampler(ScheduleConfig(**SD_DDIM)),
        DDIMSampler(ScheduleConfig(**SD_DDIM), eta=0.7),
        DPMSolverSampler(ScheduleConfig(**SD, timestep_spacing="trailing")),
        EulerSampler(ScheduleConfig(**SD, timestep_spacing="linspace", prediction_type="v_prediction")),
        DDIMInverseSampler(ScheduleConfig(**SD_DDIM)),
    ],
    ids=["ddpm", "ddim-eta0.7", "dpm2m", "euler-v", "ddim_inverse"],
)
def test_sample_loop_scan_matches_python_loop(sampler):
    """`sample_loop` (one jitted lax.scan) equals stepping in a Python loop with the same per-step keys
    (max abs error 1e-5)."""
    state = sampler.set_timesteps(12)
    key = jax.random.key(0)
    x_T = jax.random.normal(jax.random.key(1), SHAPE) * state.init_noise_sigma
    fused = jax.jit(sample_loop, static_argnums=(0, 2))(sampler, state, toy_model, x_T, key)

    @jax.jit
    def one_step(x, carry, i):
        out = toy_model(sampler.scale_model_input(state, x, i), state.timesteps[i])
        return sampler.step(state, carry, i, out, x, key=jax.random.fold_in(key, i))

    x, carry = x_T, sampler.init_carry(state, x_T)
    for i in range(state.num_inference_steps):
        x, carry = one_step(x, carry, jnp.int32(i))
    np.testing.assert_allclose(np.asarray(fused), np.asarray(x), atol=1e-5, rtol=0)
    assert np.abs(np.asarray(x) - np.asarray(x_T)).max() > 0.1
