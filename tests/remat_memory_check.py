"""Prints {policy: temp bytes} of a compiled unet2d gradient for each remat policy, as JSON.

Run in its own process: XLA's CPU scheduler favours concurrency over memory by default, which hides what remat
saves; with `--xla_cpu_enable_concurrency_optimized_scheduler=false` it schedules for memory as the GPU and TPU
schedulers do, and `memory_analysis()` shows the saving.
"""

import dataclasses
import json
import os

os.environ["XLA_FLAGS"] = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp

from magdiff_jax.convert.unet2d import example_inputs
from magdiff_jax.models.unet2d import UNet2DConditionModel, UNet2DConfig

CFG = UNet2DConfig(
    sample_size=32, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=16,
    attention_head_dim=2, norm_num_groups=4,
)
x, t, c = jnp.zeros((4, 32, 32, 4)), jnp.zeros((4,)), jnp.zeros((4, 5, 16))
abstract = jax.eval_shape(UNet2DConditionModel(CFG).init, jax.random.key(0), *example_inputs(CFG))["params"]
params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.value.shape, a.value.dtype), abstract,
                      is_leaf=lambda a: hasattr(a, "value"))
out = {}
for policy in ("none", "full", "names"):
    module = UNet2DConditionModel(dataclasses.replace(CFG, remat_policy=policy))
    grad = jax.jit(jax.grad(lambda p, m=module: jnp.mean(m.apply({"params": p}, x, t, c) ** 2)))
    out[policy] = grad.lower(params).compile().memory_analysis().temp_size_in_bytes
print(json.dumps(out))
