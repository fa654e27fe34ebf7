"""Prints {kind: {policy: temp bytes}} of a compiled U-Net gradient for each remat policy, as JSON.

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
from remat_configs import tiny_config

from magdiff_jax.convert import get_kind

policies = sys.argv[1].split(",")
out = {}
for kind in sys.argv[2:]:
    spec = get_kind(kind)
    cfg = tiny_config(kind, sample_size=32, blocks=1)  # one cross-attention block: half the compile
    # whole-matrix attention: the blockwise form ("auto" on CPU) already recomputes its scores, whatever the policy
    cfg = dataclasses.replace(cfg, attention_impl="xla")
    video = kind != "unet2d"
    x = jnp.zeros((1, 4, 32, 32, 4) if video else (4, 32, 32, 4))
    t, c = jnp.zeros((x.shape[0],)), jnp.zeros((x.shape[0], 5, 16))
    abstract = jax.eval_shape(spec.build(cfg).init, jax.random.key(0), *spec.example_inputs(cfg))["params"]
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.value.shape, a.value.dtype), abstract,
                          is_leaf=lambda a: hasattr(a, "value"))
    out[kind] = {}
    for policy in policies:
        module = spec.build(dataclasses.replace(cfg, remat_policy=policy))
        grad = jax.jit(jax.grad(lambda p, m=module, x=x, t=t, c=c: jnp.mean(m.apply({"params": p}, x, t, c) ** 2)))
        out[kind][policy] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
print(json.dumps(out))
