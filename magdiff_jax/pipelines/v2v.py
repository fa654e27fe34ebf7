"""MagicVideo-V2 video-to-video super-resolution (PAPERS.md B.4): keyframes + the reference image + a caption -> the
same video at a higher resolution, as pure functions of models and params.

    models = {"unet": I2VUNet, "vae": AutoencoderKL, "text_encoder": CLIPTextModel, "image_encoder": CLIPVisionModel}
    video = super_resolve(models, params, low_res=keyframes, reference=image, tokens=..., null_tokens=..., key=...,
                          size=(1024, 1024), schedule=..., config=stage_config, strength=0.5)

The low-resolution video is upsampled (bicubic, `utils.images.upscale_video`) and VAE-encoded in temporal chunks;
with SDEdit input (the default) that latent is noised to the step a run at `strength` starts from and denoised
(Meng et al. 2022); with concat input it is concatenated to the noisy latent at every step and the run starts from
noise at strength 1 (or from the noised latent below). The reference image (the text-to-image stage's) conditions
every step through the appearance encoder and the ControlNet, as in I2V; classifier-free guidance on the text keeps
it in both passes. Frames larger than the stage was trained at are denoised in overlapping spatial tiles of the
trained size, blended every step (`pipelines.tiling`), and decoded in temporal chunks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.diffusion import sample_loop
from magdiff_jax.diffusion.noise_prior import diffuse_to_step, strength_start_index
from magdiff_jax.diffusion.schedules import NoiseSchedule, ScheduleConfig
from magdiff_jax.models.i2v import reference_condition
from magdiff_jax.models.vae import decode_video, encode_video
from magdiff_jax.pipelines.guided import StagePipeline, guided_denoiser, per_example_jit
from magdiff_jax.pipelines.i2v import make_sampler
from magdiff_jax.pipelines.tiling import tiled
from magdiff_jax.utils.images import upscale_video


def _trained_latent_size(models, config) -> tuple[int, int]:
    f = models["vae"].config.downsample_factor
    return tuple(int(s) // f for s in config.data.resolution)


def default_strength(config, strength: float | None = None) -> float:
    """The strength a run uses: `strength`, else the stage's `task_options.strength` (0.5 for SDEdit input, 1.0 for
    concat input)."""
    if strength is not None:
        return float(strength)
    mode = config.task_options.get("low_res_input", "sdedit")
    return float(config.task_options.get("strength", 0.5 if mode == "sdedit" else 1.0))


def super_resolve(models, params, *, low_res, reference, tokens, null_tokens, key, size, schedule: ScheduleConfig,
                  config, num_steps: int = 25, strength: float | None = None, guidance: float = 7.5,
                  sampler: str = "ddim", tile=None, overlap=None, frames_per_call: int = 0, progress=None):
    """The high-resolution video (B, F, size[0], size[1], 3) in [-1, 1] of `low_res` (B, F, h, w, 3) in [-1, 1].

    reference (B, H', W', 3) in [-1, 1]: the reference image, resized here to `size` for the ControlNet;
    tokens / null_tokens (B, L): the prompts and the empty prompt; config: the stage's training config
    (`task_options.low_res_input`, `task_options.strength` (the default strength: 0.5 for SDEdit, 1.0 for concat),
    `data.resolution`: the trained size); tile / overlap: the denoiser's tile in latent cells (default: the trained
    latent size, overlap a quarter of it); frames_per_call: frames the VAE encodes or decodes at once (0: all)."""
    unet, vae, text = models["unet"], models["vae"], models["text_encoder"]
    mode = config.task_options.get("low_res_input", "sdedit")
    strength = default_strength(config, strength)
    f = vae.config.downsample_factor
    size = tuple(int(s) for s in size)
    if size[0] % f or size[1] % f:
        raise ValueError(f"the output size {size} must be a multiple of the VAE's factor {f}")
    b = low_res.shape[0]
    up = upscale_video(low_res, size)
    z_up = encode_video(vae, params["vae"], up, frames_per_call=frames_per_call)
    reference = upscale_video(reference, size) if tuple(reference.shape[1:3]) != size else reference
    cond = reference_condition(models, params, reference, image_layer=config.task_options.get("image_layer", -2))
    text_ctx = text.apply({"params": params["text_encoder"]}, tokens).last_hidden_state
    null_ctx = text.apply({"params": params["text_encoder"]}, null_tokens).last_hidden_state

    tile = _trained_latent_size(models, config) if tile is None else tile
    tile = (int(tile), int(tile)) if np.ndim(tile) == 0 else tuple(int(t) for t in tile)
    overlap = (tile[0] // 4, tile[1] // 4) if overlap is None else overlap
    k = unet.config.reference_factor

    def apply(x, t, ctx, *, image_embeds, reference, conditioning_scale):
        arrays, scales = [x, reference], [1, k]
        if mode == "concat":
            arrays.append(jnp.concatenate([z_up] * (x.shape[0] // b)).astype(x.dtype))
            scales.append(1)

        def one(x_tile, ref_tile, *low):
            inp = jnp.concatenate([x_tile, *low], -1) if low else x_tile
            return unet.apply({"params": params["unet"]}, inp, t, ctx, image_embeds=image_embeds, reference=ref_tile,
                              conditioning_scale=conditioning_scale)

        return tiled(one, arrays, scales=scales, size=x.shape[2:4], tile=tile, overlap=overlap)

    model_fn = guided_denoiser(apply, text_ctx, null_ctx, cond, guidance=guidance)
    solver = make_sampler(sampler, schedule)
    state = solver.set_timesteps(num_steps)
    noise = jax.random.normal(key, z_up.shape, jnp.float32)
    if strength >= 1.0:
        x, start = noise * state.init_noise_sigma, 0
    else:
        start = strength_start_index(num_steps, strength)
        x = diffuse_to_step(NoiseSchedule.create(schedule), solver, state, z_up, noise, start)
    x = sample_loop(solver, state, model_fn, x, start=start, callback=progress)
    out = decode_video(vae, params["vae"], x, frames_per_call=frames_per_call)
    if config.task_options.get("residual_decode", False):
        # the change the stage made, decoded, on top of the bicubic input: the VAE's own reconstruction error of
        # the input cancels (for a VAE that reconstructs below the upsampled input's fidelity)
        out = jnp.clip(up + out - decode_video(vae, params["vae"], z_up, frames_per_call=frames_per_call), -1, 1)
    return out


class V2VPipeline(StagePipeline):
    """High-resolution videos from a V2V stage (`magdiff-jax v2v`): its export, or a training workdir.

        pipe = V2VPipeline.load("runs/v2v/export")
        hires = pipe(videos, images, prompts, seeds=[0], scale=2)   # uint8 (N, F, h, w, 3) -> (N, F, 2h, 2w, 3)

    The output size is the input's times `scale`, both multiples of the VAE factor; reference images of any size
    are resized to cover it and centre-cropped. Outputs larger than the trained size are tiled (`super_resolve`).
    """

    TASK, NAME, REQUIRED = "v2v", "a V2V", ("unet", "vae", "text_encoder", "image_encoder")

    def __call__(self, videos, images, prompts: list[str], seeds, *, scale: int | None = None,
                 strength: float | None = None, num_steps: int = 25, guidance: float = 7.5, sampler: str = "ddim",
                 frames_per_call: int = 0, progress: bool = False):
        """High-resolution videos (N, F, s h, s w, 3) uint8 of videos (N, F, h, w, 3) uint8, one reference image
        (any size, uint8), prompt and seed each; scale s: default the stage's `task_options.scale`."""
        import numpy as np

        from magdiff_jax.data.transforms import crop_offset, resize_images, scaled_size, tokenizer

        videos = np.asarray(videos)
        if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
            raise ValueError(f"videos must be (N, F, H, W, 3) uint8, got {videos.shape} {videos.dtype}")
        if not (len(videos) == len(images) == len(prompts) == len(seeds)):
            raise ValueError(f"{len(videos)} videos, {len(images)} images, {len(prompts)} prompts and {len(seeds)} "
                             "seeds: one each")
        scale = int(self.config.task_options.get("scale", 2) if scale is None else scale)
        if scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        f = self.stage.modules["vae"].config.downsample_factor
        size = (videos.shape[2] * scale, videos.shape[3] * scale)
        down = 2 ** (len(self.stage.modules["unet"].config.unet.block_out_channels) - 1)
        if size[0] % (f * down) or size[1] % (f * down):
            raise ValueError(f"the output {size[0]}x{size[1]} (input x {scale}) must be a multiple of {f * down} "
                             f"(the VAE's factor {f} x the U-Net's downsampling {down})")
        max_frames = self.stage.modules["unet"].config.unet.motion_max_seq_length
        if videos.shape[1] > max_frames:
            raise ValueError(f"{videos.shape[1]} frames: the motion modules' position table holds {max_frames}")
        refs = []
        for im in images:
            im = np.asarray(im)
            if im.ndim != 3 or im.shape[-1] != 3 or im.dtype != np.uint8:
                raise ValueError(f"a reference image must be (H, W, 3) uint8, got {im.shape} {im.dtype}")
            h, w = scaled_size(*im.shape[:2], *size)
            im = resize_images(im[None], (h, w))[0]
            y, x = crop_offset((h, w), size, None)
            refs.append(im[y:y + size[0], x:x + size[1]])
        tok = tokenizer(self.stage.tokenizer_folder(), self.config.data.max_length)
        batch = {"low_res": videos.astype(np.float32) / 127.5 - 1.0,
                 "reference": np.stack(refs).astype(np.float32) / 127.5 - 1.0,
                 "tokens": np.asarray(tok(list(prompts))), "null_tokens": np.asarray(tok([""] * len(prompts)))}
        settings = (size, None if strength is None else float(strength), int(num_steps), float(guidance), sampler,
                    int(frames_per_call), bool(progress))
        if settings not in self._fns:
            self._fns[settings] = self._compile(*settings)
        return self._runner.run(self._fns[settings], self.stage.params, batch, seeds, num_steps=num_steps,
                                progress=progress)

    def _compile(self, size, strength, num_steps, guidance, sampler, frames_per_call, progress):
        models, config, schedule = self.stage.modules, self.config, self.stage.schedule

        def one(params, batch, key_data):  # one example: (1, ...) arrays
            return super_resolve(models, params, low_res=batch["low_res"], reference=batch["reference"],
                                 tokens=batch["tokens"], null_tokens=batch["null_tokens"],
                                 key=jax.random.wrap_key_data(key_data), size=size, schedule=schedule, config=config,
                                 num_steps=num_steps, strength=strength, guidance=guidance, sampler=sampler,
                                 frames_per_call=frames_per_call, progress=self._runner.tick if progress else None)

        return per_example_jit(one)
