"""The model registry: a name -> how to configure, build and trace a model.

    spec = get_model("unet2d")
    module = spec.build(spec.config_from_dict({"block_out_channels": [32, 64], ...}))
    shapes = spec.abstract_params(module)          # {path tuple: ShapeDtypeStruct}, nothing allocated

Every model the trainer, the stage exports or an evaluator builds is registered here by the module that defines it,
with nothing about checkpoint formats: `convert/` attaches PyTorch mapping tables to the names that have a PyTorch
counterpart, and a model without one (a discriminator, a metric's feature network) registers just the same.
`sharding_rules` are the model's own overrides of the default logical-axis table (`magdiff_jax.sharding`), e.g. a
VAE whose small parameters stay replicated while the U-Net's shard.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import numbers
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

from magdiff_jax.layers.attention import IMPLEMENTATIONS
from magdiff_jax.layers.common import activation, compute_dtype
from magdiff_jax.utils.errors import json_excerpt

# the modules that register models (imported on the first lookup, so importing the package registers nothing)
MODEL_MODULES = ("clip", "vae", "unet2d", "unet3d", "unet_motion", "controlnet", "magdiff", "i2v", "discriminator",
                 "vgg", "edsc", "i3d", "c3d", "dino")


def _no_kwargs(config) -> dict:
    return {}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """How to configure, build and trace one registered model."""

    name: str
    config_cls: type  # a dataclass
    build: Callable[[Any], nn.Module]  # config -> Flax module
    example_inputs: Callable[[Any], tuple]  # config -> the smallest positional inputs an init takes
    example_kwargs: Callable[[Any], dict] = _no_kwargs  # config -> keyword inputs for that init
    sharding_rules: tuple[tuple[str, Any], ...] = ()  # overrides of sharding.DEFAULT_RULES for this model

    def abstract_variables(self, module: nn.Module):
        """The boxed (logically partitioned) variable tree of `module.init`, as ShapeDtypeStructs."""
        args, kwargs = self.example_inputs(module.config), self.example_kwargs(module.config)
        return jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))

    def abstract_params(self, module: nn.Module) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
        """Flat {path: ShapeDtypeStruct} of the module's parameters, computed without allocating them."""
        return traverse_util.flatten_dict(nn.meta.unbox(self.abstract_variables(module)["params"]))

    def config_from_dict(self, d: Mapping):
        return config_from_dict(self.config_cls, d)


_REGISTRY: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def _load_all() -> None:
    for name in MODEL_MODULES:
        importlib.import_module(f"magdiff_jax.models.{name}")


def get_model(name: str) -> ModelSpec:
    _load_all()
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered models: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def model_names() -> tuple[str, ...]:
    _load_all()
    return tuple(sorted(_REGISTRY))


def spec_of(module: nn.Module) -> ModelSpec:
    """The registered model whose config class `module.config` is an instance of."""
    _load_all()
    for spec in _REGISTRY.values():
        if isinstance(getattr(module, "config", None), spec.config_cls):
            return spec
    raise TypeError(f"no registered model is configured by {type(getattr(module, 'config', None)).__name__}")


# --- config dataclasses <-> plain dicts (JSON) -----------------------------------------------------------------
class ConfigError(ValueError):
    """A config field of the wrong type or value. `field` is its dotted path ("unet.block_out_channels") when the
    error is about one field; the message reads "field: problem"."""

    def __init__(self, problem: str, field: str | None = None):
        self.problem, self.field = problem, field
        super().__init__(f"{field}: {problem}" if field else problem)

    def within(self, outer: str) -> ConfigError:
        """The same error, for the field `outer` of an enclosing config."""
        return ConfigError(self.problem, f"{outer}.{self.field}" if self.field else outer)


def _tuplify(x):
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuplify(v) for k, v in x.items()}
    return x


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls, d: Mapping):
    """A config dataclass from a plain dict (lists read as tuples, nested configs as dicts). Unknown keys and values
    that do not fit a field's annotation are refused before the dataclass is built, then its own `__post_init__`
    checks the values; every error is a `ConfigError` naming the field."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"expected an object of {cls.__name__} fields, got {json_excerpt(d)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown config keys {unknown}")
    hints = _field_types(cls)
    kw = {}
    for name, value in d.items():
        hint = hints[name]
        nested = _dataclass_of(hint)
        if nested is not None and isinstance(value, Mapping):
            try:
                kw[name] = config_from_dict(nested, value)
            except ConfigError as e:
                raise e.within(name) from None
            continue
        if not _fits(value, hint):
            raise ConfigError(f"expected {_describe(hint)}, got {json_excerpt(value)}", name)
        kw[name] = _tuplify(value)
    try:
        return cls(**kw)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from e


def check_positive(config, *names: str) -> None:
    """A ConfigError naming the first of the fields `names` that holds an integer below 1 (or a non-integer); a
    per-block tuple (or tuple of tuples) is checked entry by entry, and None (not set) passes."""
    for name in names:
        value = getattr(config, name)
        for v in _leaves(value):
            if v is not None and (not _is_int(v) or v < 1):
                what = "every entry must be" if isinstance(value, (tuple, list)) else "must be"
                raise ConfigError(f"{what} a positive integer, got {json_excerpt(value)}", name)


def check_names(config, dtype=compute_dtype) -> None:
    """A ConfigError naming the first of the fields an activation (`act_fn`, `hidden_act`, `time_embedding_act_fn`),
    an attention implementation (`attention_impl`) or a compute dtype (`dtype`, read by the function `dtype`) that
    `config` has and that names none: caught with the config, not when the model is first run."""
    for name, check in (("act_fn", activation), ("hidden_act", activation), ("time_embedding_act_fn", activation),
                        ("dtype", dtype)):
        value = getattr(config, name, None)
        if value is not None:
            try:
                check(value)
            except (ValueError, TypeError, KeyError) as e:
                raise ConfigError(str(e), name) from None
    impl = getattr(config, "attention_impl", None)
    if impl is not None and impl not in IMPLEMENTATIONS:
        raise ConfigError(f"{json_excerpt(impl)} is not one of {list(IMPLEMENTATIONS)}", "attention_impl")


def _leaves(value):
    if isinstance(value, (tuple, list)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(hint) -> type | None:
    """The config dataclass a field holds (possibly as `X | None`), if any."""
    for arm in typing.get_args(hint) if _is_union(hint) else (hint,):
        if dataclasses.is_dataclass(arm) and isinstance(arm, type):
            return arm
    return None


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _fits(value, hint) -> bool:
    """Whether `value` (a JSON value, or what Python code passes) fits the field annotation `hint`. Lists stand for
    tuples, integers for floats; booleans are not numbers, and floats must be finite."""
    if hint is Any:
        return True
    if _is_union(hint):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is tuple or typing.get_origin(hint) is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return not args or (len(args) == len(value) and all(map(_fits, value, args)))
    if dataclasses.is_dataclass(hint):
        return isinstance(value, (hint, Mapping))
    return isinstance(value, hint) if isinstance(hint, type) else True


_TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
               type(None): "null"}
_PLURALS = {int: "integers", float: "finite numbers", str: "strings", bool: "booleans"}


def _describe(hint) -> str:
    if _is_union(hint):
        return " or ".join(_describe(arm) for arm in typing.get_args(hint))
    if hint in _TYPE_NAMES:
        return _TYPE_NAMES[hint]
    if hint is tuple or typing.get_origin(hint) is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_PLURALS.get(args[0], 'values')}"
        return f"a list of {len(args)}" if args else "a list"
    if dataclasses.is_dataclass(hint):
        return f"an object of {hint.__name__} fields"
    return getattr(hint, "__name__", str(hint))


