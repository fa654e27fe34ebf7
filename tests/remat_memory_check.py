"""Prints {kind: {policy: {"temp": temp bytes, "loss": ..., "max_grad_diff": ...}}} of a compiled U-Net gradient
for each remat policy, as JSON: XLA's temporary memory of the compiled loss-and-gradient, and the loss and the
largest gradient difference (relative to the largest gradient) against the first policy's, on random parameters.

    python tests/remat_memory_check.py none,full,names unet2d unet_motion unet3d

Run in its own process: XLA's CPU scheduler favours concurrency over memory by default, which hides what remat
saves; with `--xla_cpu_enable_concurrency_optimized_scheduler=false` it schedules for memory as the GPU and TPU
schedulers do, and `memory_analysis()` shows the saving.
"""

import dataclasses
import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np
from helpers import random_params
from remat_configs import tiny_config

from magdiff_jax.models.registry import get_model

policies = sys.argv[1].split(",")
out = {}
for kind in sys.argv[2:]:
    spec = get_model(kind)
    cfg = tiny_config(kind, sample_size=32, blocks=1)  # one cross-attention block: half the compile
    # whole-matrix attention: the blockwise form ("auto" on CPU) already recomputes its scores, whatever the policy
    cfg = dataclasses.replace(cfg, attention_impl="xla")
    video = kind != "unet2d"
    rng = np.random.RandomState(0)
    x = rng.randn(*((1, 4, 32, 32, 4) if video else (4, 32, 32, 4))).astype(np.float32)
    t, c = np.arange(x.shape[0]) * 300 + 5, rng.randn(x.shape[0], 5, 16).astype(np.float32)
    params = random_params(spec.build(cfg), *spec.example_inputs(cfg), scale=0.05)
    out[kind], ref = {}, None
    for policy in policies:
        module = spec.build(dataclasses.replace(cfg, remat_policy=policy))
        loss_fn = lambda p, m=module, x=x, t=t, c=c: jnp.mean(m.apply({"params": p}, x, t, c) ** 2)
        fn = jax.jit(jax.value_and_grad(loss_fn))
        compiled = fn.lower(params).compile()
        loss, grads = compiled(params)
        grads = [np.asarray(g) for g in jax.tree.leaves(grads)]
        ref = ref or (float(loss), grads)
        scale = max(float(np.abs(g).max()) for g in ref[1])
        out[kind][policy] = {"temp": compiled.memory_analysis().temp_size_in_bytes, "loss": float(loss),
                             "max_grad_diff": max(float(np.abs(g - r).max()) for g, r in zip(grads, ref[1],
                                                                                              strict=True)) / scale}
print(json.dumps(out))
