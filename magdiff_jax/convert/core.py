"""The one conversion mechanism: explicit per-kind mapping tables between PyTorch state dicts and Flax trees.

A registered model (`magdiff_jax.models.registry`: `clip_text`, `vae`, `unet2d`, ...) with a PyTorch counterpart gets
a `TorchFormat` attached by name: how to translate its config.json, and a function that lists, for a given config,
every `Rule` (PyTorch key <-> Flax path + layout transform). The table is written out module by module from the
config (no regex guessing), so a key that the table does not know is reported, never silently mapped.

Layout transforms (PyTorch -> Flax; the inverse is applied on export):
  copy    unchanged (biases, embeddings, positional tables)
  linear  (out, in) -> (in, out); an (out, in, 1, 1) 1x1-conv weight is accepted for a linear (legacy VAE attention)
  conv    (out, in, *k) -> (*k, in, out)
  norm    unchanged (weight -> scale is a naming matter of the rule)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from magdiff_jax.convert import safetensors_io
from magdiff_jax.models.registry import ConfigError, get_model
from magdiff_jax.utils.errors import ConversionError, key_list, mismatch_message
from magdiff_jax.utils.files import as_path, atomic_dir, check_destination, user_path


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str  # "down_blocks.0.resnets.1.conv1.weight"
    flax: tuple[str, ...]  # ("down_blocks_0", "resnets_1", "conv1", "kernel")
    transform: str = "copy"  # copy | linear | conv


def _f(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


# --- rule builders: one call per PyTorch module --------------------------------------------------------------
def linear(t: str, f: str, bias: bool = True) -> list[Rule]:
    """nn.Linear at PyTorch prefix `t` <-> nn.Dense at Flax path `f` ("a/b/c")."""
    rules = [Rule(f"{t}.weight", (*_f(f), "kernel"), "linear")]
    if bias:
        rules.append(Rule(f"{t}.bias", (*_f(f), "bias")))
    return rules


def conv(t: str, f: str, bias: bool = True) -> list[Rule]:
    """nn.ConvNd <-> nn.Conv."""
    rules = [Rule(f"{t}.weight", (*_f(f), "kernel"), "conv")]
    if bias:
        rules.append(Rule(f"{t}.bias", (*_f(f), "bias")))
    return rules


def norm(t: str, f: str) -> list[Rule]:
    """nn.LayerNorm / nn.GroupNorm (weight, bias) <-> (scale, bias)."""
    return [Rule(f"{t}.weight", (*_f(f), "scale")), Rule(f"{t}.bias", (*_f(f), "bias"))]


def embedding(t: str, f: str) -> list[Rule]:
    """nn.Embedding <-> nn.Embed."""
    return [Rule(f"{t}.weight", (*_f(f), "embedding"))]


def param(t: str, f: str) -> list[Rule]:
    """A bare nn.Parameter <-> a Flax param of the same layout."""
    return [Rule(t, _f(f))]


# --- layout transforms ----------------------------------------------------------------------------------------
def _to_flax(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        if x.ndim == 4 and x.shape[2:] == (1, 1):
            x = x[:, :, 0, 0]
        return x.T
    if transform == "conv":
        return np.transpose(x, (*range(2, x.ndim), 1, 0))
    return x


def _to_torch(x: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return x.T
    if transform == "conv":
        n = x.ndim
        return np.transpose(x, (n - 1, n - 2, *range(n - 2)))
    return x


def _expected_torch_shape(flax_shape: tuple[int, ...], transform: str) -> tuple[int, ...]:
    return tuple(_to_torch(np.empty(flax_shape, dtype=np.bool_), transform).shape)


def check_table(rules: list[Rule], abstract: Mapping[tuple[str, ...], Any], kind: str) -> None:
    """The table must cover the Flax tree exactly: a mismatch is a bug in the table, reported as such."""
    by_flax = {r.flax for r in rules}
    no_rule = sorted("/".join(p) for p in abstract if p not in by_flax)
    no_param = sorted("/".join(p) for p in by_flax if p not in abstract)
    if no_rule or no_param:
        raise ConversionError(
            f"[{kind}] the mapping table does not match the Flax module:"
            + (f"\n  Flax parameters with no rule:{key_list(no_rule)}" if no_rule else "")
            + (f"\n  rules naming no Flax parameter:{key_list(no_param)}" if no_param else "")
        )


def torch_to_flax(
    state: Mapping[str, np.ndarray],
    rules: list[Rule],
    abstract: Mapping[tuple[str, ...], Any],
    kind: str,
    source: str = "",
    dtype=np.float32,
) -> dict:
    """A PyTorch state dict -> a nested Flax params dict; every missing/unexpected/mis-shaped key is reported."""
    check_table(rules, abstract, kind)
    known = {r.torch for r in rules}
    missing = [r.torch for r in rules if r.torch not in state]
    unexpected = sorted(k for k in state if k not in known)
    misshaped, flat = [], {}
    for r in rules:
        if r.torch not in state:
            continue
        want = tuple(abstract[r.flax].shape)
        x = _to_flax(np.asarray(state[r.torch]), r.transform)
        if tuple(x.shape) != want:
            misshaped.append(
                f"{r.torch}: checkpoint has {tuple(state[r.torch].shape)}, model expects "
                f"{_expected_torch_shape(want, r.transform)}"
            )
            continue
        flat[r.flax] = np.asarray(x, dtype=dtype)
    if missing or unexpected or misshaped:
        where = f" in {source}" if source else ""
        raise ConversionError(mismatch_message(f"[{kind}] checkpoint{where} does not match the model config:",
                                               missing, unexpected, misshaped))
    return traverse_util.unflatten_dict(flat)


def flax_to_torch(params: Mapping, rules: list[Rule], kind: str) -> dict[str, np.ndarray]:
    """A nested Flax params dict -> a PyTorch state dict (numpy arrays, PyTorch layouts)."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(params)))
    check_table(rules, flat, kind)
    return {r.torch: _contiguous(_to_torch(np.asarray(flat[r.flax]), r.transform)) for r in rules}


def _contiguous(x: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping the shape (np.ascontiguousarray turns a 0-d array into shape (1,))."""
    return np.ascontiguousarray(x).reshape(x.shape)


# --- PyTorch formats of registered models ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TorchFormat:
    """The PyTorch (diffusers / transformers) form of a registered model (`magdiff_jax.models.registry`): its class,
    config.json translation and mapping table. Attached by name; a model without a PyTorch counterpart has none."""

    library: str  # "diffusers" | "transformers"
    torch_class: Callable[[Any], str]  # config -> PyTorch class name written to config.json
    config_from_torch: Callable[[dict], Any]
    config_to_torch: Callable[[Any], dict]
    rules: Callable[[Any], list[Rule]]
    normalise_keys: Callable[[dict], dict] = lambda state: state  # import only: legacy names, prefixes
    # a kind also released as one weights file with no config (`WEIGHT_FILES`): file -> (config, state dict), and
    # (config, state dict, file) -> None; `load_torch` / `save_torch` use them for a path with such a suffix
    read_file: Callable[[Any], tuple[Any, dict]] | None = None
    write_file: Callable[[Any, dict, Any], None] | None = None

    @property
    def weights_stem(self) -> str:
        return "diffusion_pytorch_model" if self.library == "diffusers" else "model"


_FORMATS: dict[str, TorchFormat] = {}
# the modules that attach formats (imported on the first lookup)
FORMAT_MODULES = ("clip", "vae", "unet2d", "unet3d", "unet_motion", "controlnet", "edsc", "vgg", "i3d", "c3d",
                  "dino")
WEIGHT_FILES = (".safetensors", *safetensors_io.PICKLE_SUFFIXES)


def attach(name: str, fmt: TorchFormat) -> TorchFormat:
    """Attach `fmt` to the registered model `name`."""
    get_model(name)  # an unknown name fails here
    _FORMATS[name] = fmt
    return fmt


def weights_file_format(name: str, *, library: str, class_name: str, config_cls, rules: Callable[[Any], list[Rule]],
                        read_file: Callable[[Any], tuple[Any, dict]], write_file: Callable[[Any, dict, Any], None],
                        normalise_keys: Callable[[dict], dict] | None = None) -> TorchFormat:
    """Attach the format of a model whose PyTorch side is one weights file of a class outside diffusers /
    transformers (VGG16, EDSC-style networks, the evaluation networks): a folder export's config.json is the config's
    fields plus `_class_name`."""
    from magdiff_jax.models.registry import config_from_dict, config_to_dict

    extra = {} if normalise_keys is None else {"normalise_keys": normalise_keys}
    return attach(name, TorchFormat(
        library=library,
        torch_class=lambda cfg: class_name,
        config_from_torch=lambda d: config_from_dict(config_cls, {k: v for k, v in d.items() if k != "_class_name"}),
        config_to_torch=lambda cfg: {"_class_name": class_name, **config_to_dict(cfg)},
        rules=rules, read_file=read_file, write_file=write_file, **extra))


def params_from_state(kind: str, config, state: Mapping[str, np.ndarray], source: str = "", dtype=jnp.float32):
    """A PyTorch state dict -> `(module, params)` of model `kind` built from `config` with its format's table, cast
    to `dtype`; every missing, unexpected or mis-shaped key is reported (`torch_to_flax`)."""
    spec = get_model(kind)
    module = spec.build(config)
    params = torch_to_flax(state, torch_format(kind).rules(config), spec.abstract_params(module), kind, source=source)
    return module, jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)


def torch_format(name: str) -> TorchFormat:
    """The PyTorch form of registered model `name`; an error saying so for a model that has none."""
    formats = torch_formats()
    if name not in formats:
        get_model(name)  # an unknown model says so
        raise ValueError(f"model {name!r} has no single-folder PyTorch format; models with one: {sorted(formats)}")
    return formats[name]


def torch_formats() -> dict[str, TorchFormat]:
    for module in FORMAT_MODULES:
        importlib.import_module(f"magdiff_jax.convert.{module}")
    return dict(_FORMATS)


def read_config(folder: str | os.PathLike) -> dict:
    """The JSON object in FOLDER/config.json (FOLDER local or in an object store)."""
    folder = user_path(folder)
    path = folder / "config.json"
    if not path.exists():
        raise safetensors_io.CheckpointFormatError(f"{folder}: no config.json (expected a diffusers/transformers "
                                                   "model folder)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise safetensors_io.CheckpointFormatError(f"{path}: not valid JSON ({str(e) or type(e).__name__})") from e
    if not isinstance(config, dict):
        raise safetensors_io.CheckpointFormatError(f"{path}: expected a JSON object of config fields, got "
                                                   f"{type(config).__name__}")
    return config


def torch_config(kind: str, folder: str | os.PathLike):
    """The config dataclass of the diffusers/transformers model folder FOLDER (its config.json) of registered model
    `kind`, checked before any model is built: a field of the wrong type or value is an error naming the file and
    the field (`/path/config.json: block_out_channels: expected a list of integers, got "8"`)."""
    folder = user_path(folder)
    d = read_config(folder)
    try:
        return torch_format(kind).config_from_torch(d)
    except ValueError as e:
        raise ConfigError(f"{folder / 'config.json'}: {e}") from e


def write_weights_file(state: dict, path, what: str, hint: str = "") -> None:
    """One `.safetensors` file of a bare state dict (a `TorchFormat.write_file` for kinds released as one weights
    file): pickle formats are only ever read, so another suffix is refused, with `hint` saying how to make the
    released layout in PyTorch."""
    path = user_path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: {what} is written as one .safetensors file (pickle files such as {path.suffix} are "
                         f"only read){'; ' + hint if hint else ''}")
    safetensors_io.atomic_write_bytes(path, safetensors_io._serialise(state))


def load_torch(kind: str, path: str | os.PathLike, dtype=jnp.float32, shardings=None):
    """Read a diffusers/transformers model folder (config.json + safetensors) into `(module, params)`; for a kind
    with `TorchFormat.read_file`, also one weights file (`WEIGHT_FILES`).

    `shardings`, when given, is a pytree of `jax.sharding.Sharding` matching params: each array is placed with its
    sharding as it is converted (never whole on one device).
    """
    spec, fmt = get_model(kind), torch_format(kind)
    folder = user_path(path)
    if fmt.read_file is not None and folder.suffix in WEIGHT_FILES:
        config, state = fmt.read_file(folder)
    else:
        config = torch_config(kind, folder)
        state = fmt.normalise_keys(safetensors_io.read_state_dict(folder, fmt.weights_stem))
    module = spec.build(config)
    params = torch_to_flax(state, fmt.rules(config), spec.abstract_params(module), kind, source=str(folder))
    if shardings is not None:
        params = jax.tree.map(lambda x, s: jax.device_put(x.astype(dtype), s), params, shardings)
    else:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)
    return module, params


def save_torch(kind: str, module: nn.Module, params, out_dir: str | os.PathLike, max_shard_bytes=None,
               overwrite: bool = False) -> epath.Path:
    """Write a folder that the matching PyTorch class loads with `from_pretrained(out_dir)`. It is assembled beside
    OUT_DIR and swapped into place, so no file of an older export survives to be preferred by a loader; a non-empty
    OUT_DIR is refused unless `overwrite`. For a kind with `TorchFormat.write_file`, an OUT_DIR with a suffix of
    `WEIGHT_FILES` is written as that one file (an existing one is refused unless `overwrite`)."""
    fmt = torch_format(kind)
    out = as_path(out_dir)
    one_file = fmt.write_file is not None and out.suffix in WEIGHT_FILES
    if one_file and out.exists() and (out.is_dir() or not overwrite):
        raise FileExistsError(f"{out} exists; choose another destination" + ("" if out.is_dir() else
                              " or pass overwrite (--overwrite) to replace it"))
    if not one_file:
        check_destination(out, overwrite)
    config = module.config
    params = jax.device_get(nn.meta.unbox(params))
    state = flax_to_torch(params, fmt.rules(config), kind)
    state = {k: np.asarray(v, dtype=np.float32) if v.dtype != np.float16 else v for k, v in state.items()}
    if one_file:
        fmt.write_file(config, state, out)
        return out
    torch_config = fmt.config_to_torch(config)
    with atomic_dir(out) as tmp:
        safetensors_io.write_state_dict(state, tmp, fmt.weights_stem, max_shard_bytes=max_shard_bytes)
        safetensors_io.atomic_write_bytes(tmp / "config.json", json.dumps(torch_config, indent=2).encode())
    return out
