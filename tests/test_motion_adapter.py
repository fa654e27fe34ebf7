"""AnimateDiff motion adapters in every form == diffusers `UNetMotionModel.from_unet2d(UNet2DConditionModel,
MotionAdapter)`, fp32, max|diff|/max|ref| <= 1e-4; exact round trips back to `MotionAdapter.from_pretrained` and to
the original AnimateDiff layout; a new adapter for a unet_motion; every bad file named.

The SD U-Net and the MotionAdapter are tiny and random with every parameter perturbed (the motion modules'
zero-initialised `proj_out` included) and so are the `pos_embed.pe` frame tables, which therefore must be read from
the file, not recomputed. The original-layout files are written here from the MotionAdapter's state dict by the
test's own key map (`to_original`), which documents that layout.
"""

import json
import re

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import MotionAdapter, UNet2DConditionModel, UNetMotionModel
from flax import traverse_util
from helpers import assert_same_state_dict, perturb_, rel_err
from test_unet_motion import forward, perturb_all_, plain_config, run_torch

from magdiff_jax.convert import CheckpointFormatError, ConversionError, torch_format
from magdiff_jax.convert.core import flax_to_torch
from magdiff_jax.convert.unet_motion import (
    apply_motion_adapter,
    load_motion_adapter,
    motion_adapter_to_torch,
    read_motion_adapter,
    unet_motion_rules,
)
from magdiff_jax.layers.motion import sinusoidal_table
from magdiff_jax.models.registry import ConfigError

TOL = 1e-4
UNET = dict(block_out_channels=(16, 32), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, sample_size=8)
# AnimateDiff v2-like: a mid-block module, 32 frame positions, 8 heads (AnimateDiff's, which no file records);
# per-block temporal depths
ADAPTER = dict(block_out_channels=(16, 32), motion_layers_per_block=1, motion_transformer_layers_per_block=(1, 2),
               motion_norm_num_groups=4, motion_max_seq_length=32, use_motion_mid_block=True)

# the original AnimateDiff names (animatediff/models/motion_module.py: TemporalTransformerBlock) of diffusers'
ORIGINAL_NAMES = {"attn1": "attention_blocks.0", "attn2": "attention_blocks.1", "norm1": "norms.0", "norm2": "norms.1",
                  "norm3": "ff_norm"}


def to_original(state: dict) -> dict:
    """A MotionAdapter state dict under the keys of AnimateDiff's own checkpoints (mm_sd_v15_v2.ckpt):
    `<block>.motion_modules.<j>.<rest>` -> `<block>.motion_modules.<j>.temporal_transformer.<rest>`, where in
    `transformer_blocks.<k>.<sub>.*` attn1/attn2/norm1/norm2/norm3 become attention_blocks.0/attention_blocks.1/
    norms.0/norms.1/ff_norm, and the block's frame table `pos_embed.pe` is held by both attentions,
    `attention_blocks.{0,1}.pos_encoder.pe`."""
    out = {}
    for key, value in state.items():
        block, j, rest = re.fullmatch(r"(.+)\.motion_modules\.(\d+)\.(.+)", key).groups()
        names = [rest]
        sub = re.fullmatch(r"transformer_blocks\.(\d+)\.(\w+)\.(.+)", rest)
        if sub and sub[2] == "pos_embed":
            names = [f"transformer_blocks.{sub[1]}.attention_blocks.{a}.pos_encoder.{sub[3]}" for a in (0, 1)]
        elif sub:
            names = [f"transformer_blocks.{sub[1]}.{ORIGINAL_NAMES.get(sub[2], sub[2])}.{sub[3]}"]
        for name in names:
            out[f"{block}.motion_modules.{j}.temporal_transformer.{name}"] = value.detach().clone()
    return out


class NotATensor:
    """Any object but tensors: a weights-only load refuses to unpickle it."""


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The SD U-Net folder, the adapter in four forms, the diffusers adapter, and diffusers' from_unet2d of them."""
    torch.manual_seed(0)
    unet = perturb_(UNet2DConditionModel(**UNET).eval(), seed=1)
    adapter = perturb_all_(MotionAdapter(**ADAPTER).eval(), seed=2)
    root = tmp_path_factory.mktemp("motion")
    unet.save_pretrained(root / "unet", safe_serialization=True)
    adapter.save_pretrained(root / "adapter", safe_serialization=True)
    original = to_original(adapter.state_dict())
    torch.save(original, root / "mm_original.ckpt")
    safetensors.torch.save_file(original, root / "mm_original.safetensors")
    sources = {
        "folder": root / "adapter",
        "original_ckpt": root / "mm_original.ckpt",
        "original_safetensors": root / "mm_original.safetensors",
        "diffusers_file": root / "adapter" / "diffusion_pytorch_model.safetensors",
    }
    reference = UNetMotionModel.from_unet2d(unet, adapter).eval()
    rng = np.random.RandomState(0)
    x = rng.randn(1, 4, 8, 8, 4).astype(np.float32)
    t, ctx = np.array([417]), rng.randn(1, 5, 8).astype(np.float32)
    return dict(root=root, sources=sources, adapter=adapter, reference=reference, inputs=(x, t, ctx),
                ref_out=run_torch(reference, x, t, ctx), loaded={})


def loaded(case, form):
    if form not in case["loaded"]:
        case["loaded"][form] = load_motion_adapter(case["root"] / "unet", case["sources"][form])
    return case["loaded"][form]


@pytest.mark.parametrize("form", ["folder", "original_ckpt", "original_safetensors", "diffusers_file"])
def test_every_form_equals_from_unet2d(case, form):
    """load_motion_adapter(SD U-Net folder, adapter) == diffusers UNetMotionModel.from_unet2d for the MotionAdapter
    folder, a torch.save .ckpt and a .safetensors in the original AnimateDiff layout, and diffusers' weights file
    alone: the same config (a single file's read from its shapes), bit-identical state dict, output within 1e-4
    relative (fp32)."""
    module, params = loaded(case, form)
    reference = case["reference"]
    assert plain_config(torch_format("unet_motion").config_to_torch(module.config)) == plain_config(
        reference.config)
    ours = flax_to_torch(params, unet_motion_rules(module.config), "unet_motion")
    ref = {k: v.numpy() for k, v in reference.state_dict().items()}
    assert set(ours) == set(ref)
    assert all(np.array_equal(ours[k], ref[k]) for k in ref)
    err = rel_err(forward(module)(params, *case["inputs"], {}), case["ref_out"])
    print(f"motion adapter [{form}] vs from_unet2d rel err {err:.2e}")
    assert err <= TOL
    assert read_motion_adapter(case["sources"][form]).layout == ("original" if "original" in form else "diffusers")


def test_round_trip_to_motion_adapter(case, tmp_path):
    """ours -> motion_adapter_to_torch -> MotionAdapter.from_pretrained: no missing, unexpected or mis-shaped key,
    bit-identical tensors, the same config; layout="original": the keys of `to_original`, the same tensors, and it
    reads back to the same params."""
    module, params = loaded(case, "original_ckpt")
    adapter = case["adapter"]
    motion_adapter_to_torch(module.config, params, tmp_path / "adapter")
    back, info = MotionAdapter.from_pretrained(tmp_path / "adapter", output_loading_info=True)
    assert not any(info.values()), info
    assert_same_state_dict(adapter.state_dict(), back.state_dict())
    assert plain_config(back.config) == plain_config(adapter.config)
    with pytest.raises(FileExistsError, match="not empty"):
        motion_adapter_to_torch(module.config, params, tmp_path / "adapter")

    path = motion_adapter_to_torch(module.config, params, tmp_path / "mm.safetensors", layout="original")
    written = safetensors.torch.load_file(path)
    expected = to_original(adapter.state_dict())
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    again = traverse_util.flatten_dict(apply_motion_adapter(module.config, params, path))
    assert all(np.array_equal(v, again[k]) for k, v in traverse_util.flatten_dict(params).items())
    with pytest.raises(FileExistsError):
        motion_adapter_to_torch(module.config, params, path, layout="original")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        motion_adapter_to_torch(module.config, params, tmp_path / "mm.ckpt", layout="original")


def test_apply_motion_adapter_replaces_only_the_motion_modules(case, tmp_path):
    """A second adapter (original layout) on a loaded unet_motion: its motion modules become that adapter's (bit for
    bit, compared in diffusers' layout), every other parameter is kept (the same arrays); an adapter that does not
    fit is refused naming what differs."""
    module, params = loaded(case, "folder")
    other = perturb_all_(MotionAdapter(**ADAPTER).eval(), seed=7)
    safetensors.torch.save_file(to_original(other.state_dict()), tmp_path / "other.safetensors")
    replaced = apply_motion_adapter(module.config, params, tmp_path / "other.safetensors")
    new, old = traverse_util.flatten_dict(replaced), traverse_util.flatten_dict(params)
    assert set(new) == set(old)
    motion = [k for k in old if any(p.startswith("motion_modules") for p in k)]
    assert motion and len(motion) < len(old)
    assert all(new[k] is old[k] for k in old if k not in motion)
    assert not any(np.array_equal(new[k], old[k]) for k in motion)
    state = flax_to_torch(replaced, unet_motion_rules(module.config), "unet_motion")
    want = other.state_dict()
    assert {k for k in state if ".motion_modules." in k} == set(want)
    assert all(np.array_equal(state[k], want[k].numpy()) for k in want)

    short = perturb_all_(MotionAdapter(**{**ADAPTER, "motion_max_seq_length": 24}).eval(), seed=3)
    short.save_pretrained(tmp_path / "short", safe_serialization=True)
    with pytest.raises(ConversionError, match=r"(?s)mis-shaped keys.*down_blocks\.0\.motion_modules\.0\."
                                              r"transformer_blocks\.0\.pos_embed\.pe: checkpoint has \(1, 24, 16\)"):
        apply_motion_adapter(module.config, params, tmp_path / "short")
    with pytest.raises(ValueError, match="motion_num_attention_heads"):
        apply_motion_adapter(module.config, params, tmp_path / "other.safetensors",
                             adapter_config={"motion_num_attention_heads": 4})


def test_config_read_from_shapes_v1_layout(case, tmp_path):
    """An AnimateDiff v1-like file (no mid-block module, 24 frame positions, 4 heads here): its config is read from
    the shapes and equals the MotionAdapter's; heads are given (no shape carries them); structural fields cannot be
    overridden. Without frame tables (AnimateDiff's current code keeps them out of its state dicts) the sinusoidal
    table is used; frame tables of different lengths are refused."""
    v1 = dict(ADAPTER, motion_transformer_layers_per_block=1, use_motion_mid_block=False, motion_max_seq_length=24,
              motion_num_attention_heads=4)
    adapter = perturb_all_(MotionAdapter(**v1).eval(), seed=4)
    state = to_original(adapter.state_dict())
    safetensors.torch.save_file(state, tmp_path / "v1.safetensors")
    read = read_motion_adapter(tmp_path / "v1.safetensors", {"motion_num_attention_heads": 4})
    assert read.layout == "original"
    assert {k: plain_config(adapter.config)[k] for k in read.config} == read.config
    assert set(read.config) == {"block_out_channels", "motion_layers_per_block", "motion_transformer_layers_per_block",
                                "use_motion_mid_block", "motion_max_seq_length", "motion_num_attention_heads"}
    with pytest.raises(ConfigError, match="use_motion_mid_block is read from the tensor shapes"):
        read_motion_adapter(tmp_path / "v1.safetensors", {"use_motion_mid_block": True})

    no_tables = {k: v for k, v in state.items() if not k.endswith(".pe")}
    torch.save(no_tables, tmp_path / "no_tables.ckpt")
    module, params = load_motion_adapter(case["root"] / "unet", tmp_path / "no_tables.ckpt",
                                         adapter_config={"motion_max_seq_length": 24})
    assert not module.config.use_motion_mid_block and module.config.motion_max_seq_length == 24
    pe = params["up_blocks_0"]["motion_modules_1"]["transformer_blocks_0"]["pos_embed"]["pe"]
    np.testing.assert_array_equal(pe, sinusoidal_table(24, 32))
    kernel = params["up_blocks_0"]["motion_modules_1"]["transformer_blocks_0"]["attn2"]["to_q"]["kernel"]
    weight = adapter.state_dict()["up_blocks.0.motion_modules.1.transformer_blocks.0.attn2.to_q.weight"]
    np.testing.assert_array_equal(kernel, weight.numpy().T)

    mixed = dict(state)
    name = "up_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"
    mixed[name] = mixed[name][:, :16]
    torch.save(mixed, tmp_path / "mixed.ckpt")
    with pytest.raises(ConversionError, match=r"frame tables .* differ in length \[16, 24\]"):
        read_motion_adapter(tmp_path / "mixed.ckpt")


def test_bad_files_are_refused_naming_the_culprit(case, tmp_path):
    """A .ckpt holding any other pickled object is refused unread (torch.load(weights_only=True)); a missing and a
    mis-shaped key are both named, under the file's own (original) names; a block's two frame tables must agree;
    widths that no adapter has are refused."""
    unet = case["root"] / "unet"
    key = "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight"
    torch.save({key: NotATensor()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointFormatError, match="not a loadable weights-only PyTorch checkpoint"):
        load_motion_adapter(unet, tmp_path / "evil.ckpt")

    state = to_original(case["adapter"].state_dict())
    gone = "up_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_k.weight"
    bent = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.1.ff.net.2.weight"
    del state[gone]
    state[bent] = state[bent].T.contiguous()
    torch.save(state, tmp_path / "broken.ckpt")
    with pytest.raises(ConversionError) as e:
        load_motion_adapter(unet, tmp_path / "broken.ckpt")
    message = str(e.value)
    assert "broken.ckpt" in message and "missing keys (1)" in message and "mis-shaped keys (1)" in message
    assert f"\n    {gone}" in message and f"\n    {bent}: checkpoint has (128, 32), model expects (32, 128)" in message

    state = to_original(case["adapter"].state_dict())
    table = "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"
    state[table] = state[table] + 1
    torch.save(state, tmp_path / "tables.ckpt")
    module, params = loaded(case, "folder")
    with pytest.raises(ConversionError, match="two frame tables .* differ(?s:.*)" + re.escape(table)):
        apply_motion_adapter(module.config, params, tmp_path / "tables.ckpt")

    state = to_original(case["adapter"].state_dict())
    state = {k: v for k, v in state.items() if not k.startswith("up_blocks.0.")}
    torch.save(state, tmp_path / "no_up.ckpt")
    with pytest.raises(ConversionError, match=r"the up blocks are numbered \[1\], expected 0\.\.0"):
        load_motion_adapter(unet, tmp_path / "no_up.ckpt")


def test_cli_converts_motion_adapters(case, tmp_path):
    """`convert to-flax --kind unet_motion --motion-adapter ADAPTER UNET DST` (an original-layout .ckpt), then
    `convert to-torch --kind unet_motion --motion-adapter-layout diffusers DST OUT`: OUT is the adapter again."""
    from magdiff_jax import cli

    def convert(*argv):
        cli._convert(cli.build_parser().parse_args(["convert", *argv]))

    convert("to-flax", "--kind", "unet_motion", "--motion-adapter", str(case["sources"]["original_ckpt"]),
            str(case["root"] / "unet"), str(tmp_path / "flax"))
    convert("to-torch", "--kind", "unet_motion", "--motion-adapter-layout", "diffusers", str(tmp_path / "flax"),
            str(tmp_path / "adapter"))
    back = MotionAdapter.from_pretrained(tmp_path / "adapter")
    assert_same_state_dict(case["adapter"].state_dict(), back.state_dict())
    assert json.loads((tmp_path / "adapter" / "config.json").read_text())["_class_name"] == "MotionAdapter"
    with pytest.raises(ValueError, match="--motion-adapter needs --kind unet_motion"):
        convert("to-flax", "--kind", "unet2d", "--motion-adapter", "x", "y", "z")
