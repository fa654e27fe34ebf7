"""Spatial tiling with overlap: a function trained at one size run over larger frames, tile by tile, the tiles'
outputs blended where they overlap (MultiDiffusion, Bar-Tal et al. 2023, for a denoiser step; plain overlapped
tiling for a feed-forward network such as the frame interpolator).

    out = tiled(fn, [x, reference], scales=[1, 8], size=(h, w), tile=(64, 64), overlap=16)

Every array is channels-last with its spatial axes at -3 and -2; `scales[k]` is array k's size over the tile grid's
(a latent and the pixels of the same frames: 1 and the VAE's factor). fn maps the crops of one tile to an output of
the tile's grid size (scale 1). The tiles cover the grid with at least `overlap` cells shared between neighbours
(the last tile of a row moves back to end at the border); each output is weighted by a window that ramps linearly
over the overlap (1 inside), so a seam is a cross-fade and a cell covered once keeps its tile's value exactly.
The tile positions are static; the tiles run one after another (`lax.map`), so fn is traced and compiled once
whatever the number of tiles, and holds one tile's memory at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if np.ndim(v) == 0 else (int(v[0]), int(v[1]))


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of `tile` cells over `size` cells, neighbours sharing at least `overlap`."""
    if tile < 1 or overlap < 0 or overlap >= tile:
        raise ValueError(f"tiling needs tile >= 1 and 0 <= overlap < tile, got tile {tile}, overlap {overlap}")
    if size <= tile:
        return [0]
    n = -(-(size - overlap) // (tile - overlap))  # ceil: tiles needed
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _ramp(length: int, overlap: int, first: bool, last: bool) -> np.ndarray:
    w = np.ones(length, np.float32)
    if overlap:
        ramp = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
        if not first:
            w[:overlap] = ramp
        if not last:
            w[length - overlap:] = ramp[::-1]
    return w


def tiled(fn: Callable[..., jax.Array], arrays: Sequence[jax.Array], *, scales: Sequence[int], size, tile,
          overlap) -> jax.Array:
    """fn over overlapping tiles of the grid `size` (h, w), blended (module docstring). Returns fn's output over
    the whole grid. With the grid no larger than a tile, fn runs once on the arrays as they are."""
    (h, w), (th, tw), (oh, ow) = _pair(size), _pair(tile), _pair(overlap)
    if len(arrays) != len(scales):
        raise ValueError(f"{len(arrays)} arrays but {len(scales)} scales")
    for a, s in zip(arrays, scales, strict=True):
        if tuple(a.shape[-3:-1]) != (h * s, w * s):
            raise ValueError(f"an array of spatial size {tuple(a.shape[-3:-1])} is not the grid {h}x{w} at scale {s}")
    if h <= th and w <= tw:
        return fn(*arrays)
    th, tw = min(th, h), min(tw, w)
    ys, xs = tile_starts(h, th, oh), tile_starts(w, tw, ow)
    spots = [(i, j, y, x) for i, y in enumerate(ys) for j, x in enumerate(xs)]
    crops = [jnp.stack([a[..., y * s:(y + th) * s, x * s:(x + tw) * s, :] for _, _, y, x in spots])
             for a, s in zip(arrays, scales, strict=True)]
    parts = jax.lax.map(lambda cs: fn(*cs), crops)  # one tile at a time: fn traced once, memory of one tile
    out, weight = None, np.zeros((h, w, 1), np.float32)
    for n, (i, j, y, x) in enumerate(spots):
        win = np.outer(_ramp(th, oh if len(ys) > 1 else 0, i == 0, i == len(ys) - 1),
                       _ramp(tw, ow if len(xs) > 1 else 0, j == 0, j == len(xs) - 1))[:, :, None]
        part = parts[n]
        if out is None:
            out = jnp.zeros((*part.shape[:-3], h, w, part.shape[-1]), part.dtype)
        out = out.at[..., y:y + th, x:x + tw, :].add(part * win.astype(part.dtype))
        weight[y:y + th, x:x + tw] += win
    return out / jnp.asarray(weight, out.dtype)
