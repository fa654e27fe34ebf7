"""Spatial tiling with overlap (`pipelines.tiling`): the tiles cover the grid, a pointwise function is unchanged by
tiling, a cell covered once keeps its tile's value, seams cross-fade, and arrays at other scales are cropped with
their tile."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from magdiff_jax.pipelines.tiling import tile_starts, tiled


@pytest.mark.parametrize("size,tile,overlap", [(64, 32, 8), (50, 16, 4), (33, 32, 0), (32, 32, 8), (100, 24, 23)])
def test_tile_starts_cover_with_the_overlap(size, tile, overlap):
    starts = tile_starts(size, tile, overlap)
    assert starts[0] == 0 and starts[-1] + min(tile, size) == max(size, min(tile, size))
    covered = np.zeros(size, bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    for a, b in itertools.pairwise(starts):
        assert a + tile - b >= overlap  # neighbours share at least `overlap` cells
        assert b > a


def test_tile_starts_refuse_bad_settings():
    with pytest.raises(ValueError, match="overlap < tile"):
        tile_starts(64, 16, 16)
    with pytest.raises(ValueError, match="tile >= 1"):
        tile_starts(64, 0, 0)


def test_pointwise_function_is_unchanged_and_scales_crop_together():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 3, 40, 56, 4)), jnp.float32)  # (B, F, h, w, c): the latent grid
    ref = jnp.asarray(rng.normal(size=(2, 80, 112, 3)), jnp.float32)  # the same frames at scale 2
    calls = []

    def fn(xt, rt):
        calls.append((xt.shape, rt.shape))
        assert rt.shape[1:3] == (2 * xt.shape[2], 2 * xt.shape[3])
        pooled = rt.reshape(rt.shape[0], xt.shape[2], 2, xt.shape[3], 2, 3).mean((2, 4)).sum(-1)
        return xt * 3.0 + pooled[:, None, :, :, None]

    out = tiled(fn, [x, ref], scales=[1, 2], size=(40, 56), tile=16, overlap=4)
    want = fn(x, ref)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert calls[0][0][2:4] == (16, 16)  # traced once, on one tile (the tiles run in a lax.map)


def test_seams_cross_fade_and_single_cover_keeps_values():
    x = jnp.broadcast_to(jnp.arange(20.0)[None, None, None, :, None], (1, 1, 8, 20, 1))  # each cell: its column
    starts = tile_starts(20, 12, 4)
    assert starts == [0, 8]

    def corner(xt):  # each tile paints its first column's index: which tile wrote a cell shows in the output
        return jnp.broadcast_to(xt[..., :1, :1, :], xt.shape)

    out = np.asarray(tiled(corner, [x], scales=[1], size=(8, 20), tile=(8, 12), overlap=4))[0, 0, 0, :, 0]
    assert np.all(out[:8] == 0.0) and np.all(out[12:] == 8.0)  # covered once: that tile's value exactly
    seam = out[8:12]
    assert np.all(np.diff(seam) > 0) and np.all((seam > 0) & (seam < 8))  # a monotone cross-fade


def test_a_grid_within_one_tile_runs_once_and_shapes_are_checked():
    x = jnp.ones((1, 1, 8, 8, 2))
    assert np.asarray(tiled(lambda a: a * 2, [x], scales=[1], size=(8, 8), tile=16, overlap=4)).max() == 2
    with pytest.raises(ValueError, match="not the grid"):
        tiled(lambda a, b: a, [x, jnp.ones((1, 10, 16, 3))], scales=[1, 2], size=(8, 8), tile=4, overlap=1)
