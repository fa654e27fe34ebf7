"""Gradient checkpointing by config string: every policy gives the same outputs and gradients as none, and
`full` needs less temporary memory (XLA's own `memory_analysis()` of the compiled gradient)."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magdiff_jax.convert.unet2d import example_inputs
from magdiff_jax.models.unet2d import UNet2DConditionModel, UNet2DConfig

CFG = UNet2DConfig(
    sample_size=8, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=16,
    attention_head_dim=2, norm_num_groups=4,
)


def _loss_grad(policy: str):
    module = UNet2DConditionModel(dataclasses.replace(CFG, remat_policy=policy, remat_save_names=("attention", "mlp")))

    def loss(p, x, t, c):
        return jnp.mean(module.apply({"params": p}, x, t, c) ** 2)

    return module, jax.jit(jax.value_and_grad(loss))


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 8, 8, 4).astype(np.float32)
    ctx = rng.randn(2, 5, 16).astype(np.float32)
    t = np.array([5, 600])
    module = UNet2DConditionModel(CFG)
    params = jax.jit(module.init)(jax.random.key(0), *example_inputs(CFG))["params"]
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(1), a.shape), jax.tree.map(
        lambda a: a.value if hasattr(a, "value") else a, params, is_leaf=lambda a: hasattr(a, "value")))
    return params, x, t, ctx


@pytest.fixture(scope="module")
def reference(inputs):
    _, fn = _loss_grad("none")
    return fn(*inputs)


@pytest.mark.parametrize("policy", ["full", "names"])
def test_same_loss_and_gradients(policy, inputs, reference):
    _, fn = _loss_grad(policy)
    loss, grads = fn(*inputs)
    ref_loss, ref_grads = reference
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_params_tree_does_not_depend_on_policy(inputs):
    params = inputs[0]
    module, _ = _loss_grad("full")
    abstract = jax.eval_shape(module.init, jax.random.key(0), *example_inputs(CFG))["params"]
    assert jax.tree.structure(jax.tree.map(lambda a: 0, abstract, is_leaf=lambda a: hasattr(a, "value"))) == \
        jax.tree.structure(jax.tree.map(lambda a: 0, params))


def test_remat_lowers_peak_memory():
    """XLA `memory_analysis()` of the compiled gradient (32x32 latents, batch 4): full and named-tensor remat
    need less temporary memory than none (a separate process: see remat_memory_check.py)."""
    script = Path(__file__).with_name("remat_memory_check.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    temp = json.loads(proc.stdout.strip().splitlines()[-1])
    print("temp bytes per policy", temp)
    assert temp["full"] < 0.8 * temp["none"]
    assert temp["names"] < temp["none"]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown remat policy"):
        dataclasses.replace(CFG, remat_policy="most")
    with pytest.raises(ValueError, match="not tags"):
        dataclasses.replace(CFG, remat_policy="names", remat_save_names=("qkv",))
