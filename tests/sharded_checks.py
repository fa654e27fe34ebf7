"""Run in a subprocess with 8 fake CPU devices (XLA_FLAGS set before JAX is imported); prints one JSON line.

unet2d: initialised directly sharded over fsdp=2 x tensor=4, the same parameters and output as the unsharded model;
gradients on data=2 x fsdp=2 x tensor=2 equal the unsharded ones; `load_torch` places a checkpoint directly onto
given shardings. Each video U-Net kind named on the command line: initialised directly sharded over
fsdp=2 x tensor=2 with its frames over context=2, the unsharded output. One process for both (one JAX start-up).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from helpers import random_params, rel_err
from jax.sharding import NamedSharding, PartitionSpec
from remat_configs import tiny_config

from magdiff_jax import sharding
from magdiff_jax.models.registry import get_model
from magdiff_jax.models.unet2d import UNet2DConditionModel, UNet2DConfig
from magdiff_jax.utils.prng import init_key


def unet2d_checks() -> dict:
    cfg = UNet2DConfig(
        sample_size=16, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=(4, 8), use_linear_projection=True, norm_num_groups=8,
    )
    module = UNet2DConditionModel(cfg)
    rng = np.random.RandomState(0)
    x = rng.randn(4, 16, 16, 4).astype(np.float32)
    t = np.array([1, 250, 500, 999])
    ctx = rng.randn(4, 8, 32).astype(np.float32)
    key = jax.random.key(42)

    # jitted: compiling the init once is about twice as fast as running it op by op
    params = jax.jit(lambda k: nn.meta.unbox(module.init(init_key(k), x[:1], t[:1], ctx[:1])["params"]))(key)
    apply = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))
    ref = np.asarray(apply(params, x, t, ctx))

    results = {}
    for sizes in ({"fsdp": 2, "tensor": 4},):
        mesh = sharding.make_mesh(sizes)
        sparams, shardings = sharding.init_sharded(module, key, x[:1], t[:1], ctx[:1], mesh=mesh)
        sharded_leaves = sum(1 for s in jax.tree.leaves(shardings) if any(a is not None for a in s.spec))
        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        with sharding.activation_rules_context(mesh):
            out = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c))(
                sparams, jax.device_put(x, batch), jax.device_put(t, batch), jax.device_put(ctx, batch))
        param_diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                         for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(sparams)))
        results["x".join(f"{k}{v}" for k, v in sizes.items())] = {
            "max_abs_diff": float(np.abs(np.asarray(out) - ref).max()),
            "param_max_abs_diff": param_diff,
            "sharded_leaves": sharded_leaves,
            "total_leaves": len(jax.tree.leaves(shardings)),
            "devices": len(out.sharding.device_set),
            "example_spec": str(shardings["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn1"]["to_q"]
                                ["kernel"].spec),
        }
    # gradients on a mesh that shards the batch over data x fsdp and the parameters over fsdp x tensor (the trainer's
    # layout) equal the unsharded ones: XLA's SPMD partitioner once got conv weight gradients wrong here when a conv
    # kernel had both its input channels (fsdp) and output channels (tensor) sharded

    def loss(p, x, t, c):
        return jnp.mean(module.apply({"params": p}, x, t, c) ** 2)

    ref_grads = jax.jit(jax.grad(loss))(params, x, t, ctx)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings3 = sharding.param_shardings(sharding.abstract_init(module, x[:1], t[:1], ctx[:1])["params"], mesh)
    sparams = jax.device_put(params, shardings3)  # (initialising directly sharded is checked above)
    batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    with sharding.activation_rules_context(mesh):
        grads = jax.jit(jax.grad(loss), in_shardings=(shardings3, batch, batch, batch), out_shardings=shardings3)(
            sparams, x, t, ctx)
    results["grads_data2xfsdp2xtensor2"] = {
        "max_rel_err": max(rel_err(b, a) for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads))),
        "sharded_leaves": sum(1 for s in jax.tree.leaves(shardings3) if any(a is not None for a in s.spec)),
    }

    # the converter places each tensor with its sharding as it loads (never whole on one device)
    import tempfile

    from magdiff_jax.convert import load_torch, save_torch

    with tempfile.TemporaryDirectory() as tmp:
        save_torch("unet2d", module, params, tmp)
        _, loaded = load_torch("unet2d", tmp, shardings=shardings)
    results["load_torch_sharded"] = {
        "same_values": all(np.array_equal(np.asarray(a), np.asarray(b))
                           for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded))),
        "same_shardings": all(a.sharding == s for a, s in zip(jax.tree.leaves(loaded), jax.tree.leaves(shardings))),
    }
    return results


def video_checks(kinds) -> dict:
    results = {}
    for kind in kinds:
        spec = get_model(kind)
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
    return results


if __name__ == "__main__":
    print(json.dumps({"unet2d": unet2d_checks(), "video": video_checks(sys.argv[1:])}))
