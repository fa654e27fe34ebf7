"""The VFI stage's parameter-free motion prior (`magdiff_jax.models.motion_prior`) and EDSC with it: the warp is
bilinear with a replicate border, bilateral matching finds known motions (global, sub-pixel, larger than the finest
search, and an object moving over a static textured background), and the untrained `blend_init` network with the
prior blends the two frames warped to time t."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magdiff_jax.models.motion_prior import backward_warp, bilateral_flow, intermediate_flows


def _texture(h, w, seed=0):
    """A random texture in [0, 1] with detail at every scale, as natural images have: white noise blurred at
    several widths, summed, (h, w, 3)."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = sum(gaussian_filter(rng.normal(0, 1, (h, w, 3)), (s, s, 0)) * s for s in (1.0, 2.0, 4.0))
    return np.clip(0.5 + 0.12 * out / out.std(), 0, 1).astype(np.float32)


def _shifted(image, shift, h, w, margin):
    """The window (h, w) of `image` at (margin, margin) moved by shift (dy, dx) (bilinear for fractions)."""
    flow = np.broadcast_to(np.asarray(shift, np.float32), (1, *image.shape[:2], 2))
    moved = np.asarray(backward_warp(jnp.asarray(image[None]), jnp.asarray(flow)))[0]
    return moved[margin:margin + h, margin:margin + w]


def test_backward_warp():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(size=(2, 7, 9, 3)), jnp.float32)
    zero = jnp.zeros((2, 7, 9, 2))
    np.testing.assert_array_equal(np.asarray(backward_warp(x, zero)), np.asarray(x))
    moved = backward_warp(x, zero.at[..., 0].set(1.0).at[..., 1].set(-2.0))  # sample at (y + 1, x - 2)
    np.testing.assert_allclose(np.asarray(moved[:, :-1, 2:]), np.asarray(x[:, 1:, :-2]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(moved[:, -1, 2:]), np.asarray(x[:, -1, :-2]), atol=1e-6)  # border row kept
    half = backward_warp(x, zero.at[..., 1].set(0.5))
    np.testing.assert_allclose(np.asarray(half[:, :, :-1]), np.asarray((x[:, :, :-1] + x[:, :, 1:]) / 2), atol=1e-6)
    with pytest.raises(ValueError, match=r"flow must be \(B, H, W, 2\)"):
        backward_warp(x, jnp.zeros((2, 7, 9, 3)))


@pytest.mark.parametrize("motion", [(2.0, -3.0), (0.0, 9.0), (-6.0, 1.5)])
def test_bilateral_flow_finds_a_global_motion(motion):
    """frame1 is frame0 moved by `motion` (a point at p in frame0 is at p + motion in frame1), including a motion
    larger than the finest level's search and a fractional one: away from the borders, the median within 0.1 px,
    95% of the pixels within 1 px and half within 0.3 px."""
    h = w = 32
    margin = 12
    image = _texture(h + 2 * margin, w + 2 * margin)
    f0 = _shifted(image, (0.0, 0.0), h, w, margin)
    f1 = _shifted(image, (-motion[0], -motion[1]), h, w, margin)
    t = jnp.asarray([0.3, 0.6])
    v = np.asarray(jax.jit(bilateral_flow)(jnp.asarray(np.stack([f0, f0])), jnp.asarray(np.stack([f1, f1])), t))
    inner = v[:, 8:-8, 8:-8]
    for b in range(2):
        err = np.linalg.norm(inner[b] - np.asarray(motion), axis=-1)
        np.testing.assert_allclose(np.median(inner[b].reshape(-1, 2), axis=0), motion, atol=0.1)
        assert np.mean(err < 1.0) > 0.95 and np.mean(err < 0.3) > 0.5, (np.mean(err < 1.0), np.mean(err < 0.3))


def test_moving_object_over_a_static_background():
    """A flat square moving 8 px right over a static texture: inside the square at time t the motion is found, and
    the background away from it keeps no motion (block matching would spread the object's motion around it)."""
    h = w = 32
    background = _texture(h, w, seed=1)
    colour = np.asarray([0.9, 0.1, 0.1], np.float32)

    def frame(x0):
        f = background.copy()
        f[12:22, x0:x0 + 10] = colour
        return f

    f0, f1 = frame(4), frame(12)
    t = 0.5
    v = np.asarray(bilateral_flow(jnp.asarray(f0[None]), jnp.asarray(f1[None]), t))[0]
    square = v[13:21, 9:17]  # the square at t = 0.5 spans columns 8..17
    np.testing.assert_allclose(np.median(square.reshape(-1, 2), axis=0), (0.0, 8.0), atol=0.5)  # flat: less exact
    far = np.ones((h, w), bool)
    far[8:26, 0:26] = False
    assert np.mean(np.linalg.norm(v[far], axis=-1) < 0.25) > 0.95
    # the two frames warped to t by the prior's flows and averaged: closer to the truth than blending by over 3 dB
    f_t0, f_t1 = intermediate_flows(jnp.asarray(f0[None]), jnp.asarray(f1[None]), t)
    warped = 0.5 * backward_warp(jnp.asarray(f0[None]), f_t0) + 0.5 * backward_warp(jnp.asarray(f1[None]), f_t1)
    truth = frame(8)
    err_prior = float(np.mean((np.asarray(warped)[0] - truth) ** 2))
    err_blend = float(np.mean(((f0 + f1) / 2 - truth) ** 2))
    assert err_prior < err_blend / 2, (err_prior, err_blend)  # over 3 dB better


def test_intermediate_flows_and_errors():
    rng = np.random.default_rng(2)
    f0, f1 = (jnp.asarray(rng.uniform(size=(2, 16, 16, 3)), jnp.float32) for _ in range(2))
    assert intermediate_flows(f0, f1, 0.5, "none") is None
    t = jnp.asarray([0.25, 0.75])
    f_t0, f_t1 = intermediate_flows(f0, f1, t)
    v = np.asarray(bilateral_flow(f0, f1, t))
    tb = np.asarray(t)[:, None, None, None]
    yx = np.stack(np.meshgrid(np.arange(16.0), np.arange(16.0), indexing="ij"), -1)
    for flow, scale in ((f_t0, -tb), (f_t1, 1 - tb)):  # scale x v, clipped to end inside the frame
        np.testing.assert_allclose(np.asarray(flow), np.clip(yx + scale * v, 0, 15) - yx, atol=1e-5)
    with pytest.raises(ValueError, match="motion prior must be one of"):
        intermediate_flows(f0, f1, t, "raft")
    with pytest.raises(ValueError, match="frames must both be"):
        bilateral_flow(f0, f1[:, :8], t)
    # no gradient flows into the frames through the prior
    g = jax.grad(lambda a: jnp.sum(bilateral_flow(a, f1, t)))(f0)
    assert float(jnp.abs(g).max()) == 0.0


def test_edsc_with_the_prior_starts_at_the_blend_of_the_warped_frames():
    """`motion_prior="bilateral"` with `blend_init`: the untrained network outputs the average of the two frames
    warped to t by the prior's flows (the centre taps sample at the flow), borders included (the flows end inside
    the frame, where the released synthesis op samples as the warp does)."""
    from magdiff_jax.models.edsc import EDSC, EDSCConfig

    module = EDSC(EDSCConfig.tiny(blend_init=True, motion_prior="bilateral"))
    image = _texture(40, 48, seed=3)
    f0, f1 = image[None, 4:36, 4:44], image[None, 2:34, 7:47]  # frame0 moved by (2, -3)
    f0, f1 = np.concatenate([f0, f0]), np.concatenate([f1, f1])
    t = jnp.asarray([0.3, 0.6])
    params = module.init(jax.random.key(0), f0, f1, t)["params"]
    out = module.apply({"params": params}, f0, f1, t)
    f_t0, f_t1 = intermediate_flows(jnp.asarray(f0), jnp.asarray(f1), t)
    ref = 0.5 * backward_warp(jnp.asarray(f0), f_t0) + 0.5 * backward_warp(jnp.asarray(f1), f_t1)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
    blend = (f0 + f1) / 2
    assert float(np.abs(np.asarray(out) - blend).max()) > 0.05  # it is not the plain blend


def test_prior_config_and_export_errors(tmp_path):
    from magdiff_jax.convert.edsc import write_edsc_file
    from magdiff_jax.models.edsc import EDSCConfig
    from magdiff_jax.utils.errors import ConversionError

    with pytest.raises(ValueError, match="motion_prior must be one of"):
        EDSCConfig.tiny(motion_prior="flow")
    with pytest.raises(ConversionError, match=r"bilateral.*write a folder"):
        write_edsc_file(EDSCConfig.tiny(motion_prior="bilateral"), {}, tmp_path / "edsc.safetensors")
    assert not (tmp_path / "edsc.safetensors").exists()
