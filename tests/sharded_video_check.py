"""Run in a subprocess with 8 fake CPU devices: each video U-Net kind named on the command line, initialised
directly sharded over fsdp=2 x tensor=2 with its frames over context=2, gives the unsharded output. Prints JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import flax.linen as nn
import jax
import numpy as np
from helpers import random_params
from jax.sharding import NamedSharding, PartitionSpec
from remat_configs import tiny_config

from magdiff_jax import sharding
from magdiff_jax.convert import get_kind

jax.config.update("jax_default_matmul_precision", "highest")

results = {}
for kind in sys.argv[1:]:
    spec = get_kind(kind)
    cfg = tiny_config(kind, sample_size=8)
    module = spec.build(cfg)
    rng = np.random.RandomState(0)
    x = rng.randn(2, 4, 8, 8, 4).astype(np.float32)
    t = np.array([10, 800])
    ctx = rng.randn(2, 6, 16).astype(np.float32)
    init_args = spec.example_inputs(cfg)
    # random weights everywhere (the temporal outputs too, so the temporal layers matter); no init compile
    params = random_params(module, *init_args, scale=0.05)
    apply = jax.jit(lambda p, x, t, c, m=module: m.apply({"params": p}, x, t, c))
    ref = np.asarray(apply(params, x, t, ctx))

    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 2, "context": 2})
    shardings = nn.meta.unbox(sharding.param_shardings(sharding.abstract_init(module, *init_args)["params"], mesh))
    sparams = jax.tree.map(jax.device_put, params, shardings)
    video = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "context"))
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with sharding.activation_rules_context(mesh):
        out = jax.jit(lambda p, x, t, c, m=module: m.apply({"params": p}, x, t, c))(
            sparams, jax.device_put(x, video), jax.device_put(t, batch), jax.device_put(ctx, batch))
    results[kind] = {
        "max_abs_diff": float(np.abs(np.asarray(out) - ref).max()),
        "sharded_leaves": sum(1 for s in jax.tree.leaves(shardings) if any(a is not None for a in s.spec)),
        "total_leaves": len(jax.tree.leaves(shardings)),
        "devices": len(out.sharding.device_set),
    }
print(json.dumps(results))
