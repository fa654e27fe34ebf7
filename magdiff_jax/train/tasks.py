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
    trainable: str  # default regex over parameter paths
    def batch_keys(self, config) -> tuple[str, ...]:
        """The numeric batch entries the loss reads (the rest stay on the host)."""

    def models(self, config) -> dict[str, tuple[str, Any]]:
        """{name: (registry kind, model config dataclass)}."""

    def loss(self, modules: dict, params: dict, batch: dict, key: jax.Array, *, config) -> tuple[jax.Array, dict]:
        """Scalar loss and auxiliary scalars, for one (micro-)batch."""

    def preview(self, modules: dict, params: dict, batch: dict, key: jax.Array, *, config) -> jax.Array:
        """Samples as videos (N, F, H, W, 3) in [-1, 1] for `batch`: the first N examples of the first training
        batch (the task's `batch_keys`), with `tokens` (N, L) replaced by `config.preview.prompts` when there are
        some, and `null_tokens` (the empty prompt, for guidance); `config.preview` holds num_steps and guidance.
        Traced inside `jax.jit`."""


def model_config(config, name: str, kind: str):
    """The config dataclass of model `name`: `config.model[name]` over the stored config of `init_from/name`
    (a folder converted with `magdiff-jax convert to-flax`), when there is one."""
    from pathlib import Path

    from magdiff_jax.convert.core import config_from_dict, get_kind
    from magdiff_jax.convert.flax_checkpoint import read_meta

    given = config.model[name].to_dict() if name in config.model else {}
    cls = get_kind(kind).config_cls
    base = {}
    src = Path(config.init_from) / name if config.init_from else None
    if src is not None and src.exists():
        base = read_meta(src)["config"]
    elif not given:
        where = f"and no {src} (a converted {kind} folder)" if src is not None else "and no init_from"
        raise ValueError(f"model.{name}: no model config {where} to take it from")
    return config_from_dict(cls, _deep_merge(_deep_merge(base, _compute_dtype(cls, config)), given))


def _compute_dtype(cls, config) -> dict:
    """{"dtype": config.compute_dtype} for a model config with a `dtype` field, nested into sub-configs that have
    one (MagDiff's `unet`)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "dtype":
            out["dtype"] = config.get("compute_dtype", "float32")
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory()):
            inner = _compute_dtype(type(f.default_factory()), config)
            if inner:
                out[f.name] = inner
    return out


def _deep_merge(base: dict, overrides: dict) -> dict:
    """`overrides` over `base`, nested dicts merged key by key (a nested model config can change one field)."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def schedule_from(config) -> NoiseSchedule:
    fields = {f.name for f in dataclasses.fields(ScheduleConfig)}
    return NoiseSchedule.create(ScheduleConfig(**{k: v for k, v in config.schedule.items() if k in fields}))


def timestep_bias(config) -> float:
    """`schedule.timestep_bias` (0 when absent), checked."""
    bias = float(config.schedule.get("timestep_bias", 0.0))
    if bias < 0:
        raise ValueError(f"schedule.timestep_bias must be >= 0, got {bias}")
    return bias


def sample_timesteps(key, n: int, config) -> jax.Array:
    """n training timesteps in [0, num_train_timesteps): uniform (`schedule.timestep_bias` 0, the default), or with
    density proportional to (t / T) ** timestep_bias (> 0: more of them at high noise, where the noisy input no
    longer shows what the conditioning alone must decide, e.g. which way a subject moves)."""
    num, bias = config.schedule.num_train_timesteps, timestep_bias(config)
    if bias == 0:
        return jax.random.randint(key, (n,), 0, num)
    u = jax.random.uniform(key, (n,))
    return jnp.minimum((num * u ** (1.0 / (1.0 + bias))).astype(jnp.int32), num - 1)


@dataclasses.dataclass
class T2ITask:
    """MagicVideo-V2 stage 1 (and SD fine-tuning): latent diffusion with a frozen VAE and CLIP text encoder and a
    trainable unet2d; epsilon or v prediction (the schedule's `prediction_type`); caption dropout happens in the
    data pipeline (captions replaced by ""). Batches: `video` (B, 1, H, W, 3) in [-1, 1] (images are one-frame
    videos) and `tokens` (B, L)."""

    name: str = "t2i"
    trainable: str = r"^unet/"

    def batch_keys(self, config):
        return ("video", "tokens")

    def models(self, config):
        return {name: (kind, model_config(config, name, kind))
                for name, kind in (("unet", "unet2d"), ("vae", "vae"), ("text_encoder", "clip_text"))}

    def loss(self, modules, params, batch, key, *, config):
        schedule, prediction_type = schedule_from(config), config.schedule.prediction_type
        images = batch["video"][:, 0]
        k_lat, k_noise, k_t = jax.random.split(key, 3)
        vae, unet, text = modules["vae"], modules["unet"], modules["text_encoder"]
        mean, logvar = vae.apply({"params": params["vae"]}, images, method="encode")
        latents = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_lat, mean.shape, mean.dtype)
        latents = jax.lax.stop_gradient(latents * vae.config.scaling_factor)
        # no stop_gradient: a frozen text encoder is split off before jax.grad anyway, a trainable one learns
        context = text.apply({"params": params["text_encoder"]}, batch["tokens"]).last_hidden_state
        noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
        t = sample_timesteps(k_t, latents.shape[0], config)
        pred = unet.apply({"params": params["unet"]}, add_noise(schedule, latents, noise, t), t, context)
        target = training_target(schedule, latents, noise, t, prediction_type)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
        return loss, {}

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


@dataclasses.dataclass
class VAETask:
    """Autoencoder training (a tiny VAE for the synthetic dataset, or fine-tuning a decoder): reconstruction MSE
    of every frame through a posterior sample, plus `task_options.kl_weight` (default 1e-6) x the KL to N(0, I)
    per latent element.
    Batches: `video` (B, F, H, W, 3) in [-1, 1]."""

    name: str = "vae"
    trainable: str = r"^vae/"

    def batch_keys(self, config):
        return ("video",)

    def models(self, config):
        return {"vae": ("vae", model_config(config, "vae", "vae"))}

    def loss(self, modules, params, batch, key, *, config):
        vae = modules["vae"]
        video = batch["video"]
        images = video.reshape(-1, *video.shape[2:])
        mean, logvar = vae.apply({"params": params["vae"]}, images, method="encode")
        z = vae.sample_latent(mean, logvar, key)
        recon = vae.apply({"params": params["vae"]}, z, method="decode").astype(jnp.float32)
        mse = jnp.mean(jnp.square(recon - images.astype(jnp.float32)))
        kl = jnp.mean(vae.kl_divergence(mean, logvar)) / (mean[0].size)
        return mse + config.task_options.get("kl_weight", 1e-6) * kl, {"mse": mse, "kl": kl}

    def preview(self, modules, params, batch, key, *, config):
        """Reconstructions (posterior means) beside the inputs: (2N, F, H, W, 3)."""
        from magdiff_jax.pipelines.magdiff import decode_video, encode_video

        vae = modules["vae"]
        video = batch["video"].astype(jnp.float32)
        recon = decode_video(vae, params["vae"], encode_video(vae, params["vae"], video))
        return jnp.concatenate([video, recon])


@dataclasses.dataclass
class MagDiffTask:
    """MagDiff (PAPERS.md part A): epsilon (or v) MSE on VAE latents of the video, conditioned on the text, the
    subject's CLIP tokens (through the resampler) and its VAE latents at the pyramid sizes (through the entity
    pyramid). Frozen: VAE, text and image encoders, and the U-Net's resnets and samplers; trained (the paper's
    code): temporal layers, spatial transformer blocks (with the entity attention), conv_in, the resampler, the
    pyramid. Caption dropout (and subject dropout: the data pipeline's `subject.probs.none`, black subjects) happen
    in the data pipeline. Batches: `video` (B, F, H, W, 3), `tokens`, `subject_<size>` per pyramid size and
    `subject_clip` (data.subject.enabled). `task_options.image_layer`: the CLIP vision hidden state used as image
    features (-2, the penultimate, as IP-Adapter-Plus; -1 is the last layer's output before `post_layernorm`,
    which PAPERS.md A.2 reads in the released code)."""

    name: str = "magdiff"
    trainable: str = (r"^unet/(unet/(conv_in|transformer_in)/|unet/.*/(temp_convs_\d+|temp_attentions_\d+|"
                      r"transformer_blocks_\d+)/|image_proj/|entity_pyramid/)")

    def batch_keys(self, config):
        from magdiff_jax.pipelines.magdiff import subject_keys

        return ("video", "tokens", *subject_keys(config.data.subject.sizes))

    def models(self, config):
        return {name: (kind, model_config(config, name, kind))
                for name, kind in (("unet", "magdiff"), ("vae", "vae"), ("text_encoder", "clip_text"),
                                   ("image_encoder", "clip_vision"))}

    def loss(self, modules, params, batch, key, *, config):
        from magdiff_jax.pipelines.magdiff import encode_video, subject_condition

        schedule, prediction_type = schedule_from(config), config.schedule.prediction_type
        vae, unet, text = modules["vae"], modules["unet"], modules["text_encoder"]
        k_lat, k_sub, k_noise, k_t = jax.random.split(key, 4)
        latents = jax.lax.stop_gradient(encode_video(vae, params["vae"], batch["video"], k_lat))
        cond = subject_condition(modules, params, batch, sizes=config.data.subject.sizes,
                                 image_layer=config.task_options.get("image_layer", -2), key=k_sub)
        # no stop_gradient: a frozen text encoder is split off before jax.grad anyway, a trainable one learns
        context = text.apply({"params": params["text_encoder"]}, batch["tokens"]).last_hidden_state
        noise = jax.random.normal(k_noise, latents.shape, latents.dtype)
        t = sample_timesteps(k_t, latents.shape[0], config)
        pred = unet.apply({"params": params["unet"]}, add_noise(schedule, latents, noise, t), t, context, **cond)
        target = training_target(schedule, latents, noise, t, prediction_type)
        loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32)))
        return loss, {}

    def preview(self, modules, params, batch, key, *, config):
        """Generation from each example's subject (as the data gave it) and prompt: (N, F, H, W, 3)."""
        from magdiff_jax.pipelines.magdiff import generate, subject_condition

        f = modules["vae"].config.downsample_factor
        video = batch["video"]
        cond = subject_condition(modules, params, batch, sizes=config.data.subject.sizes,
                                 image_layer=config.task_options.get("image_layer", -2))
        return generate(modules, params, tokens=batch["tokens"], null_tokens=batch["null_tokens"], cond=cond,
                        key=key, num_frames=video.shape[1], latent_size=(video.shape[2] // f, video.shape[3] // f),
                        schedule=schedule_from(config).config, num_steps=config.preview.num_steps,
                        guidance=config.preview.guidance)


TASKS = {"t2i": T2ITask, "vae": VAETask, "magdiff": MagDiffTask}


def get_task(name: str):
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]()
