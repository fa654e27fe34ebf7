"""Our on-disk form of a converted model: an Orbax checkpoint of the params plus `config.json`.

    DST/
      config.json    {"kind": "unet2d", "format": "magdiff_jax", "config": {...our config dataclass...}}
      params/        Orbax (OCDBT) checkpoint of the Flax params tree

Written into a temporary sibling folder and renamed into place: an interrupted conversion never leaves a
half-written DST, and an existing DST is never overwritten unless asked.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from magdiff_jax.convert.core import config_from_dict, config_to_dict, get_kind
from magdiff_jax.utils.files import atomic_dir

FORMAT = "magdiff_jax"


def save_flax(kind: str, module, params, dst: str | os.PathLike, overwrite: bool = False) -> Path:
    dst = Path(dst).absolute()
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; choose another destination or pass overwrite")
    with atomic_dir(dst) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp / "params", jax.device_get(params))
            ckptr.wait_until_finished()
        meta = {"kind": kind, "format": FORMAT, "config": config_to_dict(module.config)}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
    return dst


def read_meta(src: str | os.PathLike) -> dict:
    src = Path(src)
    path = src / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{src}: no config.json; expected a folder written by `magdiff-jax convert to-flax`")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or "kind" not in meta:
        raise ValueError(f"{path}: not a magdiff_jax checkpoint config (no format/kind); is this a PyTorch folder?")
    return meta


def load_flax(src: str | os.PathLike, kind: str | None = None, shardings=None):
    """-> (kind, module, params). `kind`, when given, must match the stored one."""
    src = Path(src).absolute()
    meta = read_meta(src)
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"{src} holds a {meta['kind']!r} model, not {kind!r}")
    spec = get_kind(meta["kind"])
    module = spec.build(config_from_dict(spec.config_cls, meta["config"]))
    from flax import traverse_util

    abstract = traverse_util.unflatten_dict(spec.abstract_params(module))
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(src / "params", abstract)
    return meta["kind"], module, params
