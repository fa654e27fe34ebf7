"""pytorch-i3d's Kinetics-400 I3D state dict <-> the Flax `i3d` model (FVD's feature network).

    module, params = i3d_from_torch("i3d_pretrained_400.pt")           # kind i3d (= load_torch("i3d", path))
    i3d_to_torch(module, params, "out/i3d.safetensors")                 # pytorch-i3d's keys, num_batches_tracked too
    magdiff-jax convert to-flax --kind i3d i3d_pretrained_400.pt out/i3d

The file is the plain state dict of pytorch-i3d's `InceptionI3d(400)` that VideoGPT, TATS and the `cd-fvd` package
load (`i3d_pretrained_400.pt`: a pickle read through `torch.load(weights_only=True)`, or a .safetensors of the same
keys). Its keys, per `Unit3D` at `{name}` (`Conv3d_1a_7x7`, `Mixed_4c.b1b`, ...): `{name}.conv3d.weight`
(out, in, kT, kH, kW) and `{name}.bn.weight/bias/running_mean/running_var/num_batches_tracked`; the logits layer
`logits.conv3d.weight/bias`. `num_batches_tracked` (a training counter) is dropped on import and written as 0 on
export, so `InceptionI3d.load_state_dict` takes the exported file strictly. The config comes from the shapes: the
width divisor from the stem's 64 output channels, `in_channels` from its input channels, `num_classes` from the
logits layer; the rest of the table then checks every shape against it. Every missing, unexpected or mis-shaped
key is reported.

StyleGAN-V's TorchScript detector (`i3d_torchscript.pt`, a port of the TF-Hub module) is not read here: its
parameter names are not published anywhere this project could check, and a table guessed at would be wrong
silently.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from magdiff_jax.convert import safetensors_io
from magdiff_jax.convert.core import (
    Rule,
    conv,
    flax_to_torch,
    load_torch,
    params_from_state,
    save_torch,
    weights_file_format,
    write_weights_file,
)
from magdiff_jax.models.i3d import BRANCHES, LAYOUT, I3DConfig
from magdiff_jax.utils.files import user_path

TRACKED = ".num_batches_tracked"


def _unit_rules(t: str, f: str) -> list[Rule]:
    """One Unit3D with BatchNorm: `{t}.conv3d.weight` and `{t}.bn.*` <-> `{f}/conv3d/kernel` and `{f}/bn/*`."""
    return [
        *conv(f"{t}.conv3d", f"{f}/conv3d", bias=False),
        Rule(f"{t}.bn.weight", (*f.split("/"), "bn", "scale")),
        Rule(f"{t}.bn.bias", (*f.split("/"), "bn", "bias")),
        Rule(f"{t}.bn.running_mean", (*f.split("/"), "bn", "mean")),
        Rule(f"{t}.bn.running_var", (*f.split("/"), "bn", "var")),
    ]


def i3d_rules(config: I3DConfig) -> list[Rule]:
    """The whole table, in network order (the layout does not depend on the config beyond shapes)."""
    rules = []
    for layer in LAYOUT:
        if layer[0] == "unit":
            rules += _unit_rules(layer[1], layer[1])
        elif layer[0] == "mixed":
            for b in BRANCHES:
                rules += _unit_rules(f"{layer[1]}.{b}", f"{layer[1]}/{b}")
    return rules + conv("logits.conv3d", "logits/conv3d")


def _drop_tracked(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.endswith(TRACKED)}


def i3d_config_from_state(state, dtype: str = "float32") -> I3DConfig:
    """The config of a pytorch-i3d state dict, read from the stem and the logits layer (an absent or odd key keeps
    the default; the table then reports it)."""
    default = I3DConfig()
    divisor, in_channels, classes = 1, default.in_channels, default.num_classes
    stem = state.get("Conv3d_1a_7x7.conv3d.weight")
    if stem is not None and np.ndim(stem) == 5 and stem.shape[0] > 0 and 64 % stem.shape[0] == 0:
        divisor, in_channels = 64 // int(stem.shape[0]), int(stem.shape[1])
    head = state.get("logits.conv3d.weight")
    if head is not None and np.ndim(head) == 5:
        classes = int(head.shape[0])
    return I3DConfig(num_classes=classes, in_channels=in_channels, width_divisor=divisor, dtype=dtype)


def read_i3d_file(path: str | os.PathLike) -> tuple[I3DConfig, dict]:
    """pytorch-i3d's weights file -> (the config its shapes give, the state dict without `num_batches_tracked`)."""
    path = user_path(path)
    if path.is_dir():
        raise ValueError(f"{path}: expected the I3D state dict as one weights file (.pt or .safetensors), got a "
                         "folder")
    state = _drop_tracked(safetensors_io.read_weights(path))
    return i3d_config_from_state(state), state


def i3d_state_dict(config: I3DConfig, params) -> dict[str, np.ndarray]:
    """`i3d` params -> pytorch-i3d's state dict (numpy, PyTorch layouts), `num_batches_tracked` included (0)."""
    return _with_tracked(flax_to_torch(params, i3d_rules(config), "i3d"))


def _with_tracked(state: dict) -> dict:
    """`state` with each BatchNorm's `num_batches_tracked` (0), which `load_state_dict(strict=True)` expects."""
    tracked = {k.removesuffix(".running_mean") + TRACKED: np.zeros((), np.int64)
               for k in state if k.endswith(".running_mean")}
    return {**state, **tracked}


def write_i3d_file(config: I3DConfig, state: dict, path) -> None:
    write_weights_file(_with_tracked(state), path, "pytorch-i3d's state dict",
                       "torch.save(InceptionI3d(...).state_dict(), 'i3d.pt') after loading the .safetensors")


def i3d_from_torch(path: str | os.PathLike, config: I3DConfig | None = None, dtype=jnp.float32):
    """pytorch-i3d's weights file (`i3d_pretrained_400.pt` or a .safetensors of its keys) -> `(module, params)` of
    model kind `i3d`; with `config`, that config instead of the one the shapes give (e.g. another `bn_eps` or
    `pool_size`, which no weight shape shows)."""
    if config is None:
        return load_torch("i3d", path, dtype=dtype)
    _, state = read_i3d_file(path)
    return params_from_state("i3d", config, state, source=str(path), dtype=dtype)


def i3d_to_torch(module, params, dst: str | os.PathLike, overwrite: bool = False):
    """Write `i3d` params as one .safetensors file DST with pytorch-i3d's keys (fp32; a DST without that suffix is a
    folder with config.json). An existing DST is refused unless `overwrite`."""
    return save_torch("i3d", module, params, dst, overwrite=overwrite)



FORMAT = weights_file_format("i3d", library="pytorch-i3d", class_name="InceptionI3d", config_cls=I3DConfig,
                             rules=i3d_rules, read_file=read_i3d_file, write_file=write_i3d_file,
                             normalise_keys=_drop_tracked)
