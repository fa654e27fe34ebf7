"""The CPU tuning (`magdiff_jax.cpu`) is off unless switched on, and without it every U-Net is plain JAX/Flax:

- importing `magdiff_jax` and `magdiff_jax.cpu` switches nothing (a fresh process); `tuning()` sets the state for its
  block and puts the previous one back; `enable()` is idempotent;
- with the tuning off, `jax.jvp` goes through each U-Net (unet2d, unet3d, unet_motion and the MagDiff U-Net, on the
  tiny configs of `remat_configs`) and agrees with reverse mode: the tangent along a random direction equals the
  gradient's dot product with it (fp32, 1e-5 of the sum of the products' magnitudes);
- with the tuning on (CPU), the loss and its gradient equal those with it off up to summation order: the loss to
  1e-5 relative, every gradient to 1e-5 of the largest gradient (fp32); there auto attention takes blockwise (the
  CPU rule's thresholds lowered to the tiny models' largest attentions, blocks of half a pair's queries) while
  with the tuning off it never does;
- xla and blockwise attention take `jax.jvp` with the tuning off, blockwise's tangent equal to xla's.
"""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_params, rel_err
from remat_configs import tiny_config, tiny_magdiff_config

from magdiff_jax import cpu
from magdiff_jax.cpu import kernels as cpu_kernels
from magdiff_jax.layers import attention as attn_lib
from magdiff_jax.layers import kernels

KINDS = ("unet2d", "unet3d", "unet_motion", "magdiff")
B, F, S = 2, 3, 8  # batch, frames, latent size


def test_importing_switches_nothing():
    code = ("import magdiff_jax, magdiff_jax.cpu\n"
            "from magdiff_jax.layers import kernels\n"
            "print(magdiff_jax.cpu.enabled(), kernels.all_defaults(), magdiff_jax.cpu.compiler_options())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "None"]


def test_tuning_sets_and_restores_the_state():
    before = cpu.enabled(), kernels.active()
    with cpu.tuning():
        assert cpu.enabled()
        assert kernels.get("matmul") is cpu_kernels.KERNELS["matmul"]
        cpu.enable()  # idempotent
        assert kernels.active() == {**kernels.DEFAULTS, **cpu_kernels.KERNELS}
        with cpu.tuning(False):
            assert not cpu.enabled() and kernels.all_defaults()
        assert cpu.enabled() and kernels.get("attention") is cpu_kernels.KERNELS["attention"]
    assert (cpu.enabled(), kernels.active()) == before
    with pytest.raises(ValueError, match="not override points"):
        kernels.install({"matmull": jnp.dot})


def _model(kind):
    """(module, inputs, keyword inputs) of a tiny U-Net of `kind`, 8x8 latents, 3 frames for the video kinds."""
    rng = np.random.RandomState(0)
    t, ctx = np.array([3, 700]), rng.randn(B, 5, 16).astype(np.float32)
    if kind == "unet2d":
        from magdiff_jax.models.unet2d import UNet2DConditionModel

        return UNet2DConditionModel(tiny_config(kind)), (rng.randn(B, S, S, 4).astype(np.float32), t, ctx), {}
    x = rng.randn(B, F, S, S, 4).astype(np.float32)
    if kind == "unet3d":
        from magdiff_jax.models.unet3d import UNet3DConditionModel

        return UNet3DConditionModel(tiny_config(kind)), (x, t, ctx), {}
    if kind == "unet_motion":
        from magdiff_jax.models.unet_motion import UNetMotionModel

        return UNetMotionModel(tiny_config(kind)), (x, t, ctx), {}
    from magdiff_jax.models.magdiff import MagDiffUNet

    grids = tuple(rng.randn(B, F, s, s, 4).astype(np.float32) for s in (12, 10, 8))
    embeds = rng.randn(B, F, 9, 12).astype(np.float32)
    return MagDiffUNet(tiny_magdiff_config()), (x, t, ctx), dict(entity_latents=grids, image_embeds=embeds)


@pytest.fixture(scope="module", params=KINDS)
def case(request):
    """A tiny U-Net with random parameters, and a loss of its parameters and noisy input: the mean squared error
    against a random target. `loss()` gives a new function each call, so each is traced afresh (JAX reuses a trace
    per function)."""
    module, (x, t, ctx), kw = _model(request.param)
    params = random_params(module, x, t, ctx, seed=1, scale=0.1, **kw)
    target = np.random.RandomState(2).randn(*x.shape).astype(np.float32)

    def loss():
        return lambda p, x: jnp.mean((module.apply({"params": p}, x, t, ctx, **kw) - target) ** 2)

    return request.param, params, x, loss


def _leaves(*trees):
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(trees)]


@pytest.fixture(scope="module")
def tuning_off(case):
    """With the tuning off, in one compiled program: the loss, its tangent along a random direction of the
    parameters and input, and its gradient (the reference of both tests below)."""
    _, params, x, loss = case
    rng = np.random.RandomState(3)
    d_params = jax.tree.map(lambda a: rng.standard_normal(np.shape(a)).astype(np.float32), params)
    d_x = rng.standard_normal(x.shape).astype(np.float32)
    with cpu.tuning(False):
        fn = loss()
        blockwise = "scan" in str(jax.make_jaxpr(fn)(params, x))
        both = jax.jit(lambda p, x, dp, dx: (jax.jvp(fn, (p, x), (dp, dx)), jax.grad(fn, (0, 1))(p, x)))
        (value, tangent), grads = both(params, x, d_params, d_x)
    return dict(value=value, tangent=tangent, grads=grads, direction=(d_params, d_x), blockwise=blockwise)


def test_forward_and_reverse_mode_agree_with_the_tuning_off(case, tuning_off):
    kind = case[0]
    products = [g * d for g, d in zip(_leaves(tuning_off["grads"]), _leaves(*tuning_off["direction"]), strict=True)]
    want = sum(float(p.sum()) for p in products)
    scale = sum(float(np.abs(p).sum()) for p in products)
    assert np.isfinite(float(tuning_off["value"]))
    tangent = float(tuning_off["tangent"])
    assert abs(tangent - want) <= 1e-5 * scale, (kind, tangent, want, scale)


def test_the_tuning_changes_results_only_in_summation_order(case, tuning_off, monkeypatch):
    kind, params, x, loss = case
    # auto's CPU rule takes blockwise for each model's largest attentions (the 8x8 spatial self-attentions: at least
    # 2 x 2 x 64 x 64 scores), and blockwise splits each pair's 64 queries into 2 blocks; with the tuning off auto
    # never takes it (the rule and the block size are the tuning's alone: the reference was traced without them)
    monkeypatch.setattr(cpu_kernels, "AUTO_BLOCKWISE_MIN_SCORES", B * 2 * 64 * 64)
    monkeypatch.setattr(attn_lib, "BLOCK_SCORES", 32 * 64)
    with cpu.tuning(False):
        assert "scan" not in str(jax.make_jaxpr(loss())(params, x)), kind
    assert not tuning_off["blockwise"], kind
    with cpu.tuning(True):
        fn = loss()
        assert ("scan" in str(jax.make_jaxpr(fn)(params, x))) == (jax.default_backend() == "cpu"), kind
        on_loss, on_grads = jax.jit(jax.value_and_grad(fn, (0, 1)))(params, x)
    off_loss = float(tuning_off["value"])
    assert abs(float(on_loss) - off_loss) <= 1e-5 * abs(off_loss), kind
    off, on = _leaves(tuning_off["grads"]), _leaves(on_grads)
    largest = max(np.abs(g).max() for g in off)
    worst = max(np.abs(a - b).max() for a, b in zip(on, off, strict=True))
    assert worst <= 1e-5 * largest, (kind, worst, largest)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_takes_jvp_with_the_tuning_off(monkeypatch, causal):
    """xla and blockwise attention (blocks of 2 pairs and of 3 queries of one pair) under `jax.jvp`: blockwise's
    value and tangent equal xla's (fp32, 1e-5 relative), and xla's tangent equals a central difference of it
    (float64 inputs' worth of accuracy is not needed: 1e-2 relative, step 1e-3)."""
    rng = np.random.RandomState(0)
    q, k, v = (rng.randn(2, 6, 3, 8).astype(np.float32) for _ in range(3))
    dq, dk, dv = (rng.randn(2, 6, 3, 8).astype(np.float32) for _ in range(3))

    def jvp(impl):
        fn = lambda q, k, v: attn_lib.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
        return jax.jvp(fn, (q, k, v), (dq, dk, dv)), fn

    with cpu.tuning(False):
        (out, tangent), fn = jvp("xla")
        for block in (2 * 6 * 6, 3 * 6):
            monkeypatch.setattr(attn_lib, "BLOCK_SCORES", block)
            (b_out, b_tangent), _ = jvp("blockwise")
            assert rel_err(b_out, out) < 1e-5 and rel_err(b_tangent, tangent) < 1e-5
        h = 1e-3
        diff = (fn(q + h * dq, k + h * dk, v + h * dv) - fn(q - h * dq, k - h * dk, v - h * dv)) / (2 * h)
    assert rel_err(tangent, diff) < 1e-2
