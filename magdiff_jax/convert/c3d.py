"""The UCF-101 C3D of TGAN2 / StyleGAN-V's video Inception Score <-> the Flax `c3d` model.

    module, params = c3d_from_tgan2("conv3d_deepnetA_ucf.npz", "mean2.npz")   # TGAN2's released Chainer files
    module, params = load_torch("c3d", "c3d.safetensors")                     # the PyTorch state-dict layout
    save_torch("c3d", module, params, "out/c3d.safetensors")                  # and back
    magdiff-jax convert to-flax --kind c3d c3d.safetensors out/c3d_flax

Layouts (module docstring of `magdiff_jax.models.c3d` for the network):
- TGAN2's weights (`conv3d_deepnetA_ucf.npz`, released at github.com/rezoo/tgan2/releases/tag/v1.0 and read by
  `chainer.serializers.load_npz` into `C3DVersion1UCF101`): one array per parameter of the Chain's registered links,
  `conv1a/W` (out, in, 3, 3, 3), `conv1a/b`, ..., `conv5b/b`, `fc6/W` (4096, 8192), ..., `fc8/b` (101,). Chainer's
  ConvolutionND and Linear hold PyTorch's layouts; the input step's links (`pre`, `mean`) are set outside the
  Chain's init scope and are not in the file.
- TGAN2's mean (`mean2.npz`, same release): `mean`, a (3, T, H, W) BGR pixel mean that `C3DVersion1UCF101` crops to
  `mean[:, :, 8:120, 8:120]` for its 112 x 112 input (the crop is at row and column 8, as written there).
- The PyTorch state-dict layout (tests/torch_c3d.py, and what `save_torch` writes): `conv1a.weight`, `conv1a.bias`,
  ..., `fc8.bias`, and `mean` (3, T, S, S), the cropped mean. Read from .safetensors, or .pt/.pth through
  `torch.load(weights_only=True)`.

StyleGAN-V's `c3d_ucf101.pt` is a TorchScript program, not a state dict: it is not read here. Its parameter names
and its input convention (it takes uint8 videos, (B, 3, T, H, W)) are not published as source, so no key table is
given for it; TGAN2's files above are the public source it was made from.
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
    linear,
    param,
    params_from_state,
    weights_file_format,
    write_weights_file,
)
from magdiff_jax.models.c3d import CONV_NAMES, FC_NAMES, C3DConfig
from magdiff_jax.utils.errors import ConversionError
from magdiff_jax.utils.files import user_path

TGAN2_MEAN_CROP = 8  # C3DVersion1UCF101: mean[:, :, 8:8 + 112, 8:8 + 112]


def c3d_rules(config: C3DConfig) -> list[Rule]:
    """`convNx.weight/bias` <-> `convNx/kernel|bias`, `fcN.weight/bias` <-> `fcN/kernel|bias`, `mean` <-> `mean`."""
    rules = [rule for name in CONV_NAMES for rule in conv(name, name)]
    rules += [rule for name in FC_NAMES for rule in linear(name, name)]
    return rules + param("mean", "mean")


def c3d_config_from_state(state: dict, dtype: str = "float32") -> C3DConfig:
    """The config a PyTorch-layout C3D state dict's shapes give (a field whose key is absent or mis-ranked keeps
    the reference's value; the table then reports that key)."""
    default = C3DConfig()

    def dim(key, axis, ndim, fallback):
        x = state.get(key)
        return int(x.shape[axis]) if x is not None and np.ndim(x) == ndim else fallback

    widths = tuple(dim(f"{n}.weight", 0, 5, w) for n, w in zip(CONV_NAMES, default.widths, strict=True))
    fc_widths = tuple(dim(f"{n}.weight", 0, 2, w) for n, w in zip(FC_NAMES[:2], default.fc_widths, strict=True))
    return C3DConfig(widths=widths, fc_widths=fc_widths, num_classes=dim("fc8.weight", 0, 2, default.num_classes),
                     num_frames=dim("mean", 1, 4, default.num_frames),
                     sample_size=dim("mean", 2, 4, default.sample_size), dtype=dtype)


def read_c3d_file(path: str | os.PathLike) -> tuple[C3DConfig, dict]:
    """A PyTorch-layout C3D weights file (.safetensors, or .pt/.pth read with weights_only=True) -> (the config its
    shapes give, the state dict)."""
    path = user_path(path)
    if path.is_dir():
        raise ValueError(f"{path}: expected the C3D as one weights file (.safetensors or .pth), got a folder")
    state = safetensors_io.read_weights(path)
    return c3d_config_from_state(state), state


def write_c3d_file(config: C3DConfig, state: dict, path) -> None:
    write_weights_file(state, path, "the C3D", hint="tests/torch_c3d.py's TorchC3D loads it with load_state_dict")


def _read_npz(path, what: str) -> dict[str, np.ndarray]:
    path = user_path(path)
    try:
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
            return {k: np.asarray(z[k]) for k in z.files}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file ({what})") from None
    except (ValueError, OSError) as e:
        raise safetensors_io.CheckpointFormatError(f"{path}: not a numpy .npz of arrays ({what}): {e}") from e


def tgan2_state_dict(weights_npz: str | os.PathLike, mean_npz: str | os.PathLike) -> dict[str, np.ndarray]:
    """TGAN2's `conv3d_deepnetA_ucf.npz` and `mean2.npz` -> the PyTorch-layout state dict (`conv1a/W` ->
    `conv1a.weight`, `conv1a/b` -> `conv1a.bias`, ..., and `mean` cropped to [8:120, 8:120] as TGAN2 does).
    A key of neither form is kept as it is (and then reported as unexpected by the table)."""
    weights = _read_npz(weights_npz, "TGAN2's C3D weights, conv3d_deepnetA_ucf.npz")
    means = _read_npz(mean_npz, "TGAN2's C3D mean, mean2.npz")
    if "mean" not in means:
        raise ConversionError(f"[c3d] {mean_npz}: no array `mean` (TGAN2's mean2.npz holds one); found "
                              f"{sorted(means)}")
    mean = np.asarray(means["mean"], np.float32)
    s = C3DConfig().sample_size
    if mean.ndim != 4 or mean.shape[0] != 3 or min(mean.shape[2:]) < TGAN2_MEAN_CROP + s:
        raise ConversionError(f"[c3d] {mean_npz}: `mean` has shape {mean.shape}; TGAN2 crops a (3, frames, height, "
                              f"width) mean with height and width >= {TGAN2_MEAN_CROP + s} to "
                              f"[{TGAN2_MEAN_CROP}:{TGAN2_MEAN_CROP + s}]")
    state = {"mean": np.ascontiguousarray(mean[:, :, TGAN2_MEAN_CROP:TGAN2_MEAN_CROP + s,
                                               TGAN2_MEAN_CROP:TGAN2_MEAN_CROP + s])}
    suffix = {"W": "weight", "b": "bias"}
    for key, value in weights.items():
        link, _, name = key.rpartition("/")
        state[f"{link}.{suffix[name]}" if link and name in suffix else key] = value
    return state


def c3d_from_tgan2(weights_npz: str | os.PathLike, mean_npz: str | os.PathLike, dtype=jnp.float32):
    """TGAN2's released C3D (`conv3d_deepnetA_ucf.npz` + `mean2.npz`) -> `(module, params)` of model kind `c3d`;
    every missing, unexpected or mis-shaped key is reported."""
    state = tgan2_state_dict(weights_npz, mean_npz)
    return c3d_from_state(state, source=f"{weights_npz} + {mean_npz}", dtype=dtype)


def c3d_from_state(state: dict, source: str = "", dtype=jnp.float32):
    """A PyTorch-layout C3D state dict -> `(module, params)`; the config is read from its shapes."""
    return params_from_state("c3d", c3d_config_from_state(state), state, source=source, dtype=dtype)


def c3d_state_dict(config: C3DConfig, params) -> dict[str, np.ndarray]:
    """`c3d` params -> the PyTorch-layout state dict (numpy arrays)."""
    return flax_to_torch(params, c3d_rules(config), "c3d")



FORMAT = weights_file_format("c3d", library="tgan2", class_name="C3DVersion1UCF101", config_cls=C3DConfig,
                             rules=c3d_rules, read_file=read_c3d_file, write_file=write_c3d_file)
