"""torchvision's VGG16 and the lpips package's linear heads <-> the Flax `vgg16` and `lpips` models.

    module, params = vgg16_from_torch("vgg16-397923af.pth")                        # kind vgg16
    vgg16_to_torch(module, params, "out/vgg16.safetensors")                        # torchvision `features.*` keys
    module, params = lpips_from_torch("vgg16-397923af.pth", "weights/v0.1/vgg.pth")  # kind lpips
    magdiff-jax convert to-flax --kind vgg16 vgg16-397923af.pth out/vgg16

Both are single weights files without a config.json, so the config is read from the tensor shapes: the stage widths
from the first convolution of each stage (`features.0/5/10/17/24.weight`), which the rest of the table then checks.
The torchvision file (`torchvision.models.vgg16().state_dict()`, .pth through `torch.load(weights_only=True)` or
.safetensors) holds `features.{i}.weight/bias` for the 13 convolutions (`magdiff_jax.models.vgg.conv_indices`) and
`classifier.*` (the fully connected head): the classifier keys are ignored, since LPIPS and every feature use stop
at relu5_3; any other key is reported. The lpips file (`lpips/weights/v0.1/vgg.pth`) holds `lin{k}.model.1.weight`,
(1, C_k, 1, 1) for tap k (index 1 of NetLinLayer's Sequential(Dropout, Conv2d)).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.convert import safetensors_io
from magdiff_jax.convert.core import (
    Rule,
    conv,
    flax_to_torch,
    linear,
    load_torch,
    params_from_state,
    save_torch,
    torch_to_flax,
    weights_file_format,
    write_weights_file,
)
from magdiff_jax.models.registry import get_model
from magdiff_jax.models.vgg import LPIPSConfig, VGG16Config, conv_indices
from magdiff_jax.utils.errors import ConversionError
from magdiff_jax.utils.files import user_path

IGNORED_PREFIXES = ("classifier.",)  # torchvision's fully connected head: not part of the feature network


def vgg16_rules(config: VGG16Config, prefix: str = "", flax_prefix: str = "") -> list[Rule]:
    """The table of the 13 convolutions: `{prefix}features.{i}.weight/bias` <-> `{flax_prefix}features_{i}/...`."""
    return [rule for stage in conv_indices() for i in stage
            for rule in conv(f"{prefix}features.{i}", f"{flax_prefix}features_{i}")]


def lpips_rules(config: LPIPSConfig) -> list[Rule]:
    """The `lpips` model's table: the VGG16 trunk under `vgg/` with torchvision's keys, and with `linear` the heads
    `lin{k}.model.1.weight` (1, C_k, 1, 1) <-> `lin{k}/kernel` (C_k, 1)."""
    rules = vgg16_rules(config.vgg, flax_prefix="vgg/")
    if config.linear:
        rules += [rule for k in range(len(config.vgg.widths)) for rule in linear(f"lin{k}.model.1", f"lin{k}", False)]
    return rules


def vgg16_config_from_state(state, dtype: str = "float32") -> VGG16Config:
    """The config of a torchvision VGG16 `features` state dict, read from the shapes of each stage's first
    convolution (a stage whose key is absent keeps VGG16's width; the key is then reported as missing)."""
    default = VGG16Config()
    widths, in_channels = list(default.widths), default.in_channels
    for s, stage in enumerate(conv_indices()):
        w = state.get(f"features.{stage[0]}.weight")
        if w is not None and np.ndim(w) == 4:
            widths[s] = int(w.shape[0])
            if s == 0:
                in_channels = int(w.shape[1])
    return VGG16Config(widths=tuple(widths), in_channels=in_channels, dtype=dtype)


def _read(path, what: str) -> dict[str, np.ndarray]:
    """Every tensor of one weights file, with a clear error for a folder."""
    path = user_path(path)
    if path.is_dir():
        raise ValueError(f"{path}: expected {what} as one weights file (.pth or .safetensors), got a folder")
    return safetensors_io.read_weights(path)


def _drop_ignored(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}


def read_vgg16_file(path: str | os.PathLike) -> tuple[VGG16Config, dict]:
    """torchvision's VGG16 weights file -> (the config its shapes give, the `features.*` state dict)."""
    state = _drop_ignored(_read(path, "a torchvision VGG16 state dict"))
    return vgg16_config_from_state(state), state


def write_vgg16_file(config: VGG16Config, state: dict, path) -> None:
    """One .safetensors file of torchvision's `features.*` keys, which `torchvision.models.vgg16()` loads with
    `load_state_dict(..., strict=False)` (the classifier left as it was)."""
    write_weights_file(state, path, "VGG16's features")


def vgg16_from_torch(path: str | os.PathLike, config: VGG16Config | None = None, dtype=jnp.float32):
    """torchvision's VGG16 weights file (`vgg16-397923af.pth`, or a .safetensors of the same keys) -> `(module,
    params)` of model kind `vgg16` (`load_torch("vgg16", path)`, with a given `config` instead of the one the shapes
    give); the `classifier.*` keys are ignored, every missing, unexpected or mis-shaped `features.*` key is
    reported."""
    if config is None:
        return load_torch("vgg16", path, dtype=dtype)
    _, state = read_vgg16_file(path)
    return params_from_state("vgg16", config, state, source=str(path), dtype=dtype)


def vgg16_state_dict(config: VGG16Config, params) -> dict[str, np.ndarray]:
    """The torchvision `features.*` state dict (numpy arrays, PyTorch layouts) of `vgg16` params."""
    return flax_to_torch(params, vgg16_rules(config), "vgg16")


def vgg16_to_torch(module, params, dst: str | os.PathLike, overwrite: bool = False):
    """Write `vgg16` params as one .safetensors file DST with torchvision's `features.*` keys (fp32)
    (`save_torch("vgg16", ...)`; a DST without that suffix is a folder with config.json). An existing DST is refused
    unless `overwrite`."""
    return save_torch("vgg16", module, params, dst, overwrite=overwrite)



def lpips_from_torch(vgg_path: str | os.PathLike, lin_path: str | os.PathLike | None = None,
                     config: LPIPSConfig | None = None, dtype=jnp.float32):
    """`(module, params)` of model kind `lpips` from torchvision's VGG16 weights file and the lpips package's
    linear-head file (`weights/v0.1/vgg.pth`). Without `lin_path` the heads are off (`linear=False`: the
    unweighted channel sum). `config`, when given, must agree with the files; by default the shapes give it."""
    vgg_state = _drop_ignored(_read(vgg_path, "a torchvision VGG16 state dict"))
    lin_state = _read(lin_path, "the lpips linear heads") if lin_path is not None else {}
    if config is None:
        config = LPIPSConfig(vgg=vgg16_config_from_state(vgg_state), linear=lin_path is not None)
    elif config.linear != (lin_path is not None):
        raise ValueError(f"LPIPSConfig(linear={config.linear}) needs "
                         + ("a linear-head file (lin_path)" if config.linear else "no linear-head file")
                         + f", got lin_path={lin_path!r}")
    clash = sorted(set(vgg_state) & set(lin_state))
    if clash:
        raise ConversionError(f"[lpips] {lin_path} repeats keys of {vgg_path}: {clash[:5]}")
    spec = get_model("lpips")
    module = spec.build(config)
    source = str(vgg_path) + (f" + {lin_path}" if lin_path is not None else "")
    params = torch_to_flax({**vgg_state, **lin_state}, lpips_rules(config), spec.abstract_params(module), "lpips",
                           source=source)
    return module, _as_jax(params, dtype)


def lpips_state_dicts(config: LPIPSConfig, params) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`lpips` params as (torchvision `features.*` state dict, lpips linear-head state dict with the heads' 1x1
    convolution layout (1, C_k, 1, 1); empty without heads)."""
    state = flax_to_torch(params, lpips_rules(config), "lpips")
    lins = {k: v.reshape(*v.shape, 1, 1) for k, v in state.items() if k.startswith("lin")}
    return {k: v for k, v in state.items() if k not in lins}, lins


def _as_jax(params, dtype):
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=dtype), params)


FORMAT = weights_file_format("vgg16", library="torchvision", class_name="VGG16", config_cls=VGG16Config,
                             rules=vgg16_rules, read_file=read_vgg16_file, write_file=write_vgg16_file,
                             normalise_keys=_drop_ignored)
