"""The I2V stage as a diffusers AnimateDiffControlNetPipeline folder (`convert.i2v`, `magdiff-jax convert to-torch
--kind i2v`).

The stage (`helpers.tiny_i2v_stage`): a tiny random I2V export written by `export.stage.save_stage`: the denoiser
(`models.i2v.I2VUNet`: one cross-attention block of 32 channels, 4 heads, 3 frames of motion; an IP-Adapter-Plus
resampler of 1 head of 64, depth 4, ff x4, 4 queries, 32 -> 32 wide, which diffusers' loader can rebuild; image
cross-attention lambda 0.8; a ControlNet reading the reference at 2x the latent size, residuals x 0.7), a two-block
VAE (factor 2), CLIP text and vision towers (32 wide, 2 layers; the vision tower without a projection) and the
synthetic tokenizer. Every weight random, the ControlNet's zero convolutions included (a live ControlNet).

- the folder loads with `AnimateDiffControlNetPipeline.from_pretrained`, every component with no missing,
  unexpected or mis-shaped key (each class's `from_pretrained(output_loading_info=True)`), the IP-Adapter with
  `pipe.load_ip_adapter(DST, subfolder="", weight_name="ip_adapter.safetensors")`;
- one denoiser step, fp32, max|diff| / max|ref| <= 1e-4: diffusers ControlNetModel on the B*F frames (the reference
  repeated, i2v.json's conditioning scale) then UNetMotionModel with IPAdapterAttnProcessor2_0 (i2v.json's scale)
  == our I2VUNet, each side with its own text embeddings (pipe.tokenizer + pipe.text_encoder == our tokenizer +
  CLIPTextModel) and CLIP tokens (hidden_states[-2] of the same pixel_values: CLIPImageProcessor resizes unlike us);
- `i2v_from_diffusers` reads the stage's denoiser back bit-exactly; the VAE and CLIP towers read back with
  `load_torch` (the vision tower with the zero projection the export adds);
- an existing destination is refused without --overwrite, a stage diffusers cannot hold (a resampler of dim_head 8,
  another task) before anything is written; a missing tensor is named on reading.
"""

import dataclasses
import shutil

import pytest
from helpers import (
    STAGE_CONFIGS,
    STAGE_RESAMPLER,
    assert_i2v_reads_back,
    assert_pipeline_components_load,
    i2v_step_errors,
    tiny_i2v_stage,
)

from magdiff_jax.convert import ConversionError
from magdiff_jax.convert import safetensors_io as sio
from magdiff_jax.convert.i2v import DDIM_KEYS, i2v_from_diffusers, i2v_to_diffusers, read_i2v_meta
from magdiff_jax.export.stage import save_stage
from magdiff_jax.models.registry import get_model

TOL = 1e-4


def convert(*argv):
    from magdiff_jax import cli

    cli._convert(cli.build_parser().parse_args(["convert", "to-torch", "--kind", "i2v", *argv]))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The stage export, its conversion through the CLI, and the pipeline diffusers loads from it."""
    from diffusers import AnimateDiffControlNetPipeline

    root = tmp_path_factory.mktemp("i2v_export")
    stage = tiny_i2v_stage(root, "i2v")
    save_stage(stage, root / "stage")
    convert(str(root / "stage"), str(root / "diffusers"))
    dst = root / "diffusers"
    pipe = AnimateDiffControlNetPipeline.from_pretrained(dst)
    pipe.load_ip_adapter(str(dst), subfolder="", weight_name="ip_adapter.safetensors")
    meta = read_i2v_meta(dst)
    pipe.set_ip_adapter_scale(meta["ip_adapter_scale"])
    return dict(root=root, dst=dst, stage=stage, pipe=pipe, meta=meta)


def test_every_component_loads_with_no_missing_or_unexpected_key(case):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from transformers import CLIPImageProcessor

    dst = case["dst"]
    assert_pipeline_components_load(dst, "AnimateDiffControlNetPipeline")
    pipe, meta = case["pipe"], case["meta"]
    ip = [n for n, p in pipe.unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert len(ip) == 4 and all("motion_modules" not in n for n in ip)  # down 1, up 2, mid 1 spatial attn2
    assert type(pipe.unet.encoder_hid_proj.image_projection_layers[0]).__name__ == "IPAdapterPlusImageProjection"
    # the components diffusers has no weights for
    fe = CLIPImageProcessor.from_pretrained(dst / "feature_extractor")
    assert fe.crop_size == {"height": 32, "width": 32} and fe.size == {"shortest_edge": 32}
    schedule = case["stage"].schedule.to_diffusers_config()
    assert {k: pipe.scheduler.config[k] for k in DDIM_KEYS} == {k: schedule[k] for k in DDIM_KEYS}
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.tokenizer.model_max_length == 16
    assert meta["conditioning_scale"] == 0.7 and meta["ip_adapter_scale"] == 0.8 and meta["image_layer"] == -2
    assert meta["noise_prior"]["kind"] == "diffused" and meta["image_encoder_projection"] == "zeros"
    assert meta["step"] == 7 and meta["reference_factor"] == 2 and meta["text_max_length"] == 16
    assert meta["task"] == "i2v" and not (dst / "v2v.json").exists()


def test_one_denoiser_step_equals_the_diffusers_pipeline(case):
    """ControlNetModel + UNetMotionModel (IP-Adapter loaded) == I2VUNet, with each side's text and CLIP encoders."""
    errors = i2v_step_errors(case["pipe"], case["stage"], case["meta"])
    print("I2V export parity (max|diff| / max|ref|):", errors)
    assert all(errors[k] <= TOL for k in ("text", "clip", "denoiser")), errors
    # both conditionings move the output far beyond the tolerance: the comparison sees them
    assert errors["no_control"] > 1e-2 and errors["no_image"] > 1e-2, errors


def test_the_folder_reads_back_bit_exactly(case):
    assert_i2v_reads_back(case["stage"], case["dst"])


def test_existing_destination_refused_and_missing_tensors_named(case, tmp_path):
    root, dst = case["root"], case["dst"]
    with pytest.raises(FileExistsError, match=r"exists and is not empty.*overwrite"):
        convert(str(root / "stage"), str(dst))
    convert(str(root / "stage"), str(tmp_path / "again"))
    convert("--overwrite", str(root / "stage"), str(tmp_path / "again"))
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in dst.iterdir())

    stage = case["stage"]
    tiny = get_model("i2v").build(get_model("i2v").config_from_dict(
        {**STAGE_CONFIGS["unet"], "resampler": {**STAGE_RESAMPLER, "dim_head": 8, "heads": 8}}))
    with pytest.raises(ValueError, match=r"load_ip_adapter cannot read this resampler: dim_head=8 \(needs 64\)"):
        i2v_to_diffusers(dataclasses.replace(stage, modules={**stage.modules, "unet": tiny}), tmp_path / "no")
    with pytest.raises(ValueError, match="holds a 't2i' stage, not i2v"):
        i2v_to_diffusers(dataclasses.replace(stage, task="t2i"), tmp_path / "no")
    assert not (tmp_path / "no").exists()

    broken = tmp_path / "broken"
    shutil.copytree(dst, broken)
    state = dict(sio.read_state_dict(broken / "controlnet", "diffusion_pytorch_model"))
    del state["controlnet_mid_block.weight"]
    sio.write_state_dict(state, broken / "controlnet", "diffusion_pytorch_model")
    with pytest.raises(ConversionError, match=r"(?s)controlnet.*missing keys.*controlnet_mid_block\.weight"):
        i2v_from_diffusers(broken)
    shutil.copytree(dst / "controlnet", broken / "controlnet", dirs_exist_ok=True)
    state = dict(sio.read_file(broken / "ip_adapter.safetensors"))
    del state["ip_adapter.3.to_v_ip.weight"]
    sio.write_state_dict(state, broken, "ip_adapter")
    with pytest.raises(ConversionError, match=r"(?s)missing keys.*ip_adapter\.3\.to_v_ip\.weight"):
        i2v_from_diffusers(broken)
