"""Converter I/O: every error names its culprit, pickles are refused, sharded safetensors load, and the CLI's
to-flax / to-torch round trip is exact. A tiny diffusers UNet2DConditionModel stands in for every kind (the
mechanism is shared; per-kind tables are proven in their parity suites)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from helpers import assert_same_state_dict, perturb_

from magdiff_jax.convert import CheckpointFormatError, ConversionError, load_torch, save_torch
from magdiff_jax.convert import safetensors_io as sio

TINY = dict(
    sample_size=8, block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=8,
    attention_head_dim=2, norm_num_groups=4,
)
REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def torch_unet(tmp_path_factory):
    torch.manual_seed(0)
    model = perturb_(TorchUNet(**TINY).eval())
    folder = tmp_path_factory.mktemp("unet")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _write_variant(src: Path, dst: Path, edit) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    state = safetensors.torch.load_file(src / "diffusion_pytorch_model.safetensors")
    edit(state)
    safetensors.torch.save_file(state, dst / "diffusion_pytorch_model.safetensors")
    return dst


def test_missing_unexpected_and_misshaped_keys_are_all_listed(torch_unet, tmp_path):
    _, src = torch_unet

    def edit(state):
        del state["down_blocks.0.attentions.0.proj_in.weight"]
        del state["conv_out.bias"]
        state["down_blocks.0.resnets.0.extra_gain"] = torch.ones(3)
        state["mid_block.resnets.0.conv1.weight"] = torch.zeros(16, 16, 1, 1)

    folder = _write_variant(src, tmp_path / "bad", edit)
    with pytest.raises(ConversionError) as info:
        load_torch("unet2d", folder)
    msg = str(info.value)
    assert "missing keys (2)" in msg and "proj_in.weight" in msg and "conv_out.bias" in msg
    assert "unexpected keys (1)" in msg and "down_blocks.0.resnets.0.extra_gain" in msg
    assert "mis-shaped keys (1)" in msg and "mid_block.resnets.0.conv1.weight" in msg
    assert "(16, 16, 1, 1)" in msg and "(16, 16, 3, 3)" in msg
    assert str(folder) in msg


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt"])
def test_pickle_checkpoints_are_refused_without_unpickling(torch_unet, tmp_path, suffix):
    _, src = torch_unet
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    # Not even a valid pickle: proves the file is refused before anything reads it.
    (folder / f"diffusion_pytorch_model{suffix}").write_bytes(b"\x80\x04 not a pickle")
    with pytest.raises(CheckpointFormatError, match=rf"diffusion_pytorch_model\{suffix}.*safetensors"):
        load_torch("unet2d", folder)
    with pytest.raises(CheckpointFormatError, match="refusing to load a pickle"):
        sio.read_state_dict(folder / f"diffusion_pytorch_model{suffix}")


def test_corrupt_and_missing_files_name_the_path(torch_unet, tmp_path):
    _, src = torch_unet
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text((src / "config.json").read_text())
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(np.random.bytes(64))
    with pytest.raises(CheckpointFormatError, match=r"diffusion_pytorch_model\.safetensors"):
        load_torch("unet2d", folder)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "config.json").write_text((src / "config.json").read_text())
    data = (src / "diffusion_pytorch_model.safetensors").read_bytes()
    (truncated / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated"):
        load_torch("unet2d", truncated)
    with pytest.raises(CheckpointFormatError, match=r"no config\.json"):
        load_torch("unet2d", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown model 'unet9d'"):
        load_torch("unet9d", src)


def test_sharded_safetensors_round_trip(torch_unet, tmp_path):
    """save_torch with a shard limit writes index-json shards that diffusers loads, and that load_torch reads."""
    model, src = torch_unet
    module, params = load_torch("unet2d", src)
    out = save_torch("unet2d", module, params, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert_same_state_dict(model.state_dict(), TorchUNet.from_pretrained(out).state_dict())
    _, params2 = load_torch("unet2d", out)
    for a, b in zip(np.asarray(params["conv_in"]["kernel"]), np.asarray(params2["conv_in"]["kernel"])):
        assert np.array_equal(a, b)


def test_bfloat16_safetensors_load(torch_unet, tmp_path):
    """A bf16 checkpoint (as many released ones are) loads; values equal the bf16-rounded originals."""
    model, src = torch_unet
    folder = _write_variant(src, tmp_path / "bf16", lambda s: s.update({k: v.bfloat16() for k, v in s.items()}))
    _, params = load_torch("unet2d", folder)
    ref = model.conv_in.weight.detach().bfloat16().float().permute(2, 3, 1, 0).numpy()
    assert np.array_equal(np.asarray(params["conv_in"]["kernel"]), ref)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "magdiff_jax.cli", *args], capture_output=True, text=True,
                          cwd=REPO, timeout=600)


def test_cli_to_flax_then_to_torch_is_exact(torch_unet, tmp_path):
    """`magdiff-jax convert to-flax` (Orbax + config) then `to-torch`: UNet2DConditionModel loads it unchanged."""
    model, src = torch_unet
    r = _cli("convert", "to-flax", "--kind", "unet2d", str(src), str(tmp_path / "flax"))
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((tmp_path / "flax" / "config.json").read_text())
    assert meta["kind"] == "unet2d" and meta["config"]["block_out_channels"] == [8, 16]
    r = _cli("convert", "to-torch", "--kind", "unet2d", str(tmp_path / "flax"), str(tmp_path / "torch"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_state_dict(model.state_dict(), TorchUNet.from_pretrained(tmp_path / "torch").state_dict())
    # an existing destination is never overwritten silently
    r = _cli("convert", "to-flax", "--kind", "unet2d", str(src), str(tmp_path / "flax"))
    assert r.returncode == 1 and "exists and is not empty" in r.stderr


def test_cli_help_and_bad_input():
    r = _cli("convert", "--help")
    assert r.returncode == 0 and "to-flax" in r.stdout and "to-torch" in r.stdout
    r = _cli("convert", "to-flax", "--kind", "vae", "/nonexistent/folder", "/tmp/never")
    assert r.returncode == 1 and "/nonexistent/folder" in r.stderr


def test_core_imports_without_torch():
    """The core install has no torch: the CLI, converters (every kind registered), samplers and sharding import
    without pulling in torch, diffusers or transformers."""
    code = (
        "import sys\n"
        "import magdiff_jax.cli, magdiff_jax.diffusion, magdiff_jax.sharding\n"
        "from magdiff_jax.convert import load_pipeline_torch, torch_format\n"
        "[torch_format(k) for k in ('clip_text', 'clip_vision', 'vae', 'unet2d')]\n"
        "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


class _NotAWeight:
    """A pickled object of an arbitrary class: weights_only loading must refuse it."""


def test_pickled_weights_read_with_weights_only(tmp_path):
    """`read_weights` reads .bin / .ckpt through torch.load(weights_only=True): nested dicts flatten to dotted keys,
    a "state_dict" wrapper is unwrapped, bfloat16 survives, scalars beside the weights are skipped."""
    a, b = torch.randn(3, 4), torch.randn(2).to(torch.bfloat16)
    torch.save({"image_proj": {"proj.weight": a}, "ip_adapter": {"1.to_k_ip.weight": b}}, tmp_path / "ip.bin")
    got = sio.read_weights(tmp_path / "ip.bin")
    assert sorted(got) == ["image_proj.proj.weight", "ip_adapter.1.to_k_ip.weight"]
    np.testing.assert_array_equal(got["image_proj.proj.weight"], a.numpy())
    assert got["ip_adapter.1.to_k_ip.weight"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(got["ip_adapter.1.to_k_ip.weight"].astype(np.float32), b.float().numpy())
    torch.save({"state_dict": {"x.weight": a}, "global_step": 7}, tmp_path / "mm.ckpt")
    assert list(sio.read_weights(tmp_path / "mm.ckpt")) == ["x.weight"]
    safetensors.torch.save_file({"x": a}, tmp_path / "w.safetensors")
    np.testing.assert_array_equal(sio.read_weights(tmp_path / "w.safetensors")["x"], a.numpy())


def test_pickled_weights_with_arbitrary_objects_are_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"weight": torch.zeros(2), "payload": _NotAWeight()}, path)
    with pytest.raises(CheckpointFormatError, match=r"evil\.ckpt.*weights-only"):
        sio.read_weights(path)
    (tmp_path / "junk.bin").write_bytes(b"not a pickle")
    with pytest.raises(CheckpointFormatError, match=r"junk\.bin"):
        sio.read_weights(tmp_path / "junk.bin")
