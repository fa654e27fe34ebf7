"""`magdiff-jax convert i2v-init`: the MagicVideo-V2 I2V `init_from` folder from pretrained parts in their real on-disk
formats, all tiny, random and perturbed:

- an SD pipeline folder: UNet2DConditionModel (diffusers; two cross-attention blocks, 1 and 2 transformer layers: 11
  spatial cross-attentions), AutoencoderKL (two blocks: 2x), CLIPTextModel, CLIP tokenizer, a scheduler config;
- an AnimateDiff MotionAdapter saved as an original-layout `.ckpt` (torch.save, AnimateDiff's keys) and as a folder;
- an IP-Adapter-Plus `.bin` written as the IP-Adapter repository does (torch.save of the nested {"image_proj": the
  original Resampler with fused `to_kv`, "ip_adapter": {"<2n+1>.to_k_ip.weight", ...}});
- a CLIPVisionModelWithProjection folder (transformers), 12 wide as the resampler reads.

The written U-Net (kind i2v) must hold, bit for bit, the adapter's motion modules, the file's to_k_ip/to_v_ip and
resampler (or copies of to_k/to_v and the given resampler config without a file), and a ControlNet that is
`controlnet_from_unet`'s copy of the SD U-Net (zero convs zero) or the given ControlNetModel; and the I2V denoiser at
that start must equal diffusers' UNetMotionModel.from_unet2d(unet, adapter) with the IP-Adapter loaded
(AnimateDiffPipeline.load_ip_adapter, scale 1), fp32, max|diff| / max|ref| <= 1e-4. Bad sources fail before anything
is written, naming the file and the key or field.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import ControlNetModel, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from flax import traverse_util
from helpers import flat_params, perturb_, rel_err
from test_ip_adapter import OriginalResampler, load_in_diffusers, run_motion, spatial_cross_attention
from test_magdiff_init import TEXT, _random
from test_motion_adapter import to_original
from test_unet_motion import perturb_all_
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from magdiff_jax import cli
from magdiff_jax.convert import ConversionError, load_torch, save_torch
from magdiff_jax.convert.core import flax_to_torch
from magdiff_jax.convert.i2v_init import build_i2v_init
from magdiff_jax.convert.ip_adapter import base_config, original_from_diffusers, resampler_to_torch, unet_motion_attn2
from magdiff_jax.convert.unet_motion import unet_motion_rules
from magdiff_jax.data.synthetic import write_tokenizer
from magdiff_jax.export import load_model
from magdiff_jax.layers.resampler import ResamplerConfig
from magdiff_jax.models.vae import AutoencoderKLConfig

TOL = 1e-4
B, F, H, T_TOKENS = 2, 3, 8, 5
CROSS = TEXT.hidden_size  # 16
UNET = dict(block_out_channels=(16, 32), norm_num_groups=4, cross_attention_dim=CROSS, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
            layers_per_block=1, transformer_layers_per_block=(1, 2), sample_size=H)
# AnimateDiff's 8 motion heads (which a single file does not record), a mid-block module, 8 frame positions
ADAPTER = dict(block_out_channels=(16, 32), motion_layers_per_block=1, motion_num_attention_heads=8,
               motion_norm_num_groups=4, motion_max_seq_length=8, use_motion_mid_block=True)
# what diffusers' load_ip_adapter can rebuild: depth 4, heads of 64, ff x4
RESAMPLER = ResamplerConfig(dim=16, depth=4, dim_head=64, heads=1, num_queries=4, embedding_dim=12, output_dim=CROSS,
                            ff_mult=4)
VISION = dict(hidden_size=12, intermediate_size=24, projection_dim=12, num_hidden_layers=1, num_attention_heads=2,
              image_size=16, patch_size=8)
VAE = AutoencoderKLConfig(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=4,
                          sample_size=16)
CONDITIONING = (8, 16)  # one stride-2 step: the reference at 2x the latent size, the VAE's factor


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("i2v_sources")
    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(**UNET).eval(), seed=1)
    unet.save_pretrained(root / "sd" / "unet", safe_serialization=True)
    for seed, (name, kind, cfg) in enumerate((("vae", "vae", VAE), ("text_encoder", "clip_text", TEXT))):
        module, params = _random(kind, cfg, seed)
        save_torch(kind, module, params, root / "sd" / name)
    write_tokenizer(root / "sd" / "tokenizer")
    (root / "sd" / "scheduler").mkdir()
    (root / "sd" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler"}))
    CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).save_pretrained(root / "image_encoder")

    adapter = perturb_all_(MotionAdapter(**ADAPTER).eval(), seed=2)
    torch.save(to_original(adapter.state_dict()), root / "mm_original.ckpt")
    adapter.save_pretrained(root / "adapter", safe_serialization=True)

    unet_motion = UNetMotionModel.from_unet2d(unet, adapter).eval()
    resampler = perturb_(OriginalResampler(RESAMPLER).eval(), seed=3)
    g = torch.Generator().manual_seed(4)
    ip = {}
    for n, name in enumerate(spatial_cross_attention(unet_motion)):
        shape = unet_motion.get_submodule(name).to_k.weight.shape
        for proj in ("to_k_ip", "to_v_ip"):
            ip[f"{2 * n + 1}.{proj}.weight"] = 0.3 * torch.randn(shape, generator=g)
    torch.save({"image_proj": resampler.state_dict(), "ip_adapter": ip}, root / "ip_adapter.bin")
    _, reference = load_in_diffusers(unet, unet_motion, root, "ip_adapter.bin")
    return dict(root=root, unet=unet, adapter=adapter, resampler=resampler, ip=ip, reference=reference)


def _cli(root, out, *extra):
    cli.main(cli.build_parser().parse_args(
        ["convert", "i2v-init", "--pipeline", str(root / "sd"), "--image-encoder", str(root / "image_encoder"),
         "--conditioning-embedding-out-channels", ",".join(map(str, CONDITIONING)), "--out", str(out), *extra]))


def _same(got: dict, want: dict, what: str):
    assert set(got) == set(want), (what, sorted(set(got) ^ set(want))[:8])
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]), err_msg=f"{what}: {k}")


@pytest.fixture(scope="module")
def written(sources, tmp_path_factory):
    out = tmp_path_factory.mktemp("i2v_out") / "i2v_init"
    root = sources["root"]
    _cli(root, out, "--motion-adapter", str(root / "mm_original.ckpt"), "--ip-adapter", str(root / "ip_adapter.bin"),
         "--seed", "5")
    kind, module, params = load_model(out / "unet")
    assert kind == "i2v"
    return out, module, params


def test_init_folder_holds_every_source_weight(sources, written):
    """Motion modules == the adapter's, to_k_ip/to_v_ip and image_proj == the IP-Adapter file's, every spatial
    weight == the SD U-Net's (all of diffusers' from_unet2d state dict), the ControlNet == controlnet_from_unet's
    copy (encoder copied, zero convs and the condition encoder's conv_out zero), the VAE and the encoders == their
    sources; the folder and its record."""
    out, module, params = written
    root = sources["root"]
    assert sorted(p.name for p in out.iterdir()) == ["i2v_init.json", "image_encoder", "scheduler", "text_encoder",
                                                     "tokenizer", "unet", "vae"]
    cfg = module.config
    assert cfg.resampler == RESAMPLER and cfg.unet.image_attention and cfg.unet.image_attention_scale == 1.0
    assert cfg.conditioning_embedding_out_channels == CONDITIONING and cfg.reference_factor == VAE.downsample_factor

    # the U-Net without its image projections: diffusers' UNetMotionModel.from_unet2d, key for key
    flat = traverse_util.flatten_dict(params["unet"])
    base = traverse_util.unflatten_dict({p: v for p, v in flat.items() if p[-2] not in ("to_k_ip", "to_v_ip")})
    rules = unet_motion_rules(base_config(cfg.unet))
    state = flax_to_torch(base, rules, "unet_motion")
    reference = sources["reference"].state_dict()
    _same(state, {k: v.numpy() for k, v in reference.items() if k in state}, "unet_motion")
    assert len(state) == len([k for k in reference if "processor" not in k and "encoder_hid_proj" not in k])
    motion = {k: v for k, v in state.items() if ".motion_modules." in k}
    _same(motion, {k: v.numpy() for k, v in sources["adapter"].state_dict().items()}, "motion modules")

    layers = unet_motion_attn2(cfg.unet)
    assert len(layers) == 11
    for n, (_, path) in enumerate(layers):
        for proj in ("to_k_ip", "to_v_ip"):
            np.testing.assert_array_equal(flat[(*path, proj, "kernel")].T, sources["ip"][f"{2 * n + 1}.{proj}.weight"])
    image_proj = original_from_diffusers(resampler_to_torch(params["image_proj"], cfg.resampler), RESAMPLER.depth)
    _same(image_proj, {k: v.numpy() for k, v in sources["resampler"].state_dict().items()}, "image_proj")

    cn = flat_params(params["controlnet"])
    _, sd_unet = load_torch("unet2d", root / "sd" / "unet")
    sd_unet = flat_params(sd_unet)
    copied = {p for p in cn if p.split("/")[0] in ("conv_in", "time_embedding", "mid_block")
              or p.startswith("down_blocks_")}
    _same({p: cn[p] for p in copied}, {p: sd_unet[p] for p in copied}, "controlnet copy")
    zero = [p for p in cn if p.startswith(("controlnet_down_blocks_", "controlnet_mid_block",
                                           "controlnet_cond_embedding/conv_out/"))]
    assert len(zero) == 2 * (4 + 1 + 1) and not any(np.any(cn[p]) for p in zero)
    fresh = [p for p in cn if p.startswith("controlnet_cond_embedding/") and p not in zero and p.endswith("kernel")]
    assert fresh and all(np.any(cn[p]) for p in fresh)

    for name, kind, src in (("vae", "vae", root / "sd" / "vae"), ("text_encoder", "clip_text", root / "sd" /
                            "text_encoder"), ("image_encoder", "clip_vision", root / "image_encoder")):
        got_kind, got_module, got = load_model(out / name)
        want_module, want = load_torch(kind, src)
        assert got_kind == kind and got_module.config == want_module.config
        _same(flat_params(got), flat_params(want), name)
    meta = json.loads((out / "i2v_init.json").read_text())
    assert meta["seed"] == 5 and meta["sources"]["motion_adapter"].endswith("mm_original.ckpt")
    assert meta["sources"]["ip_adapter"].endswith("ip_adapter.bin")
    assert not any("image_proj" in f or "_ip" in f for f in meta["fresh"])


def test_denoiser_at_the_start_equals_animatediff_with_the_ip_adapter(sources, written):
    """The I2V denoiser (UNetMotionModel + resampler + ControlNet on the reference) == diffusers UNetMotionModel
    (from_unet2d + AnimateDiffPipeline.load_ip_adapter, scale 1, IPAdapterPlusImageProjection run by the U-Net) on
    the same latents, timesteps, text and CLIP tokens: the ControlNet adds nothing at this start. fp32, <= 1e-4."""
    _, module, params = written
    rng = np.random.RandomState(0)
    x = rng.randn(B, F, H, H, 4).astype(np.float32)
    t = np.array([3, 700])
    ctx = rng.randn(B, 5, CROSS).astype(np.float32)
    clip = rng.randn(B, T_TOKENS, VISION["hidden_size"]).astype(np.float32)
    k = module.config.reference_factor
    reference = rng.rand(B, H * k, H * k, 3).astype(np.float32)
    out = jax.jit(lambda p: module.apply({"params": p}, x, t, ctx, image_embeds=clip, reference=reference))(params)
    ref = run_motion(sources["reference"], x, t, ctx, clip)
    err = rel_err(out, ref)
    print(f"i2v-init denoiser vs diffusers UNetMotionModel + IP-Adapter-Plus: rel err {err:.2e}")
    assert err <= TOL


def test_without_ip_adapter_and_with_a_given_controlnet(sources, tmp_path):
    """No IP-Adapter: every spatial attn2's to_k_ip/to_v_ip are copies of its to_k/to_v and the resampler is fresh
    with the given fields over IP-Adapter-Plus SD1.5's (embedding width = the image encoder's, output = the
    cross-attention's). A diffusers ControlNetModel folder is taken as it is. The adapter here is a folder."""
    root = sources["root"]
    torch.manual_seed(1)
    controlnet = perturb_(ControlNetModel.from_unet(sources["unet"], conditioning_embedding_out_channels=CONDITIONING),
                          seed=6)
    controlnet.save_pretrained(root / "controlnet", safe_serialization=True)
    out = tmp_path / "init"
    build_i2v_init(out, pipeline=root / "sd", motion_adapter=root / "adapter", image_encoder=root / "image_encoder",
                   controlnet=root / "controlnet", resampler_config={"dim": 16, "depth": 1, "heads": 2, "dim_head": 8,
                                                                     "num_queries": 3})
    _, module, params = load_model(out / "unet")
    cfg = module.config
    assert cfg.resampler == ResamplerConfig(dim=16, depth=1, dim_head=8, heads=2, num_queries=3, embedding_dim=12,
                                            output_dim=CROSS, ff_mult=4)
    flat = flat_params(params["unet"])
    ip = [p for p in flat if "_ip/" in p]
    assert len(ip) == 2 * 11
    for p in ip:
        np.testing.assert_array_equal(flat[p], flat[p.replace("_ip/", "/")])
    assert all(np.any(v) for v in flat_params(params["image_proj"]).values() if v.ndim > 1)
    _same(flat_params(params["controlnet"]), flat_params(load_torch("controlnet", root / "controlnet")[1]),
          "given controlnet")
    meta = json.loads((out / "i2v_init.json").read_text())
    assert "image_proj/..." in meta["fresh"] and meta["sources"]["controlnet"].endswith("controlnet")

    # the training config of configs/i2v.py:base takes every model config from the folder
    from magdiff_jax.train.tasks.i2v import I2VTask

    config = ml_collections.ConfigDict({"init_from": str(out), "compute_dtype": "float32", "model": {
        "unet": {"unet": {"remat_policy": "full"}}, "vae": {}, "text_encoder": {}, "image_encoder": {}}})
    models = I2VTask().models(config)
    assert models["unet"][1].unet.remat_policy == "full" and models["unet"][1].resampler.num_queries == 3
    assert models["image_encoder"][1].hidden_size == VISION["hidden_size"]


def test_bad_sources_fail_before_writing(sources, tmp_path):
    """An adapter whose widths do not fit the U-Net (named with its file and field), a ControlNet of another U-Net,
    a condition encoder whose downscale is not the VAE's, an IP-Adapter whose resampler reads another width than the
    image encoder gives, an unknown resampler field: each fails with nothing written."""
    root = sources["root"]
    narrow = perturb_(MotionAdapter(**{**ADAPTER, "block_out_channels": (16, 24)}).eval(), seed=7)
    narrow.save_pretrained(root / "narrow_adapter", safe_serialization=True)
    out = tmp_path / "never"
    args = ("--motion-adapter", str(root / "mm_original.ckpt"))
    with pytest.raises(ConversionError, match=r"(?s)does not fit the SD U-Net .*narrow_adapter: MotionAdapter "
                                              r"block_out_channels=\(16, 24\) differ from the U-Net's \(16, 32\)"):
        _cli(root, out, "--motion-adapter", str(root / "narrow_adapter"))
    other = ControlNetModel(**{k: v for k, v in UNET.items() if k not in ("up_block_types", "sample_size")}
                            | {"cross_attention_dim": 8, "conditioning_embedding_out_channels": CONDITIONING})
    other.save_pretrained(root / "other_controlnet", safe_serialization=True)
    with pytest.raises(ConversionError, match=r"other_controlnet does not fit the U-Net:\n  cross_attention_dim=8 "
                                              r"where the U-Net needs 16"):
        _cli(root, out, *args, "--controlnet", str(root / "other_controlnet"))
    with pytest.raises(ConversionError, match=r"conditioning_embedding_out_channels=\[8, 16, 32\] take the reference "
                                              r"down 4x, the VAE .* its frames 2x"):
        cli.main(cli.build_parser().parse_args(
            ["convert", "i2v-init", "--pipeline", str(root / "sd"), "--image-encoder", str(root / "image_encoder"),
             "--conditioning-embedding-out-channels", "8,16,32", "--out", str(out), *args]))
    wide = CLIPVisionModelWithProjection(CLIPVisionConfig(**{**VISION, "hidden_size": 20, "projection_dim": 20}))
    wide.save_pretrained(root / "wide_image_encoder")
    with pytest.raises(ConversionError, match=r"ip_adapter.bin does not fit:\n.*\n    image_proj.proj_in.weight: "
                                              r"reads 12-wide image tokens, the image encoder .* gives 20"):
        build_i2v_init(out, pipeline=root / "sd", motion_adapter=root / "mm_original.ckpt",
                       ip_adapter=root / "ip_adapter.bin", image_encoder=root / "wide_image_encoder",
                       conditioning_embedding_out_channels=CONDITIONING)
    with pytest.raises(ValueError, match=r"unknown resampler config fields \['queries'\]"):
        build_i2v_init(out, pipeline=root / "sd", motion_adapter=root / "mm_original.ckpt",
                       image_encoder=root / "image_encoder", resampler_config={"queries": 4})
    assert not out.exists() and not any(p.name.startswith(".never") for p in tmp_path.iterdir())
