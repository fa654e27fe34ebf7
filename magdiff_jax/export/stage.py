"""Stage exports: every model a trained stage's inference needs, frozen ones included, in one folder.

    DST/
      stage.json     {"format": "magdiff_jax_stage", "format_version": 1, "task": "magdiff", "step": 150,
                      "models": {"unet": "magdiff", "vae": "vae", ...}, "tokenizer": "tokenizer" | null,
                      "config": the run's training config}
      <model>/       one model folder each (`export.model`: config.json + params/)
      tokenizer/     the run's tokenizer (vocab.json, merges.txt, ...), when it has one
      scheduler/     scheduler_config.json (diffusers' DDIMScheduler reads it)

    stage = load_stage("runs/magdiff/export")       # or the workdir itself: exported on the fly from its checkpoint
    stage.modules["unet"], stage.params["unet"], stage.config, stage.schedule, stage.tokenizer

A training workdir holds what an export needs: `models.json` (the task, each model's registry name and config,
the parameter groups), `frozen/` (the parameters no group trains, written once when the run starts), `tokenizer/`
and the checkpoints (each group's parameters and EMA). `stage_from_workdir` assembles them without the `init_from`
folders the run started from; a model parameter found nowhere is an error naming it, never a fresh initialisation.
The trainer writes `WORKDIR/export/` at the end of training; `magdiff-jax export --workdir W --out DIR` writes one
from any checkpoint. Exports and workdirs may be local or in an object store (gs://...); an export is written whole
(`export.model.folder_written_whole`: a local rename, or in an object store a completion marker written last), and
an object-store export without its marker is refused as incomplete.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
from etils import epath
from flax import traverse_util

from magdiff_jax.diffusion.schedules import ScheduleConfig
from magdiff_jax.export.model import folder_written_whole, load_model, model_config, read_model_config, save_model
from magdiff_jax.models.registry import ConfigError, config_to_dict, get_model
from magdiff_jax.utils.errors import ConversionError, mismatch_message
from magdiff_jax.utils.files import as_path, check_complete, copy_tree

FORMAT = "magdiff_jax_stage"
FORMAT_VERSION = 1
STAGE_FILE = "stage.json"
TOKENIZER = "tokenizer"
SCHEDULER = "scheduler"
# a training workdir's own files
WORKDIR_MODELS = "models.json"
FROZEN = "frozen"
CHECKPOINTS = "checkpoints"
GROUP_ITEM = "group_{}"  # the checkpoint item of a parameter group


@dataclasses.dataclass
class Stage:
    """A trained stage in memory: its models and parameters ({name: ...}), the run's config and tokenizer."""

    task: str
    step: int
    config: ml_collections.ConfigDict
    kinds: dict[str, str]
    modules: dict[str, nn.Module]
    params: dict[str, Any]
    tokenizer: epath.Path | None
    path: epath.Path

    @property
    def schedule(self) -> ScheduleConfig:
        """The noise schedule the stage trained with (its sampler settings)."""
        return ScheduleConfig.from_mapping(self.config.schedule)

    def tokenizer_folder(self) -> str:
        if self.tokenizer is None:
            raise FileNotFoundError(f"{self.path}: the stage has no tokenizer")
        return str(self.tokenizer)


# --- writing ----------------------------------------------------------------------------------------------------
def save_stage(stage: Stage, dst: str | os.PathLike, overwrite: bool = False) -> epath.Path:
    """Write `stage` as the export folder of the module docstring (written whole: `folder_written_whole`; an
    existing non-empty DST is replaced only with `overwrite`). Every process of a multi-host run calls it."""
    dst = as_path(dst)
    with folder_written_whole(dst, overwrite) as tmp:
        for name in sorted(stage.modules):
            save_model(stage.kinds[name], stage.modules[name], stage.params[name], tmp / name)
        if jax.process_index() == 0:
            if stage.tokenizer is not None:
                copy_tree(stage.tokenizer, tmp / TOKENIZER)
            (tmp / SCHEDULER).mkdir(exist_ok=True)
            (tmp / SCHEDULER / "scheduler_config.json").write_text(
                json.dumps(stage.schedule.to_diffusers_config("DDIMScheduler"), indent=2))
            meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": stage.task, "step": stage.step,
                    "models": dict(sorted(stage.kinds.items())),
                    "tokenizer": TOKENIZER if stage.tokenizer is not None else None,
                    "config": json.loads(stage.config.to_json_best_effort())}
            (tmp / STAGE_FILE).write_text(json.dumps(meta, indent=1))
    return dst


def write_workdir_models(workdir: epath.Path, task: str, models: dict[str, tuple[str, Any]], groups: list[str],
                         export: tuple[str, ...], tokenizer: bool, frozen: bool) -> None:
    """WORKDIR/models.json: what `stage_from_workdir` needs besides the checkpoints (process 0 writes it).
    `frozen`: whether some parameters are frozen (then WORKDIR/frozen holds them)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task,
            "models": {name: {"kind": kind, "config": config_to_dict(cfg)} for name, (kind, cfg) in models.items()},
            "groups": list(groups), "export": list(export), "tokenizer": TOKENIZER if tokenizer else None,
            "frozen": FROZEN if frozen else None}
    (workdir / WORKDIR_MODELS).write_text(json.dumps(meta, indent=1))


# --- reading ----------------------------------------------------------------------------------------------------
def _read_json(path: epath.Path, what: str) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path.parent}: no {path.name} ({what})")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a magdiff_jax stage file (format != {FORMAT!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not the supported "
                         f"{FORMAT_VERSION}")
    return meta


def load_stage(path: str | os.PathLike, step: int | None = None, use_ema: bool = True) -> Stage:
    """A stage export, or a training workdir exported on the fly (its checkpoint at `step`, default the latest;
    the EMA parameters when the run kept them and `use_ema`)."""
    path = as_path(path)
    if (path / STAGE_FILE).exists():
        check_complete(path, "stage export")
        if step is not None:
            raise ValueError(f"{path} is an export (of step {json.loads((path / STAGE_FILE).read_text()).get('step')})"
                             "; a step can be chosen only from a training workdir")
        return _load_export(path)
    if (path / CHECKPOINTS).exists() or (path / WORKDIR_MODELS).exists():
        return stage_from_workdir(path, step, use_ema)
    raise FileNotFoundError(f"{path}: neither a stage export (no {STAGE_FILE}) nor a training workdir (no "
                            f"{CHECKPOINTS}/)")


def read_stage_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """The training config of a stage export or workdir, read without loading a model (cheap: one JSON file)."""
    path = as_path(path)
    if (path / STAGE_FILE).exists():
        check_complete(path, "stage export")
        return ml_collections.ConfigDict(_read_json(path / STAGE_FILE, "a stage export")["config"])
    if (path / CHECKPOINTS).exists() or (path / WORKDIR_MODELS).exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: config.json is missing (the training workdir's config)")
        return ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
    raise FileNotFoundError(f"{path}: neither a stage export (no {STAGE_FILE}) nor a training workdir (no "
                            f"{CHECKPOINTS}/)")


@dataclasses.dataclass
class StageInfo:
    """What a stage is, read from its JSON files alone (no weights): its task, training config, each model's kind
    and config dataclass ({name: (kind, config)}) and its tokenizer folder."""

    task: str
    config: ml_collections.ConfigDict
    models: dict[str, tuple[str, Any]]
    tokenizer: epath.Path | None
    path: epath.Path


def read_stage_info(path: str | os.PathLike) -> StageInfo:
    """A stage export's or training workdir's `StageInfo`, from stage.json and the model folders' config.json (an
    export) or models.json and config.json (a workdir): cheap enough to check several stages against each other
    before any of them loads."""
    path = as_path(path)
    config = read_stage_config(path)  # also: what the folder is, or a clear error
    if (path / STAGE_FILE).exists():
        meta = _read_json(path / STAGE_FILE, "a stage export")
        models = {name: read_model_config(path / name, kind=kind) for name, kind in meta["models"].items()}
    else:
        meta = _read_json(path / WORKDIR_MODELS, "written by the trainer when the run starts")
        models = {}
        for name in meta["export"]:
            try:
                models[name] = model_config(meta["models"][name])
            except ConfigError as e:
                raise ConfigError(f"{path / WORKDIR_MODELS}: {e.within(f'models.{name}')}") from e
    tokenizer = path / meta["tokenizer"] if meta.get("tokenizer") else None
    return StageInfo(meta["task"], config, models, tokenizer, path)


def _load_export(path: epath.Path) -> Stage:
    meta = _read_json(path / STAGE_FILE, "a stage export")
    kinds, modules, params = {}, {}, {}
    for name, kind in meta["models"].items():
        folder = path / name
        if not folder.is_dir():
            raise FileNotFoundError(f"{path}: the export lists model {name!r} ({kind}) but {folder} is missing")
        kinds[name], modules[name], params[name] = load_model(folder, kind=kind)
    tokenizer = path / meta["tokenizer"] if meta.get("tokenizer") else None
    if tokenizer is not None and not tokenizer.is_dir():
        raise FileNotFoundError(f"{path}: the export's tokenizer folder {tokenizer} is missing")
    return Stage(meta["task"], int(meta["step"]), ml_collections.ConfigDict(meta["config"]), kinds, modules, params,
                 tokenizer, path)


def checkpoint_steps(workdir: epath.Path) -> list[int]:
    folder = workdir / CHECKPOINTS
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _restore_partial(path: epath.Path, names: tuple[str, ...]) -> dict:
    """The subtrees `names` of an Orbax PyTree item (the first of them it holds), read alone onto one device:
    a group's optimizer state (twice its parameters with Adam) stays on disk."""
    import orbax.checkpoint as ocp

    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = handler.metadata(path).tree
    finally:
        handler.close()
    name = next((n for n in names if n in saved), None)
    if name is None:
        raise ValueError(f"{path}: the checkpoint item holds none of {list(names)} (it has {sorted(saved)})")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved[name])}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ck:
        restored = ck.restore(path, args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    return restored[name]


def restore_frozen(workdir: epath.Path, shardings=None):
    """WORKDIR/frozen: the parameters no group trains ({model: params}); `shardings` (a tree like it) places them."""
    import orbax.checkpoint as ocp

    folder = workdir / FROZEN
    if not folder.exists():
        raise FileNotFoundError(f"{workdir}: no {FROZEN}/ (the run's frozen parameters, written when it started)")
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(folder).item_metadata.tree
        if shardings is None:
            device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: device, meta)
        target = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), meta, shardings)
        return ckptr.restore(folder, target)


def stage_from_workdir(workdir: str | os.PathLike, step: int | None = None, use_ema: bool = True) -> Stage:
    """The stage a training workdir's checkpoint holds (module docstring)."""
    workdir = as_path(workdir)
    meta = _read_json(workdir / WORKDIR_MODELS, "written by the trainer when the run starts")
    steps = checkpoint_steps(workdir)
    if not steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint under {workdir / CHECKPOINTS} (train first: "
                                "magdiff-jax train)")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"{workdir}: no checkpoint for step {step} (have {steps})")
    config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
    flat = {}
    if meta.get("frozen"):
        flat.update(traverse_util.flatten_dict(restore_frozen(workdir), sep="/"))
    for group in meta["groups"]:
        item = workdir / CHECKPOINTS / str(step) / GROUP_ITEM.format(group)
        if not item.exists():
            raise FileNotFoundError(f"{workdir}: checkpoint {step} has no item for parameter group {group!r} "
                                    f"({item})")
        names = ("ema", "params") if use_ema else ("params",)
        flat.update(traverse_util.flatten_dict(_restore_partial(item, names), sep="/"))
    kinds, modules, params = {}, {}, {}
    for name in meta["export"]:
        entry = meta["models"][name]
        spec = get_model(entry["kind"])
        try:
            module = spec.build(model_config(entry)[1])
        except ConfigError as e:
            raise ConfigError(f"{workdir / WORKDIR_MODELS}: {e.within(f'models.{name}')}") from e
        expected = {"/".join(p): a for p, a in spec.abstract_params(module).items()}
        own = {p[len(name) + 1:]: v for p, v in flat.items() if p.startswith(f"{name}/")}
        missing = sorted(p for p in expected if p not in own)
        misshaped = sorted(f"{p}: {tuple(own[p].shape)}, expected {tuple(a.shape)}" for p, a in expected.items()
                           if p in own and tuple(own[p].shape) != tuple(a.shape))
        if missing or misshaped:
            raise ConversionError(mismatch_message(
                f"{workdir}: model {name!r} ({entry['kind']}) is incomplete in checkpoint {step} and {FROZEN}/",
                [f"{name}/{p}" for p in missing], (), misshaped))
        kinds[name], modules[name] = entry["kind"], module
        params[name] = traverse_util.unflatten_dict({p: own[p] for p in expected}, sep="/")
    tokenizer = workdir / meta["tokenizer"] if meta.get("tokenizer") else None
    return Stage(meta["task"], step, config, kinds, modules, params, tokenizer, workdir)


def export_workdir(workdir: str | os.PathLike, dst: str | os.PathLike, step: int | None = None,
                   use_ema: bool = True, overwrite: bool = False) -> epath.Path:
    """`magdiff-jax export`: the workdir's checkpoint as a stage export."""
    return save_stage(stage_from_workdir(workdir, step, use_ema), dst, overwrite=overwrite)
