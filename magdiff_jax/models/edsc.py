"""EDSC: multiple video frame interpolation by enhanced deformable separable convolution (Cheng & Chen, TPAMI 2021),
the interpolator of MagicVideo-V2's VFI stage; parameters named and shaped as the released EDSC-pytorch `Network`.

    out = EDSC(config).apply({"params": p}, frame0, frame1, t)     # (B, H, W, 3): the frame at time t in (0, 1)

Frames (B, H, W, 3) with values in [0, 1], the released network's input range. The released checkpoints were trained
on frames read by OpenCV, i.e. in BGR channel order: feed them BGR. Any H and W: both frames are padded on the
bottom and right by repeating their last row / column (replicate padding) up to a multiple of 2**len(
block_out_channels) (32 for the released network), as the release's `run.py` does, and the output is cropped back.

Backbone (U-Net-like, widths w = `block_out_channels`, n = len(w) levels; each "HetConv" is an efficient
heterogeneous convolution, grouped 3x3 + 1x1 - grouped 1x1 with `het_groups` groups, each followed by a ReLU):

    moduleConv1          conv3x3 6 -> w0, ReLU, 2x HetConv w0 -> w0            full resolution
    moduleConv{l+1}      avg-pool 2, 3x HetConv w(l-1) -> w(l)                  1/2**l, l = 1..n-1
    moduleDeconv{n}      avg-pool 2, 3x HetConv w(n-1) -> w(n-1)                1/2**n
    moduleDeconv{l+1}    3x HetConv w(l+1) -> w(l) on (previous + conv{l+2})    l = n-2..1
    moduleUpsample{l+1}  bilinear x2 (align_corners), HetConv w(l) -> w(l)      after each deconv
    combine            = deconv2 + conv2                                        (B, H/2, W/2, w1)

Heads (3x conv3x3 + ReLU with `head_channels` hidden widths, bilinear x2 (align_corners), conv3x3), at full
resolution: per input frame k in {1, 2} vertical and horizontal kernels (ks channels, `moduleVertical{k}`,
`moduleHorizontal{k}`), offsets (ks*ks channels each, `moduleOffset{k}x` / `moduleOffset{k}y`), a modulation mask
(ks*ks, sigmoid, `moduleMask{k}`), and one bias image (3 channels, `moduleBias`, from `combine` alone). With the
time input (`multiple`, the released EDSC_m), a constant map t is concatenated to `combine` for frame 1's heads
and 1 - t for frame 2's (so their first conv reads w1 + 1 channels).

Output = DSepConv(frame0; heads 1) + DSepConv(frame1; heads 2) + bias, with `deformable_separable_conv` below.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magdiff_jax.layers.common import compute_dtype, conv, default_kernel_init
from magdiff_jax.models.motion_prior import PRIORS, backward_warp, intermediate_flows
from magdiff_jax.models.registry import ModelSpec, check_names, check_positive, register


# --- the synthesis op -------------------------------------------------------------------------------------------
def _quads(frame: jax.Array, pad: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H + 2 pad - 1) * (W + 2 pad - 1), 4C): the frame replicate-padded by `pad` and, at flat
    index (j, i), its 2x2 neighbourhood [top-left, top-right, bottom-left, bottom-right] starting at (j, i). With
    pad = c + 1 that is the neighbourhood of pixel (j - 1, i - 1) of the frame padded by c, every index clamped into
    it: one gather reads all four bilinear corners, clamped as the release clamps them."""
    p = jnp.pad(frame, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    q = jnp.concatenate([p[:, :-1, :-1], p[:, :-1, 1:], p[:, 1:, :-1], p[:, 1:, 1:]], axis=-1)
    return q.reshape(q.shape[0], -1, q.shape[-1])


def _sampling_bases(h: int, w: int, ks: int) -> tuple[np.ndarray, np.ndarray]:
    """The undisplaced sampling positions (y + fy - c + 1, x + fx - c + 1) in the padded frame, each (H, W, ks*ks)."""
    c = (ks - 1) // 2
    taps = np.arange(ks, dtype=np.float32)
    by = np.broadcast_to((np.arange(h, dtype=np.float32)[:, None, None, None] + taps[:, None] - c + 1),
                         (h, w, ks, ks)).reshape(h, w, -1)
    bx = np.broadcast_to((np.arange(w, dtype=np.float32)[None, :, None, None] + taps[None, :] - c + 1),
                         (h, w, ks, ks)).reshape(h, w, -1)
    return by, bx


def _sampling(shape, kernel_size: int, offset_y: jax.Array, offset_x: jax.Array):
    """The bilinear sampling of every tap, exactly as the released CUDA kernel computes it.

    In the frame replicate-padded by c = (ks - 1) // 2 (size Hp x Wp), tap (fy, fx) of output pixel (y, x) samples
    p = (y + fy - c + 1 + dy, x + fx - c + 1 + dx). Per axis, with q = floor(p), the clamped position
    pc = clip(p, 0, Wp - 1) and corners l = clip(q, 0, Wp - 1), r = clip(q + 1, 0, Wp - 1), the weights are
    wl = 1 + l - pc and wr = 1 + pc - r: the usual (1 - frac, frac) inside the frame, and (1, 1) on the same edge
    pixel at and beyond the border (the release's border handling, kept as is).

    Returns the flat quad index (B, H, W, K) into `_quads(frame, c + 1)`, the weights (wy_top, wy_bottom,
    wx_left, wx_right) and whether p lies inside the padded frame (rows, columns: where the weights move with p),
    each (B, H, W, K), with K = ks * ks taps ordered fy * ks + fx."""
    _, h, w = shape
    c = (kernel_size - 1) // 2
    hp, wp = h + 2 * c, w + 2 * c
    base_y, base_x = _sampling_bases(h, w, kernel_size)
    py = offset_y + base_y
    px = offset_x + base_x

    def axis(p, size):
        q = jnp.floor(p)
        pc = jnp.clip(p, 0, size - 1)
        lo, hi = jnp.clip(q, 0, size - 1), jnp.clip(q + 1, 0, size - 1)
        corner = jnp.clip(q, -1, size - 1).astype(jnp.int32) + 1  # index into the quads, which start at -1
        return corner, 1 + lo - pc, 1 + pc - hi, (p >= 0) & (p <= size - 1)

    cy, wt, wb, inside_y = axis(py, hp)
    cx, wl, wr, inside_x = axis(px, wp)
    return cy * (wp + 1) + cx, (wt, wb, wl, wr), (inside_y, inside_x)


def _gather(quads: jax.Array, index: jax.Array) -> jax.Array:
    """quads (B, N, 4C), index (B, H, W, K) -> (B, H, W, K, 4, C)."""
    b, h, w, k = index.shape
    g = jax.vmap(lambda q, i: q[i])(quads, index.reshape(b, -1))
    return g.reshape(b, h, w, k, 4, -1)


def _tap_weights(vertical, horizontal, mask):
    """(B, H, W, ks) x2, (B, H, W, ks*ks) -> v[fy] * h[fx] * mask[fy*ks + fx], (B, H, W, ks*ks)."""
    b, h, w, ks = vertical.shape
    return (vertical[..., :, None] * horizontal[..., None, :]).reshape(b, h, w, ks * ks) * mask


def _corner_weights(wt, wb, wl, wr):
    return jnp.stack([wt * wl, wt * wr, wb * wl, wb * wr], axis=-1)  # (B, H, W, K, 4)


def _dsepconv_plain(frame, vertical, horizontal, offset_y, offset_x, mask):
    ks = vertical.shape[-1]
    index, (wt, wb, wl, wr), _ = _sampling(frame.shape[:3], ks, offset_y, offset_x)
    samples = _gather(_quads(frame, (ks - 1) // 2 + 1), index)
    a = _corner_weights(wt, wb, wl, wr) * _tap_weights(vertical, horizontal, mask)[..., None]
    return jnp.sum(a[..., None] * samples, axis=(3, 4))  # a product and a sum: XLA's CPU dot is slower here


@jax.custom_vjp
def _dsepconv(frame, vertical, horizontal, offset_y, offset_x, mask):
    return _dsepconv_plain(frame, vertical, horizontal, offset_y, offset_x, mask)


def _dsepconv_fwd(frame, vertical, horizontal, offset_y, offset_x, mask):
    out = _dsepconv_plain(frame, vertical, horizontal, offset_y, offset_x, mask)
    return out, (frame, vertical, horizontal, offset_y, offset_x, mask)


def _dsepconv_bwd(res, g):
    """The gradient of every input from one re-gather of the sampled pixels (nothing (B, H, W, K, 4, C)-sized is
    kept from the forward). With S_q the corner pixels of a tap, D_q = <g, S_q> over channels and W the tap weight
    v[fy] h[fx] m[k] and a_q the corner weights (wt wl, wt wr, wb wl, wb wr): dW = sum_q a_q D_q;
    d(dx) = W (wt (D1 - D0) + wb (D3 - D2)) and d(dy) = W (wl (D2 - D0) + wr (D3 - D1)) where the position is inside
    the padded frame (0 outside, where it is clamped); the frame's gradient scatters a_q W g into the quads."""
    frame, vertical, horizontal, offset_y, offset_x, mask = res
    ks = vertical.shape[-1]
    b, h, w, _ = vertical.shape
    pad = (ks - 1) // 2 + 1
    index, (wt, wb, wl, wr), (inside_y, inside_x) = _sampling(frame.shape[:3], ks, offset_y, offset_x)
    quads, quads_vjp = jax.vjp(lambda f: _quads(f, pad), frame)
    samples = _gather(quads, index)
    d = jnp.einsum("bhwc,bhwkqc->bhwkq", g, samples)  # (B, H, W, K, 4)
    corner = _corner_weights(wt, wb, wl, wr)
    tap = _tap_weights(vertical, horizontal, mask)
    d_tap = jnp.sum(corner * d, axis=-1)
    d_vh = (d_tap * mask).reshape(b, h, w, ks, ks)
    d_vertical = jnp.einsum("bhwyx,bhwx->bhwy", d_vh, horizontal)
    d_horizontal = jnp.einsum("bhwyx,bhwy->bhwx", d_vh, vertical)
    d_mask = d_tap * (vertical[..., :, None] * horizontal[..., None, :]).reshape(b, h, w, ks * ks)
    d0, d1, d2, d3 = (d[..., i] for i in range(4))
    d_offset_x = jnp.where(inside_x, tap * (wt * (d1 - d0) + wb * (d3 - d2)), 0)
    d_offset_y = jnp.where(inside_y, tap * (wl * (d2 - d0) + wr * (d3 - d1)), 0)
    contrib = (corner * tap[..., None])[..., None] * g[:, :, :, None, None, :]  # (B, H, W, K, 4, C)
    c = g.shape[-1]
    d_quads = jax.vmap(lambda i, v: jnp.zeros((quads.shape[1], 4 * c), g.dtype).at[i].add(v))(
        index.reshape(b, -1), contrib.reshape(b, -1, 4 * c))
    (d_frame,) = quads_vjp(d_quads)
    return d_frame, d_vertical, d_horizontal, d_offset_y, d_offset_x, d_mask


_dsepconv.defvjp(_dsepconv_fwd, _dsepconv_bwd)


def deformable_separable_conv(frame, vertical, horizontal, offset_y, offset_x, mask, *, custom_vjp: bool = True):
    """Adaptive deformable separable convolution (the release's `FunctionDSepconv`), channels-last, in float32.

        out[b, y, x, :] = sum_{fy, fx} v[fy] h[fx] m[k] * bilinear(frame_pad, y + fy - c + 1 + dy[k],
                                                                              x + fx - c + 1 + dx[k])

    with k = fy * ks + fx, c = (ks - 1) // 2, frame_pad the frame replicate-padded by c on every side (as the
    released network pads it), and the release's bilinear border handling (`_sampling`).

    frame (B, H, W, C); vertical, horizontal (B, H, W, ks) (ks odd); offset_y (rows), offset_x (columns) and mask
    (B, H, W, ks*ks) -> (B, H, W, C).

    The released network's `moduleOffset{k}x` head gives the row offsets (offset_y here) and `moduleOffset{k}y` the
    column offsets: its CUDA kernel reads them that way round.

    `custom_vjp` (the default) picks the hand-written gradient (`_dsepconv_bwd`), which re-gathers the sampled
    pixels in the backward pass instead of keeping them from the forward (ks*ks*4*C values per output pixel, the
    bulk of the op's memory): less memory, and on CPU a faster forward + backward than plain autodiff, which
    `custom_vjp=False` uses on the same forward.
    """
    ks = vertical.shape[-1]
    if ks % 2 == 0 or horizontal.shape[-1] != ks:
        raise ValueError(f"deformable_separable_conv: vertical and horizontal kernels need the same odd size, got "
                         f"{vertical.shape[-1]} and {horizontal.shape[-1]}")
    b, h, w = frame.shape[:3]
    for name, x, ch in (("vertical", vertical, ks), ("horizontal", horizontal, ks), ("offset_y", offset_y, ks * ks),
                        ("offset_x", offset_x, ks * ks), ("mask", mask, ks * ks)):
        if x.shape != (b, h, w, ch):
            raise ValueError(f"deformable_separable_conv: {name} has shape {x.shape}, expected {(b, h, w, ch)} for a "
                             f"frame of shape {frame.shape}")
    args = [jnp.asarray(x, jnp.float32) for x in (frame, vertical, horizontal, offset_y, offset_x, mask)]
    return (_dsepconv if custom_vjp else _dsepconv_plain)(*args)


# --- the network ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EDSCConfig:
    """The defaults are the released multi-frame network (EDSC_m); `multiple=False` is the midpoint-only EDSC_s."""

    block_out_channels: tuple[int, ...] = (32, 64, 128, 256, 512)  # moduleConv1 .. moduleConv{n}
    head_channels: tuple[int, int] = (64, 32)  # the hidden widths of every head
    kernel_size: int = 5  # ks: taps of the separable kernels (ks*ks offsets and mask values per frame)
    het_groups: int = 4  # p of the efficient HetConv
    multiple: bool = True  # the time input (arbitrary t); False: the midpoint network, t is not read
    use_bias: bool = True  # the bias (residual) head
    # the colour order the weights were trained on: "bgr" for the released networks (OpenCV frames), "rgb" for ours;
    # `interpolate` swaps RGB frames into it (the network itself reads whatever it is given)
    channel_order: str = "rgb"
    # True: the heads' last convolutions start at zero with biases that make the untrained network blend its inputs
    # ((frame0 + frame1) / 2: centre taps, masks 1/2, no offsets, no residual), so training from scratch starts at
    # that baseline instead of at noise; False: Flax's default initialisers (converted weights replace either)
    blend_init: bool = False
    # "bilateral": the parameter-free motion prior of `models.motion_prior` (B.5's lightweight interpolation model
    # without weights): the backbone reads both frames warped to time t by the estimated flows, and every tap of each
    # frame's synthesis samples at that frame's flow + the predicted offset, so the heads learn residual motion and
    # occlusion; "none": the released network (its weights were trained without a prior)
    motion_prior: str = "none"
    dtype: str = "float32"  # compute dtype of the convolutions; the synthesis runs in float32

    def __post_init__(self):
        check_positive(self, "block_out_channels", "head_channels", "kernel_size", "het_groups")
        check_names(self)
        if len(self.block_out_channels) < 2:
            raise ValueError(f"EDSCConfig: block_out_channels needs at least 2 levels, got {self.block_out_channels}")
        if len(self.head_channels) != 2:
            raise ValueError(f"EDSCConfig: head_channels holds the 2 hidden widths of a head, got {self.head_channels}")
        bad = [c for c in self.block_out_channels if c % self.het_groups]
        if bad:
            raise ValueError(f"EDSCConfig: block_out_channels {bad} do not split into het_groups={self.het_groups}")
        if self.kernel_size % 2 == 0:
            raise ValueError(f"EDSCConfig: kernel_size must be odd, got {self.kernel_size}")
        if self.channel_order not in ("rgb", "bgr"):
            raise ValueError(f"EDSCConfig: channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")
        if self.motion_prior not in PRIORS:
            raise ValueError(f"EDSCConfig: motion_prior must be one of {PRIORS}, got {self.motion_prior!r}")

    @classmethod
    def tiny(cls, **overrides) -> EDSCConfig:
        """Three levels of 8 channels and 8-channel heads (frames padded to a multiple of 8): a CPU test size."""
        return cls(**{"block_out_channels": (8, 8, 8), "head_channels": (8, 8), "dtype": "float32", **overrides})

    @property
    def size_multiple(self) -> int:
        """H and W are padded up to a multiple of this (the deepest level is the input / 2**n)."""
        return 2 ** len(self.block_out_channels)


def _grouped_conv(features: int, kernel: int, groups: int, dtype, name: str) -> nn.Conv:
    """A grouped channels-last conv ('same' padding) with `layers.common.conv`'s logical axis names."""
    return nn.Conv(features, (kernel, kernel), padding="SAME", feature_group_count=groups, dtype=dtype,
                   kernel_init=nn.with_logical_partitioning(default_kernel_init,
                                                            ("conv_h", "conv_w", "conv_in", "conv_out")),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)), name=name)


class HetConv(nn.Module):
    """Efficient HetConv (the release's `Efficient_HetConv2d`): conv3x3(x) + conv1x1(x) - conv1x1_(x), where
    conv3x3 and conv1x1_ have `groups` groups and conv1x1 is a full 1x1 conv; all with biases."""

    features: int
    groups: int
    dtype: object = None

    @nn.compact
    def __call__(self, x):
        return (_grouped_conv(self.features, 3, self.groups, self.dtype, "conv3x3")(x)
                + _grouped_conv(self.features, 1, 1, self.dtype, "conv1x1")(x)
                - _grouped_conv(self.features, 1, self.groups, self.dtype, "conv1x1_")(x))


def _aligned_axis(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights of bilinear x2 upsampling with align_corners=True along an axis of n: output i reads
    source s = i (n - 1) / (2n - 1) (float32 as PyTorch computes it), x[floor s] (1 - f) + x[floor s + 1] f."""
    scale = np.float32((n - 1) / (2 * n - 1)) if n > 1 else np.float32(0)
    src = scale * np.arange(2 * n, dtype=np.float32)
    lo = np.minimum(np.floor(src).astype(np.int32), n - 1)
    hi = np.minimum(lo + 1, n - 1)
    frac = (src - lo).astype(np.float32)
    return lo, hi, frac


def upsample_bilinear_aligned(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, 2H, 2W, C): `nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)`."""
    for axis in (1, 2):
        lo, hi, frac = _aligned_axis(x.shape[axis])
        shape = [1] * x.ndim
        shape[axis] = -1
        f = jnp.asarray(frac.reshape(shape), x.dtype)
        x = jnp.take(x, lo, axis=axis) * (1 - f) + jnp.take(x, hi, axis=axis) * f
    return x


def _avg_pool2(x):
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class EDSC(nn.Module):
    """EDSC with the time input: (frame0, frame1, t) -> the frame at time t (module docstring)."""

    config: EDSCConfig

    def _head(self, x, name: str, out: int, dt, sigmoid: bool = False, start=None):
        """3x (conv3x3 + ReLU) at indices 0, 2, 4; bilinear x2; conv3x3 at index 7 (+ sigmoid at 8). With
        `config.blend_init` the last conv starts at zero with bias `start` (out,) (zeros when None)."""
        h0, h1 = self.config.head_channels
        x = nn.relu(conv(h0, dtype=dt, name=f"{name}_0")(x))
        x = nn.relu(conv(h1, dtype=dt, name=f"{name}_2")(x))
        x = nn.relu(conv(out, dtype=dt, name=f"{name}_4")(x))
        init = {}
        if self.config.blend_init:
            bias = np.zeros(out, np.float32) if start is None else np.asarray(start, np.float32)
            init = {"kernel_init": nn.initializers.zeros_init(),
                    "bias_init": lambda key, shape, dtype=jnp.float32: jnp.asarray(bias, dtype).reshape(shape)}
        x = conv(out, dtype=dt, name=f"{name}_7", **init)(upsample_bilinear_aligned(x))
        return jax.nn.sigmoid(x) if sigmoid else x

    def _basic(self, x, name: str, features: int, dt):
        """3x (HetConv + ReLU) at indices 0, 2, 4 (the release's `Basic`)."""
        for i in (0, 2, 4):
            x = nn.relu(HetConv(features, self.config.het_groups, dt, name=f"{name}_{i}")(x))
        return x

    @nn.compact
    def __call__(self, frame0, frame1, t=None):
        """frame0, frame1 (B, H, W, 3) in [0, 1]; t (B,) (or a scalar) in (0, 1), the time of the output between
        frame0 (t = 0) and frame1 (t = 1), not read when `config.multiple` is False -> (B, H, W, 3) float32."""
        c = self.config
        dt = compute_dtype(c.dtype)
        if frame0.shape != frame1.shape or frame0.ndim != 4 or frame0.shape[-1] != 3:
            raise ValueError(f"EDSC: frames must both be (B, H, W, 3), got {frame0.shape} and {frame1.shape}")
        b, h, w, _ = frame0.shape
        if c.multiple:
            if t is None:
                raise ValueError("EDSC: this network takes the time t of the output frame (config.multiple)")
            t = jnp.asarray(t, jnp.float32)
            if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != b):
                raise ValueError(f"EDSC: t must be a scalar or one value per example ({b},), got shape {t.shape}")
        m = c.size_multiple
        ph, pw = math.ceil(h / m) * m - h, math.ceil(w / m) * m - w
        pad = lambda f: jnp.pad(jnp.asarray(f, jnp.float32), ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
        frame0, frame1 = pad(frame0), pad(frame1)

        flows = None  # (F_t0, F_t1) of the motion prior, each (B, Hp, Wp, 2) as (dy, dx)
        if c.motion_prior != "none":
            flows = intermediate_flows(frame0, frame1, t if c.multiple else jnp.full((b,), 0.5), c.motion_prior)
        seen = (frame0, frame1) if flows is None else (backward_warp(frame0, flows[0]), backward_warp(frame1, flows[1]))
        widths, n = c.block_out_channels, len(c.block_out_channels)
        x = jnp.concatenate(seen, axis=-1).astype(dt)
        x = nn.relu(conv(widths[0], dtype=dt, name="moduleConv1_0")(x))
        for i in (2, 4):
            x = nn.relu(HetConv(widths[0], c.het_groups, dt, name=f"moduleConv1_{i}")(x))
        convs = [x]  # level l at 1/2**l of the padded size
        for level in range(1, n):
            convs.append(self._basic(_avg_pool2(convs[-1]), f"moduleConv{level + 1}", widths[level], dt))
        x = _avg_pool2(convs[-1])
        for level in range(n - 1, 0, -1):
            if level < n - 1:
                x = x + convs[level + 1]
            x = self._basic(x, f"moduleDeconv{level + 1}", widths[level], dt)
            x = nn.relu(HetConv(widths[level], c.het_groups, dt, name=f"moduleUpsample{level + 1}_1")(
                upsample_bilinear_aligned(x)))
        combine = x + convs[1]  # (B, Hp/2, Wp/2, w1)

        if c.multiple:
            tmap = jnp.broadcast_to(jnp.broadcast_to(t, (b,))[:, None, None, None], (*combine.shape[:3], 1))
            in0 = jnp.concatenate([combine, tmap.astype(combine.dtype)], axis=-1)
            in1 = jnp.concatenate([combine, (1 - tmap).astype(combine.dtype)], axis=-1)
        else:
            in0 = in1 = combine

        ks = c.kernel_size
        centre = np.eye(ks, dtype=np.float32)[ks - 2]  # the tap at offset 0: fy = 2c - 1 (`_sampling`)
        out = 0.0
        for k, (frame, feats) in enumerate(((frame0, in0), (frame1, in1)), start=1):
            offset_y = self._head(feats, f"moduleOffset{k}x", ks * ks, dt)  # rows (the release's naming: see the op)
            offset_x = self._head(feats, f"moduleOffset{k}y", ks * ks, dt)  # columns
            if flows is not None:
                flow = flows[k - 1]
                offset_y, offset_x = offset_y + flow[..., :1], offset_x + flow[..., 1:]
            out = out + deformable_separable_conv(
                frame,
                self._head(feats, f"moduleVertical{k}", ks, dt, start=centre),
                self._head(feats, f"moduleHorizontal{k}", ks, dt, start=centre),
                offset_y,
                offset_x,
                self._head(feats, f"moduleMask{k}", ks * ks, dt, sigmoid=True),
            )
        if c.use_bias:
            out = out + self._head(combine, "moduleBias", 3, dt).astype(jnp.float32)
        return out[:, :h, :w]


def interpolate(module: EDSC, params, frame0, frame1, t) -> jax.Array:
    """The frames at times t (B,) between frame0 and frame1 (B, H, W, 3), RGB in [-1, 1] as everywhere else in the
    project -> (B, H, W, 3) float32 in [-1, 1]: mapped to the network's [0, 1] and colour order
    (`config.channel_order`) and back; the output is clipped to the range."""
    bgr = module.config.channel_order == "bgr"

    def to_net(x):
        x = (x.astype(jnp.float32) + 1.0) * 0.5
        return x[..., ::-1] if bgr else x

    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (frame0.shape[0],))
    out = module.apply({"params": params}, to_net(frame0), to_net(frame1), t)
    out = out[..., ::-1] if bgr else out
    return jnp.clip(out.astype(jnp.float32) * 2.0 - 1.0, -1.0, 1.0)


def example_inputs(config: EDSCConfig) -> tuple:
    s = config.size_multiple
    return jnp.zeros((1, s, s, 3)), jnp.zeros((1, s, s, 3)), jnp.full((1,), 0.5)


SPEC = register(ModelSpec("edsc", EDSCConfig, EDSC, example_inputs))
