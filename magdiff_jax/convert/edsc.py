"""Kind `edsc`: the released EDSC-pytorch `Network` (`networks/EDSC.py`) <-> `magdiff_jax.models.edsc`.

    module, params = load_torch("edsc", "EDSC_m.ckpt")           # the released checkpoint: one file, no config
    save_torch("edsc", module, params, "out/edsc.safetensors")   # the bare state dict (pickles are only read)
    save_torch("edsc", module, params, "out/edsc")               # a folder: config.json + model.safetensors

The released checkpoints (EDSC_s_l1/lf.ckpt, EDSC_m.ckpt) are pickles holding the state dict under "model_state"
(the release's `run.py` loads `torch.load(path)["model_state"]`); they are read through
`safetensors_io.read_weights` (torch.load(weights_only=True)). A bare state dict, a "state_dict" wrapper and the
"module." prefix of a DataParallel model are accepted too. A single file holds no config: it is read from the
weight shapes (`config_from_state`).

Keys: PyTorch `nn.Sequential` children keep their index, `moduleConv2.0.conv3x3.weight` <->
moduleConv2_0/conv3x3/kernel; a head's convs are at 0, 2, 4 and 7 (`moduleVertical1.7.weight` <->
moduleVertical1_7/kernel), an upsampling block's HetConv at 1.
"""

from __future__ import annotations

import os

import numpy as np

from magdiff_jax.convert import safetensors_io
from magdiff_jax.convert.core import Rule, TorchFormat, attach, conv, write_weights_file
from magdiff_jax.models.edsc import EDSCConfig
from magdiff_jax.models.registry import ConfigError, config_from_dict, config_to_dict
from magdiff_jax.utils.errors import ConversionError

TORCH_CLASS = "EDSC-pytorch networks.EDSC.Network"
HEAD_CONVS = (0, 2, 4, 7)
MODEL_STATE = "model_state."  # the released files' wrapper (run.py reads torch.load(path)["model_state"])
DATA_PARALLEL = "module."


def het_conv(t: str, f: str) -> list[Rule]:
    """`Efficient_HetConv2d` at `t` <-> `models.edsc.HetConv` at `f`."""
    return [r for name in ("conv3x3", "conv1x1_", "conv1x1") for r in conv(f"{t}.{name}", f"{f}/{name}")]


def head_names(cfg: EDSCConfig) -> list[str]:
    names = [f"module{what}{k}" for k in (1, 2) for what in ("Vertical", "Horizontal")]
    names += [f"moduleOffset{k}{axis}" for k in (1, 2) for axis in "xy"] + ["moduleMask1", "moduleMask2"]
    return names + (["moduleBias"] if cfg.use_bias else [])


def edsc_rules(cfg: EDSCConfig) -> list[Rule]:
    """Every parameter of the released `Network` (at these widths)."""
    n = len(cfg.block_out_channels)
    rules = conv("moduleConv1.0", "moduleConv1_0") + het_conv("moduleConv1.2", "moduleConv1_2")
    rules += het_conv("moduleConv1.4", "moduleConv1_4")
    for level in range(2, n + 1):
        rules += [r for i in (0, 2, 4) for r in het_conv(f"moduleConv{level}.{i}", f"moduleConv{level}_{i}")]
    for level in range(n, 1, -1):
        rules += [r for i in (0, 2, 4) for r in het_conv(f"moduleDeconv{level}.{i}", f"moduleDeconv{level}_{i}")]
        rules += het_conv(f"moduleUpsample{level}.1", f"moduleUpsample{level}_1")
    for name in head_names(cfg):
        rules += [r for i in HEAD_CONVS for r in conv(f"{name}.{i}", f"{name}_{i}")]
    return rules


def normalise_keys(state: dict) -> dict:
    """The `Network`'s own keys: those under "model_state." when the file has them (what the release's `run.py`
    reads; training state beside them is not the network's), without the "module." prefix of a DataParallel
    model."""
    if any(k.startswith(MODEL_STATE) for k in state):
        state = {k[len(MODEL_STATE):]: v for k, v in state.items() if k.startswith(MODEL_STATE)}
    if state and all(k.startswith(DATA_PARALLEL) for k in state):
        state = {k[len(DATA_PARALLEL):]: v for k, v in state.items()}
    return state


def config_from_state(state: dict, source: str = "") -> EDSCConfig:
    """The `EDSCConfig` of a state dict, from its shapes: widths from moduleConv{l} (the levels present), head
    widths and ks from moduleVertical1, the time input from its first conv's input channels (w1 + 1) and the bias
    head from the presence of moduleBias. The shapes this needs are named if absent."""
    where = f"{source}: " if source else ""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ConversionError(f"{where}not an EDSC state dict: no {key!r}, which the config is read from "
                                  f"(keys start {sorted(state)[:5]})")
        return tuple(np.shape(state[key]))

    widths = [shape("moduleConv1.0.weight")[0]]
    level = 2
    while f"moduleConv{level}.0.conv1x1.weight" in state:
        widths.append(shape(f"moduleConv{level}.0.conv1x1.weight")[0])
        level += 1
    full, grouped = shape("moduleConv1.2.conv1x1.weight"), shape("moduleConv1.2.conv1x1_.weight")
    groups = full[1] // grouped[1] if grouped[1] else 0
    first, second = shape("moduleVertical1.0.weight"), shape("moduleVertical1.2.weight")
    ks = shape("moduleVertical1.4.weight")[0]
    fields = {"block_out_channels": widths, "head_channels": [first[0], second[0]], "kernel_size": ks,
              "het_groups": groups, "multiple": first[1] == widths[1] + 1 if len(widths) > 1 else False,
              "use_bias": any(k.startswith("moduleBias.") for k in state),
              "channel_order": "bgr"}  # a bare state dict is the release's: trained on OpenCV's BGR frames
    try:
        return config_from_dict(EDSCConfig, fields)
    except ConfigError as e:
        raise ConversionError(f"{where}the weight shapes give no valid EDSC config ({e})") from e


def config_from_torch(d: dict) -> EDSCConfig:
    """config.json of an EDSC folder written by `save_torch`: our config fields (plus `_class_name`)."""
    d = {k: v for k, v in d.items() if k != "_class_name"}
    return config_from_dict(EDSCConfig, d)


def config_to_torch(cfg: EDSCConfig) -> dict:
    return {"_class_name": TORCH_CLASS, **config_to_dict(cfg)}


def read_edsc_file(path: str | os.PathLike) -> tuple[EDSCConfig, dict]:
    """One `.pth`/`.ckpt`/`.pt` (torch.load(weights_only=True)) or `.safetensors` file -> (config, state dict)."""
    state = normalise_keys(safetensors_io.read_weights(path))
    return config_from_state(state, str(path)), state


def write_edsc_file(cfg: EDSCConfig, state: dict, path) -> None:
    """A `.safetensors` file of the bare state dict: `Network().load_state_dict(safetensors.torch.load_file(path))`
    loads it. The release's `run.py` reads `torch.load(path)["model_state"]`, which
    `torch.save({"model_state": load_file(path)}, "EDSC.pth")` makes. A network with a motion prior is refused: the
    file holds no config, and the released network would read it without its prior (write a folder instead)."""
    if cfg.motion_prior != "none":
        raise ConversionError(f"{path}: this EDSC network uses the {cfg.motion_prior!r} motion prior, which the "
                              "released Network and a bare weights file cannot carry; write a folder (its config.json "
                              "keeps the prior)")
    write_weights_file(state, path, "an EDSC network", "in PyTorch, torch.save({'model_state': "
                       "safetensors.torch.load_file(p)}, out) gives the release's layout")


FORMAT = attach("edsc", TorchFormat(
    library="edsc-pytorch",
    torch_class=lambda cfg: TORCH_CLASS,
    config_from_torch=config_from_torch,
    config_to_torch=config_to_torch,
    rules=edsc_rules,
    normalise_keys=normalise_keys,
    read_file=read_edsc_file,
    write_file=write_edsc_file,
))

__all__ = ["config_from_state", "edsc_rules", "read_edsc_file", "write_edsc_file"]
