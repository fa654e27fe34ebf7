"""Gradient checkpointing by config string, for every U-Net kind: every block of every kind goes through the same
`layers.remat.remat` wrapper, traced here for each kind and policy (one `remat` per block, carrying that policy;
none for "none"); `full` gives the same loss and gradients as `none` (compiled and run for the unet3d, one
cross-attention block), the parameter tree does not depend on the policy, and remat lowers the temporary memory of
the compiled gradient (XLA's own `memory_analysis()`, for the one-block unet3d at 32x32)."""

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
from helpers import random_params
from remat_configs import tiny_config

from magdiff_jax.convert import get_kind

KINDS = ("unet2d", "unet3d", "unet_motion")
MEMORY_KINDS = ("unet3d",)  # 2 compiles each; the others remat through the same wrapper


def _inputs(kind):
    rng = np.random.RandomState(0)
    video = kind != "unet2d"
    x = rng.randn(*((1, 3, 8, 8, 4) if video else (2, 8, 8, 4))).astype(np.float32)
    b = x.shape[0]
    return x, np.arange(b) * 300 + 5, rng.randn(b, 5, 16).astype(np.float32)


def _loss(module, kind):
    x, t, c = _inputs(kind)
    return lambda p: jnp.mean(module.apply({"params": p}, x, t, c) ** 2)


def _remat_policies(jaxpr) -> list:
    """The policy of every remat (jax.checkpoint) in a traced program, nested ones included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith(("remat", "checkpoint")):
            found.append(eqn.params.get("policy"))
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None:
                found += _remat_policies(getattr(inner, "jaxpr", inner))
    return found


@pytest.mark.parametrize("kind", KINDS)
def test_every_block_is_checkpointed_with_its_policy(kind):
    """Traced, not compiled: the loss of a one-block U-Net holds one remat per block (down, mid, up),
    each with the policy the config string names, and none with policy "none"; the parameter tree is the same."""
    from magdiff_jax.layers.remat import checkpoint_policy

    spec, cfg = get_kind(kind), tiny_config(kind, blocks=1)
    params = jax.eval_shape(lambda: spec.build(cfg).init(jax.random.key(0), *spec.example_inputs(cfg)))["params"]
    for policy in ("none", "full", "dots_saveable"):
        module = spec.build(dataclasses.replace(cfg, remat_policy=policy))
        tree = jax.eval_shape(lambda m=module: m.init(jax.random.key(0), *spec.example_inputs(cfg)))["params"]
        assert jax.tree.structure(tree) == jax.tree.structure(params), (kind, policy)  # same checkpoints
        found = _remat_policies(jax.make_jaxpr(_loss(module, kind))(params).jaxpr)
        if policy == "none":
            assert found == [], kind
        else:
            want = checkpoint_policy(policy)
            assert len(found) == 3 and all(f is want or f == want for f in found), (kind, policy, found)


def test_same_loss_and_gradients():
    """unet3d (one cross-attention block): full remat == none, loss and every gradient."""
    kind = "unet3d"
    spec, cfg = get_kind(kind), tiny_config(kind, blocks=1)
    params = random_params(spec.build(cfg), *spec.example_inputs(cfg), scale=0.05)

    def loss_grad(policy):
        return jax.jit(jax.value_and_grad(_loss(spec.build(dataclasses.replace(cfg, remat_policy=policy)), kind)))

    ref_loss, ref_grads = loss_grad("none")(params)
    loss, grads = loss_grad("full")(params)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_remat_lowers_peak_memory():
    """XLA `memory_analysis()` of the compiled gradient (32x32 latents, 1 video of 4 frames): full remat needs at
    most 80% of the temporary memory of none (a separate process: remat_memory_check.py)."""
    script = Path(__file__).with_name("remat_memory_check.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)])}
    proc = subprocess.run([sys.executable, str(script), "none,full", *MEMORY_KINDS], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    temp = json.loads(proc.stdout.strip().splitlines()[-1])
    print("temp bytes per policy", temp)
    for kind in MEMORY_KINDS:
        assert temp[kind]["full"] < 0.8 * temp[kind]["none"], kind


def test_unknown_policy_is_refused():
    cfg = tiny_config("unet2d")
    with pytest.raises(ValueError, match="unknown remat policy"):
        dataclasses.replace(cfg, remat_policy="most")
    with pytest.raises(ValueError, match="not tags"):
        dataclasses.replace(cfg, remat_policy="names", remat_save_names=("qkv",))
