"""Mesh construction, logical-axis rules, and a unet2d initialised directly sharded on 8 fake CPU devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import pytest
from jax.sharding import PartitionSpec

from magdiff_jax import sharding


def test_mesh_shape_fills_and_validates():
    assert sharding.mesh_shape({"data": -1}, 8) == (8, 1, 1, 1)
    assert sharding.mesh_shape({"fsdp": 2, "tensor": -1}, 8) == (1, 2, 4, 1)
    assert sharding.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.mesh_shape({"data": 3, "fsdp": 2}, 8)
    with pytest.raises(ValueError, match="only one axis"):
        sharding.mesh_shape({"data": -1, "fsdp": -1}, 8)
    with pytest.raises(ValueError, match="unknown axes"):
        sharding.mesh_shape({"model": 2}, 8)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.mesh_shape({"data": 3, "fsdp": -1}, 8)


def test_logical_rules_replicate_indivisible_dims():
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    # on a 1-device mesh everything replicates
    assert sharding.logical_to_spec(("embed", "mlp"), (8, 8), mesh, sharding.DEFAULT_RULES) == PartitionSpec(None, None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("nonsense",), (4,), mesh, sharding.DEFAULT_RULES)


def test_every_unet2d_param_has_logical_names():
    from magdiff_jax.convert.unet2d import example_inputs
    from magdiff_jax.models.unet2d import UNet2DConditionModel, UNet2DConfig

    cfg = UNet2DConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                       cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8)
    abstract = sharding.abstract_init(UNet2DConditionModel(cfg), *example_inputs(cfg))["params"]
    leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    unnamed = [x for x in leaves if not isinstance(x, nn.LogicallyPartitioned)]
    assert leaves and not unnamed


def test_unet2d_sharded_over_fsdp_and_tensor_equals_unsharded():
    """8 fake CPU devices: initialised directly sharded (fsdp=2 x tensor=4), the unet2d
    output equals the unsharded one within 1e-5, and parameters really are split across devices."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    script = Path(__file__).with_name("sharded_unet2d_check.py")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    print(results)
    for name, r in results.items():
        assert r["devices"] == 8, name
        assert r["param_max_abs_diff"] == 0.0, name
        assert r["max_abs_diff"] <= 1e-5, (name, r)
        assert r["sharded_leaves"] > r["total_leaves"] // 2, (name, r)
