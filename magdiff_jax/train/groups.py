"""Parameter groups and the update step a task writes with them.

A task trains one or several named parameter groups. Each group has its own trainable mask (a regex over the
"model/param/path" of every parameter), optimizer (AdamW with its schedule, clipping, decay mask and gradient
accumulation, `optim.make_optimizer`), EMA switch and the step it starts training at; parameters no group claims
are frozen (no gradient, no optimizer state). A task's `update` receives a `StepContext` and returns it with its
groups moved:

    def update(self, ctx, batch, key):                         # one loss, every group (the diffusion stages)
        return ctx.minimize(lambda params: (loss(params, batch, key), {}))

    def update(self, ctx, batch, key):                         # a GAN: two losses, two groups, one jitted step
        ctx, aux = ctx.minimize(generator_loss, groups=("generator",), metric="loss")
        return ctx.minimize(discriminator_loss, groups=("discriminator",), metric="loss_d")

`minimize` differentiates a loss with respect to the named groups (the rest of the parameters held fixed) and
applies each group's optimizer; a non-finite loss or gradient leaves that group as it was (the trainer counts the
step as skipped), and a group whose `start_step` is not reached yet stays as initialised. Metrics per group:
`grad_norm/<group>`, `lr/<group>`.

Configs: `config.optim` is every group's optimizer; `config.trainable` and `config.ema_decay` are the task's first
(main) group's; `config.groups.<name>` overrides any of `trainable`, `ema_decay`, `start_step` and `optim.<field>`
for one group.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from magdiff_jax.train import optim


@dataclasses.dataclass(frozen=True)
class ParamGroup:
    """A named set of trainable parameters: its mask, optimizer settings, EMA and first training step."""

    trainable: str  # regex over "model/param/path"
    optim: ml_collections.ConfigDict  # optim.optim_config() fields
    ema_decay: float = 0.0
    start_step: int = 0


def param_groups(config, defaults: dict[str, str], start_steps: dict[str, int] | None = None
                 ) -> dict[str, ParamGroup]:
    """The task's groups ({name: default trainable regex}, the main group first) with the config's settings."""
    overrides = config.get("groups") or ml_collections.ConfigDict()
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise ValueError(f"config.groups: unknown groups {unknown}; task {config.task!r} trains {list(defaults)}")
    out = {}
    for i, (name, trainable) in enumerate(defaults.items()):
        own = overrides.get(name) or ml_collections.ConfigDict()
        main = i == 0
        opt = config.optim.copy_and_resolve_references()
        if "optim" in own:
            opt.update(own.optim.to_dict())
        rx = own.get("trainable") or (config.get("trainable") if main else "") or trainable
        ema = own.get("ema_decay", config.get("ema_decay", 0.0) if main else 0.0)
        start = own.get("start_step", (start_steps or {}).get(name, 0))
        if start < 0:
            raise ValueError(f"groups.{name}.start_step must be >= 0, got {start}")
        out[name] = ParamGroup(trainable=rx, optim=opt, ema_decay=float(ema), start_step=int(start))
    return out


def split_params(params, groups: dict[str, ParamGroup]) -> tuple[dict, Any]:
    """({group: its parameters}, frozen parameters) of a {model: params} tree. A parameter claimed by two groups,
    or a group that claims nothing, is an error naming them."""
    flat = optim.flat(params)
    claimed, owner = {name: {} for name in groups}, {}
    for name, group in groups.items():
        rx = re.compile(group.trainable)
        for path, value in flat.items():
            if rx.search(path):
                if path in owner:
                    raise ValueError(f"parameter {path} is claimed by groups {owner[path]!r} and {name!r}; make "
                                     "their trainable patterns disjoint")
                owner[path] = name
                claimed[name][path] = value
    for name, part in claimed.items():
        if not part:
            raise ValueError(f"group {name!r}: trainable={groups[name].trainable!r} matches no parameter; paths look "
                             f"like {next(iter(flat), '')!r}")
    frozen = {p: v for p, v in flat.items() if p not in owner}
    return ({name: optim.unflat(part) for name, part in claimed.items()},
            optim.unflat(frozen) if frozen else {})


def merge_params(group_params: dict, frozen) -> dict:
    """The {model: params} tree of every group's parameters and the frozen ones."""
    flat = optim.flat(frozen) if frozen else {}
    for part in group_params.values():
        flat.update(optim.flat(part))
    return optim.unflat(flat)


def make_optimizers(groups: dict[str, ParamGroup], total_steps: int) -> dict:
    """{group: (optax transform, lr schedule)}; a group starting at step N schedules over the steps after it."""
    return {name: optim.make_optimizer(g.optim, max(total_steps - g.start_step, 1)) for name, g in groups.items()}


def initial_state(group_params: dict, optimizers: dict, groups: dict[str, ParamGroup]) -> dict:
    """{group: {"params", "opt_state"[, "ema"]}} of a fresh run."""
    out = {}
    for name, params in group_params.items():
        out[name] = {"params": params, "opt_state": optimizers[name][0].init(params)}
        if groups[name].ema_decay > 0:
            out[name]["ema"] = jax.tree.map(jnp.copy, params)
    return out


@dataclasses.dataclass(frozen=True)
class StepContext:
    """One training step as a task sees it (traced inside the jitted step): the modules, the config, the step
    number (0-based, the step being taken), each group's state and the frozen parameters. `minimize` and `apply`
    return a new context; `metrics` collects what the trainer logs."""

    modules: dict
    config: Any
    step: jax.Array
    state: dict  # {group: {"params", "opt_state"[, "ema"]}}
    frozen: Any
    groups: dict[str, ParamGroup]
    optimizers: dict
    metrics: dict = dataclasses.field(default_factory=dict)

    def params(self, **replaced) -> dict:
        """Every model's parameters ({model: params}), the groups named in `replaced` taking the trees given."""
        return merge_params({g: replaced.get(g, s["params"]) for g, s in self.state.items()}, self.frozen)

    def minimize(self, loss_fn, groups: tuple[str, ...] | None = None, *, metric: str = "loss"):
        """Differentiate `loss_fn(params) -> (scalar loss, aux dict)` with respect to `groups` (default: every
        group) and apply each one's optimizer. The loss is logged as `metric`, the aux scalars under their names.
        Returns (new context, aux)."""
        names = tuple(self.state) if groups is None else tuple(groups)
        unknown = sorted(set(names) - set(self.state))
        if unknown:
            raise ValueError(f"minimize: unknown groups {unknown}; the task's groups are {list(self.state)}")

        def fn(trees):
            return loss_fn(self.params(**trees))

        (loss, aux), grads = jax.value_and_grad(fn, has_aux=True)({g: self.state[g]["params"] for g in names})
        ctx = dataclasses.replace(self, metrics={**self.metrics, metric: loss,
                                                 **{k: v for k, v in aux.items() if jnp.ndim(v) == 0}})
        for name in names:
            ctx = ctx.apply(name, grads[name], loss)
        return ctx, aux

    def apply(self, name: str, grads, loss=None) -> StepContext:
        """Apply group `name`'s optimizer to `grads`, unless the loss or the gradient is not finite or the group's
        start step is still ahead (then its state stays as it was)."""
        group, (tx, schedule), state = self.groups[name], self.optimizers[name], self.state[name]
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(grad_norm) if loss is None else jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        active = ok & (self.step >= group.start_step) if group.start_step else ok
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        def keep(new, old):
            return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, old)

        new = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"])}
        if "ema" in state:
            d = group.ema_decay
            new["ema"] = keep(jax.tree.map(lambda e, p: d * e + (1 - d) * p, state["ema"], new["params"]),
                              state["ema"])
        metrics = {**self.metrics, f"grad_norm/{name}": grad_norm,
                   f"lr/{name}": schedule(jnp.maximum(self.step - group.start_step, 0)),
                   "nonfinite": jnp.maximum(self.metrics.get("nonfinite", 0), (~ok).astype(jnp.int32))}
        return dataclasses.replace(self, state={**self.state, name: new}, metrics=metrics)
