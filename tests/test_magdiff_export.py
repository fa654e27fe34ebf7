"""The MagDiff U-Net exported to PyTorch (`convert.magdiff`, `magdiff-jax convert to-torch --kind magdiff`) and run
by `torch_port.MagDiffUNetTorch`: diffusers `UNet3DConditionModel` (conv_in widened to the entity channels) +
diffusers `IPAdapterPlusImageProjection` + the port's `MagDiffAttnProcessor` on every spatial attn2 +
`EntityPyramidTorch`, on the tiny MagDiff config of `remat_configs` (blocks 16/32, one layer each, 2/4 heads of width
8, cross-attention 16, a one-layer resampler of 2 queries over 12-wide tokens, an 8-channel pyramid "multi";
B=2, 3 frames, 8x8 latents, 12/10/8 entity grids).

- every parameter random (text_scale/image_scale per layer away from 1.0/1.5, conv_in's entity channels and the
  pyramid non-zero): the PyTorch forward equals the JAX `MagDiffUNet` forward, fp32, max|diff| / max|ref| <= 1e-4;
- the folder layout: unet/ loads with `UNet3DConditionModel.from_pretrained`, ip_adapter.safetensors holds
  `image_proj.*` and `ip_adapter.<2k+1>.*` in the order of diffusers' `attn_processors`, the pyramid in Conv2d layout;
- Flax -> PyTorch folder -> Flax is bit-exact (pyramid "multi" and "single"), through the CLI both ways;
- a missing key in ip_adapter.safetensors is named by both readers; the port imports no JAX;
- the pieces alone: `EntityPyramidTorch` == `EntityPyramid` (bilinear F.interpolate, align_corners=False, no
  antialias == jax.image.resize bilinear without antialias, down- and upscaling) and `MagDiffAttnProcessor` on a
  diffusers `Attention` == `EntityAttention` in image_token_mode "all" and "own_and_first" (<= 1e-5).
"""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util
from helpers import flat_params, random_params, rel_err
from remat_configs import tiny_magdiff_config

from magdiff_jax.convert import ConversionError
from magdiff_jax.convert import magdiff as export
from magdiff_jax.convert import safetensors_io as sio
from magdiff_jax.convert.magdiff import resampler_to_torch
from magdiff_jax.export import load_model, save_model
from magdiff_jax.layers.attention import EntityAttention
from magdiff_jax.models.magdiff import EntityPyramid, MagDiffUNet
from magdiff_jax.models.registry import get_model
from magdiff_jax.models.unet3d import per_frame_image_context
from magdiff_jax.torch_port import EntityPyramidTorch, MagDiffAttnProcessor, load_magdiff_torch
from magdiff_jax.torch_port import magdiff as port

REPO = Path(__file__).parents[1]
TOL = 1e-4
B, F_, H = 2, 3, 8
SPATIAL_ATTN2 = ("down_blocks_0/attentions_0", "up_blocks_1/attentions_0", "up_blocks_1/attentions_1",
                 "mid_block/attentions_0")  # diffusers' attn_processors order: down, up, mid
PROCESSORS = [f"{p}.transformer_blocks.0.attn2.processor" for p in (
    "down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1", "mid_block.attentions.0")]


def _video(x):  # (B, F, H, W, C) -> (B, C, F, H, W)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))




def _random_magdiff(cfg, seed=0):
    """Every parameter N(0, 0.1^2) (norm scales 1 + that), and per layer text_scale 0.6 + 0.1k, image_scale
    1.1 + 0.1k: both branches weigh in, with weights that are neither 1.0 nor 1.5."""
    spec = get_model("magdiff")
    module = MagDiffUNet(cfg)
    flat = traverse_util.flatten_dict(random_params(module, *spec.example_inputs(cfg), seed=seed,
                                                    **spec.example_kwargs(cfg)))
    for k, prefix in enumerate(SPATIAL_ATTN2):
        attn = ("unet", *prefix.split("/"), "transformer_blocks_0", "attn2")
        flat[(*attn, "text_scale")] = np.float32(0.6 + 0.1 * k)
        flat[(*attn, "image_scale")] = np.float32(1.1 + 0.1 * k)
    return module, traverse_util.unflatten_dict(flat)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "magdiff_jax.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Random MagDiff params saved as our Flax folder, exported by `magdiff-jax convert to-torch --kind magdiff`
    (a subprocess: the real entry point), and inputs."""
    module, params = _random_magdiff(tiny_magdiff_config())
    root = tmp_path_factory.mktemp("magdiff_export")
    save_model("magdiff", module, params, root / "flax")
    r = _cli("convert", "to-torch", "--kind", "magdiff", str(root / "flax"), str(root / "torch"))
    assert r.returncode == 0, r.stderr[-3000:]
    rng = np.random.RandomState(0)
    inputs = dict(x=rng.randn(B, F_, H, H, 4).astype(np.float32), t=np.array([3, 700]),
                  ctx=rng.randn(B, 5, 16).astype(np.float32),
                  grids=tuple(rng.randn(B, F_, s, s, 4).astype(np.float32) for s in (12, 10, 8)),
                  embeds=rng.randn(B, F_, 9, 12).astype(np.float32))
    return dict(module=module, params=params, root=root, folder=root / "torch", inputs=inputs)


def test_export_layout(case):
    """unet/ is a UNet3DConditionModel folder with 8 input channels; ip_adapter.safetensors holds exactly
    `image_proj.*` (IPAdapterPlusImageProjection's state dict) and `ip_adapter.{1,3,5,7}.{to_k_ip.weight,
    to_v_ip.weight, text_scale, image_scale}` in the order of the spatial attn2 keys of diffusers' attn_processors;
    the pyramid is in Conv2d layout; magdiff.json records config, resampler arguments and processor order."""
    from diffusers import UNet3DConditionModel

    folder, cfg, flat = case["folder"], case["module"].config, flat_params(case["params"])
    meta = json.loads((folder / "magdiff.json").read_text())
    assert meta["format"] == "magdiff_torch" and meta["format_version"] == 1
    assert meta["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert meta["resampler"] == dict(embed_dims=12, output_dims=16, hidden_dims=16, depth=1, dim_head=8, heads=2,
                                     num_queries=2, ffn_ratio=2)
    unet = UNet3DConditionModel.from_pretrained(folder / "unet")
    assert unet.config.in_channels == 8
    spatial = [k for k in unet.attn_processors if k.endswith("attn2.processor") and ".attentions." in k]
    assert meta["processors"] == spatial == PROCESSORS
    conv_in = unet.conv_in.weight.detach().numpy()
    np.testing.assert_array_equal(conv_in, np.transpose(flat["unet/conv_in/kernel"], (3, 2, 0, 1)))
    assert np.abs(conv_in[:, 4:]).min() > 0  # the entity channels are live

    ip = sio.read_state_dict(folder / "ip_adapter.safetensors")
    image_proj = resampler_to_torch(case["params"]["image_proj"], cfg.resampler)
    names = ("to_k_ip.weight", "to_v_ip.weight", "text_scale", "image_scale")
    assert set(ip) == {f"image_proj.{k}" for k in image_proj} | {f"ip_adapter.{2 * k + 1}.{n}"
                                                                  for k in range(4) for n in names}
    assert all(np.array_equal(ip[f"image_proj.{k}"], v) for k, v in image_proj.items())
    for k, prefix in enumerate(SPATIAL_ATTN2):
        attn = f"unet/{prefix}/transformer_blocks_0/attn2"
        np.testing.assert_array_equal(ip[f"ip_adapter.{2 * k + 1}.to_k_ip.weight"], flat[f"{attn}/to_k_ip/kernel"].T)
        assert ip[f"ip_adapter.{2 * k + 1}.image_scale"].shape == (1,)
        assert float(ip[f"ip_adapter.{2 * k + 1}.image_scale"][0]) == np.float32(1.1 + 0.1 * k)
    pyramid = sio.read_state_dict(folder / "entity_pyramid.safetensors")
    assert {k: v.shape for k, v in pyramid.items()} == {
        "scale_0.weight": (8, 4, 3, 3), "scale_1.weight": (8, 4, 3, 3), "scale_2.weight": (8, 4, 3, 3),
        "fuse.weight": (8, 8, 3, 3), "proj_out.weight": (4, 8, 1, 1), "scale_0.bias": (8,), "scale_1.bias": (8,),
        "scale_2.bias": (8,), "fuse.bias": (8,), "proj_out.bias": (4,)}
    # the port reads the layout constants of the converter
    assert (port.FORMAT, port.FORMAT_VERSION, port.META_FILE, port.UNET_DIR, port.IP_ADAPTER_FILE,
            port.PYRAMID_FILE) == (export.FORMAT, export.FORMAT_VERSION, export.META_FILE, export.UNET_DIR,
                                   export.IP_ADAPTER_FILE, export.PYRAMID_FILE)


def test_torch_forward_matches_jax(case):
    """MagDiffUNetTorch (diffusers UNet3DConditionModel + IPAdapterPlusImageProjection + MagDiffAttnProcessor +
    EntityPyramidTorch) == MagDiffUNet, fp32, max|diff| / max|ref| <= 1e-4. Other image embeddings or entity
    latents change the output: both conditioning paths are live (reordering the frames' image tokens would not: in
    mode "all" every frame attends to the whole set)."""
    module, params, i = case["module"], case["params"], case["inputs"]
    fwd = jax.jit(lambda p, x, g, e: module.apply({"params": p}, x, i["t"], i["ctx"], entity_latents=g,
                                                  image_embeds=e))
    ours = np.asarray(fwd(params, i["x"], i["grids"], i["embeds"]))
    model = load_magdiff_torch(case["folder"])
    assert list(model.processors) == json.loads((case["folder"] / "magdiff.json").read_text())["processors"]

    def run(grids, embeds):
        with torch.no_grad():
            out = model(_video(i["x"]), torch.from_numpy(i["t"]), torch.from_numpy(i["ctx"]),
                        [_video(g) for g in grids], torch.from_numpy(embeds))
        return np.moveaxis(out.numpy(), 1, -1)

    ref = run(i["grids"], i["embeds"])
    err = rel_err(ours, ref)
    print(f"MagDiffUNetTorch vs MagDiffUNet: rel err {err:.2e}")
    assert ours.shape == (B, F_, H, H, 4) and err <= TOL
    other = np.random.RandomState(1)
    assert rel_err(run(i["grids"], other.randn(*i["embeds"].shape).astype(np.float32)), ref) > 1e-3
    assert rel_err(run(tuple(other.randn(*g.shape).astype(np.float32) for g in i["grids"]), i["embeds"]), ref) > 1e-3


def test_round_trip_is_bitwise(case, tmp_path):
    """Flax -> PyTorch folder -> Flax: the same config and bit-identical params, through `magdiff-jax convert
    to-flax --kind magdiff` (in-process) and `magdiff_from_torch`; pyramid "single" exports no pyramid file."""
    from magdiff_jax import cli

    cli.main(cli.build_parser().parse_args(["convert", "to-flax", "--kind", "magdiff", str(case["folder"]),
                                            str(tmp_path / "flax")]))
    kind, module, params = load_model(tmp_path / "flax", kind="magdiff")
    assert kind == "magdiff" and module.config == case["module"].config
    want = flat_params(case["params"])
    got = flat_params(params)
    assert set(got) == set(want)
    assert all(got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)

    single_module, single = _random_magdiff(tiny_magdiff_config(pyramid="single"), seed=1)
    out = export.magdiff_to_torch(single_module, single, tmp_path / "single")
    assert sorted(p.name for p in out.iterdir()) == ["ip_adapter.safetensors", "magdiff.json", "unet"]
    back_module, back = export.magdiff_from_torch(out)
    assert back_module.config == single_module.config
    want, got = flat_params(single), flat_params(back)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        export.magdiff_to_torch(single_module, single, case["root"])  # never replaces an unrelated folder


def test_corrupted_export_names_the_key(case, tmp_path):
    """A key missing from ip_adapter.safetensors, an unexpected one, or a mis-shaped pyramid weight: both the
    Flax reader and the PyTorch loader name it; a magdiff.json whose processor order disagrees is refused."""
    folder = tmp_path / "torch"
    shutil.copytree(case["folder"], folder)
    ip = dict(sio.read_state_dict(folder / "ip_adapter.safetensors"))
    gone = ip.pop("ip_adapter.5.to_v_ip.weight")
    sio.write_state_dict(ip, folder, "ip_adapter")
    for read in (export.magdiff_from_torch, load_magdiff_torch):
        with pytest.raises(ConversionError, match=r"missing keys \(1\):\n    ip_adapter\.5\.to_v_ip\.weight"):
            read(folder)
    sio.write_state_dict({**ip, "ip_adapter.5.to_v_ip.weight": gone, "ip_adapter.9.to_k_ip.weight": gone}, folder,
                         "ip_adapter")
    for read in (export.magdiff_from_torch, load_magdiff_torch):
        with pytest.raises(ConversionError, match=r"unexpected keys \(1\):\n    ip_adapter\.9\.to_k_ip\.weight"):
            read(folder)
    shutil.copy(case["folder"] / "ip_adapter.safetensors", folder / "ip_adapter.safetensors")
    pyramid = dict(sio.read_state_dict(folder / "entity_pyramid.safetensors"))
    pyramid["fuse.weight"] = pyramid["fuse.weight"][:, :4]
    sio.write_state_dict(pyramid, folder, "entity_pyramid")
    for read in (export.magdiff_from_torch, load_magdiff_torch):
        with pytest.raises(ConversionError, match=r"mis-shaped keys \(1\):\n    fuse\.weight"):
            read(folder)
    shutil.copy(case["folder"] / "entity_pyramid.safetensors", folder / "entity_pyramid.safetensors")
    meta = json.loads((folder / "magdiff.json").read_text())
    meta["processors"] = meta["processors"][::-1]
    (folder / "magdiff.json").write_text(json.dumps(meta))
    with pytest.raises(ConversionError, match="processors"):
        export.magdiff_from_torch(folder)
    with pytest.raises(ValueError, match="spatial attn2 processors"):
        load_magdiff_torch(folder)


def test_pyramid_matches_jax():
    """EntityPyramidTorch == EntityPyramid (random weights, channels 8) at the paper's 48/40/32 grids and at
    11/13/6 (non-integer down- and an upscale): bilinear F.interpolate with align_corners=False and antialias=False
    is jax.image.resize(..., "bilinear", antialias=False); <= 1e-5 relative."""
    rng = np.random.RandomState(3)
    for sizes in ((48, 40, 32), (11, 13, 6)):
        grids = tuple(rng.randn(2, 2, s, s + 1, 4).astype(np.float32) for s in sizes)
        jax_pyramid = EntityPyramid(channels=8)
        params = random_params(jax_pyramid, grids, seed=4)
        ours = np.asarray(jax_pyramid.apply({"params": params}, grids))
        torch_pyramid = EntityPyramidTorch("multi", 8, 4, 4)
        torch_pyramid.load_state_dict({f"{layer}.{k}": torch.from_numpy(
            np.ascontiguousarray(np.transpose(v, (3, 2, 0, 1)) if k == "weight" else v))
            for layer, p in params.items() for k, v in (("weight", p["kernel"]), ("bias", p["bias"]))})
        with torch.no_grad():
            ref = np.moveaxis(torch_pyramid([_video(g) for g in grids]).numpy(), 1, -1)
        err = rel_err(ours, ref)
        print(f"pyramid {sizes}: rel err {err:.2e}")
        assert ours.shape == (2, 2, sizes[2], sizes[2] + 1, 4) and err <= 1e-5
    x = rng.randn(1, 7, 9, 3).astype(np.float32)
    for size in ((5, 4), (10, 13)):
        resized = jax.image.resize(x, (1, *size, 3), "bilinear", antialias=False)
        ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False,
                            antialias=False).permute(0, 2, 3, 1).numpy()
        assert rel_err(resized, ref) <= 1e-5


@pytest.mark.parametrize("mode", ["all", "own_and_first"])
def test_processor_matches_entity_attention(mode):
    """MagDiffAttnProcessor on a diffusers `Attention(16, cross_attention_dim=12, heads=2, dim_head=8)` ==
    `EntityAttention` given the per-frame image context (and mask) of `per_frame_image_context`; 2 videos of 3
    frames, 6 image tokens per video (2 per frame), all weights random; <= 1e-5 relative."""
    from diffusers.models.attention_processor import Attention

    rng = np.random.RandomState(5)
    b, f, n = 2, 3, 6
    x = rng.randn(b * f, 10, 16).astype(np.float32)
    text = rng.randn(b * f, 5, 12).astype(np.float32)
    tokens = rng.randn(b, n, 12).astype(np.float32)
    unet_cfg = dataclasses.replace(tiny_magdiff_config().unet, cross_attention_dim=12, image_token_mode=mode)
    context, mask = per_frame_image_context(unet_cfg, jnp.asarray(tokens), b, f, jnp.float32)
    layer = EntityAttention(16, 2, 8)
    params = random_params(layer, x, text, context, mask, seed=6)
    params["text_scale"], params["image_scale"] = np.float32(0.7), np.float32(1.3)
    ours = np.asarray(layer.apply({"params": params}, x, text, context, mask))

    attn = Attention(16, cross_attention_dim=12, heads=2, dim_head=8, bias=False, out_bias=True)
    proc = MagDiffAttnProcessor(16, 12, mode)
    attn.set_processor(proc)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    state = {f"{k}.weight": t(params[k.replace(".", "_")]["kernel"].T) for k in ("to_q", "to_k", "to_v", "to_out.0")}
    state |= {f"processor.{k}.weight": t(params[k]["kernel"].T) for k in ("to_k_ip", "to_v_ip")}
    state |= {"to_out.0.bias": t(params["to_out_0"]["bias"]), "processor.text_scale": t(np.full(1, 0.7, np.float32)),
              "processor.image_scale": t(np.full(1, 1.3, np.float32))}
    attn.load_state_dict(state)
    with torch.no_grad():
        ref = attn(t(x), encoder_hidden_states=t(text), ip_hidden_states=t(tokens)).numpy()
    err = rel_err(ours, ref)
    print(f"MagDiffAttnProcessor[{mode}] vs EntityAttention: rel err {err:.2e}")
    assert err <= 1e-5
    if mode == "own_and_first":  # the mask matters: "all" on the same weights differs
        proc.image_token_mode = "all"
        with torch.no_grad():
            assert rel_err(attn(t(x), encoder_hidden_states=t(text), ip_hidden_states=t(tokens)).numpy(), ref) > 1e-3


def test_the_torch_port_imports_without_jax():
    """A PyTorch user loads the export without JAX: `magdiff_jax.torch_port` (and the layout constants it shares
    with the converter, `utils.magdiff_layout`) import no JAX module."""
    code = ("import sys, magdiff_jax.torch_port; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
