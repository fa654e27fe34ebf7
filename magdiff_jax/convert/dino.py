"""DINO ViT weights (timm's `vit_small_patch16_224.dino`, the official `dino_deitsmall16_pretrain.pth`) <-> the Flax
`dino_vit` model.

    module, params = dino_from_torch("dino_deitsmall16_pretrain.pth")    # or timm's model.safetensors
    module, params = load_torch("dino_vit", "dino_vits16.safetensors")
    save_torch("dino_vit", module, params, "out/dino_vits16.safetensors")  # timm / DINO keys
    magdiff-jax convert to-flax --kind dino_vit dino_deitsmall16_pretrain.pth out/dino_flax

Both layouts name the backbone alike (DINO's `vision_transformer.py` and timm's `VisionTransformer` share the
names): `cls_token` (1, 1, D), `pos_embed` (1, 1 + N, D), `patch_embed.proj.weight` (D, 3, p, p) / `.bias`,
`blocks.{i}.norm1.weight/bias`, `blocks.{i}.attn.qkv.weight` (3D, D) / `.bias`, `blocks.{i}.attn.proj.*`,
`blocks.{i}.norm2.*`, `blocks.{i}.mlp.fc1.*` (hidden, D), `blocks.{i}.mlp.fc2.*`, `norm.weight/bias`. DINO's
pretrain files hold the backbone only (its head is an Identity); timm's `.dino` models have `num_classes=0`, so no
head either. On import, the `module.` and `backbone.` prefixes of DINO's training checkpoints are stripped (as
DINO's `utils.load_pretrained_weights` does) and a classifier `head.*` is ignored (not part of the CLS feature); any
other unknown key is reported.

The config is read from the shapes (embed_dim, patch_size, depth, mlp ratio, img_size from the position table),
except the number of heads, which no shape holds: every DINO and timm ViT uses 64-wide heads (ViT-S/16: 384 / 6),
so it defaults to embed_dim // 64; pass `num_heads` otherwise.
"""

from __future__ import annotations

import math
import os
import re

import jax.numpy as jnp
import numpy as np

from magdiff_jax.convert import safetensors_io
from magdiff_jax.convert.core import (
    Rule,
    conv,
    flax_to_torch,
    linear,
    norm,
    param,
    params_from_state,
    weights_file_format,
    write_weights_file,
)
from magdiff_jax.models.dino import DINOViTConfig
from magdiff_jax.models.registry import ConfigError
from magdiff_jax.utils.files import user_path

HEAD_DIM = 64  # every DINO / timm ViT (Ti 192/3, S 384/6, B 768/12)
STRIPPED_PREFIXES = ("module.", "backbone.")
IGNORED_PREFIXES = ("head.",)


def dino_rules(config: DINOViTConfig) -> list[Rule]:
    """The table of a `dino_vit` of `config` (module docstring): `blocks.{i}.x.y` <-> `blocks_{i}/x/y`."""
    rules = param("cls_token", "cls_token") + param("pos_embed", "pos_embed")
    rules += conv("patch_embed.proj", "patch_embed/proj")
    for i in range(config.depth):
        t, f = f"blocks.{i}", f"blocks_{i}"
        rules += norm(f"{t}.norm1", f"{f}/norm1") + norm(f"{t}.norm2", f"{f}/norm2")
        rules += linear(f"{t}.attn.qkv", f"{f}/attn/qkv") + linear(f"{t}.attn.proj", f"{f}/attn/proj")
        rules += linear(f"{t}.mlp.fc1", f"{f}/mlp/fc1") + linear(f"{t}.mlp.fc2", f"{f}/mlp/fc2")
    return rules + norm("norm", "norm")


def normalise_keys(state: dict) -> dict:
    """Strip DINO's `module.` / `backbone.` prefixes and drop a classifier `head.*`."""
    out = {}
    for key, value in state.items():
        for prefix in STRIPPED_PREFIXES:
            key = key.removeprefix(prefix)
        if not key.startswith(IGNORED_PREFIXES):
            out[key] = value
    return out


def dino_config_from_state(state: dict, num_heads: int | None = None, dtype: str = "float32") -> DINOViTConfig:
    """The config of a DINO / timm ViT state dict, from its shapes (module docstring); a field whose key is
    absent or mis-ranked keeps ViT-S/16's value, and the table then reports that key."""
    default = DINOViTConfig()
    embed_dim, patch_size, in_chans = default.embed_dim, default.patch_size, default.in_chans
    w = state.get("patch_embed.proj.weight")
    if w is not None and np.ndim(w) == 4:
        embed_dim, in_chans, patch_size = int(w.shape[0]), int(w.shape[1]), int(w.shape[2])
    depth = len({m.group(1) for k in state if (m := re.fullmatch(r"blocks\.(\d+)\.norm1\.weight", k))}) or default.depth
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / embed_dim if fc1 is not None and np.ndim(fc1) == 2 else default.mlp_ratio
    img_size = default.img_size
    pos = state.get("pos_embed")
    if pos is not None and np.ndim(pos) == 3:
        n = math.isqrt(max(int(pos.shape[1]) - 1, 0))
        img_size = n * patch_size if n else img_size
    if num_heads is None:
        if embed_dim % HEAD_DIM:
            raise ConfigError(f"embed_dim {embed_dim} is not a multiple of the usual {HEAD_DIM}-wide heads: pass "
                              "num_heads", "num_heads")
        num_heads = embed_dim // HEAD_DIM
    return DINOViTConfig(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                         depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, dtype=dtype)


def read_dino_file(path: str | os.PathLike, num_heads: int | None = None) -> tuple[DINOViTConfig, dict]:
    """One DINO / timm ViT weights file (.pth read with weights_only=True, or .safetensors) -> (config, state)."""
    path = user_path(path)
    if path.is_dir():
        raise ValueError(f"{path}: expected the DINO ViT as one weights file (.pth or .safetensors), got a folder")
    state = normalise_keys(safetensors_io.read_weights(path))
    return dino_config_from_state(state, num_heads), state


def write_dino_file(config: DINOViTConfig, state: dict, path) -> None:
    write_weights_file(state, path, "the DINO ViT", hint="timm's VisionTransformer and DINO's vit_small load it "
                       "with load_state_dict")


def dino_from_torch(path: str | os.PathLike, num_heads: int | None = None, dtype=jnp.float32):
    """A DINO / timm ViT weights file -> `(module, params)` of model kind `dino_vit` (`load_torch("dino_vit",
    path)`, with `num_heads` when the heads are not 64 wide); every missing, unexpected or mis-shaped key is
    reported."""
    config, state = read_dino_file(path, num_heads)
    return params_from_state("dino_vit", config, state, source=str(path), dtype=dtype)


def dino_state_dict(config: DINOViTConfig, params) -> dict[str, np.ndarray]:
    """`dino_vit` params -> the timm / DINO state dict (numpy arrays, PyTorch layouts)."""
    return flax_to_torch(params, dino_rules(config), "dino_vit")



FORMAT = weights_file_format("dino_vit", library="timm", class_name="VisionTransformer", config_cls=DINOViTConfig,
                             rules=dino_rules, read_file=read_dino_file, write_file=write_dino_file,
                             normalise_keys=normalise_keys)
