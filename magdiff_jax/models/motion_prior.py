"""A parameter-free motion prior for frame interpolation: coarse-to-fine bilateral block matching.

MagicVideo-V2's interpolator pairs its EDSC head with "a pretrained lightweight interpolation model ... for more
stability and smoothness" (PAPERS.md B.5). This module is the lightweight part without weights: for the frame at
time t between frame0 and frame1 it estimates, at every pixel p of that frame, the motion v(p) of the point passing
through p, assuming linear motion, so that

    frame0(p - t v)  ~  frame1(p + (1 - t) v)                                  (bilateral matching)

and hands the interpolator the backward flows to both inputs, F_t0 = -t v and F_t1 = (1 - t) v. Searching
symmetrically around the output pixel (bilateral motion estimation, as in classical frame-rate up-conversion) gives
the flows at the output's own pixels directly, so no flow projection or hole filling is needed.

    v = bilateral_flow(frame0, frame1, t)           # (B, H, W, 2) as (dy, dx) in pixels, frames (B, H, W, C)
    warped = backward_warp(frame0, -t[:, None, None, None] * v)

The search runs on a pyramid of the frames (halved by area averaging until the next level would be smaller than
`min_size`): at the coarsest level every displacement within `coarse_radius` pixels, at each finer level the
upsampled estimate corrected within `radius` pixels. Each candidate is scored by the squared difference of the two
bilinear samples summed over the channels and averaged over a `window` x `window` neighbourhood, plus `penalty` x
the correction's squared length (in pixels; scores in the units of frames in [0, 1]), which keeps the coarser
estimate where matching is ambiguous (flat regions). The winner is refined to sub-pixel by a parabola through its
neighbours' scores on each axis; then "no motion" is scored too and kept wherever it matches at least as well
(without that, block matching spreads a moving object's motion over the static background around it). The largest
motion found is coarse_radius x 2**L + radius x (2**L - 1) pixels for L halvings (18 at 32 px, over 100 at 256 px,
with the defaults). The result carries no gradient: it has no parameters and is a fixed function of the frames.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

PRIORS = ("none", "bilateral")


def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's row and column, each (H, W) float32."""
    return np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")


def backward_warp(frame: jax.Array, flow: jax.Array) -> jax.Array:
    """frame (B, H, W, C), flow (B, H, W, 2) as (dy, dx) in pixels -> the frame sampled bilinearly at (y + dy,
    x + dx), positions clamped into the frame (replicate border). float32."""
    b, h, w, c = frame.shape
    if flow.shape != (b, h, w, 2):
        raise ValueError(f"backward_warp: flow must be (B, H, W, 2) = {(b, h, w, 2)}, got {flow.shape}")
    gy, gx = _pixel_grid(h, w)
    py = jnp.clip(gy + flow[..., 0], 0, h - 1)
    px = jnp.clip(gx + flow[..., 1], 0, w - 1)
    y0, x0 = jnp.floor(py), jnp.floor(px)
    fy, fx = (py - y0)[..., None], (px - x0)[..., None]
    y0, x0 = y0.astype(jnp.int32), x0.astype(jnp.int32)
    y1, x1 = jnp.minimum(y0 + 1, h - 1), jnp.minimum(x0 + 1, w - 1)
    flat = frame.astype(jnp.float32).reshape(b, h * w, c)

    def at(yi, xi):
        return jnp.take_along_axis(flat, (yi * w + xi).reshape(b, h * w, 1), axis=1).reshape(b, h, w, c)

    top = at(y0, x0) * (1 - fx) + at(y0, x1) * fx
    bottom = at(y1, x0) * (1 - fx) + at(y1, x1) * fx
    return top * (1 - fy) + bottom * fy


def _pyramid_sizes(h: int, w: int, min_size: int) -> list[tuple[int, int]]:
    """Finest first: (h, w), then halved (rounded up) while the smaller side stays >= min_size."""
    sizes = [(h, w)]
    while min(half := (-(-sizes[-1][0] // 2), -(-sizes[-1][1] // 2))) >= min_size:
        sizes.append(half)
    return sizes


def _resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    if x.shape[1:3] == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "linear", antialias=True)


def _box_mean(x: jax.Array, window: int) -> jax.Array:
    """(..., H, W) -> the mean over the window x window neighbourhood (zero padding, divided by the full area)."""
    dims = (1,) * (x.ndim - 2) + (window, window)
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, (1,) * x.ndim, "SAME") / (window * window)


def _parabola(c_minus, c_zero, c_plus):
    """The sub-pixel offset of a parabola's minimum through three scores at -1, 0, +1, within +-0.5 (0 where the
    scores do not curve upwards)."""
    curve = c_minus - 2 * c_zero + c_plus
    ok = jnp.isfinite(c_minus) & jnp.isfinite(c_plus) & (curve > 1e-12)
    return jnp.where(ok, jnp.clip((c_minus - c_plus) / (2 * jnp.where(ok, curve, 1.0)), -0.5, 0.5), 0.0)


def _search(f0, f1, t, v, radius: int, window: int, penalty: float):
    """One level: the correction of v (B, H, W, 2) within `radius` pixels that best matches f0 and f1 (module doc)."""
    n = 2 * radius + 1
    steps = np.arange(-radius, radius + 1, dtype=np.float32)
    candidates = np.stack(np.meshgrid(steps, steps, indexing="ij"), -1).reshape(-1, 2)  # (n*n, 2) (dy, dx)
    tb = t[:, None, None, None]

    def score(motion):
        e = backward_warp(f0, -tb * motion) - backward_warp(f1, (1 - tb) * motion)
        return _box_mean(jnp.sum(e * e, axis=-1), window)

    costs = jax.lax.map(lambda d: score(v + d), jnp.asarray(candidates))  # (n*n, B, H, W)
    costs = costs + penalty * jnp.asarray(np.sum(candidates ** 2, -1))[:, None, None, None]
    grid = jnp.moveaxis(costs.reshape(n, n, *costs.shape[1:]), (0, 1), (-2, -1))  # (B, H, W, n, n)
    best = jnp.argmin(grid.reshape(*grid.shape[:3], n * n), axis=-1)
    iy, ix = best // n, best % n
    padded = jnp.pad(grid, ((0, 0),) * 3 + ((1, 1), (1, 1)), constant_values=jnp.inf)
    flat = padded.reshape(*padded.shape[:3], (n + 2) ** 2)

    def at(dy, dx):  # the score of the winner's neighbour (dy, dx) (inf beyond the searched square)
        return jnp.take_along_axis(flat, ((iy + 1 + dy) * (n + 2) + ix + 1 + dx)[..., None], axis=-1)[..., 0]

    c0 = at(0, 0)
    sub = jnp.stack([_parabola(at(-1, 0), c0, at(1, 0)), _parabola(at(0, -1), c0, at(0, 1))], axis=-1)
    whole = jnp.stack([iy, ix], axis=-1).astype(jnp.float32) - radius
    still = score(jnp.zeros_like(v))  # no motion, a candidate everywhere (static backgrounds next to moving objects)
    return jnp.where((still <= jnp.min(grid, axis=(-2, -1)))[..., None], 0.0, v + whole + sub)


def bilateral_flow(frame0: jax.Array, frame1: jax.Array, t, *, radius: int = 2, coarse_radius: int = 3,
                   window: int = 5, min_size: int = 8, penalty: float = 1e-3) -> jax.Array:
    """The motion v (B, H, W, 2) as (dy, dx) in pixels of the points at each pixel of the frame at time t (a
    scalar or (B,) in [0, 1]) between frame0 and frame1 (B, H, W, C, any range; float32): frame0(p - t v) matches
    frame1(p + (1 - t) v) (module docstring). No gradient flows through it."""
    if frame0.shape != frame1.shape or frame0.ndim != 4:
        raise ValueError(f"bilateral_flow: frames must both be (B, H, W, C), got {frame0.shape} and {frame1.shape}")
    if min(radius, coarse_radius) < 1 or window < 1 or min_size < 1:
        raise ValueError(f"bilateral_flow: radius, coarse_radius, window and min_size must be >= 1, got "
                         f"{radius}, {coarse_radius}, {window}, {min_size}")
    b, h, w, _ = frame0.shape
    frame0, frame1 = (jax.lax.stop_gradient(jnp.asarray(f, jnp.float32)) for f in (frame0, frame1))
    t = jnp.broadcast_to(jax.lax.stop_gradient(jnp.asarray(t, jnp.float32)), (b,))
    sizes = _pyramid_sizes(h, w, min_size)
    v = jnp.zeros((b, *sizes[-1], 2), jnp.float32)
    for level in range(len(sizes) - 1, -1, -1):
        size = sizes[level]
        if v.shape[1:3] != size:
            scale = jnp.asarray([size[0] / v.shape[1], size[1] / v.shape[2]], jnp.float32)
            v = _resize(v, size) * scale
        r = coarse_radius if level == len(sizes) - 1 else radius
        v = _search(_resize(frame0, size), _resize(frame1, size), t, v, r, window, penalty)
    return v


def intermediate_flows(frame0: jax.Array, frame1: jax.Array, t, prior: str = "bilateral") -> tuple | None:
    """(F_t0, F_t1), each (B, H, W, 2): the backward flows from the frame at time t to frame0 and frame1 under the
    named prior (-t v and (1 - t) v, each clipped to end inside the frame), or None for "none"."""
    if prior not in PRIORS:
        raise ValueError(f"motion prior must be one of {PRIORS}, got {prior!r}")
    if prior == "none":
        return None
    v = bilateral_flow(frame0, frame1, t)
    b = frame0.shape[0]
    tb = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))[:, None, None, None]
    return _inside(-tb * v), _inside((1 - tb) * v)


def _inside(flow: jax.Array) -> jax.Array:
    """The flow (B, H, W, 2) clipped so that every pixel's target lies inside the frame: `backward_warp` clamps
    there anyway, and EDSC's synthesis op (whose release treats positions beyond its padding differently) then
    samples the same points."""
    h, w = flow.shape[1:3]
    gy, gx = _pixel_grid(h, w)
    return jnp.stack([jnp.clip(flow[..., 0], -gy, h - 1 - gy), jnp.clip(flow[..., 1], -gx, w - 1 - gx)], axis=-1)
