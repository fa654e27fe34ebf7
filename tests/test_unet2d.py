"""unet2d == diffusers UNet2DConditionModel (fp32, max|diff|/max|ref| <= 1e-4), and exact conversion round trips.

Configs cover both projection variants (conv 1x1 as SD1.5, linear as SD2.1), both head conventions (one head count
for every block as SD1.5's `attention_head_dim=8`; per-block counts as SD2.1's `(5, 10, 20, 20)`), two transformer
layers per block, and the time-embedding options (time_embedding_dim, act fns, cond projection, class embedding).
"""

import jax
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from helpers import assert_same_state_dict, nchw, nhwc, perturb_, rel_err

from magdiff_jax.convert import load_torch, save_torch

TOL = 1e-4
BASE = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
    norm_num_groups=8,
)
CONFIGS = {
    "sd15_conv_one_head_count": dict(attention_head_dim=2, use_linear_projection=False),
    "sd21_linear_per_block_heads": dict(attention_head_dim=(2, 4, 4), use_linear_projection=True),
    "conv_per_block_heads": dict(attention_head_dim=(4, 2, 2), use_linear_projection=False,
                                 transformer_layers_per_block=2, resnet_out_scale_factor=1.5,
                                 mid_block_scale_factor=0.8),
    "linear_time_options": dict(
        attention_head_dim=2, use_linear_projection=True, layers_per_block=1, time_embedding_dim=48,
        time_embedding_act_fn="silu", timestep_post_act="silu", time_cond_proj_dim=8, num_class_embeds=5,
        flip_sin_to_cos=False, freq_shift=1, center_input_sample=True,
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(TorchUNet(**{**BASE, **CONFIGS[request.param]}).eval())
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    module, params = load_torch("unet2d", folder)
    return request.param, model, module, params


def test_forward_matches_diffusers(case):
    """UNet2DConditionModel forward parity, fp32, tolerance 1e-4 relative (odd 10x10 latents on one config)."""
    name, model, module, params = case
    rng = np.random.RandomState(0)
    size = 10 if name == "linear_time_options" else 16
    x = rng.randn(2, size, size, 4).astype(np.float32)
    ctx = rng.randn(2, 7, 24).astype(np.float32)
    t = np.array([3, 817])
    kw, tkw = {}, {}
    if name == "linear_time_options":
        cond = rng.randn(2, 8).astype(np.float32)
        labels = np.array([1, 4])
        kw = dict(timestep_cond=cond, class_labels=labels)
        tkw = dict(timestep_cond=torch.from_numpy(cond), class_labels=torch.from_numpy(labels))
    ours = jax.jit(lambda p, x, t, c: module.apply({"params": p}, x, t, c, **kw))(params, x, t, ctx)
    with torch.no_grad():
        ref = model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **tkw).sample
    err = rel_err(ours, nhwc(ref))
    print(f"unet2d[{name}] rel err {err:.2e}")
    assert err <= TOL


def test_round_trip_is_exact(case, tmp_path):
    """save_torch -> UNet2DConditionModel.from_pretrained: same keys, bit-identical tensors."""
    _, model, module, params = case
    save_torch("unet2d", module, params, tmp_path)
    back = TorchUNet.from_pretrained(tmp_path)
    assert_same_state_dict(model.state_dict(), back.state_dict())
    assert list(np.atleast_1d(back.config.attention_head_dim)) == list(np.atleast_1d(model.config.attention_head_dim))


def test_sd_presets_translate_to_diffusers_configs():
    """The SD1.5 / SD2.1 presets carry the published head layouts and projection kinds."""
    from magdiff_jax.convert import torch_format
    from magdiff_jax.models.unet2d import UNet2DConfig

    kind = torch_format("unet2d")
    sd15, sd21 = kind.config_to_torch(UNet2DConfig.sd15()), kind.config_to_torch(UNet2DConfig.sd21())
    assert sd15["attention_head_dim"] == 8 and sd15["cross_attention_dim"] == 768
    assert not sd15["use_linear_projection"]
    assert sd21["attention_head_dim"] == [5, 10, 20, 20] and sd21["cross_attention_dim"] == 1024
    assert sd21["use_linear_projection"]
    assert UNet2DConfig.sd21().heads_per_block == (5, 10, 20, 20)
    # 320 / 5 = 64-wide heads in SD2.1's first block
    assert 320 // UNet2DConfig.sd21().heads_per_block[0] == 64
