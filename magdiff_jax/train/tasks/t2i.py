"""MagicVideo-V2 stage 1 (and SD fine-tuning): text -> image latent diffusion."""

from __future__ import annotations

import dataclasses

import jax

from magdiff_jax.diffusion.losses import diffusion_loss
from magdiff_jax.models.vae import encode_images
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
        """DDIM with classifier-free guidance at `config.data.resolution` (`pipelines.t2i.generate_images`) ->
        (N, 1, H, W, 3) in [-1, 1]."""
        from magdiff_jax.pipelines.t2i import generate_images

        f = modules["vae"].config.downsample_factor
        latent_size = tuple(s // f for s in config.data.resolution)
        images = generate_images(modules, params, tokens=batch["tokens"], null_tokens=batch["null_tokens"], key=key,
                                 latent_size=latent_size, schedule=schedule_from(config).config,
                                 num_steps=config.preview.num_steps, guidance=config.preview.guidance)
        return images[:, None]
