"""MagicVideo-V2 stage 1 (and SD fine-tuning): text -> image latent diffusion."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from magdiff_jax.diffusion.losses import diffusion_loss
from magdiff_jax.models.vae import decode_video, encode_images
from magdiff_jax.train.groups import param_groups
from magdiff_jax.train.tasks.base import model_config, schedule_from, timestep_bias


@dataclasses.dataclass
class T2ITask:
    """Latent diffusion with a frozen VAE and CLIP text encoder and a trainable unet2d (group `unet`); epsilon or v
    prediction (the schedule's `prediction_type`); caption dropout happens in the data pipeline (captions replaced
    by ""). Batches: `video` (B, 1, H, W, 3) in [-1, 1] (images are one-frame videos) and `tokens` (B, L)."""

    name: str = "t2i"

    def models(self, config):
        return {name: (kind, model_config(config, name, kind))
                for name, kind in (("unet", "unet2d"), ("vae", "vae"), ("text_encoder", "clip_text"))}

    def batch_keys(self, config):
        return ("video", "tokens")

    def groups(self, config):
        return param_groups(config, {"unet": r"^unet/"})

    def export_models(self, config):
        return tuple(self.models(config))

    def update(self, ctx, batch, key):
        vae, unet, text = ctx.modules["vae"], ctx.modules["unet"], ctx.modules["text_encoder"]
        k_lat, k_noise, k_t = jax.random.split(key, 3)

        def loss_fn(params):
            latents = jax.lax.stop_gradient(encode_images(vae, params["vae"], batch["video"][:, 0], k_lat))
            # no stop_gradient: a frozen text encoder is split off before jax.grad anyway, a trainable one learns
            context = text.apply({"params": params["text_encoder"]}, batch["tokens"]).last_hidden_state
            loss = diffusion_loss(lambda x, t: unet.apply({"params": params["unet"]}, x, t, context), latents,
                                  k_noise, k_t, schedule_from(ctx.config),
                                  prediction_type=ctx.config.schedule.prediction_type,
                                  timestep_bias=timestep_bias(ctx.config))
            return loss, {}

        return ctx.minimize(loss_fn)[0]

    def preview(self, modules, params, batch, key, *, config):
        """DDIM with classifier-free guidance at `config.data.resolution` -> (N, 1, H, W, 3) in [-1, 1]."""
        from magdiff_jax.diffusion import DDIMSampler, classifier_free_guidance, sample_loop

        vae, unet, text = modules["vae"], modules["unet"], modules["text_encoder"]
        tokens, null_tokens = batch["tokens"], batch["null_tokens"]
        n = tokens.shape[0]
        context = text.apply({"params": params["text_encoder"]}, jnp.concatenate([null_tokens, tokens]))
        context = context.last_hidden_state
        f = vae.config.downsample_factor
        h, w = (s // f for s in config.data.resolution)
        sampler = DDIMSampler(schedule_from(config).config)
        state = sampler.set_timesteps(config.preview.num_steps)

        def model_fn(x, t):
            out = unet.apply({"params": params["unet"]}, jnp.concatenate([x, x]), jnp.full((2 * n,), t), context)
            uncond, cond = jnp.split(out, 2)
            return classifier_free_guidance(uncond, cond, config.preview.guidance)

        noise = jax.random.normal(key, (n, h, w, vae.config.latent_channels), jnp.float32)
        latents = sample_loop(sampler, state, model_fn, noise * state.init_noise_sigma)
        return decode_video(vae, params["vae"], latents[:, None])
