"""unet3d == diffusers UNet3DConditionModel (fp32, max|diff|/max|ref| <= 1e-4), exact conversion round trips, the
joint image/video contract (a single frame computes the unet2d model on the same spatial parameters, <= 1e-5 abs), and
the temporal layers on a frame- and channel-sharded mesh.

Two configs: blocks (32, 64) and (32, 64, 64) with 2 layers per block, heads by UNet3D's quirk (`attention_head_dim`
is the head width: 4/8 heads of width 8, and 2/4/4 heads of width 16; transformer_in has 8 heads of that width),
cross-attention 24, 4 and 5 frames, 16x16 and odd 14x10 latents (the upsampler follows the skip sizes); the second
also has a cond projection on the time embedding and mid_block_scale_factor 2. Every PyTorch parameter is perturbed,
so the zero-initialised temporal output layers take part.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet3DConditionModel as TorchUNet3D
from diffusers.models.resnet import TemporalConvLayer as TorchTemporalConv
from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel as TorchTemporalTransformer
from flax import traverse_util
from helpers import assert_same_state_dict, perturb_, rel_err

from magdiff_jax import cpu
from magdiff_jax.convert import load_torch, save_torch, torch_format
from magdiff_jax.convert.core import Rule, torch_to_flax
from magdiff_jax.convert.unet3d import temp_conv_rules, temporal_transformer_rules
from magdiff_jax.layers.temporal import TemporalConv, TemporalConvLayer, TransformerTemporalModel
from magdiff_jax.models.registry import get_model
from magdiff_jax.models.unet2d import UNet2DConditionModel
from magdiff_jax.models.unet3d import UNet3DConditionModel, UNet3DConfig

TOL = 1e-4
CONFIGS = {
    "two_blocks": dict(
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), attention_head_dim=8,
    ),
    "three_blocks_cond": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"), attention_head_dim=16,
        time_cond_proj_dim=8, mid_block_scale_factor=2.0,
    ),
}
BASE = dict(sample_size=16, layers_per_block=2, norm_num_groups=8, cross_attention_dim=24)
SHAPES = {"two_blocks": (4, 16, 16), "three_blocks_cond": (5, 14, 10)}  # frames, height, width


def _compile(fn, *args):
    """Run `fn(*args)` compiled once; LLVM optimisation off: same arithmetic, a fraction of the compile time."""
    return jax.jit(fn).lower(*args).compile({"xla_backend_optimization_level": 0})(*args)


def _video_to_torch(x):  # (B, F, H, W, C) -> (B, C, F, H, W)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def _video_from_torch(t):  # (B, C, F, H, W) -> (B, F, H, W, C)
    return np.moveaxis(t.detach().numpy(), 1, -1)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    """A perturbed diffusers model saved with save_pretrained and read back by load_torch."""
    torch.manual_seed(0)
    model = perturb_(TorchUNet3D(**{**BASE, **CONFIGS[request.param]}).eval())
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    module, params = load_torch("unet3d", folder)
    return request.param, model, module, params


def _inputs(name, frames=None):
    rng = np.random.RandomState(0)
    f, h, w = SHAPES[name]
    x = rng.randn(2, frames or f, h, w, 4).astype(np.float32)
    ctx = rng.randn(2, 7, 24).astype(np.float32)
    t = np.array([3, 817])
    cond = rng.randn(2, 8).astype(np.float32) if name == "three_blocks_cond" else None
    return x, t, ctx, cond


def test_forward_matches_diffusers(case):
    """UNet3DConditionModel forward parity, fp32, tolerance 1e-4 relative; per-video timesteps and contexts."""
    name, model, module, params = case
    x, t, ctx, cond = _inputs(name)
    kw = {} if cond is None else dict(timestep_cond=cond)
    ours = _compile(lambda p, x, t, c, kw: module.apply({"params": p}, x, t, c, **kw), params, x, t, ctx, kw)
    assert ours.shape == x.shape
    tkw = {} if cond is None else dict(timestep_cond=torch.from_numpy(cond))
    with torch.no_grad():
        ref = model(_video_to_torch(x), torch.from_numpy(t), torch.from_numpy(ctx), **tkw).sample
    err = rel_err(ours, _video_from_torch(ref))
    print(f"unet3d[{name}] rel err {err:.2e}")
    assert err <= TOL


def test_round_trip_is_exact(case, tmp_path):
    """save_torch -> UNet3DConditionModel.from_pretrained: same keys, bit-identical tensors, same config."""
    _, model, module, params = case
    save_torch("unet3d", module, params, tmp_path)
    back = TorchUNet3D.from_pretrained(tmp_path)
    assert_same_state_dict(model.state_dict(), back.state_dict())
    plain = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items() if not k.startswith("_")}
    assert plain(back.config) == plain(model.config)


def test_single_frame_equals_unet2d(case):
    """F == 1 bypasses every temporal layer: the output equals unet2d on the spatial parameters (<= 1e-5 abs)."""
    name, _, module, params = case
    spatial = {
        k: v for k, v in traverse_util.flatten_dict(params).items()
        if not any(p == "transformer_in" or p.startswith(("temp_convs_", "temp_attentions_")) for p in k)
    }
    image_model = UNet2DConditionModel(module.config.to_unet2d())
    x, t, ctx, cond = _inputs(name, frames=1)
    kw = {} if cond is None else dict(timestep_cond=cond)
    abstract = jax.eval_shape(lambda: image_model.init(jax.random.key(0), x[:, 0], t, ctx, **kw))["params"]
    assert set(traverse_util.flatten_dict(abstract)) == set(spatial)
    spatial = traverse_util.unflatten_dict(spatial)
    video = _compile(lambda p, x, kw: module.apply({"params": p}, x, t, ctx, **kw), spatial, x, kw)
    image = _compile(lambda p, x, kw: image_model.apply({"params": p}, x, t, ctx, **kw), spatial, x[:, 0], kw)
    err = float(jnp.max(jnp.abs(video[:, 0] - image)))
    print(f"unet3d[{name}] single frame vs unet2d: max abs diff {err:.2e}")
    assert video.shape == x.shape
    assert err <= 1e-5


def _layer_params(rules, torch_module, flax_module, x):
    """Convert one PyTorch layer with a table written at prefix "layer" (stripped here)."""
    rules = [Rule(r.torch.removeprefix("layer."), r.flax[1:], r.transform) for r in rules]
    state = {k: v.numpy() for k, v in torch_module.state_dict().items()}
    abstract = jax.eval_shape(lambda: flax_module.init(jax.random.key(0), x))["params"]
    return torch_to_flax(state, rules, traverse_util.flatten_dict(nn.meta.unbox(abstract)), "layer")


def test_temporal_layers_match_diffusers():
    """TemporalConvLayer and TransformerTemporalModel alone (B=2, F=6, 5x3, 16 channels), fp32, 1e-4 relative."""
    torch.manual_seed(0)
    rng = np.random.RandomState(1)
    b, f, h, w, c = 2, 6, 5, 3, 16
    x = rng.randn(b, f, h, w, c).astype(np.float32)
    x_frames = torch.from_numpy(np.ascontiguousarray(x.reshape(b * f, h, w, c).transpose(0, 3, 1, 2)))

    def back(y):  # (B*F, C, H, W) -> (B, F, H, W, C)
        return y.detach().numpy().transpose(0, 2, 3, 1).reshape(b, f, h, w, c)

    tconv = perturb_(TorchTemporalConv(c, c, dropout=0.1, norm_num_groups=4).eval())
    ours = TemporalConvLayer(c, c, dropout=0.1, norm_num_groups=4)
    p = _layer_params(temp_conv_rules("layer", "layer"), tconv, ours, x)
    with torch.no_grad():
        ref = back(tconv(x_frames, num_frames=f))
    err = rel_err(ours.apply({"params": p}, x), ref)
    print(f"TemporalConvLayer rel err {err:.2e}")
    assert err <= TOL

    tattn = perturb_(TorchTemporalTransformer(num_attention_heads=2, attention_head_dim=8, in_channels=c,
                                              norm_num_groups=4, cross_attention_dim=24).eval())
    ours = TransformerTemporalModel(heads=2, dim_head=8, norm_num_groups=4)
    p = _layer_params(temporal_transformer_rules("layer", "layer"), tattn, ours, x)
    with torch.no_grad():
        ref = back(tattn(x_frames, num_frames=f).sample)
    err = rel_err(ours.apply({"params": p}, x), ref)
    print(f"TransformerTemporalModel rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("tuned", [False, True], ids=["plain", "cpu_tuning"])
def test_temporal_conv_gradients_match_torch_conv3d(tuned):
    """TemporalConv's backward (one matmul over the shifted frames, which rebuilds them rather than saving them:
    `jax.checkpoint` by default, the CPU tuning's hand-written backward with it): input, kernel and bias gradients
    of a weighted sum equal torch.nn.Conv3d's (3, 1, 1) autograd gradients, fp32, 1e-5 relative (B=2, F=5 and
    F=1, 3x2 pixels, 6 -> 4 channels, random kernel and bias)."""
    rng = np.random.RandomState(3)
    for f in (5, 1):
        x = rng.randn(2, f, 3, 2, 6).astype(np.float32)
        weight = rng.randn(2, f, 3, 2, 4).astype(np.float32)  # d loss / d output
        conv = torch.nn.Conv3d(6, 4, kernel_size=(3, 1, 1), padding=(1, 0, 0))
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(rng.randn(4, 6, 3, 1, 1).astype(np.float32)))
            conv.bias.copy_(torch.from_numpy(rng.randn(4).astype(np.float32)))
        tx = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))).requires_grad_(True)
        (conv(tx) * torch.from_numpy(np.ascontiguousarray(weight.transpose(0, 4, 1, 2, 3)))).sum().backward()

        params = {"kernel": conv.weight.detach().numpy().transpose(2, 3, 4, 1, 0), "bias": conv.bias.detach().numpy()}
        def loss(p, x, weight):
            return jnp.sum(TemporalConv(4).apply({"params": p}, x) * weight)

        with cpu.tuning(tuned):
            d_params, d_x = jax.grad(loss, argnums=(0, 1))(params, x, weight)
            custom = "custom_vjp" in str(jax.make_jaxpr(loss)(params, x, weight))
        assert custom == (tuned and jax.default_backend() == "cpu")
        assert rel_err(d_x, tx.grad.numpy().transpose(0, 2, 3, 4, 1)) <= 1e-5
        assert rel_err(d_params["kernel"], conv.weight.grad.numpy().transpose(2, 3, 4, 1, 0)) <= 1e-5
        assert rel_err(d_params["bias"], conv.bias.grad.numpy()) <= 1e-5


def test_every_parameter_has_logical_axis_names():
    """Every parameter (temporal convs included) is created with allowed logical axis names."""
    allowed = {"embed", "mlp", "heads", "conv_in", "conv_out", "conv_t", "conv_h", "conv_w", "norm", "vocab"}
    cfg = UNet3DConfig(**{**BASE, **CONFIGS["two_blocks"]})
    args = get_model("unet3d").example_inputs(cfg)
    boxed = jax.eval_shape(lambda: UNet3DConditionModel(cfg).init(jax.random.key(0), *args))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    for leaf in leaves:
        assert hasattr(leaf, "names"), leaf
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed, leaf.names
    kernel = boxed["down_blocks_0"]["temp_convs_0"]["conv4_3"]["kernel"]
    assert kernel.value.shape == (3, 1, 1, 32, 32)
    assert kernel.names == ("conv_t", "conv_h", "conv_w", "conv_in", "conv_out")


def test_presets_and_config_errors():
    """modelscope() / sd21_base() carry diffusers' defaults and SD2.1's head layout; bad configs fail clearly."""
    kind = torch_format("unet3d")
    ms, sd = UNet3DConfig.modelscope(), UNet3DConfig.sd21_base()
    d = kind.config_to_torch(ms)
    assert d["_class_name"] == "UNet3DConditionModel" and d["attention_head_dim"] == 64
    assert kind.config_from_torch(d) == ms
    assert sd.heads_per_block == (5, 10, 20, 20) and sd.cross_attention_dim == 1024 and sd.sample_size == 64
    image = sd.to_unet2d()
    assert image.heads_per_block == (5, 10, 20, 20) and image.use_linear_projection
    assert image.down_block_types == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    with pytest.raises(ValueError, match="num_attention_heads"):
        UNet3DConfig(num_attention_heads=8)
    with pytest.raises(ValueError, match="attention_head_dim"):
        UNet3DConfig(attention_head_dim=(64, 64, 64, 64))
    with pytest.raises(ValueError, match="CrossAttnDownBlock2D"):
        UNet3DConfig(down_block_types=("CrossAttnDownBlock2D",) * 4)
    with pytest.raises(ValueError, match="unknown key"):
        kind.config_from_torch({**d, "use_linear_projection": True})


SHARDED_CHECK = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
import flax.linen as nn, jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
jax.config.update("jax_default_matmul_precision", "highest")
from magdiff_jax import sharding
from magdiff_jax.layers.temporal import TemporalConvLayer, TransformerTemporalModel
sys.path.insert(0, TESTS)
from helpers import rel_err
x = np.random.RandomState(0).randn(2, 8, 4, 4, 16).astype(np.float32)  # a shape that XLA mis-partitions as a conv
out = {}
for name, m in (("conv", TemporalConvLayer(16, norm_num_groups=4)),
                ("attn", TransformerTemporalModel(2, 8, norm_num_groups=4))):
    p = nn.meta.unbox(m.init(jax.random.key(0), x)["params"])
    p = jax.tree.map(lambda a: a + 0.1 * np.random.RandomState(a.size).randn(*a.shape).astype(np.float32), p)
    ref = np.asarray(jax.jit(lambda p, x: m.apply({"params": p}, x))(p, x))
    mesh = sharding.make_mesh({"data": 2, "context": 2, "tensor": 2})
    # conv output channels over tensor on purpose (the default rules replicate them)
    rules = [(k, "tensor" if k == "conv_out" else v) for k, v in sharding.DEFAULT_RULES]
    _, shardings = sharding.init_sharded(m, jax.random.key(0), x, mesh=mesh, rules=rules)
    with sharding.activation_rules_context(mesh, rules):
        y = jax.jit(lambda p, x: m.apply({"params": p}, x))(
            jax.device_put(p, shardings), jax.device_put(x, NamedSharding(mesh, P("data", "context"))))
    spec = list(shardings["conv1_2"]["kernel"].spec) if name == "conv" else None
    out[name] = [rel_err(y, ref), len(y.sharding.device_set), spec]
print(json.dumps(out))
'''


def test_temporal_layers_on_a_context_and_tensor_sharded_mesh():
    """Frames sharded over `context` and channels over `tensor` (8 fake CPU devices, data=2 x context=2 x tensor=2,
    conv output channels sharded by an explicit rule) give the unsharded result (1e-5 relative): the temporal
    convolution avoids XLA's mis-partitioned conv."""
    import json
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    script = SHARDED_CHECK.replace("TESTS", repr(os.path.dirname(__file__)))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    print(f"temporal layers sharded vs unsharded: {result}")
    assert result["conv"][2] == [None, None, None, None, "tensor"]
    for err, devices, _ in result.values():
        assert err <= 1e-5 and devices == 8
