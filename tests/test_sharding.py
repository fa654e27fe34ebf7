"""Mesh construction, logical-axis rules, and a unet2d initialised directly sharded on 8 fake CPU devices."""

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
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


@dataclasses.dataclass(frozen=True)
class FakeGPU:  # what the mesh code reads of a device
    id: int
    process_index: int
    platform: str = "gpu"
    device_kind: str = "fake"


@dataclasses.dataclass(frozen=True)
class FakeTPU:
    id: int
    process_index: int
    slice_index: int
    coords: tuple
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v4"


def _layout(arr, axis=0):
    """For each index along `axis` of a device array (MESH_AXES order): the sorted set of (process or slice) keys."""
    return [sorted({getattr(d, "slice_index", d.process_index) for d in np.take(arr, i, axis).flat})
            for i in range(arr.shape[axis])]


def test_dcn_sizes_resolve_and_fail_naming_the_key():
    """mesh_dcn: a -1 takes the largest value that divides the slices/processes and its mesh axis (1 on one host);
    sizes that do not divide the granule count or their mesh axis are refused naming `mesh_dcn.<axis>`."""
    assert sharding.dcn_shape({"data": -1}, (4, 1, 2, 1), 2) == (2, 1, 1, 1)
    assert sharding.dcn_shape({"data": -1}, (8, 1, 1, 1), 1) == (1, 1, 1, 1)
    assert sharding.dcn_shape({"data": -1}, (2, 1, 8, 1), 16) == (2, 1, 1, 1)  # 2 nodes of 8 one-GPU processes
    assert sharding.dcn_shape({"data": 2, "fsdp": -1}, (2, 8, 1, 1), 4) == (2, 2, 1, 1)
    assert sharding.dcn_shape({"data": 1}, (8, 1, 1, 1), 4) == (1, 1, 1, 1)  # no DCN split: one plain mesh
    with pytest.raises(ValueError, match=r"mesh_dcn.data=2 does not divide the 1 slice of this run"):
        sharding.dcn_shape({"data": 2}, (8, 1, 1, 1), 1)
    with pytest.raises(ValueError, match=r"mesh_dcn.data=2 x mesh_dcn.fsdp=2 = 4 does not divide the "
                                         r"6 processes"):
        sharding.dcn_shape({"data": 2, "fsdp": 2}, (4, 4, 1, 1), 6, "process")
    with pytest.raises(ValueError, match=r"mesh_dcn.tensor=2 does not divide the mesh's tensor axis of 1"):
        sharding.dcn_shape({"tensor": 2}, (8, 1, 1, 1), 2)
    with pytest.raises(ValueError, match=r"mesh_dcn: unknown axes \['model'\]"):
        sharding.dcn_shape({"model": 2}, (8, 1, 1, 1), 2)
    with pytest.raises(ValueError, match="mesh_dcn: only one axis may be -1"):
        sharding.check_dcn_sizes({"data": -1, "fsdp": -1}, {"data": -1})
    with pytest.raises(ValueError, match=r"mesh_dcn.fsdp=3 does not divide mesh.fsdp=4"):
        sharding.check_dcn_sizes({"fsdp": 3}, {"data": -1, "fsdp": 4})
    sharding.check_dcn_sizes({"data": 4, "fsdp": 2}, {"data": -1, "fsdp": 4})


def test_check_config_refuses_bad_mesh_dcn():
    import train_helpers as th

    from magdiff_jax.train.trainer import base_config, check_config

    assert dict(base_config().mesh_dcn) == {"data": -1, "fsdp": 1, "tensor": 1, "context": 1}
    c = th.config()
    c.mesh.update(data=2)
    c.mesh_dcn.update(data=3)
    with pytest.raises(ValueError, match=r"mesh_dcn.data=3 does not divide mesh.data=2"):
        check_config(c, num_devices=2, process_count=1)
    c.mesh_dcn.update(data=0)
    with pytest.raises(ValueError, match="mesh_dcn: sizes must be positive or -1"):
        check_config(c, num_devices=2, process_count=1)


def test_hybrid_layout_keeps_model_axes_within_a_host_or_slice(caplog):
    """GPU processes (no slice_index): the data axis goes across processes, tensor stays within one; one-GPU
    processes group consecutively when the tensor axis needs more devices than one holds; TPU slices are the
    granules where devices carry several slice indices. A mesh util that fails is logged once, naming why."""
    gpus = [FakeGPU(i, i // 4) for i in range(8)]  # 2 hosts x 4 GPUs
    arr = sharding.device_array({"data": -1, "tensor": 2}, gpus)
    assert arr.shape == (4, 1, 2, 1)
    assert _layout(arr) == [[0], [0], [1], [1]]
    assert all(len(keys) == 1 for keys in _layout(arr.transpose(0, 2, 1, 3).reshape(4, 2), 0))
    one_gpu = [FakeGPU(i, i) for i in range(8)]  # 2 nodes of 4 one-GPU processes
    arr = sharding.device_array({"data": -1, "tensor": 4}, one_gpu)
    assert [[d.id for d in row.flat] for row in arr] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(ValueError, match=r"mesh_dcn.data=3 .* the 8 processes"):
        sharding.device_array({"data": -1}, one_gpu, {"data": 3})

    tpus = [FakeTPU(i, i // 2, i // 4, (i % 2, (i % 4) // 2, 0)) for i in range(8)]  # 2 slices of 2x2 chips
    arr = sharding.device_array({"data": -1, "tensor": 2}, tpus)
    assert _layout(arr) == [[0], [0], [1], [1]]
    # one slice, several hosts: ICI spans the hosts, so no DCN split
    arr = sharding.device_array({"data": -1, "tensor": 2}, [FakeTPU(i, i // 2, 0, (i % 2, i // 2, 0))
                                                            for i in range(4)])
    assert arr.shape == (2, 1, 2, 1)

    broken = [FakeTPU(i, i // 2, i // 4, ((i % 4) if i % 4 != 3 else 5, 0, 0)) for i in range(8)]  # a gap
    caplog.set_level(logging.WARNING, logger="magdiff_jax.sharding")
    sharding._fallbacks_logged.clear()
    for _ in range(2):
        arr = sharding.device_array({"data": -1, "tensor": 2}, broken)
        assert _layout(arr) == [[0], [0], [1], [1]]  # the slices still group, in plain order within each
    warnings = [r for r in caplog.records if "create_hybrid_device_mesh" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "laid out in plain order" in warnings[0].getMessage()


def test_logical_rules_replicate_indivisible_dims():
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    # on a 1-device mesh everything replicates
    assert sharding.logical_to_spec(("embed", "mlp"), (8, 8), mesh, sharding.DEFAULT_RULES) == PartitionSpec(None, None)
    with pytest.raises(ValueError, match="no sharding rule"):
        sharding.logical_to_spec(("nonsense",), (4,), mesh, sharding.DEFAULT_RULES)


def test_rule_tables_of_the_run_and_of_each_model():
    """`config.sharding_rules` updates the default table for every model; a model's registry entry (the VAE keeps
    its parameters replicated) and `config.model_sharding_rules.<model>` update it for that model alone; a malformed
    pair or an unknown mesh axis is refused naming where it came from. Checked on an abstract 2 x 2 mesh."""
    import ml_collections

    from magdiff_jax.train.trainer import base_config, model_rules, run_rules

    mesh = jax.sharding.AbstractMesh((1, 2, 2, 1), sharding.MESH_AXES)
    spec = lambda rules, names, shape=(8, 8): sharding.logical_to_spec(names, shape, mesh, rules)
    c = base_config()
    assert spec(run_rules(c), ("embed", "mlp")) == PartitionSpec("fsdp", "tensor")
    assert spec(model_rules(c, "unet", "unet2d"), ("conv_in", "conv_out")) == PartitionSpec("fsdp", None)
    assert spec(model_rules(c, "vae", "vae"), ("conv_in", "conv_out")) == PartitionSpec(None, None)
    c.sharding_rules = (("mlp", None), ("conv_out", "tensor"))
    assert spec(run_rules(c), ("embed", "mlp")) == PartitionSpec("fsdp", None)
    assert spec(model_rules(c, "unet", "unet2d"), ("conv_in", "conv_out")) == PartitionSpec("fsdp", "tensor")
    c.model_sharding_rules = ml_collections.ConfigDict({"unet": (("conv_in", ("fsdp", "tensor")),)})
    assert spec(model_rules(c, "unet", "unet2d"), ("conv_in", "conv_out"), (8, 8)) == PartitionSpec(
        ("fsdp", "tensor"), None)
    assert spec(model_rules(c, "text_encoder", "clip_text"), ("conv_in",), (8,)) == PartitionSpec("fsdp")
    c.sharding_rules = (("mlp", "model"),)
    with pytest.raises(ValueError, match=r"config.sharding_rules: 'mlp' maps to unknown mesh axes \['model'\]"):
        run_rules(c)
    c.sharding_rules = ("mlp",)
    with pytest.raises(ValueError, match=r"is not a \(logical axis name, mesh axes\) pair"):
        run_rules(c)


def _tiny_configs():
    from magdiff_jax.models.clip import CLIPTextConfig, CLIPVisionConfig
    from magdiff_jax.models.unet2d import UNet2DConfig
    from magdiff_jax.models.vae import AutoencoderKLConfig

    return {
        "clip_text": CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, max_position_embeddings=8, with_projection=True,
                                    projection_dim=8),
        "clip_vision": CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=8, with_projection=True,
                                        projection_dim=8),
        "vae": AutoencoderKLConfig(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4),
        "unet2d": UNet2DConfig(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                               cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8),
    }


@pytest.mark.parametrize("kind", ["clip_text", "clip_vision", "vae", "unet2d"])
def test_every_parameter_has_logical_axis_names(kind):
    """Every parameter of every model kind carries logical names that the rule table knows."""
    from magdiff_jax.models.registry import get_model

    spec, cfg = get_model(kind), _tiny_configs()[kind]
    abstract = sharding.abstract_init(spec.build(cfg), *spec.example_inputs(cfg), **spec.example_kwargs(cfg))
    leaves = jax.tree.leaves(abstract["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    unnamed = [x for x in leaves if not isinstance(x, nn.LogicallyPartitioned)]
    assert leaves and not unnamed
    known = {name for name, _ in sharding.DEFAULT_RULES}
    mesh = sharding.make_mesh({}, jax.devices()[:1])
    for x in leaves:
        assert set(x.names) - {None} <= known, x.names
        assert len(x.names) == x.value.ndim
        sharding.logical_to_spec(x.names, x.value.shape, mesh, sharding.DEFAULT_RULES)


VIDEO_KINDS = ("unet3d", "unet_motion")


@pytest.fixture(scope="module")
def sharded_checks() -> dict:
    """tests/sharded_checks.py's report, from one subprocess with 8 fake CPU devices."""
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    proc = subprocess.run([sys.executable, str(tests / "sharded_checks.py"), *VIDEO_KINDS], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_unet2d_sharded_over_fsdp_and_tensor_equals_unsharded(sharded_checks):
    """8 fake CPU devices: initialised directly sharded (fsdp=2 x tensor=4), the unet2d
    output equals the unsharded one within 1e-5, parameters really are split across devices, gradients on
    data=2 x fsdp=2 x tensor=2 equal the unsharded ones within 1e-5 relative, and `load_torch` places a checkpoint
    directly onto given shardings."""
    results = dict(sharded_checks["unet2d"])
    print(results)
    assert results.pop("load_torch_sharded") == {"same_values": True, "same_shardings": True}
    grads = results.pop("grads_data2xfsdp2xtensor2")
    assert grads["max_rel_err"] <= 1e-5 and grads["sharded_leaves"] > 100, grads
    for name, r in results.items():
        assert r["devices"] == 8, name
        assert r["param_max_abs_diff"] == 0.0, name
        assert r["max_abs_diff"] <= 1e-5, (name, r)
        assert r["sharded_leaves"] > r["total_leaves"] // 2, (name, r)


def test_video_unets_sharded_with_frames_over_context_equal_unsharded(sharded_checks):
    """8 fake CPU devices, mesh fsdp=2 x tensor=2 x context=2, the video's frame axis sharded over `context`: each
    video U-Net (temporal layers active) gives the unsharded output within 1e-5."""
    results = sharded_checks["video"]
    print(results)
    for kind in VIDEO_KINDS:
        r = results[kind]
        assert r["devices"] == 8 and r["max_abs_diff"] <= 1e-5, (kind, r)
        assert r["sharded_leaves"] > r["total_leaves"] // 3, (kind, r)  # kernels; biases and norms replicate
