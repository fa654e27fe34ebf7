"""The one conversion mechanism: explicit per-kind mapping tables between PyTorch state dicts and Flax trees.

A model kind (`clip_text`, `vae`, `unet2d`, ...) registers a `ModelKind`: how to translate its config.json, how to
build the Flax module, and a function that lists, for a given config, every `Rule` (PyTorch key <-> Flax path +
layout transform). The table is written out module by module from the config (no regex guessing), so a key that
the table does not know is reported, never silently mapped.

Layout transforms (PyTorch -> Flax; the inverse is applied on export):
  copy    unchanged (biases, embeddings, positional tables)
  linear  (out, in) -> (in, out); an (out, in, 1, 1) 1x1-conv weight is accepted for a linear (legacy VAE attention)
  conv    (out, in, *k) -> (*k, in, out)
  norm    unchanged (weight -> scale is a naming matter of the rule)
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from magdiff_jax.convert import safetensors_io


class ConversionError(ValueError):
    """A checkpoint that does not match its model: lists every missing, unexpected and mis-shaped key."""


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


def _fmt(keys: Iterable[str], limit: int = 50) -> str:
    keys = list(keys)
    shown = "\n    ".join(keys[:limit])
    more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n    {shown}{more}"


def check_table(rules: list[Rule], abstract: Mapping[tuple[str, ...], Any], kind: str) -> None:
    """The table must cover the Flax tree exactly: a mismatch is a bug in the table, reported as such."""
    by_flax = {r.flax for r in rules}
    no_rule = sorted("/".join(p) for p in abstract if p not in by_flax)
    no_param = sorted("/".join(p) for p in by_flax if p not in abstract)
    if no_rule or no_param:
        raise ConversionError(
            f"[{kind}] the mapping table does not match the Flax module:"
            + (f"\n  Flax parameters with no rule:{_fmt(no_rule)}" if no_rule else "")
            + (f"\n  rules naming no Flax parameter:{_fmt(no_param)}" if no_param else "")
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
        raise ConversionError(
            f"[{kind}] checkpoint{where} does not match the model config:"
            + (f"\n  missing keys ({len(missing)}):{_fmt(missing)}" if missing else "")
            + (f"\n  unexpected keys ({len(unexpected)}):{_fmt(unexpected)}" if unexpected else "")
            + (f"\n  mis-shaped keys ({len(misshaped)}):{_fmt(misshaped)}" if misshaped else "")
        )
    return traverse_util.unflatten_dict(flat)


def flax_to_torch(params: Mapping, rules: list[Rule], kind: str) -> dict[str, np.ndarray]:
    """A nested Flax params dict -> a PyTorch state dict (numpy arrays, PyTorch layouts)."""
    flat = traverse_util.flatten_dict(nn.meta.unbox(dict(params)))
    check_table(rules, flat, kind)
    return {r.torch: _contiguous(_to_torch(np.asarray(flat[r.flax]), r.transform)) for r in rules}


def _contiguous(x: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping the shape (np.ascontiguousarray turns a 0-d array into shape (1,))."""
    return np.ascontiguousarray(x).reshape(x.shape)


# --- model kinds ----------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelKind:
    """Everything the converters need to know about one model kind."""

    name: str
    library: str  # "diffusers" | "transformers"
    torch_class: Callable[[Any], str]  # config -> PyTorch class name written to config.json
    config_cls: type
    config_from_torch: Callable[[dict], Any]
    config_to_torch: Callable[[Any], dict]
    build: Callable[[Any], nn.Module]  # config -> Flax module
    example_inputs: Callable[[Any], tuple]  # config -> small inputs for an abstract init
    rules: Callable[[Any], list[Rule]]
    normalise_keys: Callable[[dict], dict] = lambda state: state  # import only: legacy names, prefixes
    example_kwargs: Callable[[Any], dict] = lambda config: {}  # keyword inputs for the abstract init

    @property
    def weights_stem(self) -> str:
        return "diffusion_pytorch_model" if self.library == "diffusers" else "model"

    def abstract_params(self, module: nn.Module) -> dict:
        """Flat {path: ShapeDtypeStruct} of the module's parameters, computed without allocating them."""
        args, kwargs = self.example_inputs(module.config), self.example_kwargs(module.config)
        shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
        return traverse_util.flatten_dict(nn.meta.unbox(shapes["params"]))


KINDS: dict[str, ModelKind] = {}


def register(kind: ModelKind) -> ModelKind:
    KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> ModelKind:
    from magdiff_jax.convert import tables  # noqa: F401  (registers every kind)

    if name not in KINDS:
        raise ValueError(f"unknown model kind {name!r}; known kinds: {sorted(KINDS)}")
    return KINDS[name]


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise safetensors_io.CheckpointFormatError(f"{folder}: no config.json (expected a diffusers/transformers "
                                                   "model folder)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise safetensors_io.CheckpointFormatError(f"{path}: not valid JSON ({e})") from e


def load_torch(kind: str, path: str | os.PathLike, dtype=jnp.float32, shardings=None):
    """Read a diffusers/transformers model folder (config.json + safetensors) into `(module, params)`.

    `shardings`, when given, is a pytree of `jax.sharding.Sharding` matching params: each array is placed with its
    sharding as it is converted (never whole on one device).
    """
    spec = get_kind(kind)
    folder = Path(path)
    config = spec.config_from_torch(read_config(folder))
    module = spec.build(config)
    state = spec.normalise_keys(safetensors_io.read_state_dict(folder, spec.weights_stem))
    rules = spec.rules(config)
    params = torch_to_flax(state, rules, spec.abstract_params(module), kind, source=str(folder))
    if shardings is not None:
        params = jax.tree.map(lambda x, s: jax.device_put(x.astype(dtype), s), params, shardings)
    else:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)
    return module, params


def save_torch(kind: str, module: nn.Module, params, out_dir: str | os.PathLike, max_shard_bytes=None) -> Path:
    """Write a folder that the matching PyTorch class loads with `from_pretrained(out_dir)`."""
    spec = get_kind(kind)
    out = Path(out_dir)
    config = module.config
    params = jax.device_get(nn.meta.unbox(params))
    state = flax_to_torch(params, spec.rules(config), kind)
    state = {k: np.asarray(v, dtype=np.float32) if v.dtype != np.float16 else v for k, v in state.items()}
    torch_config = spec.config_to_torch(config)
    out.mkdir(parents=True, exist_ok=True)
    safetensors_io.write_state_dict(state, out, spec.weights_stem, max_shard_bytes=max_shard_bytes)
    safetensors_io.atomic_write_bytes(out / "config.json", json.dumps(torch_config, indent=2).encode())
    return out


# --- our own config files (dataclass <-> json) ----------------------------------------------------------------
def _tuplify(x):
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuplify(v) for k, v in x.items()}
    return x


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls, d: Mapping):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    return cls(**{k: _tuplify(v) for k, v in d.items()})
