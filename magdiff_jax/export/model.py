"""One model on disk in our own form: an Orbax checkpoint of its parameters plus its registry name and config.

    DST/
      config.json    {"kind": "unet2d", "format": "magdiff_jax", "config": {...the model's config dataclass...}}
      params/        Orbax (OCDBT) checkpoint of the Flax params tree

      complete.json  in an object store: the completion marker, written last (`utils.files`)

`magdiff-jax convert to-flax` writes it, `init_from` folders and stage exports are made of it. DST may be local or
in an object store (gs://...). A local folder is written into a temporary sibling and renamed into place, so an
interrupted write never leaves a half-written DST; in an object store (no rename) it is written in place and its
completion marker last, and readers refuse an object-store folder without the marker as incomplete. An existing DST
is replaced only when asked. Every process of a multi-host run takes part in the write (the parameters may be
sharded over hosts); process 0 writes the JSON, and renames or writes the marker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from magdiff_jax.distributed import sync
from magdiff_jax.models.registry import ConfigError, config_from_dict, config_to_dict, get_model
from magdiff_jax.utils.files import (
    as_path,
    check_complete,
    check_destination,
    clear_remote_dir,
    is_remote,
    mark_complete,
    replace_dir,
)

FORMAT = "magdiff_jax"
META = "config.json"
PARAMS = "params"


@contextlib.contextmanager
def folder_written_whole(dst: str | os.PathLike, overwrite: bool):
    """Yield an empty folder for every process to write `dst` into (an existing non-empty `dst` is refused unless
    `overwrite`). Locally the folder is a temporary sibling that process 0 renames onto `dst` when the block ends,
    removed on an error; in an object store it is `dst` itself, an existing one removed first by process 0, which
    writes the completion marker (`utils.files`) when the block ends; its objects are removed on an error."""
    dst = as_path(dst)
    check_destination(dst, overwrite)
    remote = is_remote(dst)
    tmp = dst if remote else dst.with_name(f".{dst.name}.partial")
    main = jax.process_index() == 0
    if main:
        if remote:
            clear_remote_dir(dst)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=remote)
    sync(f"write:{dst}:start")
    try:
        yield tmp
        sync(f"write:{dst}:written")
        if main:
            if remote:
                mark_complete(tmp)
            else:
                replace_dir(tmp, dst)
    except BaseException:
        if main:
            if remote:
                tmp.rmtree(missing_ok=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
        raise
    sync(f"write:{dst}:done")


def save_model(kind: str, module, params, dst: str | os.PathLike, overwrite: bool = False) -> epath.Path:
    """Write `params` of registered model `kind` (`module.config` its config) to DST; returns DST."""
    dst = as_path(dst)
    get_model(kind)  # an unknown name fails before anything is written
    with folder_written_whole(dst, overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / PARAMS, params)
            ckptr.wait_until_finished()
        if jax.process_index() == 0:
            meta = {"kind": kind, "format": FORMAT, "config": config_to_dict(module.config)}
            (tmp / META).write_text(json.dumps(meta, indent=2))
    return dst


def read_model_meta(src: str | os.PathLike) -> dict:
    """config.json of a model folder, checked for our format: {"kind", "format", "config"}; an object-store folder
    without its completion marker is refused as incomplete."""
    src = as_path(src)
    check_complete(src, "model folder")
    path = src / META
    if not path.exists():
        raise FileNotFoundError(f"{src}: no {META}; expected a model folder written by `magdiff-jax convert to-flax` "
                                "or a stage export")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ValueError(f"{path}: not valid JSON ({str(e) or type(e).__name__})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "kind" not in meta or "config" not in meta:
        raise ValueError(f"{path}: not a magdiff_jax model config (no format/kind/config); is this a PyTorch folder?")
    return meta


def model_config(meta: dict, path: str | os.PathLike | None = None):
    """(kind, config dataclass) of a model folder's config.json `meta`, checked field by field before any model is
    built: an unknown kind or a field of the wrong type or value is an error naming `path` (the file) and the field
    (`/path/config.json: config.block_out_channels: expected a list of integers, got "8"`)."""
    try:
        spec = get_model(meta["kind"])
        try:
            return meta["kind"], config_from_dict(spec.config_cls, meta["config"])
        except ConfigError as e:
            raise e.within("config") from None
    except ValueError as e:
        if path is None:
            raise
        raise ConfigError(f"{path}: {e}") from e


def read_model_config(src: str | os.PathLike, kind: str | None = None):
    """(kind, config dataclass) of a model folder from its config.json alone, no weight read; `kind`, when given,
    must be the stored one."""
    src = as_path(src)
    meta = read_model_meta(src)
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{src} holds a {meta['kind']!r} model, not {kind!r}")
    return model_config(meta, src / META)


def load_model(src: str | os.PathLike, kind: str | None = None, shardings=None):
    """-> (kind, module, params) of a model folder. `kind`, when given, must match the stored one; `shardings` (a
    tree like the params) places each array as it is read."""
    src = as_path(src)
    kind, config = read_model_config(src, kind)
    module = get_model(kind).build(config)
    abstract = traverse_util.unflatten_dict(get_model(kind).abstract_params(module))
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    if not (src / PARAMS).is_dir():
        raise FileNotFoundError(f"{src}: no {PARAMS}/ (the model's parameters)")
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(src / PARAMS, abstract)
    return kind, module, params
