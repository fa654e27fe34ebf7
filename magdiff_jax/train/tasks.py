"""Training tasks: what a stage trains, on which batch, with which loss.

A task names its models (registry kinds from `magdiff_jax.convert`, so `init_from` loads converted checkpoints
through the same code as `magdiff-jax convert`), the batch entries it reads, the default trainable subset, a loss
and a preview sampler. The trainer owns everything else (mesh, optimizer, checkpoints, logging).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from magdiff_jax.diffusion.schedules import NoiseSchedule, ScheduleConfig, add_noise, training_target


class Task(Protocol):
    name: str
    batch_keys: tuple[str, ...]  # numeric batch entries the loss reads (the rest stay on the host)
    trainable: str  # default regex over parameter paths

    def models(self, config) -> dict[str, tuple[str, Any]]:
        """{name: (registry kind, model config dataclass)}."""

    def loss(self, modules: dict, params: dict, batch: dict, key: jax.Array) -> tuple[jax.Array, dict]:
        """Scalar loss and auxiliary scalars, for one (micro-)batch."""

    def preview(self, modules: dict, params: dict, tokens, null_tokens, key: jax.Array, *, config) -> jax.Array:
        """Samples for the prompts `tokens` (N, L) (`null_tokens`: the empty prompt, for guidance), as videos
        (N, F, H, W, 3) in [-1, 1]; `config.preview` holds num_steps and guidance. Traced inside `jax.jit`."""


def model_config(config, name: str, kind: str):
    """The config dataclass of model `name`: `config.model[name]` over the stored config of `init_from/name`
    (a folder converted with `magdiff-jax convert to-flax`), when there is one."""
    from pathlib import Path

    from magdiff_jax.convert.core import config_from_dict, get_kind
    from magdiff_jax.convert.flax_checkpoint import read_meta

    overrides = config.model[name].to_dict() if name in config.model else {}
    cls = get_kind(kind).config_cls
    if "dtype" in {f.name for f in dataclasses.fields(cls)} and "dtype" not in overrides:
        overrides["dtype"] = config.get("compute_dtype", "float32")
    base = {}
    if config.init_from:
        src = Path(config.init_from) / name
        if not src.exists():
            raise FileNotFoundError(f"init_from: {src} does not exist (expected a converted {kind} folder)")
        base = read_meta(src)["config"]
    elif not overrides:
        raise ValueError(f"model.{name}: no model config and no init_from to take it from")
    return config_from_dict(cls, {**base, **overrides})


def schedule_from(config) -> NoiseSchedule:
    fields = {f.name for f in dataclasses.fields(ScheduleConfig)}
    return NoiseSchedule.create(ScheduleConfig(**{k: v for k, v in config.schedule.items() if k in fields}))


@dataclasses.dataclass
class T2ITask:
    """MagicVideo-V2 stage 1 (and SD fine-tuning): latent diffusion with a frozen VAE and CLIP text encoder and a
    trainable unet2d; epsilon or v prediction (the schedule's `prediction_type`); caption dropout happens in the
    data pipeline (captions replaced by ""). Batches: `video` (B, 1, H, W, 3) in [-1, 1] (images are one-frame
    videos) and `tokens` (B, L)."""

    name: str = "t2i"
    batch_keys: tuple[str, ...] = ("video", "tokens")
    trainable: str = r"^unet/"

    def models(self, config):
        return {name: (kind, model_config(config, name, kind))
                for name, kind in (("unet", "unet2d"), ("vae", "vae"), ("text_encoder", "clip_text"))}

    def loss(self, modules, params, batch, key, *, schedule: NoiseSchedule, prediction_type: str):
        images = batch["video"][:, 0]
        k_lat, k_noise, k_t = jax.random.split(key, 3)
        vae, unet, text = modules["vae"], modules["unet"], modules["text_encoder"]
        mean, logvar = vae.apply({"params": params["vae"]}, images, method="encode")
        latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_lat, mean.shape, mean.dtype)
        latents = jax.lax.stop_gradient(latents * vae.config.scaling_factor)
        context = jax.lax.stop_gradient(text.apply({"params": params["text_encoder"]}, batch["tokens"])
                                        .last_hidden_state)
        noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
        t = jax.random.randint(k_t, (latents.shape[0],), 0, schedule.config.num_train_timesteps)
        pred = unet.apply({"params": params["unet"]}, add_noise(schedule, latents, noise, t), t, context)
        target = training_target(schedule, latents, noise, t, prediction_type)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
        return loss, {}

    def preview(self, modules, params, tokens, null_tokens, key, *, config):
        """DDIM with classifier-free guidance at `config.data.resolution` -> (N, 1, H, W, 3) in [-1, 1]."""
        from magdiff_jax.diffusion import DDIMSampler, classifier_free_guidance, sample_loop

        vae, unet, text = modules["vae"], modules["unet"], modules["text_encoder"]
        n = tokens.shape[0]
        context = text.apply({"params": params["text_encoder"]}, jnp.concatenate([null_tokens, tokens]))
        context = context.last_hidden_state
        f = vae.config.downsample_factor
        h, w = (s // f for s in config.data.resolution)
        schedule_cfg = schedule_from(config).config
        sampler = DDIMSampler(schedule_cfg)
        state = sampler.set_timesteps(config.preview.num_steps)

        def model_fn(x, t):
            out = unet.apply({"params": params["unet"]}, jnp.concatenate([x, x]), jnp.full((2 * n,), t), context)
            uncond, cond = jnp.split(out, 2)
            return classifier_free_guidance(uncond, cond, config.preview.guidance)

        noise = jax.random.normal(key, (n, h, w, vae.config.latent_channels), jnp.float32)
        latents = sample_loop(sampler, state, model_fn, noise * state.init_noise_sigma)
        images = vae.apply({"params": params["vae"]}, latents / vae.config.scaling_factor, method="decode")
        return jnp.clip(images.astype(jnp.float32), -1, 1)[:, None]


TASKS = {"t2i": T2ITask}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]()
