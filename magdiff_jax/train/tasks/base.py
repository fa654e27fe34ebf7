"""What a task is (`Task`) and what every task shares: its models' configs, the noise schedule, the diffusion loss's
settings.

A task names its models (registry names, `magdiff_jax.models.registry`), the batch entries its update reads, its
parameter groups (`train.groups`), the update (one or several losses per step) and a preview sampler. The trainer
owns everything else: mesh, data, checkpoints, logging, export.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from magdiff_jax.diffusion.losses import check_timestep_bias
from magdiff_jax.diffusion.schedules import NoiseSchedule, ScheduleConfig
from magdiff_jax.models.discriminator import hinge_discriminator_loss
from magdiff_jax.models.registry import config_from_dict, get_model
from magdiff_jax.train.groups import ParamGroup, StepContext


class Task(Protocol):
    name: str

    def models(self, config) -> dict[str, tuple[str, Any]]:
        """{model name: (registry name, model config dataclass)}."""

    def batch_keys(self, config) -> tuple[str, ...]:
        """The numeric batch entries the update reads (the rest stay on the host)."""

    def groups(self, config) -> dict[str, ParamGroup]:
        """The parameter groups (`train.groups.param_groups`), the main one first."""

    def update(self, ctx: StepContext, batch: dict, key: jax.Array) -> StepContext:
        """One training step on one (micro-)batch: `ctx.minimize` once or several times."""

    def export_models(self, config) -> tuple[str, ...]:
        """The models inference needs (a stage export holds these)."""

    def preview(self, modules: dict, params: dict, batch: dict, key: jax.Array, *, config) -> jax.Array:
        """Samples as videos (N, F, H, W, 3) in [-1, 1] for `batch`: the first N examples of the first training
        batch (the task's `batch_keys`), with `tokens` (N, L) replaced by `config.preview.prompts` when there are
        some, and `null_tokens` (the empty prompt, for guidance); `config.preview` holds num_steps and guidance.
        Traced inside `jax.jit`."""


def model_config(config, name: str, kind: str):
    """The config dataclass of model `name` (registry name `kind`): `config.model[name]` over the stored config of
    `init_from/name` (a model folder, `export.model`), when there is one, with the run's compute dtype."""
    from magdiff_jax.export.model import read_model_meta

    given = config.model[name].to_dict() if name in config.model else {}
    cls = get_model(kind).config_cls
    base = {}
    src = Path(config.init_from) / name if config.init_from else None
    if src is not None and src.exists():
        base = read_model_meta(src)["config"]
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
    """The noise schedule of `config.schedule`."""
    return NoiseSchedule.create(ScheduleConfig.from_mapping(config.schedule))


def timestep_bias(config) -> float:
    """`schedule.timestep_bias` (0 when absent), checked."""
    return check_timestep_bias(config.schedule.get("timestep_bias", 0.0))


def discriminator_update(ctx, disc, real, fake):
    """The patch discriminator's step of a GAN task (group `discriminator`, metric `loss_d`): the hinge loss of its
    logits on `real` against `fake` (outputs the generator's update started from, gradients stopped)."""
    fake = jax.lax.stop_gradient(fake)

    def disc_loss(params):
        logits = disc.apply({"params": params["discriminator"]}, jnp.concatenate([real, fake]))
        real_logits, fake_logits = jnp.split(logits, 2)
        return hinge_discriminator_loss(real_logits, fake_logits), {}

    return ctx.minimize(disc_loss, groups=("discriminator",), metric="loss_d")[0]
