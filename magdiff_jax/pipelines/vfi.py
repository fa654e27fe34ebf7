"""MagicVideo-V2 frame interpolation (PAPERS.md B.5): `factor - 1` frames between each pair of neighbours, so 32
frames become 32 + 31 x 2 = 94 at factor 3.

    pipe = VFIPipeline.load("runs/vfi/export")
    longer = pipe(videos, factor=3)          # uint8 (N, F, H, W, 3) -> (N, F + (F - 1)(factor - 1), H, W, 3)

The in-between frames are at t = k / factor (k = 1 .. factor - 1) of each pair, predicted by the stage's interpolator
(`models.edsc`) a chunk of pairs at a time. Frames larger than `tile` pixels are interpolated in overlapping tiles
blended where they meet (`pipelines.tiling`), so memory stays bounded at high resolution; the network is
convolutional, so a tile sees the same weights as the whole frame.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax import cpu, distributed
from magdiff_jax.models.edsc import interpolate
from magdiff_jax.pipelines.tiling import tiled


def interleave(video: np.ndarray, middles: np.ndarray) -> np.ndarray:
    """Frames (F, ...) and the in-between frames of each pair (F - 1, K, ...) -> (F + (F - 1) K, ...) in time order."""
    f, k = video.shape[0], middles.shape[1]
    out = np.empty((f + (f - 1) * k, *video.shape[1:]), video.dtype)
    out[::k + 1] = video
    for j in range(k):
        out[1 + j::k + 1] = middles[:, j]
    return out


class VFIPipeline:
    """In-between frames from a VFI stage (`magdiff-jax interpolate`): its export or a training workdir.

    `tile` / `overlap`: pixels (default: 512 and 64): a frame larger than the tile is interpolated tile by tile;
    `pairs_per_call`: frame pairs per compiled call (bounded memory; the last chunk is padded, so one program serves
    every video of the same size)."""

    def __init__(self, stage, tile: int = 512, overlap: int = 64, pairs_per_call: int = 8):
        if "interpolator" not in stage.modules:
            raise ValueError(f"{stage.path}: the stage has no interpolator (a VFI stage exports one)")
        self.stage = stage
        self.module = stage.modules["interpolator"]
        self.tile, self.overlap, self.pairs_per_call = int(tile), int(overlap), int(pairs_per_call)
        if self.pairs_per_call < 1:
            raise ValueError(f"pairs_per_call must be positive, got {pairs_per_call}")
        self._fns = {}

    @classmethod
    def load(cls, path, step: int | None = None, **kwargs) -> VFIPipeline:
        from magdiff_jax.export.stage import load_stage

        stage = load_stage(path, step)
        if stage.task != "vfi":
            raise ValueError(f"{path} holds a {stage.task!r} stage, not vfi")
        return cls(stage, **kwargs)

    def _fn(self, shape, k):
        if (shape, k) not in self._fns:
            module, tile, overlap = self.module, self.tile, self.overlap
            h, w = shape

            def run(params, f0, f1, t):  # (P, H, W, 3) pairs, t (P,) -> (P, H, W, 3) in [-1, 1]
                def one(a, b):
                    return interpolate(module, params, a, b, t)

                return tiled(one, [f0, f1], scales=[1, 1], size=(h, w), tile=tile, overlap=overlap)

            self._fns[(shape, k)] = jax.jit(run, compiler_options=cpu.compiler_options())
        return self._fns[(shape, k)]

    def middles(self, video: np.ndarray, factor: int) -> np.ndarray:
        """The in-between frames of one video (F, H, W, 3) uint8 -> (F - 1, factor - 1, H, W, 3) uint8."""
        f, k = video.shape[0], factor - 1
        x = video.astype(np.float32) / 127.5 - 1.0
        f0 = np.repeat(x[:-1], k, axis=0)
        f1 = np.repeat(x[1:], k, axis=0)
        t = np.tile(np.arange(1, factor, dtype=np.float32) / factor, f - 1)
        n, p = len(t), self.pairs_per_call
        pad = -n % p
        if pad:
            f0, f1 = (np.concatenate([a, np.repeat(a[-1:], pad, 0)]) for a in (f0, f1))
            t = np.concatenate([t, np.full(pad, t[-1], np.float32)])
        fn = self._fn(video.shape[1:3], k)
        params = self.stage.params["interpolator"]
        outs = [distributed.to_host(fn(params, jnp.asarray(f0[i:i + p]), jnp.asarray(f1[i:i + p]),
                                       jnp.asarray(t[i:i + p])))
                for i in range(0, n + pad, p)]
        out = np.concatenate(outs)[:n]
        out = np.round((out + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
        return out.reshape(f - 1, k, *video.shape[1:])

    def __call__(self, videos, factor: int = 3) -> np.ndarray:
        """Videos (N, F, H, W, 3) uint8 (F >= 2) -> (N, F + (F - 1)(factor - 1), H, W, 3) uint8."""
        videos = np.asarray(videos)
        if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
            raise ValueError(f"videos must be (N, F, H, W, 3) uint8, got {videos.shape} {videos.dtype}")
        if videos.shape[1] < 2:
            raise ValueError(f"interpolation needs at least 2 frames, got {videos.shape[1]}")
        if int(factor) != factor or factor < 2:
            raise ValueError(f"factor must be an integer >= 2 (factor - 1 frames between each pair), got {factor}")
        return np.stack([interleave(v, self.middles(v, int(factor))) for v in videos])
