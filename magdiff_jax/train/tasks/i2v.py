"""MagicVideo-V2 stage 2 (PAPERS.md B.3): a reference image and a caption -> keyframes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from magdiff_jax.diffusion.losses import diffusion_loss
from magdiff_jax.models.i2v import reference_condition
from magdiff_jax.models.vae import encode_video
from magdiff_jax.train.groups import param_groups
from magdiff_jax.train.tasks.base import model_config, schedule_from, timestep_bias

# The parameter groups over the "i2v" model's tree (models/i2v.py), each with its own optimizer (config.groups.<name>)
GROUPS = {
    "motion": r"^unet/unet/.*/motion_modules_\d+/",
    "controlnet": r"^unet/controlnet/",
    "appearance": r"^unet/(image_proj/|unet/.*/attn2/(to_k_ip|to_v_ip)/)",
}
# the spatial layers (trained with task_options.train_spatial): the rest of the U-Net
SPATIAL = r"^unet/unet/(?!.*/motion_modules_\d+/)(?!.*/attn2/(to_k_ip|to_v_ip)/)"
REFERENCE_MODES = ("first", "random")


def reference_frame(video, mode: str, key) -> jax.Array:
    """The frame each clip's reference is (B, H, W, 3): the first, or one drawn per clip (`mode` "random")."""
    if mode not in REFERENCE_MODES:
        raise ValueError(f"task_options.reference must be one of {REFERENCE_MODES}, got {mode!r}")
    if mode == "first" or video.shape[1] == 1:
        return video[:, 0]
    idx = jax.random.randint(key, (video.shape[0],), 0, video.shape[1])
    return jnp.take_along_axis(video, idx[:, None, None, None, None], axis=1)[:, 0]


def clip_condition(ctx, params, video, tokens, key) -> tuple:
    """What the denoiser of one batch of clips sees, shared by the I2V and V2V tasks: (latents (B, F, h, w, c) of
    `video`, the caption's text hidden states, the reference condition (`models.i2v.reference_condition` of the
    clip's reference frame, `task_options.reference`, with `task_options.reference_dropout`), a noise key and a
    timestep key). `task_options.vae_frames_per_call` > 0 encodes that many frames at a time (bounded memory)."""
    opts = ctx.config.task_options
    k_lat, k_ref, k_drop, k_noise, k_t = jax.random.split(key, 5)
    latents = jax.lax.stop_gradient(encode_video(ctx.modules["vae"], params["vae"], video, k_lat,
                                                 frames_per_call=opts.get("vae_frames_per_call", 0)))
    reference = reference_frame(video, opts.get("reference", "first"), k_ref)
    cond = reference_condition(ctx.modules, params, reference, image_layer=opts.get("image_layer", -2),
                               drop=opts.get("reference_dropout", 0.0), key=k_drop)
    # no stop_gradient: a frozen text encoder is split off before jax.grad anyway, a trainable one learns
    context = ctx.modules["text_encoder"].apply({"params": params["text_encoder"]}, tokens).last_hidden_state
    return latents, context, cond, k_noise, k_t


@dataclasses.dataclass
class I2VTask:
    """Epsilon (or v) MSE on the VAE latents of a clip, conditioned on the caption and a reference frame of the same
    clip (`task_options.reference`: "first" or "random"), seen by the appearance encoder (CLIP tokens -> resampler
    -> decoupled cross-attention) and the ControlNet (repeated over the frames). Joint image/video training: with
    `image_batch_size` > 0 each step also takes a batch of images (`image_data`, one-frame videos that bypass the
    motion modules) and the loss is the mean over all examples. Reference dropout (`task_options.reference_dropout`)
    trains the "no reference" input two-scale guidance needs; caption dropout happens in the data pipeline.

    Groups: `motion` (motion modules), `controlnet`, `appearance` (resampler + to_k_ip/to_v_ip) and, with
    `task_options.train_spatial`, `spatial` (the rest of the U-Net), and with `task_options.train_text_encoder`,
    `text_encoder`; each has its own optimizer settings
    (`config.groups.<name>.optim`). A `config.trainable` regex instead trains one group, `unet`, over it.
    Batches: `video` (B, F, H, W, 3), `tokens`; joint: `image_video`
    (B_i, 1, H, W, 3), `image_tokens`."""

    name: str = "i2v"

    def models(self, config):
        out = {name: (kind, model_config(config, name, kind))
               for name, kind in (("unet", "i2v"), ("vae", "vae"), ("text_encoder", "clip_text"),
                                  ("image_encoder", "clip_vision"))}
        unet, vae = out["unet"][1], out["vae"][1]
        if unet.controlnet is not None and unet.reference_factor != vae.downsample_factor:
            raise ValueError(f"model.unet.conditioning_embedding_out_channels="
                             f"{list(unet.conditioning_embedding_out_channels)} take the reference down "
                             f"{unet.reference_factor}x, the VAE its frames {vae.downsample_factor}x: the ControlNet "
                             "reads the reference at the video's resolution, so the two must agree")
        return out

    def batch_keys(self, config):
        joint = ("image_video", "image_tokens") if config.get("image_batch_size", 0) > 0 else ()
        return ("video", "tokens", *joint)

    def groups(self, config):
        if config.get("trainable"):  # one group over the given regex (tiny models trained from scratch)
            return param_groups(config, {"unet": config.trainable})
        defaults = dict(GROUPS)
        if not model_config(config, "unet", "i2v").use_controlnet:
            defaults.pop("controlnet")
        if config.task_options.get("train_spatial", False):
            defaults["spatial"] = SPATIAL
        if config.task_options.get("train_text_encoder", False):
            defaults["text_encoder"] = r"^text_encoder/"
        return param_groups(config, defaults)

    def export_models(self, config):
        return tuple(self.models(config))

    def update(self, ctx, batch, key):
        config = ctx.config
        unet = ctx.modules["unet"]
        parts = [("video", "tokens")]
        if "image_video" in batch:
            parts.append(("image_video", "image_tokens"))

        def part_loss(params, n, video, tokens):
            part_key = jax.random.fold_in(key, n)
            latents, context, cond, k_noise, k_t = clip_condition(ctx, params, video, tokens, part_key)
            return diffusion_loss(lambda x, t: unet.apply({"params": params["unet"]}, x, t, context, **cond),
                                  latents, k_noise, k_t, schedule_from(config),
                                  prediction_type=config.schedule.prediction_type, timestep_bias=timestep_bias(config))

        def loss_fn(params):  # the mean over every example, videos and images alike
            losses = [(part_loss(params, n, batch[v], batch[t]), batch[v].shape[0]) for n, (v, t) in enumerate(parts)]
            return sum(loss * count for loss, count in losses) / sum(count for _, count in losses), {}

        return ctx.minimize(loss_fn)[0]

    def preview(self, modules, params, batch, key, *, config):
        """Keyframes from each example's first frame and prompt (N, F, H, W, 3) in [-1, 1]."""
        from magdiff_jax.pipelines.i2v import generate

        video = batch["video"]
        reference = video[:, 0]
        cond = reference_condition(modules, params, reference,
                                   image_layer=config.task_options.get("image_layer", -2))
        f = modules["vae"].config.downsample_factor
        return generate(modules, params, tokens=batch["tokens"], null_tokens=batch["null_tokens"], cond=cond, key=key,
                        num_frames=video.shape[1], latent_size=(video.shape[2] // f, video.shape[3] // f),
                        schedule=schedule_from(config).config, num_steps=config.preview.num_steps,
                        guidance=config.preview.guidance, reference=reference)
