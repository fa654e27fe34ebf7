"""MagicVideo-V2 stage 4 (PAPERS.md B.5): frame interpolation, an EDSC interpolator trained as a GAN's generator."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from magdiff_jax.models.discriminator import generator_adversarial_loss
from magdiff_jax.models.edsc import interpolate
from magdiff_jax.train.groups import param_groups
from magdiff_jax.train.tasks.base import discriminator_update, model_config

RECONSTRUCTION = ("charbonnier", "l1")


@dataclasses.dataclass(frozen=True)
class VFIOptions:
    """`config.task_options` of the vfi task, checked."""

    reconstruction: str = "charbonnier"  # charbonnier | l1
    charbonnier_eps: float = 1e-3
    perceptual_weight: float = 0.0  # x LPIPS (model `perceptual`, frozen): 0 leaves it out
    adversarial_weight: float = 0.0  # x the generator's hinge loss against model `discriminator`: 0 leaves it out
    adversarial_start: int = 0  # the discriminator trains, and the generator sees its loss, from this step

    def __post_init__(self):
        if self.reconstruction not in RECONSTRUCTION:
            raise ValueError(f"task_options.reconstruction must be one of {RECONSTRUCTION}, got "
                             f"{self.reconstruction!r}")
        for name in ("charbonnier_eps", "perceptual_weight", "adversarial_weight", "adversarial_start"):
            if getattr(self, name) < 0:
                raise ValueError(f"task_options.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, config) -> VFIOptions:
        o = config.task_options
        fields = {f.name: f.type for f in dataclasses.fields(cls)}
        return cls(**{k: o[k] for k in fields if k in o})


def reconstruction_loss(pred, target, kind: str, eps: float = 1e-3) -> jax.Array:
    """Mean L1 or Charbonnier (sqrt(d^2 + eps^2), a smooth L1) distance, in float32."""
    d = pred.astype(jnp.float32) - target.astype(jnp.float32)
    if kind == "l1":
        return jnp.mean(jnp.abs(d))
    return jnp.mean(jnp.sqrt(d * d + eps * eps))


def flatten_targets(batch) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(frame0, frame1, target, t) with one row per target frame: batches hold `frame0`, `frame1` (B, H, W, 3),
    `targets` (B, K, H, W, 3) and `times` (B, K) (the data pipeline's `interp` task)."""
    targets, times = batch["targets"], batch["times"]
    b, k = times.shape
    rep = lambda x: jnp.repeat(x, k, axis=0)
    return rep(batch["frame0"]), rep(batch["frame1"]), targets.reshape(b * k, *targets.shape[2:]), times.reshape(-1)


@dataclasses.dataclass
class VFITask:
    """Frames between two given ones at times t in (0, 1): the EDSC interpolator (model `interpolator`, kind
    `edsc`) predicts each target frame from its neighbours and t. Its loss: the reconstruction
    (`task_options.reconstruction`: Charbonnier or L1) + `perceptual_weight` x LPIPS on VGG16 features (model
    `perceptual`, kind `lpips`, frozen: from init_from, e.g. `convert.vgg.lpips_from_torch` of torchvision's VGG16 and
    the lpips package's heads) + from step `adversarial_start` `adversarial_weight` x the hinge GAN's generator loss
    against a patch discriminator (model `discriminator`), which trains in the same step on the targets against the
    predictions the interpolator's update started from. Two parameter groups, each with its own optimizer
    (`config.groups.<name>.optim`): `interpolator` and `discriminator`. Batches: the data pipeline's `interp` task
    (`frame0`, `frame1`, `targets`, `times`; septuplets with targets at t = 1/3 and 2/3 for 32 -> 94 frames)."""

    name: str = "vfi"

    def models(self, config):
        opts = VFIOptions.from_config(config)
        models = {"interpolator": ("edsc", model_config(config, "interpolator", "edsc"))}
        if opts.perceptual_weight > 0:
            models["perceptual"] = ("lpips", model_config(config, "perceptual", "lpips"))
        if opts.adversarial_weight > 0:
            models["discriminator"] = ("patch_discriminator",
                                       model_config(config, "discriminator", "patch_discriminator"))
        return models

    def batch_keys(self, config):
        if config.data.get("task", "video") != "interp":
            raise ValueError(f"the vfi task needs data.task 'interp' (frame pairs with targets between), got "
                             f"{config.data.get('task', 'video')!r}")
        return ("frame0", "frame1", "targets", "times")

    def groups(self, config):
        opts = VFIOptions.from_config(config)
        if opts.adversarial_weight > 0:
            return param_groups(config, {"interpolator": r"^interpolator/", "discriminator": r"^discriminator/"},
                                start_steps={"discriminator": opts.adversarial_start})
        return param_groups(config, {"interpolator": r"^interpolator/"})

    def export_models(self, config):
        return ("interpolator",)

    def update(self, ctx, batch, key):
        opts = VFIOptions.from_config(ctx.config)
        net, disc, lpips = (ctx.modules.get(n) for n in ("interpolator", "discriminator", "perceptual"))
        f0, f1, target, t = flatten_targets(batch)

        def gen_loss(params):
            pred = interpolate(net, params["interpolator"], f0, f1, t)
            rec = reconstruction_loss(pred, target, opts.reconstruction, opts.charbonnier_eps)
            loss, aux = rec, {"reconstruction": rec, "pred": pred}
            if lpips is not None:
                perceptual = jnp.mean(lpips.apply({"params": params["perceptual"]}, pred, target))
                loss, aux["perceptual"] = loss + opts.perceptual_weight * perceptual, perceptual
            if disc is not None:
                adversarial = generator_adversarial_loss(disc.apply({"params": params["discriminator"]}, pred))
                on = (ctx.step >= opts.adversarial_start).astype(jnp.float32)
                loss, aux["adversarial"] = loss + on * opts.adversarial_weight * adversarial, adversarial
            return loss, aux

        ctx, aux = ctx.minimize(gen_loss, groups=("interpolator",))
        if disc is None:
            return ctx
        return discriminator_update(ctx, disc, target, aux["pred"])

    def preview(self, modules, params, batch, key, *, config):
        """Each example's first frame, its predicted in-between frames and its last frame, in time order, above the
        true ones: (2N, K + 2, H, W, 3) in [-1, 1]."""
        f0, f1, _, t = flatten_targets(batch)
        pred = interpolate(modules["interpolator"], params["interpolator"], f0, f1, t)
        b, k = batch["times"].shape
        pred = pred.reshape(b, k, *pred.shape[1:])
        ends = lambda mid: jnp.concatenate([batch["frame0"][:, None], mid, batch["frame1"][:, None]], 1)
        return jnp.concatenate([ends(pred), ends(batch["targets"].astype(jnp.float32))]).astype(jnp.float32)
