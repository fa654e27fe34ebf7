"""Optimizer, learning-rate schedule, and which parameters train.

Parameters are one nested dict per model ({"unet": ..., "vae": ..., "text_encoder": ...}); paths are joined with
"/" ("unet/down_blocks_0/attentions_0/..."). `config.trainable` is a regex: matching parameters train, the rest are
frozen; frozen parameters get no gradient and no optimizer state (they are split off before `jax.grad`).
Weight decay skips biases, norm scales and embedding tables that must not shrink (`no_decay` regex).
"""

from __future__ import annotations

import re

import flax
import ml_collections
import optax

NO_DECAY = r"(bias|scale|norm[^/]*/.*|pos_embed/.*|position_embedding/.*)$"


def optim_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.lr = 1e-4
    c.schedule = "constant"  # constant | cosine (after the warmup)
    c.warmup_steps = 0
    c.end_lr_factor = 0.0  # cosine: final lr = lr * end_lr_factor
    c.b1, c.b2, c.eps = 0.9, 0.999, 1e-8
    c.weight_decay = 1e-2
    c.no_decay = NO_DECAY
    c.grad_clip = 1.0  # global-norm clipping (0: off)
    c.grad_accum = 1  # micro-batches per update
    return c


def flat(tree) -> dict[str, object]:
    return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(tree).items()}


def unflat(flat_tree: dict[str, object]):
    return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat_tree.items()})


def split_trainable(params, pattern: str):
    """(trainable, frozen) nested dicts by `re.search(pattern, path)`. Raises ValueError if nothing matches."""
    rx = re.compile(pattern)
    f = flat(params)
    trainable = {k: v for k, v in f.items() if rx.search(k)}
    if not trainable:
        raise ValueError(f"trainable={pattern!r} matches no parameter; paths look like {next(iter(f), '')!r}")
    frozen = {k: v for k, v in f.items() if k not in trainable}
    return unflat(trainable), (unflat(frozen) if frozen else {})


def merge(trainable, frozen):
    return unflat({**flat(frozen), **flat(trainable)}) if frozen else trainable


def check_optim_config(c, total_steps: int, where: str = "optim") -> list[str]:
    """Raise ValueError naming the first value of `c` that cannot be right (`where`.field); return warnings for
    values that are legal but likely unintended (a warmup longer than training)."""
    checks = (("lr", c.lr >= 0, ">= 0"), ("weight_decay", c.weight_decay >= 0, ">= 0"),
              ("grad_clip", c.grad_clip >= 0, ">= 0 (0: off)"), ("grad_accum", c.grad_accum >= 1, ">= 1"),
              ("warmup_steps", c.warmup_steps >= 0, ">= 0"), ("eps", c.eps > 0, "> 0"),
              ("b1", 0 <= c.b1 < 1, "in [0, 1)"), ("b2", 0 <= c.b2 < 1, "in [0, 1)"),
              ("end_lr_factor", c.end_lr_factor >= 0, ">= 0"),
              ("schedule", c.schedule in ("constant", "cosine"), "'constant' or 'cosine'"))
    for name, ok, want in checks:
        if not ok:
            raise ValueError(f"{where}.{name} must be {want}, got {c[name]!r}")
    if c.warmup_steps > total_steps:
        return [f"{where}.warmup_steps={c.warmup_steps} is longer than the run ({total_steps} steps): the learning "
                "rate never reaches its peak"]
    return []


def lr_schedule(c, total_steps: int) -> optax.Schedule:
    warm = max(int(c.warmup_steps), 0)
    if c.schedule == "constant":
        after = optax.constant_schedule(c.lr)
    elif c.schedule == "cosine":
        after = optax.cosine_decay_schedule(c.lr, max(total_steps - warm, 1), alpha=c.end_lr_factor)
    else:
        raise ValueError(f"optim.schedule must be 'constant' or 'cosine', got {c.schedule!r}")
    if not warm:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, warm), after], [warm])


def make_optimizer(c, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup + constant/cosine, global-norm clipping, decay mask, optional gradient accumulation."""
    schedule = lr_schedule(c, total_steps)
    rx = re.compile(c.no_decay)

    def decay_mask(params):
        return unflat({k: not rx.search(k) for k in flat(params)})

    parts = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    if c.grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=c.grad_accum)
    return tx, schedule
