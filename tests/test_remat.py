"""Gradient checkpointing by config string, for every U-Net kind: every block of every kind goes through the same
`layers.remat.remat` wrapper, traced here for each kind and policy (one `remat` per block, carrying that policy;
none for "none"); the parameter tree does not depend on the policy; and for the one-block unet3d at 32x32, `full`
gives the same loss and gradients as `none` from compiled programs whose temporary memory (XLA's own
`memory_analysis()`) it lowers."""

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
from remat_configs import tiny_config

from magdiff_jax.models.registry import get_model

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
    each with the policy the config string names, and none with policy "none"; the parameter tree is the same.
    Besides them, each TemporalConv (unet3d: 20) holds its own checkpoint without a policy (it recomputes its
    shifted frames in the backward); with a policy they are inside the blocks' checkpoints, whose bodies
    `_remat_policies` does not enter."""
    from magdiff_jax.layers.remat import checkpoint_policy

    spec, cfg = get_model(kind), tiny_config(kind, blocks=1)
    params = jax.eval_shape(lambda: spec.build(cfg).init(jax.random.key(0), *spec.example_inputs(cfg)))["params"]
    for policy in ("none", "full", "dots_saveable"):
        module = spec.build(dataclasses.replace(cfg, remat_policy=policy))
        tree = jax.eval_shape(lambda m=module: m.init(jax.random.key(0), *spec.example_inputs(cfg)))["params"]
        assert jax.tree.structure(tree) == jax.tree.structure(params), (kind, policy)  # same checkpoints
        found = _remat_policies(jax.make_jaxpr(_loss(module, kind))(params).jaxpr)
        own = (20 if kind == "unet3d" else 0) if policy == "none" else 0  # else inside the blocks' checkpoints
        assert found.count(None) == own, (kind, policy, found)
        found = [f for f in found if f is not None]
        if policy == "none":
            assert found == [], kind
        else:
            want = checkpoint_policy(policy)
            assert len(found) == 3 and all(f is want or f == want for f in found), (kind, policy, found)


def test_full_remat_gives_the_same_loss_and_gradients_in_less_memory():
    """The compiled loss and gradient of the unet3d (one cross-attention block, 32x32 latents, 1 video of 4 frames,
    random parameters), full remat against none: the same loss (1e-6 relative) and gradients (1e-5 of the largest),
    and XLA `memory_analysis()` gives full remat at most 80% of the temporary memory of none (a separate process,
    remat_memory_check.py, whose scheduler settings show the saving; the same two programs serve both checks)."""
    script = Path(__file__).with_name("remat_memory_check.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(Path(__file__).parent)])}
    proc = subprocess.run([sys.executable, str(script), "none,full", *MEMORY_KINDS], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print("per policy", out)
    for kind in MEMORY_KINDS:
        none, full = out[kind]["none"], out[kind]["full"]
        assert abs(full["loss"] - none["loss"]) <= 1e-6 * abs(none["loss"]) and full["max_grad_diff"] <= 1e-5, out
        assert full["temp"] < 0.8 * none["temp"], kind


def test_unknown_policy_is_refused():
    cfg = tiny_config("unet2d")
    with pytest.raises(ValueError, match="unknown remat policy"):
        dataclasses.replace(cfg, remat_policy="most")
    with pytest.raises(ValueError, match="not tags"):
        dataclasses.replace(cfg, remat_policy="names", remat_save_names=("qkv",))
