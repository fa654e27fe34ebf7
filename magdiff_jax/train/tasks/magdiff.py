"""MagDiff (PAPERS.md part A): subject image(s) + text -> video."""

from __future__ import annotations

import dataclasses

import jax

from magdiff_jax.diffusion.losses import diffusion_loss
from magdiff_jax.models.magdiff import image_layer_of, subject_condition, subject_keys
from magdiff_jax.models.vae import encode_video
from magdiff_jax.train.groups import param_groups
from magdiff_jax.train.tasks.base import model_config, schedule_from, timestep_bias

# trained (PAPERS.md A.7, the paper code's `trainable_modules`): temporal layers, spatial transformer blocks (with the
# entity attention), conv_in, the resampler, the pyramid; frozen: the U-Net's resnets and samplers, VAE, text and
# image encoders
TRAINABLE = (r"^unet/(unet/(conv_in|transformer_in)/|unet/.*/(temp_convs_\d+|temp_attentions_\d+|"
             r"transformer_blocks_\d+)/|image_proj/|entity_pyramid/)")


@dataclasses.dataclass
class MagDiffTask:
    """Epsilon (or v) MSE on VAE latents of the video, conditioned on the text, the subject's CLIP tokens (through the
    resampler) and its VAE latents at the pyramid sizes (through the entity pyramid); group `unet` (`TRAINABLE`).
    Caption dropout (and subject dropout: the data pipeline's `subject.probs.none`, black subjects) happen in the
    data pipeline. The U-Net runs with dropout (`deterministic=False`, a "dropout" key from the step's key), as the
    paper's code and diffusers train, unless `task_options.dropout` is false; sampling is deterministic. Batches:
    `video` (B, F, H, W, 3), `tokens`, `subject_<size>` per pyramid size and `subject_clip` (data.subject.enabled).
    `task_options.image_layer`: the CLIP vision hidden state used as image features (`models.magdiff.image_layer_of`:
    -1, the last layer's output before `post_layernorm`, is what PAPERS.md A.2 reads in the released code; a config
    without the key reads -2)."""

    name: str = "magdiff"

    def models(self, config):
        return {name: (kind, model_config(config, name, kind))
                for name, kind in (("unet", "magdiff"), ("vae", "vae"), ("text_encoder", "clip_text"),
                                   ("image_encoder", "clip_vision"))}

    def batch_keys(self, config):
        return ("video", "tokens", *subject_keys(config.data.subject.sizes))

    def groups(self, config):
        return param_groups(config, {"unet": TRAINABLE})

    def export_models(self, config):
        return tuple(self.models(config))

    def update(self, ctx, batch, key):
        config = ctx.config
        vae, unet, text = ctx.modules["vae"], ctx.modules["unet"], ctx.modules["text_encoder"]
        k_lat, k_sub, k_noise, k_t, k_drop = jax.random.split(key, 5)
        layer = image_layer_of(config.task_options)
        train_dropout = bool(config.task_options.get("dropout", True))

        def loss_fn(params):
            latents = jax.lax.stop_gradient(encode_video(vae, params["vae"], batch["video"], k_lat))
            cond = subject_condition(ctx.modules, params, batch, sizes=config.data.subject.sizes,
                                     image_layer=layer, key=k_sub)
            # no stop_gradient: a frozen text encoder is split off before jax.grad anyway, a trainable one learns
            context = text.apply({"params": params["text_encoder"]}, batch["tokens"]).last_hidden_state

            def model_fn(x, t):
                return unet.apply({"params": params["unet"]}, x, t, context, **cond,
                                  deterministic=not train_dropout, rngs={"dropout": k_drop})

            loss = diffusion_loss(model_fn, latents, k_noise, k_t, schedule_from(config),
                                  prediction_type=config.schedule.prediction_type, timestep_bias=timestep_bias(config))
            return loss, {}

        return ctx.minimize(loss_fn)[0]

    def preview(self, modules, params, batch, key, *, config):
        """Generation from each example's subject (as the data gave it) and prompt: (N, F, H, W, 3)."""
        from magdiff_jax.pipelines.magdiff import generate

        f = modules["vae"].config.downsample_factor
        video = batch["video"]
        cond = subject_condition(modules, params, batch, sizes=config.data.subject.sizes,
                                 image_layer=image_layer_of(config.task_options))
        return generate(modules, params, tokens=batch["tokens"], null_tokens=batch["null_tokens"], cond=cond,
                        key=key, num_frames=video.shape[1], latent_size=(video.shape[2] // f, video.shape[3] // f),
                        schedule=schedule_from(config).config, num_steps=config.preview.num_steps,
                        guidance=config.preview.guidance)
