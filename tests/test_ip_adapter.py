"""IP-Adapter-Plus in the AnimateDiff U-Net (`unet_motion` with `image_attention`, MagicVideo-V2's appearance
attention) and its files (`convert.ip_adapter`).

The PyTorch side: a tiny random SD U-Net (UNet2DConditionModel: two cross-attention down and up blocks, 1 and 2
transformer layers, so 11 spatial cross-attentions) and MotionAdapter, diffusers' `UNetMotionModel.from_unet2d` of
them, and an IP-Adapter-Plus file written as the original IP-Adapter repository does (`torch.save` of
{"image_proj": Resampler state dict with fused `to_kv`, "ip_adapter": {"<i>.to_k_ip.weight", ...}}), the Resampler
being a PyTorch module in the original layout (embedding 12 -> 16 wide, depth 4, 1 head of 64, 4 queries, ff x4,
output 8: diffusers infers heads = inner // 64, depth 4 and ffn_ratio 4). Every weight is perturbed. diffusers loads
the file with `load_ip_adapter` on an AnimateDiffPipeline (and a StableDiffusionPipeline for the SD U-Net) and runs
the resampler itself (`encoder_hid_proj`, image_embeds (B, 1, T, E), one per video).

- 3 frames, lambda 0.6: ours (read_ip_adapter + Resampler + apply_ip_adapter + UNetMotionModel) == diffusers
  UNetMotionModel with IPAdapterAttnProcessor2_0 (fp32, max|diff| / max|ref| <= 1e-4);
- 1 frame, lambda 1.0 (motion modules bypassed): ours == diffusers UNet2DConditionModel with the same IP-Adapter
  (<= 1e-4): the processor indices agree between the two diffusers U-Nets and ours;
- the .bin (original layout) and a .safetensors in diffusers' layout read to the same params; the file we write
  loads with diffusers' load_ip_adapter to the same state dict and the same output;
- bad files and inputs are named.
"""

import copy
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
from flax import traverse_util
from helpers import assert_same_state_dict, perturb_, rel_err
from safetensors.torch import save_file

from magdiff_jax.convert import ConversionError, load_torch
from magdiff_jax.convert import safetensors_io as sio
from magdiff_jax.convert.ip_adapter import (
    apply_ip_adapter,
    check_diffusers_loadable,
    ip_adapter_state_dict,
    ip_adapter_to_torch,
    load_ip_adapter,
    read_ip_adapter,
    unet_motion_attn2,
)
from magdiff_jax.layers.attention import EntityAttention
from magdiff_jax.layers.resampler import Resampler, ResamplerConfig
from magdiff_jax.models.registry import ConfigError, get_model
from magdiff_jax.models.unet_motion import UNetMotionConfig, UNetMotionModel, add_image_attention

TOL = 1e-4
B, F, H, T_TOKENS = 2, 3, 8, 9
RESAMPLER = ResamplerConfig(dim=16, depth=4, dim_head=64, heads=1, num_queries=4, embedding_dim=12, output_dim=8,
                            ff_mult=4)
LAMBDA = 0.6


class PerceiverAttention(torch.nn.Module):
    """IP-Adapter's resampler attention, in its parameter layout (norm1/norm2, to_q, fused to_kv, to_out)."""

    def __init__(self, dim, dim_head, heads):
        super().__init__()
        inner = dim_head * heads
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.to_q = torch.nn.Linear(dim, inner, bias=False)
        self.to_kv = torch.nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = torch.nn.Linear(inner, dim, bias=False)


class OriginalResampler(torch.nn.Module):
    """IP-Adapter's `Resampler` parameter layout: latents, proj_in, layers.{i}.0 (attention), layers.{i}.1
    (LayerNorm, Linear, GELU, Linear), proj_out, norm_out."""

    def __init__(self, c: ResamplerConfig):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim**0.5)
        self.proj_in = torch.nn.Linear(c.embedding_dim, c.dim)
        self.proj_out = torch.nn.Linear(c.dim, c.output_dim)
        self.norm_out = torch.nn.LayerNorm(c.output_dim)
        self.layers = torch.nn.ModuleList(torch.nn.ModuleList([
            PerceiverAttention(c.dim, c.dim_head, c.heads),
            torch.nn.Sequential(torch.nn.LayerNorm(c.dim), torch.nn.Linear(c.dim, c.dim * c.ff_mult, bias=False),
                                torch.nn.GELU(), torch.nn.Linear(c.dim * c.ff_mult, c.dim, bias=False)),
        ]) for _ in range(c.depth))


def spatial_cross_attention(unet) -> list[str]:
    """The module paths diffusers gives IP-Adapter processors, in its order: attn2 outside the motion modules."""
    return [n.removesuffix(".processor") for n in unet.attn_processors
            if n.endswith("attn2.processor") and "motion_modules" not in n]


def pipelines(unet2d, unet_motion):
    """A StableDiffusionPipeline and an AnimateDiffPipeline around the two U-Nets (no other component: only
    load_ip_adapter / set_ip_adapter_scale are used)."""
    sd = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet2d, scheduler=None,
                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    animate = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet_motion, motion_adapter=None,
                                  scheduler=None)
    return sd, animate


def load_in_diffusers(unet2d, unet_motion, folder, weight_name):
    """Fresh copies of the two U-Nets with the IP-Adapter file loaded by diffusers' load_ip_adapter."""
    unet2d, unet_motion = copy.deepcopy(unet2d), copy.deepcopy(unet_motion)
    for pipe in pipelines(unet2d, unet_motion):
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name=weight_name, image_encoder_folder=None)
    return unet2d, unet_motion


def set_scale(unet, scale):
    for proc in unet.attn_processors.values():
        if isinstance(proc, IPAdapterAttnProcessor2_0):
            proc.scale = [scale]


def run_motion(unet, x, t, ctx, clip):
    """diffusers UNetMotionModel: (B, C, F, H, W) video, text repeated per frame (B*F, L, D), image_embeds one
    (B, 1, T, E) per video (repeated per frame inside)."""
    with torch.no_grad():
        out = unet(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))), torch.from_numpy(t),
                   torch.from_numpy(np.repeat(ctx, x.shape[1], 0)),
                   added_cond_kwargs={"image_embeds": [torch.from_numpy(clip[:, None])]}).sample
    return out.numpy().transpose(0, 2, 3, 4, 1)


def run_2d(unet, x, t, ctx, clip):
    with torch.no_grad():
        out = unet(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(t),
                   torch.from_numpy(ctx), added_cond_kwargs={"image_embeds": [torch.from_numpy(clip[:, None])]}).sample
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The PyTorch models and the original IP-Adapter .bin, our base U-Net loaded from diffusers' folder, inputs."""
    torch.manual_seed(0)
    unet2d = perturb_(UNet2DConditionModel(
        block_out_channels=(16, 32), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
        layers_per_block=1, transformer_layers_per_block=(1, 2), sample_size=H,
    ).eval(), seed=1)
    adapter = perturb_(MotionAdapter(
        block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=2,
        motion_norm_num_groups=4, motion_max_seq_length=8, use_motion_mid_block=True,
    ).eval(), seed=2)
    from diffusers import UNetMotionModel as TorchUNetMotion

    unet_motion = TorchUNetMotion.from_unet2d(unet2d, adapter).eval()
    root = tmp_path_factory.mktemp("ip_adapter")
    unet_motion.save_pretrained(root / "unet_motion", safe_serialization=True)
    module, base_params = load_torch("unet_motion", root / "unet_motion")

    resampler = perturb_(OriginalResampler(RESAMPLER).eval(), seed=3)
    layers = spatial_cross_attention(unet_motion)
    assert layers == spatial_cross_attention(unet2d) and len(layers) == 11
    g = torch.Generator().manual_seed(4)
    ip = {}
    for n, name in enumerate(layers):
        shape = unet_motion.get_submodule(name).to_k.weight.shape
        for proj in ("to_k_ip", "to_v_ip"):
            ip[f"{2 * n + 1}.{proj}.weight"] = 0.3 * torch.randn(shape, generator=g)
    torch.save({"image_proj": resampler.state_dict(), "ip_adapter": ip}, root / "ip_adapter.bin")
    ref2d, ref_motion = load_in_diffusers(unet2d, unet_motion, root, "ip_adapter.bin")
    rng = np.random.RandomState(0)
    inputs = dict(x=rng.randn(B, F, H, H, 4).astype(np.float32), t=np.array([3, 700]),
                  ctx=rng.randn(B, 5, 8).astype(np.float32), clip=rng.randn(B, T_TOKENS, 12).astype(np.float32))
    return dict(root=root, unet2d=unet2d, unet_motion=unet_motion, ref2d=ref2d, ref_motion=ref_motion,
                module=module, base_params=base_params, inputs=inputs, layers=layers)


@pytest.fixture(scope="module")
def ours(case):
    """Our reading of the .bin, the U-Net params with it, and the jitted U-Net per image scale."""
    rcfg, state = read_ip_adapter(case["root"] / "ip_adapter.bin")
    cfg = dataclasses.replace(case["module"].config, image_attention=True)
    params = apply_ip_adapter(cfg, case["base_params"], state)
    tokens = Resampler(rcfg).apply({"params": state["image_proj"]}, case["inputs"]["clip"])

    def forward(scale):
        model = UNetMotionModel(dataclasses.replace(cfg, image_attention_scale=scale))
        return jax.jit(lambda p, x, t, c, img: model.apply({"params": p}, x, t, c, image_hidden_states=img))

    return dict(rcfg=rcfg, state=state, cfg=cfg, params=params, tokens=tokens, forward=forward)


def test_read_infers_the_config_and_the_layers(case, ours):
    """The .bin's resampler config is inferred from its shapes (dim_head 64 assumed); every spatial attn2 (and no
    motion module) gets the file's to_k_ip / to_v_ip in diffusers' order, transposed to Dense kernels."""
    assert ours["rcfg"] == RESAMPLER
    assert sorted(ours["state"]["ip_adapter"]) == list(range(1, 22, 2))
    ours_layers = unet_motion_attn2(ours["cfg"])
    assert [t for t, _ in ours_layers] == case["layers"]
    flat = traverse_util.flatten_dict(ours["params"])
    new = sorted("/".join(p) for p in flat if p[-2] in ("to_k_ip", "to_v_ip"))
    assert len(new) == 22 and not any("motion_modules" in p for p in new)
    blob = torch.load(case["root"] / "ip_adapter.bin", weights_only=True)["ip_adapter"]
    for n, (_, path) in enumerate(ours_layers):
        np.testing.assert_array_equal(flat[(*path, "to_v_ip", "kernel")], blob[f"{2 * n + 1}.to_v_ip.weight"].numpy().T)


def test_video_matches_diffusers_animatediff(case, ours):
    """3 frames, ip-adapter scale 0.6: ours == diffusers UNetMotionModel after AnimateDiffPipeline.load_ip_adapter
    (IPAdapterAttnProcessor2_0 in the 11 spatial attn2, IPAdapterPlusImageProjection run by the U-Net), fp32,
    max|diff| / max|ref| <= 1e-4; the image branch changes the output."""
    i = case["inputs"]
    set_scale(case["ref_motion"], LAMBDA)
    ref = run_motion(case["ref_motion"], i["x"], i["t"], i["ctx"], i["clip"])
    out = np.asarray(ours["forward"](LAMBDA)(ours["params"], i["x"], i["t"], i["ctx"], ours["tokens"]))
    err = rel_err(out, ref)
    print(f"unet_motion + IP-Adapter-Plus (lambda {LAMBDA}) vs diffusers: rel err {err:.2e}")
    assert err <= TOL
    set_scale(case["ref_motion"], 0.0)
    without = run_motion(case["ref_motion"], i["x"], i["t"], i["ctx"], i["clip"])
    assert rel_err(without, ref) > 1e-2


def test_single_frame_matches_diffusers_sd_unet(case, ours):
    """1 frame, scale 1.0 (the joint-training image path: motion modules bypassed): ours == the SD U-Net
    (UNet2DConditionModel) with the same file loaded by StableDiffusionPipeline.load_ip_adapter, <= 1e-4."""
    i = case["inputs"]
    set_scale(case["ref2d"], 1.0)
    ref = run_2d(case["ref2d"], i["x"][:, 0], i["t"], i["ctx"], i["clip"])
    out = np.asarray(ours["forward"](1.0)(ours["params"], i["x"][:, :1], i["t"], i["ctx"], ours["tokens"]))
    err = rel_err(out[:, 0], ref)
    print(f"unet_motion F=1 + IP-Adapter-Plus vs diffusers UNet2DConditionModel: rel err {err:.2e}")
    assert out.shape == (B, 1, H, H, 4) and err <= TOL


def test_both_layouts_read_the_same(case, ours, tmp_path):
    """A .safetensors with diffusers' IPAdapterPlusImageProjection keys (what diffusers converted the .bin to) reads
    to bit-identical params and config; the original-layout .bin has the fused to_kv, the other to_k / to_v.
    diffusers' load_ip_adapter itself cannot read its own layout."""
    proj = case["ref_motion"].encoder_hid_proj.image_projection_layers[0].state_dict()
    assert "layers.0.attn.to_k.weight" in proj
    blob = torch.load(case["root"] / "ip_adapter.bin", weights_only=True)
    assert "layers.0.0.to_kv.weight" in blob["image_proj"]
    flat = {f"image_proj.{k}": v.contiguous() for k, v in proj.items()}
    flat.update({f"ip_adapter.{k}": v for k, v in blob["ip_adapter"].items()})
    save_file(flat, str(tmp_path / "diffusers_layout.safetensors"))
    rcfg, state = read_ip_adapter(tmp_path / "diffusers_layout.safetensors")
    assert rcfg == ours["rcfg"]
    a, b = traverse_util.flatten_dict(state), traverse_util.flatten_dict(ours["state"])
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    # diffusers' own loader converts only the original layout (why ip_adapter_to_torch writes that one)
    with pytest.raises(RuntimeError, match=r"to_out\.0\.0\.weight"):
        copy.deepcopy(case["unet_motion"])._load_ip_adapter_weights(
            {"image_proj": proj, "ip_adapter": blob["ip_adapter"]}, low_cpu_mem_usage=False)


def test_written_file_loads_in_diffusers(case, ours, tmp_path):
    """ip_adapter_to_torch writes a file diffusers' load_ip_adapter reads (on an AnimateDiff pipeline) into the same
    state dict as the original .bin, with the same output; it reads back to the same params."""
    dst = ip_adapter_to_torch(ours["state"]["image_proj"], ours["rcfg"], ours["cfg"], ours["params"],
                              tmp_path / "ip_adapter.safetensors")
    keys = set(sio.read_file(dst))
    assert "image_proj.layers.3.0.to_kv.weight" in keys and "ip_adapter.21.to_v_ip.weight" in keys
    _, unet_motion = load_in_diffusers(case["unet2d"], case["unet_motion"], tmp_path, "ip_adapter.safetensors")
    assert_same_state_dict(unet_motion.state_dict(), case["ref_motion"].state_dict())
    i = case["inputs"]
    set_scale(unet_motion, LAMBDA)
    set_scale(case["ref_motion"], LAMBDA)
    got = run_motion(unet_motion, i["x"], i["t"], i["ctx"], i["clip"])
    ref = run_motion(case["ref_motion"], i["x"], i["t"], i["ctx"], i["clip"])
    assert rel_err(got, ref) <= 1e-6
    rcfg, resampler, params = load_ip_adapter(dst, ours["cfg"], case["base_params"])
    assert rcfg == ours["rcfg"]
    a, b = traverse_util.flatten_dict(params), traverse_util.flatten_dict(ours["params"])
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        ip_adapter_to_torch(resampler, rcfg, ours["cfg"], params, dst)
    with pytest.raises(ValueError, match="depth=2 \\(needs 4\\)"):
        check_diffusers_loadable(ResamplerConfig(dim=16, depth=2, dim_head=64, heads=1))


def test_missing_and_misshaped_keys_are_named(case, ours, tmp_path):
    """A file with a key missing and one mis-shaped, in the resampler and in the attention layers: the reader and
    the loader name every one of them, as the file names them."""
    state = dict(ip_adapter_state_dict(ours["state"]["image_proj"], ours["rcfg"], ours["cfg"], ours["params"]))
    del state["image_proj.layers.2.1.3.weight"]
    state["image_proj.layers.1.0.to_kv.weight"] = state["image_proj.layers.1.0.to_kv.weight"][:64]
    del state["ip_adapter.7.to_k_ip.weight"]
    state["ip_adapter.11.to_v_ip.weight"] = state["ip_adapter.11.to_v_ip.weight"][:, :4]
    state["ip_adapter.23.to_k_ip.weight"] = state["ip_adapter.1.to_k_ip.weight"]
    state["ip_adapter.23.to_v_ip.weight"] = state["ip_adapter.1.to_v_ip.weight"]
    sio.write_state_dict(state, tmp_path, "broken")
    with pytest.raises(ConversionError) as err:
        read_ip_adapter(tmp_path / "broken.safetensors")
    msg = str(err.value)
    assert "missing keys (2):\n    image_proj.layers.2.1.3.weight\n    ip_adapter.7.to_k_ip.weight" in msg
    assert "image_proj.layers.1.0.to_kv.weight: file has (64, 16), expected (128, 16)" in msg
    with pytest.raises(ConversionError) as err:
        load_ip_adapter(tmp_path / "broken.safetensors", ours["cfg"], case["base_params"])
    msg = str(err.value)
    for name in ("image_proj.layers.2.1.3.weight", "image_proj.layers.1.0.to_kv.weight",
                 "ip_adapter.7.to_k_ip.weight (up_blocks.0.attentions.0.transformer_blocks.0.attn2)",
                 "ip_adapter.11.to_v_ip.weight: file has (32, 4)", "ip_adapter.23.to_k_ip.weight"):
        assert name in msg, (name, msg)
    with pytest.raises(ConversionError, match=r"(?s)missing keys.*ip_adapter\.7\.to_k_ip\.weight"):
        apply_ip_adapter(ours["cfg"], case["base_params"], {"ip_adapter": {
            k: v for k, v in ours["state"]["ip_adapter"].items() if k != 7}})


def test_add_image_attention_and_bad_inputs(case, ours):
    """add_image_attention: every spatial attn2 (11) gains to_k_ip / to_v_ip = copies of to_k / to_v and nothing
    else (no scale parameters: lambda is fixed); the image tokens are required with image attention and refused
    without; a config whose blocks differ in cross-attention width cannot have it."""
    base = traverse_util.flatten_dict(case["base_params"])
    flat = traverse_util.flatten_dict(add_image_attention(case["base_params"], ours["cfg"]))
    new = sorted(set(flat) - set(base))
    assert len(new) == 22 and all(p[-2] in ("to_k_ip", "to_v_ip") and p[-3] == "attn2" for p in new)
    for p in new:
        np.testing.assert_array_equal(flat[p], base[(*p[:-2], p[-2].removesuffix("_ip"), p[-1])])
    assert all(np.array_equal(flat[p], base[p]) for p in base)
    with pytest.raises(ValueError, match="image_attention=True"):
        add_image_attention(case["base_params"], case["module"].config)

    i = case["inputs"]
    x, tokens = jnp.asarray(i["x"]), jnp.asarray(ours["tokens"])
    model, base_model = UNetMotionModel(ours["cfg"]), case["module"]
    shape = lambda m, p, **kw: jax.eval_shape(lambda: m.apply({"params": p}, x, i["t"], i["ctx"], **kw))
    assert shape(model, ours["params"], image_hidden_states=tokens).shape == x.shape
    with pytest.raises(ValueError, match="image_attention=True needs image_hidden_states"):
        shape(model, ours["params"])
    with pytest.raises(ValueError, match="image_attention=False"):
        shape(base_model, case["base_params"], image_hidden_states=tokens)
    with pytest.raises(ValueError, match=r"image_hidden_states must be \(B=2, N, 8\)"):
        shape(model, ours["params"], image_hidden_states=tokens[:, :, :4])
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        dataclasses.replace(ours["cfg"], cross_attention_dim=(8, 16))
    with pytest.raises(ConfigError, match="image_attention_scale"):
        UNetMotionConfig(image_attention=True, image_attention_scale="1")
    with pytest.raises(ValueError, match="image_attention=False"):
        apply_ip_adapter(case["module"].config, case["base_params"], ours["state"])
    assert "image_hidden_states" in get_model("unet_motion").example_kwargs(ours["cfg"])


def test_entity_attention_modes():
    """EntityAttention's fixed mode has the four projections and the image ones only (no scales) and computes
    text + lambda * image; the learnable mode keeps text_scale / image_scale (1.0 / 1.5); an unknown mode is named."""
    rng = np.random.RandomState(0)
    x, ctx, img = (rng.randn(2, n, 8).astype(np.float32) for n in (6, 5, 4))
    fixed = EntityAttention(8, 2, 4, branch_weights="fixed", fixed_image_scale=0.3)
    params = nn.meta.unbox(fixed.init(jax.random.key(0), x, ctx, img)["params"])
    assert sorted(params) == ["to_k", "to_k_ip", "to_out_0", "to_q", "to_v", "to_v_ip"]
    learn = EntityAttention(8, 2, 4)
    lparams = nn.meta.unbox(learn.init(jax.random.key(0), x, ctx, img)["params"])
    assert sorted(lparams) == sorted([*params, "image_scale", "text_scale"])
    assert float(lparams["text_scale"]) == 1.0 and float(lparams["image_scale"]) == 1.5
    same = {**params, "text_scale": jnp.float32(1.0), "image_scale": jnp.float32(0.3)}
    np.testing.assert_allclose(fixed.apply({"params": params}, x, ctx, img),
                               learn.apply({"params": same}, x, ctx, img), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="branch_weights must be one of"):
        EntityAttention(8, 2, 4, branch_weights="both").init(jax.random.key(0), x, ctx, img)
