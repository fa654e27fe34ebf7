"""A trained workdir back in memory, for sampling, evaluation and export.

    trained = load_trained("/tmp/magdiff_tiny")       # the latest checkpoint (its EMA when the run kept one)
    trained.modules["unet"], trained.params["unet"], trained.config

The trainer checkpoints only what trains; the frozen models are rebuilt exactly as the run built them (from
`init_from`, or from the run's seed), so the restored parameters are the ones the last step used.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import ml_collections


@dataclasses.dataclass
class Trained:
    config: ml_collections.ConfigDict
    task: object
    modules: dict
    params: dict
    step: int
    workdir: Path

    def tokenizer_folder(self) -> str:
        """The run's tokenizer folder (`tokenizer_folder` of the trainer)."""
        from magdiff_jax.train.trainer import tokenizer_folder

        return tokenizer_folder(self.config, self.workdir)


def load_trained(workdir: str | Path, step: int | None = None, use_ema: bool = True) -> Trained:

    from magdiff_jax import sharding as shd
    from magdiff_jax.train import optim
    from magdiff_jax.train.tasks import get_task
    from magdiff_jax.train.trainer import _init_models

    workdir = Path(workdir).absolute()
    folder = workdir / "checkpoints"
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []
    if not steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint under {folder} (train first: magdiff-jax train)")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint for step {step} (have {steps})")
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{workdir}: config.json is missing")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    task = get_task(config.task)
    mesh = shd.make_mesh({"data": -1, "fsdp": 1, "tensor": 1, "context": 1})
    trainable_rx = config.trainable or task.trainable
    # models trained whole come from the checkpoint (left abstract here); frozen ones are re-created as training did
    modules, params, _ = _init_models(task, config, mesh, shd.DEFAULT_RULES,
                                      jax.random.fold_in(jax.random.key(config.seed), 1), restoring=trainable_rx)
    trained = _restore_params(folder / str(step) / "state", use_ema, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
    _, frozen = optim.split_trainable(params, trainable_rx)
    return Trained(config, task, modules, optim.merge(trained, frozen), step, workdir)


def _restore_params(path: Path, use_ema: bool, sharding):
    """The trained parameters of a checkpoint's `state` item (its `ema` when asked for and kept, else `params`),
    read alone: the optimizer state (twice the parameters' size with Adam) and the rest stay on disk."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = handler.metadata(path).tree
    finally:
        handler.close()
    name = "ema" if use_ema and "ema" in saved else "params"
    if name not in saved:
        raise ValueError(f"{path}: the checkpoint holds no {name!r} (items: {sorted(saved)})")
    target = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), saved[name])}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ck:
        restored = ck.restore(path, args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return restored[name]
