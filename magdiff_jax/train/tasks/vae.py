"""The autoencoder stage: a VAE trained on frames, optionally against a patch discriminator."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from magdiff_jax.models.discriminator import generator_adversarial_loss
from magdiff_jax.models.vae import decode_video, encode_video
from magdiff_jax.train.groups import param_groups
from magdiff_jax.train.tasks.base import discriminator_update, model_config


def _options(config) -> tuple[float, float, int]:
    o = config.task_options
    kl, weight, start = float(o.get("kl_weight", 1e-6)), float(o.get("disc_weight", 0.0)), int(o.get("disc_start", 0))
    if weight < 0 or start < 0:
        raise ValueError(f"task_options: disc_weight and disc_start must be >= 0, got {weight} and {start}")
    return kl, weight, start


@dataclasses.dataclass
class VAETask:
    """Reconstruction MSE of every frame through a posterior sample, plus `task_options.kl_weight` (default 1e-6)
    x the KL to N(0, I) per latent element (group `vae`). With `task_options.disc_weight` > 0 a patch discriminator
    (model `discriminator`, group `discriminator`; `config.model.discriminator` configures it) trains against the
    reconstructions with the hinge loss from step `task_options.disc_start`, from which step the VAE's loss also
    gets disc_weight x the generator's adversarial loss: both updates in one step, the discriminator seeing the
    reconstructions the VAE update started from. Batches: `video` (B, F, H, W, 3) in [-1, 1]."""

    name: str = "vae"

    def models(self, config):
        models = {"vae": ("vae", model_config(config, "vae", "vae"))}
        if _options(config)[1] > 0:
            models["discriminator"] = ("patch_discriminator",
                                       model_config(config, "discriminator", "patch_discriminator"))
        return models

    def batch_keys(self, config):
        return ("video",)

    def groups(self, config):
        _, weight, start = _options(config)
        if weight > 0:
            return param_groups(config, {"vae": r"^vae/", "discriminator": r"^discriminator/"},
                                start_steps={"discriminator": start})
        return param_groups(config, {"vae": r"^vae/"})

    def export_models(self, config):
        return ("vae",)

    def update(self, ctx, batch, key):
        vae, disc = ctx.modules["vae"], ctx.modules.get("discriminator")
        kl_weight, disc_weight, disc_start = _options(ctx.config)
        video = batch["video"]
        images = video.reshape(-1, *video.shape[2:])

        def vae_loss(params):
            mean, logvar = vae.apply({"params": params["vae"]}, images, method="encode")
            z = vae.sample_latent(mean, logvar, key)
            recon = vae.apply({"params": params["vae"]}, z, method="decode").astype(jnp.float32)
            mse = jnp.mean(jnp.square(recon - images.astype(jnp.float32)))
            kl = jnp.mean(vae.kl_divergence(mean, logvar)) / (mean[0].size)
            loss, aux = mse + kl_weight * kl, {"mse": mse, "kl": kl, "recon": recon}
            if disc is not None:
                adversarial = generator_adversarial_loss(disc.apply({"params": params["discriminator"]}, recon))
                on = (ctx.step >= disc_start).astype(jnp.float32)
                loss, aux["adversarial"] = loss + on * disc_weight * adversarial, adversarial
            return loss, aux

        ctx, aux = ctx.minimize(vae_loss, groups=("vae",))
        if disc is None:
            return ctx
        return discriminator_update(ctx, disc, images, aux["recon"])

    def preview(self, modules, params, batch, key, *, config):
        """Reconstructions (posterior means) beside the inputs: (2N, F, H, W, 3)."""
        vae = modules["vae"]
        video = batch["video"].astype(jnp.float32)
        recon = decode_video(vae, params["vae"], encode_video(vae, params["vae"], video))
        return jnp.concatenate([video, recon])
