"""unet_motion == diffusers UNetMotionModel (AnimateDiff), fp32, max|diff|/max|ref| <= 1e-4; exact round trips;
SD U-Net + MotionAdapter folders == `UNetMotionModel.from_unet2d`; one frame == the unet2d SD U-Net.

Every parameter of the PyTorch models is perturbed (the motion modules' zero-initialised `proj_out` included) and
so are the `pos_embed.pe` frame tables (buffers), so a converter that recomputed them instead of reading them
would fail.
"""

import dataclasses
import functools
import inspect
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from flax import traverse_util
from helpers import assert_same_state_dict, perturb_, rel_err

from magdiff_jax.convert import ConversionError, load_torch, safetensors_io, save_torch, torch_format
from magdiff_jax.convert.core import flax_to_torch
from magdiff_jax.convert.unet_motion import load_motion_adapter, unet_motion_rules
from magdiff_jax.layers.motion import sinusoidal_table
from magdiff_jax.models.registry import get_model
from magdiff_jax.models.unet2d import UNet2DConditionModel as FlaxUNet2D
from magdiff_jax.models.unet2d import UNet2DConfig
from magdiff_jax.models.unet_motion import UNetMotionConfig

TOL = 1e-4
FRAMES = 4
BASE = dict(block_out_channels=(16, 32), norm_num_groups=4, cross_attention_dim=8, num_attention_heads=2,
            motion_max_seq_length=8)
CONFIGS = {
    # conv projections, two layers per block, no mid-block motion module, odd latents, ControlNet residuals
    "conv_residuals": dict(
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), layers_per_block=2,
        motion_num_attention_heads=2, use_motion_mid_block=False, use_linear_projection=False,
    ),
    # linear projections, mid-block motion module, per-block motion heads / temporal depth, timestep_cond
    "linear_motion_mid": dict(
        down_block_types=("DownBlockMotion", "CrossAttnDownBlockMotion"),
        up_block_types=("CrossAttnUpBlockMotion", "UpBlockMotion"), layers_per_block=1,
        motion_num_attention_heads=(2, 4), temporal_transformer_layers_per_block=(1, 2),
        use_motion_mid_block=True, use_linear_projection=True, time_cond_proj_dim=6,
    ),
}
SIZES = {"conv_residuals": (7, 9), "linear_motion_mid": (8, 8)}


def perturb_all_(model, seed=0):
    """perturb_ plus the frame-position buffers."""
    perturb_(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("pos_embed.pe"):
                buf.add_(0.1 * torch.randn(buf.shape, generator=g))
    return model


@functools.cache
def _forward(config):
    module = get_model("unet_motion").build(config)
    return jax.jit(lambda p, x, t, c, kw: module.apply({"params": p}, x, t, c, **kw))


def forward(module):
    """One jitted forward per model config, reused across tests (compiling dominates on CPU)."""
    return _forward(module.config)


def plain_config(config) -> dict:
    """A diffusers config as JSON would hold it (lists, no private keys)."""
    return {k: json.loads(json.dumps(v)) for k, v in dict(config).items() if not k.startswith("_")}


def to_torch_video(x):  # (B, F, H, W, C) -> (B, C, F, H, W)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))


def from_torch_video(t):  # (B, C, F, H, W) -> (B, F, H, W, C)
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


def inputs(name, rng, batch=2, frames=FRAMES):
    h, w = SIZES[name]
    x = rng.randn(batch, frames, h, w, 4).astype(np.float32)
    ctx = rng.randn(batch, 5, 8).astype(np.float32)
    return x, np.array([3, 817][:batch]), ctx


def run_torch(model, x, t, ctx, **kw):
    """diffusers wants the context repeated per frame, (B*F, L, D)."""
    with torch.no_grad():
        ref = model(to_torch_video(x), torch.from_numpy(t), torch.from_numpy(np.repeat(ctx, x.shape[1], 0)), **kw)
    return from_torch_video(ref.sample)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (name, perturbed diffusers model, our module, our params loaded from its saved folder), built once."""
    cache = {}

    def get(name):
        if name not in cache:
            torch.manual_seed(0)
            model = perturb_all_(UNetMotionModel(**{**BASE, **CONFIGS[name]}).eval())
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder, safe_serialization=True)
            module, params = load_torch("unet_motion", folder)
            cache[name] = (name, model, module, params)
        return cache[name]

    return get


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, built):
    return built(request.param)


def test_forward_matches_diffusers(case):
    """UNetMotionModel forward parity (4 frames, batch 2), fp32, tolerance 1e-4 relative."""
    name, model, module, params = case
    rng = np.random.RandomState(0)
    x, t, ctx = inputs(name, rng)
    kw, tkw = {}, {}
    if name == "linear_motion_mid":
        cond = rng.randn(2, 6).astype(np.float32)
        kw, tkw = dict(timestep_cond=cond), dict(timestep_cond=torch.from_numpy(cond))
    else:  # ControlNet residuals: per frame, (B*F, h, w, c) or (B, F, h, w, c)
        b, f, h, w, _ = x.shape
        shapes = [(16, h, w)] * 3 + [(16, (h + 1) // 2, (w + 1) // 2)] + [(32, (h + 1) // 2, (w + 1) // 2)] * 2
        down = [rng.randn(b * f, hh, ww, c).astype(np.float32) for c, hh, ww in shapes]
        mid = rng.randn(b, f, (h + 1) // 2, (w + 1) // 2, 32).astype(np.float32)
        kw = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        tkw = dict(down_block_additional_residuals=[torch.from_numpy(r.transpose(0, 3, 1, 2).copy()) for r in down],
                   mid_block_additional_residual=torch.from_numpy(
                       mid.reshape(b * f, *mid.shape[2:]).transpose(0, 3, 1, 2).copy()))
    ours = forward(module)(params, x, t, ctx, kw)
    ref = run_torch(model, x, t, ctx, **tkw)
    err = rel_err(ours, ref)
    print(f"unet_motion[{name}] rel err {err:.2e}")
    assert err <= TOL


def test_round_trip_is_exact(case, tmp_path):
    """save_torch -> UNetMotionModel.from_pretrained: same keys (pos_embed.pe included), bit-identical tensors."""
    _, model, module, params = case
    save_torch("unet_motion", module, params, tmp_path)
    back = UNetMotionModel.from_pretrained(tmp_path)
    assert_same_state_dict(model.state_dict(), back.state_dict())
    assert plain_config(back.config) == plain_config(model.config)


def test_single_frame_bypasses_motion_modules_and_equals_unet2d(built):
    """F == 1: the motion modules are skipped, and the output equals the unet2d SD U-Net run on the spatial
    sub-tree of the same parameters (<= 1e-5 absolute). With F > 1 the motion modules change the output."""
    _, _, module, params = built("linear_motion_mid")
    cfg = module.config
    rng = np.random.RandomState(1)
    x, t, ctx = inputs("linear_motion_mid", rng, frames=1)
    cond = rng.randn(2, 6).astype(np.float32)
    flat = traverse_util.flatten_dict(params)
    spatial = traverse_util.unflatten_dict({k: v for k, v in flat.items() if not any(
        p.startswith("motion_modules") for p in k)})
    assert len(spatial) and len(flat) > len(traverse_util.flatten_dict(spatial))

    unet2d_cfg = UNet2DConfig(
        block_out_channels=cfg.block_out_channels, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, use_linear_projection=True, time_cond_proj_dim=6,
    )
    unet2d = FlaxUNet2D(unet2d_cfg)
    abstract = jax.eval_shape(lambda: unet2d.init(jax.random.key(0), x[:, 0], t, ctx, timestep_cond=cond))
    assert set(traverse_util.flatten_dict(abstract["params"])) == set(traverse_util.flatten_dict(spatial))

    ours = forward(module)(params, x, t, ctx, dict(timestep_cond=cond))
    ref = jax.jit(lambda p: unet2d.apply({"params": p}, x[:, 0], t, ctx, timestep_cond=cond))(spatial)
    diff = float(np.abs(np.asarray(ours)[:, 0] - np.asarray(ref)).max())
    print(f"unet_motion F=1 vs unet2d max abs diff {diff:.2e}")
    assert ours.shape == x.shape and diff <= 1e-5

    video = np.repeat(x, FRAMES, axis=1)  # identical frames: only the motion modules make them differ from F=1
    two = forward(module)(params, video, t, ctx, dict(timestep_cond=cond))
    assert float(np.abs(np.asarray(two)[:, 0] - np.asarray(ref)).max()) > 1e-3


@pytest.fixture(scope="module")
def adapter_case(tmp_path_factory):
    """A random SD U-Net and MotionAdapter, saved as diffusers folders, and diffusers' from_unet2d of them."""
    torch.manual_seed(0)
    spatial = CONFIGS["linear_motion_mid"]
    unet = perturb_(UNet2DConditionModel(
        block_out_channels=(16, 32), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1, use_linear_projection=True, time_cond_proj_dim=6,
    ).eval(), seed=1)
    adapter = perturb_all_(MotionAdapter(
        block_out_channels=(16, 32), motion_layers_per_block=1, motion_transformer_layers_per_block=(1, 2),
        motion_num_attention_heads=spatial["motion_num_attention_heads"], motion_norm_num_groups=4,
        motion_max_seq_length=8, use_motion_mid_block=True,
    ).eval(), seed=2)
    root = tmp_path_factory.mktemp("adapter")
    unet.save_pretrained(root / "unet", safe_serialization=True)
    adapter.save_pretrained(root / "motion_adapter", safe_serialization=True)
    reference = UNetMotionModel.from_unet2d(unet, adapter).eval()
    return root, reference


def test_load_motion_adapter_equals_from_unet2d(adapter_case):
    """load_motion_adapter(SD U-Net folder, MotionAdapter folder) == diffusers UNetMotionModel.from_unet2d: same
    config, same state dict, same output (fp32, 1e-4 relative)."""
    root, reference = adapter_case
    module, params = load_motion_adapter(root / "unet", root / "motion_adapter")
    assert module.config == UNetMotionConfig(**{**BASE, **CONFIGS["linear_motion_mid"]})
    ours_state = flax_to_torch(params, unet_motion_rules(module.config), "unet_motion")
    ref_state = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert set(ours_state) == set(ref_state)
    assert all(np.array_equal(ours_state[k], ref_state[k]) for k in ref_state)
    rng = np.random.RandomState(2)
    x, t, ctx = inputs("linear_motion_mid", rng)
    cond = rng.randn(2, 6).astype(np.float32)
    ours = forward(module)(params, x, t, ctx, dict(timestep_cond=cond))
    ref = run_torch(reference, x, t, ctx, timestep_cond=torch.from_numpy(cond))
    err = rel_err(ours, ref)
    print(f"load_motion_adapter vs from_unet2d rel err {err:.2e}")
    assert err <= TOL


def test_load_motion_adapter_reports_bad_adapters(adapter_case, tmp_path):
    """A missing motion key is named with the adapter folder; incompatible adapters are refused by name."""
    root, _ = adapter_case
    state = safetensors_io.read_state_dict(root / "motion_adapter", "diffusion_pytorch_model")
    gone = "up_blocks.1.motion_modules.1.transformer_blocks.0.attn2.to_k.weight"
    del state[gone]
    bad = tmp_path / "bad_adapter"
    safetensors_io.write_state_dict(state, bad, "diffusion_pytorch_model")
    (bad / "config.json").write_text((root / "motion_adapter" / "config.json").read_text())
    with pytest.raises(ConversionError, match="(?s)bad_adapter.*missing keys \\(1\\).*" + gone.replace(".", "\\.")):
        load_motion_adapter(root / "unet", bad)

    from magdiff_jax.convert.unet_motion import motion_config_from_unet2d

    unet = torch_format("unet2d").config_from_torch(
        json.loads((root / "unet" / "config.json").read_text()))
    adapter = dict(block_out_channels=[16, 32], motion_layers_per_block=1, motion_norm_num_groups=4)
    assert motion_config_from_unet2d(unet, adapter).use_motion_mid_block
    with pytest.raises(ValueError, match="motion_layers_per_block"):
        motion_config_from_unet2d(unet, {**adapter, "motion_layers_per_block": 2})
    with pytest.raises(ValueError, match="conv_in_channels"):
        motion_config_from_unet2d(unet, {**adapter, "conv_in_channels": 9})
    with pytest.raises(ValueError, match="center_input_sample"):
        motion_config_from_unet2d(dataclasses.replace(unet, center_input_sample=True), adapter)


def test_asymmetric_layer_counts_map_one_to_one(tmp_path):
    """Per-layer (nested) spatial/temporal depths with reverse_* lists, two mid-block layers with per-layer depths:
    the table covers diffusers' state dict key for key (load_torch), and save_torch writes it back exactly."""
    torch.manual_seed(0)
    model = UNetMotionModel(
        **BASE, down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), layers_per_block=2, motion_num_attention_heads=2,
        transformer_layers_per_block=((1, 2), (1, 1)), reverse_transformer_layers_per_block=((1, 1, 1), (2, 1, 1)),
        temporal_transformer_layers_per_block=((2, 1), (1, 1)),
        reverse_temporal_transformer_layers_per_block=((1, 1, 2), 1),
        mid_block_layers=2, transformer_layers_per_mid_block=(1, 2), temporal_transformer_layers_per_mid_block=(2, 1),
    ).eval()
    perturb_all_(model)
    model.save_pretrained(tmp_path / "in", safe_serialization=True)
    module, params = load_torch("unet_motion", tmp_path / "in")
    save_torch("unet_motion", module, params, tmp_path / "out")
    back = UNetMotionModel.from_pretrained(tmp_path / "out")
    assert_same_state_dict(model.state_dict(), back.state_dict())
    assert plain_config(back.config) == plain_config(model.config)


def test_config_translation_and_refusals():
    """The AnimateDiff SD1.5 preset writes a config.json that UNetMotionModel's signature accepts and that reads back
    equal; unsupported options are refused naming the key; too many frames is a clear error."""
    kind = torch_format("unet_motion")
    preset = UNetMotionConfig.animatediff_sd15()
    d = kind.config_to_torch(preset)
    assert d["_class_name"] == "UNetMotionModel"
    assert d["block_out_channels"] == [320, 640, 1280, 1280] and d["cross_attention_dim"] == 768
    assert d["num_attention_heads"] == 8 and d["motion_num_attention_heads"] == 8 and d["motion_max_seq_length"] == 32
    assert d["use_motion_mid_block"] and not d["use_linear_projection"]
    signature = set(inspect.signature(UNetMotionModel.__init__).parameters) - {"self"}
    assert {k for k in d if not k.startswith("_")} == signature
    assert kind.config_from_torch(d) == preset
    with pytest.raises(ValueError, match="encoder_hid_dim_type"):
        kind.config_from_torch({**d, "encoder_hid_dim_type": "ip_image_proj"})
    with pytest.raises(ValueError, match="addition_embed_type"):
        kind.config_from_torch({**d, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="reverse_transformer_layers_per_block"):
        UNetMotionConfig(transformer_layers_per_block=((1, 1),) * 4)

    cfg = UNetMotionConfig(**{**BASE, **CONFIGS["conv_residuals"]})
    module = get_model("unet_motion").build(cfg)
    with pytest.raises(ValueError, match="9 frames exceed the motion module's motion_max_seq_length=8"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 9, 4, 4, 4)), 1, jnp.zeros((1, 2, 8))))


def test_frame_table_matches_diffusers():
    """sinusoidal_table == diffusers SinusoidalPositionalEmbedding.pe (the init of `pos_embed/pe`)."""
    ref = SinusoidalPositionalEmbedding(48, max_seq_length=32).pe.numpy()
    np.testing.assert_allclose(sinusoidal_table(32, 48), ref, atol=5e-6, rtol=0)  # float32 libm rounding
