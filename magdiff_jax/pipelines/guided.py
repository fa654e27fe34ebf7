"""What the stage pipelines share: classifier-free guidance over an image condition, running a compiled
per-example generator over a batch with a progress bar, and loading a stage of the right task (`StagePipeline`).

Guidance (MagDiff's subject, MagicVideo's reference): `image_guidance=None` guides on the text alone, the image
condition kept in both passes: e(c_I, 0) + s_T [e(c_I, c_T) - e(c_I, 0)]; with `image_guidance=s_I`
InstructPix2Pix's two-scale guidance, the image dropped as in training:
e(0, 0) + s_I [e(c_I, 0) - e(0, 0)] + s_T [e(c_I, c_T) - e(c_I, 0)]. Every pass of a step runs as one batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from magdiff_jax import distributed


def _concat(*trees):
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *trees)


def guided_denoiser(apply, text_ctx, null_ctx, cond: dict, *, guidance: float, image_guidance: float | None = None,
                    null_cond: dict | None = None):
    """model_fn(x, t) for the samplers: `apply(x, t (N,), context, **cond)` run on every guidance pass of the batch
    at once, combined as the module docstring says. cond / null_cond: the image condition and its dropped form
    (needed with image_guidance), batched like the text."""
    b = text_ctx.shape[0]
    if image_guidance is None:  # passes: (null text, image), (text, image)
        ctx, conds = jnp.concatenate([null_ctx, text_ctx]), _concat(cond, cond)
    else:  # passes: (null, no image), (null, image), (text, image)
        if null_cond is None:
            raise ValueError("image_guidance needs null_cond: the condition of the dropped image")
        ctx, conds = jnp.concatenate([null_ctx, null_ctx, text_ctx]), _concat(null_cond, cond, cond)
    passes = ctx.shape[0] // b

    def model_fn(x, t):
        x_in = jnp.concatenate([x] * passes)
        parts = jnp.split(apply(x_in, jnp.full((x_in.shape[0],), t), ctx, **conds), passes)
        if passes == 2:
            return parts[0] + guidance * (parts[1] - parts[0])
        return parts[0] + image_guidance * (parts[1] - parts[0]) + guidance * (parts[2] - parts[1])

    return model_fn


class BatchRunner:
    """Runs a jitted `fn(params, batch, keys)` (one example per row, each with its own seed) over a host batch:
    the rows split over the devices when they divide evenly, a progress bar of the denoising steps on stderr fed
    by `tick` (pass it as the sampler loop's callback), the result gathered back to the host."""

    def __init__(self):
        self._bar = None

    def tick(self, i) -> None:
        """The progress callback: step index i (0-based) of the sampler's schedule has finished."""
        if self._bar is not None and int(i) + 1 > self._bar.n:
            self._bar.update(int(i) + 1 - self._bar.n)

    def run(self, fn, params, batch: dict, seeds, *, num_steps: int, progress: bool):
        import numpy as np

        n, d = len(seeds), jax.device_count()
        if n % d == 0 and d > 1:  # every process holds every example: each gives its devices their rows
            batch = distributed.rows_over_devices(batch)
        keys = jnp.stack([jax.random.key_data(jax.random.key(int(s))) for s in seeds])
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=num_steps, desc="denoising", unit="step", initial=0)
        try:
            out = distributed.to_host(fn(params, batch, keys))
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None
        return np.round((out + 1) * 127.5).clip(0, 255).astype(np.uint8)


def per_example_jit(one):
    """`one(params, batch, key_data)` of a single example ((1, ...) arrays) -> a jitted `run(params, batch, keys)`
    over a batch, each row with its own key (the form `BatchRunner.run` calls)."""
    from magdiff_jax import cpu

    def run(params, batch, keys):
        per = jax.vmap(lambda b, k: one(params, jax.tree.map(lambda x: x[None], b), k)[0])
        return per(batch, keys)

    return jax.jit(run, compiler_options=cpu.compiler_options())


class StagePipeline:
    """A pipeline over one trained stage: `TASK` its task, `REQUIRED` the models it needs (checked, naming the
    missing ones), `NAME` how messages call it. `load` reads a stage export or a training workdir (its checkpoint at
    `step`, default the latest; local or in an object store) and refuses a stage of another task."""

    TASK: str = ""
    NAME: str = ""
    REQUIRED: tuple[str, ...] = ()

    def __init__(self, stage):
        missing = sorted(set(self.REQUIRED) - set(stage.modules))
        if missing:
            raise ValueError(f"{stage.path}: the stage has no {missing} ({self.NAME} stage needs "
                             f"{list(self.REQUIRED)})")
        self.stage = stage
        self.config = stage.config
        self._fns = {}
        self._runner = BatchRunner()

    @classmethod
    def load(cls, path, step: int | None = None):
        from magdiff_jax.export.stage import load_stage

        stage = load_stage(path, step)
        if stage.task != cls.TASK:
            raise ValueError(f"{path} holds a {stage.task!r} stage, not {cls.TASK}")
        return cls(stage)

    @property
    def resolution(self) -> tuple[int, int]:
        """The (H, W) the stage trained at."""
        return tuple(int(v) for v in self.config.data.resolution)
