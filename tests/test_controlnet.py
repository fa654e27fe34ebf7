"""controlnet == diffusers ControlNetModel (fp32, max|diff|/max|ref| <= 1e-4 on every down residual and the mid
residual); `controlnet_from_unet` == `ControlNetModel.from_unet` (copied weights bit-identical, output convs zero);
its residuals in our unet2d == diffusers' in UNet2DConditionModel (1e-4); exact conversion round trips.

Two tiny ControlNets (CrossAttnDownBlock2D + DownBlock2D, 32/64 channels, 16x16 latents, 128x128 conditions): one in
the SD1.5 layout (conv projections, one head count), one in the SD2.1 layout (linear projections, per-block heads)
with two transformer layers, only-cross-attention, the other time-embedding flip/shift, a BGR condition and global
pooling. Every weight is perturbed away from its init, the zero convs included.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import ControlNetModel as TorchControlNet
from diffusers import UNet2DConditionModel as TorchUNet
from flax import traverse_util
from helpers import assert_same_state_dict, flat_params, nchw, nhwc, perturb_, rel_err

from magdiff_jax.convert import ConversionError, load_torch, save_torch, torch_format
from magdiff_jax.convert.core import flax_to_torch
from magdiff_jax.models.controlnet import ControlNetConfig, ControlNetModel, controlnet_from_unet, spatial_unet2d
from magdiff_jax.models.registry import ConfigError, get_model
from magdiff_jax.models.unet2d import UNet2DConfig

TOL = 1e-4
EMBED = (8, 16, 16, 32)  # the condition encoder's widths: three stride-2 convs, 8x (SD's (16, 32, 96, 256) is 8x too)
BASE = dict(
    in_channels=4, block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    layers_per_block=2, cross_attention_dim=24, norm_num_groups=8,
)
CONFIGS = {
    "sd15_conv": dict(attention_head_dim=2, conditioning_embedding_out_channels=EMBED),
    "sd21_linear_bgr_pooled": dict(
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=2,
        only_cross_attention=(True, False), flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=0.8,
        controlnet_conditioning_channel_order="bgr", global_pool_conditions=True, conditioning_channels=3,
        conditioning_embedding_out_channels=EMBED,
    ),
}
UNET = dict(sample_size=16, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=2, **BASE)


def _inputs(batch=2, seed=0):
    rng = np.random.RandomState(seed)
    x = rng.randn(batch, 16, 16, 4).astype(np.float32)
    ctx = rng.randn(batch, 7, 24).astype(np.float32)
    cond = rng.rand(batch, 128, 128, 3).astype(np.float32)
    return x, np.array([3, 817][:batch]), ctx, cond


def _torch_call(model, x, t, ctx, cond, scale, **kw):
    with torch.no_grad():
        out = model(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), nchw(cond), conditioning_scale=scale, **kw)
    return [nhwc(r) for r in out.down_block_res_samples], nhwc(out.mid_block_res_sample)


def _errors(ours, ref) -> list[float]:
    (down, mid), (ref_down, ref_mid) = ours, ref
    assert len(down) == len(ref_down)
    return [rel_err(a, b) for a, b in zip(down, ref_down)] + [rel_err(mid, ref_mid)]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(TorchControlNet(**{**BASE, **CONFIGS[request.param]}).eval())
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    module, params = load_torch("controlnet", folder)
    return request.param, model, folder, module, params


@pytest.fixture(scope="module")
def outputs(case):
    """Our residuals and diffusers' on the same inputs: guess_mode=False with one conditioning_scale per sample, and
    guess_mode=True with conditioning_scale 0.7 (diffusers' guess mode takes one scale)."""
    _, model, _, module, params = case
    x, t, ctx, cond = _inputs()
    per_sample = np.array([0.5, 1.3], np.float32)

    @jax.jit
    def run(p, x, t, ctx, cond):
        plain = module.apply({"params": p}, x, t, ctx, cond, per_sample)
        guess = module.apply({"params": p}, x, t, ctx, cond, 0.7, guess_mode=True)
        return plain, guess

    plain, guess = run(params, x, t, ctx, cond)
    ref_plain = _torch_call(model, x, t, ctx, cond, torch.from_numpy(per_sample).reshape(2, 1, 1, 1))
    ref_guess = _torch_call(model, x, t, ctx, cond, 0.7, guess_mode=True)
    return {"plain": (plain, ref_plain), "guess": (guess, ref_guess)}


def test_forward_matches_diffusers(case, outputs):
    """ControlNetModel forward parity, fp32, 1e-4 relative, on every down residual and the mid residual, with
    conditioning scales (0.5, 1.3) per sample and, in guess mode (ignored with global pooling, as in diffusers), 0.7."""
    name, _, _, module, _ = case
    for mode, (ours, ref) in outputs.items():
        down, mid = ours
        assert len(down) == module.config.num_skips == 6
        errs = _errors(ours, ref)
        print(f"controlnet[{name}, {mode}] rel errs {max(errs):.2e} (max over {len(errs)} outputs)")
        assert max(errs) <= TOL
        if module.config.global_pool_conditions:
            assert all(r.shape[1:3] == (1, 1) for r in (*down, mid))
        else:
            assert [r.shape[1:] for r in down] == [(16, 16, 32)] * 3 + [(8, 8, 32)] + [(8, 8, 64)] * 2
            assert mid.shape[1:] == (8, 8, 64)


def test_round_trip_is_exact(case, tmp_path):
    """load_torch -> save_model / load_model (the CLI's Flax checkpoint) -> save_torch ->
    ControlNetModel.from_pretrained: no missing/unexpected/mis-shaped key, same config, bit-identical tensors."""
    from magdiff_jax.cli import _kinds
    from magdiff_jax.export.model import load_model, save_model

    _, model, _, module, params = case
    assert "controlnet" in _kinds()
    save_model("controlnet", module, params, tmp_path / "flax")
    _, module2, params2 = load_model(tmp_path / "flax", kind="controlnet")
    assert module2.config == module.config
    save_torch("controlnet", module2, params2, tmp_path / "torch")
    back, info = TorchControlNet.from_pretrained(tmp_path / "torch", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert_same_state_dict(model.state_dict(), back.state_dict())
    for key, value in model.config.items():
        if not key.startswith("_"):
            assert json.loads(json.dumps(back.config[key])) == json.loads(json.dumps(value)), key


def test_bad_folder_names_every_culprit(case, tmp_path):
    """A missing, a mis-shaped and an unexpected key are all named in one error."""
    _, _, folder, _, _ = case
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    state = safetensors.torch.load_file(folder / "diffusion_pytorch_model.safetensors")
    del state["controlnet_mid_block.bias"]
    state["controlnet_down_blocks.3.weight"] = torch.zeros(32, 32, 3, 3)
    state["controlnet_down_blocks.7.weight"] = torch.zeros(64, 64, 1, 1)
    safetensors.torch.save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConversionError) as e:
        load_torch("controlnet", tmp_path)
    msg = str(e.value)
    assert "controlnet_mid_block.bias" in msg and "controlnet_down_blocks.7.weight" in msg
    assert "controlnet_down_blocks.3.weight: checkpoint has (32, 32, 3, 3), model expects (32, 32, 1, 1)" in msg


# --- from an SD U-Net; residuals into the U-Net ------------------------------------------------------------------
@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    """A random SD U-Net of the ControlNets' encoder layout, saved and loaded through load_torch("unet2d")."""
    torch.manual_seed(1)
    model = perturb_(TorchUNet(**UNET).eval(), seed=1)
    folder = tmp_path_factory.mktemp("unet")
    model.save_pretrained(folder, safe_serialization=True)
    module, params = load_torch("unet2d", folder)
    return model, module, params


@pytest.fixture(scope="module")
def from_unet(unet):
    _, module, params = unet
    return controlnet_from_unet(module.config, params, conditioning_embedding_out_channels=EMBED,
                                key=jax.random.key(3))


def _torch_state(config: ControlNetConfig, params) -> dict[str, np.ndarray]:
    return flax_to_torch(params, torch_format("controlnet").rules(config), "controlnet")


def test_from_unet_matches_diffusers(unet, from_unet):
    """controlnet_from_unet == ControlNetModel.from_unet: same config.json, the same state-dict keys, the copied
    encoder bit-identical, the output convs and the condition encoder's conv_out zero, its other convs fresh."""
    model, module, params = unet
    ref = TorchControlNet.from_unet(model, conditioning_embedding_out_channels=EMBED)
    config, ours = from_unet
    ref_config = {k: v for k, v in ref.config.items() if not k.startswith("_")}
    assert json.loads(json.dumps(torch_format("controlnet").config_to_torch(config))) == {
        **json.loads(json.dumps(ref_config)), "_class_name": "ControlNetModel", "_diffusers_version": "0.42.1"}
    state, ref_state = _torch_state(config, ours), {k: v.numpy() for k, v in ref.state_dict().items()}
    assert set(state) == set(ref_state)
    copied = ("conv_in.", "time_embedding.", "down_blocks.", "mid_block.")
    zero = ("controlnet_down_blocks.", "controlnet_mid_block.", "controlnet_cond_embedding.conv_out.")
    for k, v in state.items():
        assert v.shape == ref_state[k].shape, k
        if k.startswith(copied):
            assert np.array_equal(v, ref_state[k]), k
        elif k.startswith(zero):
            assert not v.any() and not ref_state[k].any(), k
        elif k.endswith(".weight"):  # the condition encoder's convs: freshly initialised
            assert np.abs(v).std() > 0, k
    assert sum(k.startswith(copied) for k in state) == sum(k.startswith(copied) for k in model.state_dict())

    # load_weights_from_unet=False: nothing copied
    _, fresh = controlnet_from_unet(module.config, params, conditioning_embedding_out_channels=EMBED,
                                    load_weights_from_unet=False)
    assert not np.array_equal(np.asarray(fresh["conv_in"]["kernel"]), np.asarray(params["conv_in"]["kernel"]))

    # U-Net parameters that do not fit the config: every culprit named
    flat = traverse_util.flatten_dict(params)
    del flat[("mid_block", "resnets_0", "conv1", "bias")]
    flat[("conv_in", "kernel")] = np.zeros((3, 3, 4, 16), np.float32)
    with pytest.raises(ConversionError) as e:
        controlnet_from_unet(module.config, traverse_util.unflatten_dict(flat))
    assert "mid_block/resnets_0/conv1/bias" in str(e.value)
    assert "conv_in/kernel: given (3, 3, 4, 16), expected (3, 3, 4, 32)" in str(e.value)


def test_from_unet_motion_uses_its_spatial_layers(unet, from_unet):
    """A unet_motion's params (its spatial layers named as the SD U-Net's, plus motion modules) give back the SD
    U-Net (spatial_unet2d) and the same ControlNet; a spatial parameter missing is named."""
    from magdiff_jax.convert.unet_motion import motion_config_from_unet2d
    from magdiff_jax.models.unet_motion import UNetMotionModel

    _, module, params = unet
    mcfg = motion_config_from_unet2d(module.config, {"block_out_channels": [32, 64], "motion_layers_per_block": 2,
                                                     "motion_norm_num_groups": 8, "motion_num_attention_heads": 2})
    abstract = get_model("unet_motion").abstract_params(UNetMotionModel(mcfg))
    flat2d = traverse_util.flatten_dict(params)
    rng = np.random.RandomState(0)
    flat = {p: flat2d[p] if p in flat2d else rng.randn(*a.shape).astype(np.float32) for p, a in abstract.items()}
    assert set(flat2d) < set(flat) and all("motion_modules_" in "/".join(p) for p in set(flat) - set(flat2d))
    motion_params = traverse_util.unflatten_dict(flat)

    ucfg, uparams = spatial_unet2d(mcfg, motion_params)
    assert ucfg == module.config
    a, b = flat_params(uparams), flat_params(params)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)

    cfg_m, from_motion = controlnet_from_unet(mcfg, motion_params, conditioning_embedding_out_channels=EMBED,
                                              key=jax.random.key(3))
    cfg_2d, from_2d = from_unet
    assert cfg_m == cfg_2d
    a, b = flat_params(from_motion), flat_params(from_2d)
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)

    del flat[("down_blocks_1", "resnets_0", "conv1", "bias")]
    with pytest.raises(ConversionError, match="down_blocks_1/resnets_0/conv1/bias"):
        spatial_unet2d(mcfg, traverse_util.unflatten_dict(flat))


@pytest.mark.parametrize("case", ["sd15_conv"], indirect=True)  # the U-Net's side: one ControlNet layout suffices
def test_residuals_into_unet_match_diffusers(unet, case, outputs):
    """diffusers UNet2DConditionModel given the diffusers ControlNet's residuals == our unet2d given ours (1e-4),
    and the residuals change the output."""
    tmodel, module, params = unet
    x, t, ctx, _ = _inputs()
    (down, mid), (ref_down, ref_mid) = outputs["plain"]
    ours = jax.jit(lambda p, x, d, m: module.apply({"params": p}, x, t, ctx, down_block_additional_residuals=d,
                                                   mid_block_additional_residual=m))(params, x, down, mid)
    with torch.no_grad():
        kw = dict(down_block_additional_residuals=[nchw(r) for r in ref_down],
                  mid_block_additional_residual=nchw(ref_mid))
        ref = tmodel(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx), **kw).sample
        plain = tmodel(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample
    err = rel_err(ours, nhwc(ref))
    print(f"unet2d + controlnet residuals rel err {err:.2e}")
    assert err <= TOL
    assert rel_err(nhwc(plain), nhwc(ref)) > 1e-2


def test_residuals_fit_unet_motion_per_frame(case):
    """Run on the B*F frames (the reference repeated), the ControlNet's residuals are the per-frame residuals
    UNetMotionModel takes (shapes traced, nothing compiled)."""
    from magdiff_jax.convert.unet_motion import motion_config_from_unet2d
    from magdiff_jax.models.unet_motion import UNetMotionModel

    _, _, _, module, params = case  # pooled residuals (global_pool_conditions) broadcast over the pixels
    b, f = 1, 3
    mcfg = motion_config_from_unet2d(UNet2DConfig(**UNET), {
        "block_out_channels": [32, 64], "motion_layers_per_block": 2, "motion_norm_num_groups": 8})
    _, _, ctx, cond = _inputs(batch=1)
    frames = jnp.zeros((b * f, 16, 16, 4))
    down, mid = jax.eval_shape(lambda: module.apply({"params": params}, frames, jnp.zeros(()),
                                                    jnp.repeat(ctx, f, 0), jnp.repeat(cond, f, 0)))
    out = jax.eval_shape(lambda: UNetMotionModel(mcfg).init_with_output(
        jax.random.key(0), jnp.zeros((b, f, 16, 16, 4)), jnp.zeros((b,)), ctx,
        down_block_additional_residuals=tuple(jnp.zeros(r.shape) for r in down),
        mid_block_additional_residual=jnp.zeros(mid.shape))[0])
    assert out.shape == (b, f, 16, 16, 4)


# --- configs ----------------------------------------------------------------------------------------------------------
def test_config_refusals_name_the_field():
    """Unsupported diffusers options, U-Net options a ControlNet cannot copy, and bad inputs are refused by name."""
    fmt = torch_format("controlnet")
    d = fmt.config_to_torch(ControlNetConfig(**{**BASE, **CONFIGS["sd15_conv"]}))
    assert fmt.config_from_torch(d) == ControlNetConfig(**{**BASE, **CONFIGS["sd15_conv"]})
    for key, value in (("addition_embed_type", "text"), ("class_embed_type", "timestep"), ("encoder_hid_dim", 8),
                       ("mid_block_type", "UNetMidBlock2D"), ("controlnet_conditioning_channel_order", "rgba"),
                       ("layers_per_block", [1, 2]), ("frobnicate", 1)):
        with pytest.raises(ConfigError, match=key):
            fmt.config_from_torch({**d, key: value})
    for key, value in (("num_class_embeds", 3), ("time_cond_proj_dim", 4), ("center_input_sample", True),
                       ("layers_per_block", (1, 2))):
        with pytest.raises(ConfigError, match=key):
            ControlNetConfig.from_unet2d_config(UNet2DConfig(**{**UNET, key: value}))
    base = ControlNetConfig.from_unet2d_config(UNet2DConfig(**UNET), conditioning_embedding_out_channels=EMBED)
    assert base == ControlNetConfig(**{**BASE, **CONFIGS["sd15_conv"]})
    with pytest.raises(ConfigError, match="norm_num_groups"):
        dataclasses.replace(base, norm_num_groups=5)

    module = ControlNetModel(base)
    x, t, ctx, cond = _inputs(batch=1)
    with pytest.raises(ValueError, match=r"controlnet_cond must be \(B, H, W, C\) = \(1, 128, 128, 3\)"):
        jax.eval_shape(lambda: module.init(jax.random.key(0), x, t, ctx, cond[:, :64]))
    abstract = get_model("controlnet").abstract_params(module)
    zero = [p for p in abstract if p[0].startswith(("controlnet_down_blocks_", "controlnet_mid_block"))]
    assert len(zero) == 2 * (base.num_skips + 1)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(module.init(jax.random.key(0), x, t, ctx, cond)["params"]))
    assert traverse_util.flatten_dict(shapes).keys() == abstract.keys()
