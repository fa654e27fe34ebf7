"""MagicVideo-V2 stage 3 (PAPERS.md B.4): low-resolution keyframes + the reference image + a caption -> the same
video at high resolution."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from magdiff_jax.diffusion.losses import diffusion_loss
from magdiff_jax.models.i2v import LOW_RES_INPUTS
from magdiff_jax.models.vae import encode_video
from magdiff_jax.train.groups import param_groups
from magdiff_jax.train.tasks.base import model_config, schedule_from, timestep_bias
from magdiff_jax.train.tasks.i2v import GROUPS, SPATIAL, I2VTask, clip_condition
from magdiff_jax.utils.images import upscale_video

# with concat input the input convolutions read twice the latent channels: they train with the motion modules
CONV_IN = r"^unet/(unet|controlnet)/conv_in/"


def low_res_input(config) -> str:
    mode = config.task_options.get("low_res_input", "sdedit")
    if mode not in LOW_RES_INPUTS:
        raise ValueError(f"task_options.low_res_input must be one of {LOW_RES_INPUTS}, got {mode!r}")
    return mode


def max_timestep(config) -> int | None:
    """The highest training timestep + 1 (`task_options.max_timestep`; 0 or absent: every timestep)."""
    top = int(config.task_options.get("max_timestep", 0) or 0)
    return top or None


@dataclasses.dataclass
class V2VTask(I2VTask):
    """The I2V denoiser (`models.i2v.I2VUNet`: the same backbone, spatial layers, appearance encoder and ControlNet,
    usually started from an I2V stage's export with `init_from`) fine-tuned on high-resolution clips, its motion
    modules its own. Batches come from the data pipeline's super-resolution task (`data.task` "vsr"): `video`
    (B, F, H, W, 3), its box-downsampled `low_res` (B, F, H/s, W/s, 3) and `tokens`. The reference the appearance
    encoder and the ControlNet see is a high-resolution frame of the clip (`task_options.reference`), standing in
    for the text-to-image stage's reference.

    How the low-resolution video enters (`task_options.low_res_input`):
      "sdedit" (default)  epsilon (or v) MSE on the high-resolution latents alone, timesteps below
                          `task_options.max_timestep` (an SDEdit run at strength s starts at t = s T); at sampling
                          the bicubic-upsampled video is encoded, noised to the strength and denoised
                          (`pipelines.v2v`).
      "concat"            the latent of the bicubic-upsampled low-res video is concatenated to the noisy latent on
                          the channel axis at every step (the SD x4 upscaler's way): the U-Net's and ControlNet's
                          `in_channels` are twice the latent's, and their input convolutions train (group
                          `conv_in`).

    Groups: as I2V (`motion`, `controlnet`, `appearance`, and `spatial` / `text_encoder` on request), plus `conv_in`
    with concat input; `config.trainable` trains one group, `unet`, over its regex."""

    name: str = "v2v"

    def models(self, config):
        out = super().models(config)
        unet = out["unet"][1]
        mode = low_res_input(config)
        latent = unet.latent_channels
        want = 2 * latent if mode == "concat" else latent
        if unet.unet.in_channels != want:
            raise ValueError(f"task_options.low_res_input={mode!r} needs model.unet.unet.in_channels={want} (latent "
                             f"channels {latent}{' x 2: noisy + upsampled' if mode == 'concat' else ''}), got "
                             f"{unet.unet.in_channels}")
        return out

    def batch_keys(self, config):
        if config.get("image_batch_size", 0) > 0:
            raise ValueError("the v2v task trains on (low-res, high-res) clip pairs alone: set image_batch_size 0")
        if config.data.get("task", "video") != "vsr":
            raise ValueError(f"the v2v task needs data.task 'vsr' (low-res / high-res pairs), got "
                             f"{config.data.get('task', 'video')!r}")
        return ("video", "low_res", "tokens")

    def groups(self, config):
        if config.get("trainable"):
            return param_groups(config, {"unet": config.trainable})
        defaults = dict(GROUPS)
        if not model_config(config, "unet", "i2v").use_controlnet:
            defaults.pop("controlnet")
        if low_res_input(config) == "concat":
            defaults["conv_in"] = CONV_IN
        if config.task_options.get("train_spatial", False):
            defaults["spatial"] = SPATIAL
        if config.task_options.get("train_text_encoder", False):
            defaults["text_encoder"] = r"^text_encoder/"
        return param_groups(config, defaults)

    def update(self, ctx, batch, key):
        config = ctx.config
        unet, vae = ctx.modules["unet"], ctx.modules["vae"]
        video = batch["video"]
        concat = low_res_input(config) == "concat"

        def loss_fn(params):
            latents, context, cond, k_noise, k_t = clip_condition(ctx, params, video, batch["tokens"], key)
            if concat:
                up = upscale_video(batch["low_res"], video.shape[2:4])
                low = jax.lax.stop_gradient(encode_video(
                    vae, params["vae"], up, frames_per_call=config.task_options.get("vae_frames_per_call", 0)))

                def model_fn(x, t):
                    return unet.apply({"params": params["unet"]}, jnp.concatenate([x, low.astype(x.dtype)], -1), t,
                                      context, **cond)
            else:
                def model_fn(x, t):
                    return unet.apply({"params": params["unet"]}, x, t, context, **cond)
            loss = diffusion_loss(model_fn, latents, k_noise, k_t, schedule_from(config),
                                  prediction_type=config.schedule.prediction_type,
                                  timestep_bias=timestep_bias(config), max_timestep=max_timestep(config))
            return loss, {}

        return ctx.minimize(loss_fn)[0]

    def preview(self, modules, params, batch, key, *, config):
        """Each example's low-res clip upsampled by the stage (N, F, H, W, 3) in [-1, 1], beside the bicubic one."""
        from magdiff_jax.pipelines.v2v import super_resolve

        video = batch["video"]
        out = super_resolve(modules, params, low_res=batch["low_res"], reference=video[:, 0], tokens=batch["tokens"],
                            null_tokens=batch["null_tokens"], key=key, size=video.shape[2:4],
                            schedule=schedule_from(config).config, config=config,
                            num_steps=config.preview.num_steps, guidance=config.preview.guidance)
        return jnp.concatenate([upscale_video(batch["low_res"], video.shape[2:4]), out], axis=3)
