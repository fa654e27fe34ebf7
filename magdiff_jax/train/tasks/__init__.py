"""Training tasks: what each stage trains, on which batch, with which update (`base.Task`).

    task = get_task("t2i")   # t2i (MagicVideo-V2 stage 1), vae (optionally with a patch GAN), magdiff, i2v, v2v, vfi
"""

from __future__ import annotations

from magdiff_jax.train.tasks.base import Task, model_config
from magdiff_jax.train.tasks.i2v import I2VTask
from magdiff_jax.train.tasks.magdiff import MagDiffTask
from magdiff_jax.train.tasks.t2i import T2ITask
from magdiff_jax.train.tasks.v2v import V2VTask
from magdiff_jax.train.tasks.vae import VAETask
from magdiff_jax.train.tasks.vfi import VFITask

TASKS = {"t2i": T2ITask, "vae": VAETask, "magdiff": MagDiffTask, "i2v": I2VTask, "v2v": V2VTask, "vfi": VFITask}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name]()


__all__ = ["TASKS", "Task", "get_task", "model_config"]
