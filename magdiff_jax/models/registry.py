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
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import traverse_util

# the modules that register models (imported on the first lookup, so importing the package registers nothing)
MODEL_MODULES = ("clip", "vae", "unet2d", "unet3d", "unet_motion", "magdiff", "discriminator")


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
def _tuplify(x):
    if isinstance(x, list):
        return tuple(_tuplify(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuplify(v) for k, v in x.items()}
    return x


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(cls, d: Mapping):
    """A config dataclass from a plain dict (lists read as tuples); unknown keys are refused, naming them."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}: expected an object of config fields, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    return cls(**{k: _tuplify(v) for k, v in d.items()})
