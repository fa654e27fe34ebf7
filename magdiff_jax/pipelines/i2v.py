"""MagicVideo-V2 image-to-video: a reference image and a caption -> keyframes, as pure functions of models and params.

    models = {"unet": I2VUNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel, "image_encoder": CLIPVisionModel}
    cond = reference_condition(models, params, reference)       # CLIP tokens, ControlNet pixels and scale
    video = generate(models, params, tokens=..., null_tokens=..., cond=cond, key=..., num_frames=32,
                     latent_size=(72, 72), reference=reference)               # (B, F, H, W, 3) in [-1, 1]

Sampling (PAPERS.md B.3): DDIM (eta 0), DPM-Solver++ 2M or Euler with classifier-free guidance. `image_guidance=None`
guides on the text alone, the reference kept in both passes (its CLIP tokens and the ControlNet); with
`image_guidance=s_I` InstructPix2Pix's two-scale guidance, the reference dropped as in training (black CLIP input,
ControlNet off): e(0, 0) + s_I [e(c_I, 0) - e(0, 0)] + s_T [e(c_I, c_T) - e(c_I, 0)]. The starting latents come
from the latent noise prior (`diffusion.noise_prior`: the forward-diffused reference, a mean shift toward it, or
ConsistI2V's FrameInit, over PYoCo-correlated frame noise). The denoising loop is one `lax.scan`; every pass of a
step runs as one batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magdiff_jax.diffusion import DDIMSampler, DPMSolverSampler, EulerSampler, ScheduleConfig, sample_loop
from magdiff_jax.diffusion.noise_prior import NoisePriorConfig, initial_latents
from magdiff_jax.diffusion.schedules import NoiseSchedule
from magdiff_jax.models.i2v import reference_condition
from magdiff_jax.models.vae import decode_video, encode_images
from magdiff_jax.pipelines.guided import StagePipeline, guided_denoiser, per_example_jit

SAMPLERS = {"ddim": DDIMSampler, "dpm": DPMSolverSampler, "euler": EulerSampler}


def make_sampler(name: str, schedule: ScheduleConfig):
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {name!r}")
    return SAMPLERS[name](schedule)


def generate(models, params, *, tokens, null_tokens, cond: dict, key, num_frames: int, latent_size,
             schedule: ScheduleConfig, reference=None, num_steps: int = 25, guidance: float = 7.5,
             image_guidance: float | None = None, null_cond: dict | None = None, sampler: str = "ddim",
             prior: NoisePriorConfig | None = None, progress=None):
    """Keyframes (B, F, H, W, 3) in [-1, 1]. tokens / null_tokens (B, L): the prompts and the empty prompt; cond:
    `models.i2v.reference_condition` of the references (image_embeds, reference, conditioning_scale); null_cond: that of
    dropped references (needed with image_guidance); reference (B, H, W, 3) in [-1, 1]: the pixels the noise prior
    starts from (needed unless the prior is "none"). progress: a host function called with each step's index."""
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    b = tokens.shape[0]
    text_ctx = text.apply({"params": params["text_encoder"]}, tokens).last_hidden_state
    null_ctx = text.apply({"params": params["text_encoder"]}, null_tokens).last_hidden_state
    model_fn = guided_denoiser(lambda x, t, ctx, **c: unet.apply({"params": params["unet"]}, x, t, ctx, **c),
                               text_ctx, null_ctx, cond, guidance=guidance, image_guidance=image_guidance,
                               null_cond=null_cond)
    solver = make_sampler(sampler, schedule)
    state = solver.set_timesteps(num_steps)
    prior = NoisePriorConfig() if prior is None else prior
    shape = (b, num_frames, *latent_size, unet.config.latent_channels)
    if reference is not None:
        ref_latent = encode_images(vae, params["vae"], reference)  # posterior means, (B, h, w, c)
    elif prior.kind == "none":
        ref_latent = jnp.zeros((shape[0], *shape[2:]), jnp.float32)  # unused: plain noise
    else:
        raise ValueError(f"noise prior {prior.kind!r} starts from the reference: pass reference")
    x, start = initial_latents(prior, key, ref_latent, shape, NoiseSchedule.create(schedule), solver, state)
    x = sample_loop(solver, state, model_fn, x, start=start, callback=progress)
    return decode_video(vae, params["vae"], x)


class I2VPipeline(StagePipeline):
    """Keyframes from an I2V stage (`magdiff-jax i2v`): its export, or a training workdir exported on the fly.

        pipe = I2VPipeline.load("runs/i2v/export")
        videos = pipe(images, prompts, seeds=[0, 1], num_frames=16)     # images (N, H, W, 3) uint8 -> uint8 videos

    Reference images are resized to cover the stage's resolution and centre-cropped, as the loader does; a batch
    is split over the devices when it divides evenly.
    """

    TASK, NAME, REQUIRED = "i2v", "an I2V", ("unet", "vae", "text_encoder", "image_encoder")

    def prepare(self, image):
        """An image (H, W, 3) uint8 -> the reference at the stage's resolution (cover, centre crop), uint8."""
        import numpy as np

        from magdiff_jax.data.transforms import crop_offset, resize_images, scaled_size

        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
            raise ValueError(f"a reference image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
        out_h, out_w = self.resolution
        h, w = scaled_size(*image.shape[:2], out_h, out_w)
        image = resize_images(image[None], (h, w))[0]
        y, x = crop_offset((h, w), (out_h, out_w), None)
        return image[y:y + out_h, x:x + out_w]

    def __call__(self, images, prompts: list[str], seeds, *, num_frames: int | None = None, num_steps: int = 25,
                 guidance: float = 7.5, image_guidance: float | None = None, sampler: str = "ddim",
                 prior: NoisePriorConfig | None = None, progress: bool = False):
        """Keyframes (N, F, H, W, 3) uint8 for reference images (N, H, W, 3) uint8 (any size: `prepare`d here) and
        prompts, one seed each."""
        import numpy as np

        from magdiff_jax.data.transforms import tokenizer

        if image_guidance is not None and not self.config.task_options.get("reference_dropout", 0.0):
            raise ValueError("image_guidance (two-scale guidance) needs a model trained with dropped references "
                             "(task_options.reference_dropout > 0); this stage was trained without, so its "
                             "'no reference' prediction was never learned: use text guidance alone")
        if not (len(images) == len(prompts) == len(seeds)):
            raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(seeds)} seeds: one each")
        num_frames = int(self.config.data.num_frames) if num_frames is None else int(num_frames)
        max_frames = self.stage.modules["unet"].config.unet.motion_max_seq_length
        if num_frames > max_frames:
            raise ValueError(f"{num_frames} frames: the motion modules' position table holds {max_frames}")
        refs = np.stack([self.prepare(im) for im in images])
        tok = tokenizer(self.stage.tokenizer_folder(), self.config.data.max_length)
        batch = {"reference": refs.astype(np.float32) / 127.5 - 1.0, "tokens": np.asarray(tok(list(prompts))),
                 "null_tokens": np.asarray(tok([""] * len(prompts)))}
        prior = NoisePriorConfig() if prior is None else prior
        settings = (num_frames, num_steps, float(guidance), image_guidance, sampler, prior, bool(progress))
        if settings not in self._fns:
            self._fns[settings] = self._compile(*settings)
        return self._runner.run(self._fns[settings], self.stage.params, batch, seeds, num_steps=num_steps,
                                progress=progress)

    def _compile(self, num_frames, num_steps, guidance, image_guidance, sampler, prior, progress):
        models, config, schedule = self.stage.modules, self.config, self.stage.schedule
        f = models["vae"].config.downsample_factor
        h, w = (s // f for s in self.resolution)

        def one(params, batch, key_data):  # one example: (1, ...) arrays
            reference = batch["reference"]
            layer = config.task_options.get("image_layer", -2)
            cond = reference_condition(models, params, reference, image_layer=layer)
            null_cond = None
            if image_guidance is not None:
                null_cond = reference_condition(models, params, reference, image_layer=layer, drop=1.0)
            return generate(models, params, tokens=batch["tokens"], null_tokens=batch["null_tokens"], cond=cond,
                            key=jax.random.wrap_key_data(key_data), num_frames=num_frames, latent_size=(h, w),
                            schedule=schedule, reference=reference, num_steps=num_steps, guidance=guidance,
                            image_guidance=image_guidance, null_cond=null_cond, sampler=sampler, prior=prior,
                            progress=self._runner.tick if progress else None)

        return per_example_jit(one)
