"""The V2V stage as a diffusers AnimateDiffVideoToVideoControlNetPipeline folder (`convert.i2v` with task "v2v",
`magdiff-jax convert to-torch --kind v2v`).

The stage: the tiny stage of test_i2v_export with other random weights (`helpers.tiny_i2v_stage`: the I2V denoiser
with a live ControlNet and an IP-Adapter-Plus resampler diffusers can rebuild, a factor-2 VAE, CLIP towers, the
synthetic tokenizer) as a "v2v" task with `task_options` strength 0.6 (not the default 0.5, so the meta is seen to
read it), scale 2, low_res_input "sdedit", written by `export.stage.save_stage` and converted through the CLI.

- the folder loads with `AnimateDiffVideoToVideoControlNetPipeline.from_pretrained`, its model_index.json names
  exactly the components that pipeline's __init__ takes, each with no missing, unexpected or mis-shaped key; the
  IP-Adapter loads with `pipe.load_ip_adapter(DST, subfolder="", weight_name="ip_adapter.safetensors")`; v2v.json
  holds the scales, the CLIP layer, strength, scale and low_res_input;
- the pipeline runs end to end: a 3-frame low-resolution clip (8 px) upsampled bicubically by `scale` to 16 px
  (2x the latent size), the reference as `ip_adapter_image` and repeated over the frames as `conditioning_frames`,
  v2v.json's strength and scales, 2 steps, `output_type="np"`: (1, 3, 16, 16, 3) frames, finite, in [0, 1];
- one denoiser step, fp32, max|diff| / max|ref| <= 1e-4: diffusers ControlNetModel + UNetMotionModel with
  IPAdapterAttnProcessor2_0 (the loaded pipeline's) == our I2VUNet (`helpers.i2v_step_errors`, as the I2V test);
- `i2v_from_diffusers` reads the folder back bit-exactly;
- concat input (a U-Net of twice the latent channels), a U-Net whose input channels are not the VAE's latent ones,
  a stage of another task (either way round), bad task options and a noise prior are refused before anything is
  written; a folder whose model_index.json names the other pipeline, or that holds both meta files, is refused on
  reading.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest
from helpers import (
    STAGE_CONFIGS,
    STAGE_LATENT,
    STAGE_UNET,
    assert_i2v_reads_back,
    assert_pipeline_components_load,
    i2v_step_errors,
    tiny_i2v_stage,
)

from magdiff_jax.convert import safetensors_io as sio
from magdiff_jax.convert.i2v import i2v_from_diffusers, i2v_to_diffusers, read_i2v_meta
from magdiff_jax.diffusion.noise_prior import NoisePriorConfig
from magdiff_jax.export.stage import save_stage
from magdiff_jax.models.registry import get_model

TOL = 1e-4
F = 3  # frames
OPTIONS = {"strength": 0.6, "scale": 2, "low_res_input": "sdedit"}


def convert(kind, *argv):
    from magdiff_jax import cli

    cli._convert(cli.build_parser().parse_args(["convert", "to-torch", "--kind", kind, *argv]))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The V2V stage export, its conversion through the CLI, and the pipeline diffusers loads from it."""
    from diffusers import AnimateDiffVideoToVideoControlNetPipeline

    root = tmp_path_factory.mktemp("v2v_export")
    stage = tiny_i2v_stage(root, "v2v", seed=10, **OPTIONS)
    save_stage(stage, root / "stage")
    convert("v2v", str(root / "stage"), str(root / "diffusers"))
    dst = root / "diffusers"
    pipe = AnimateDiffVideoToVideoControlNetPipeline.from_pretrained(dst)
    pipe.load_ip_adapter(str(dst), subfolder="", weight_name="ip_adapter.safetensors")
    meta = read_i2v_meta(dst)
    pipe.set_ip_adapter_scale(meta["ip_adapter_scale"])
    return dict(root=root, dst=dst, stage=stage, pipe=pipe, meta=meta)


def test_every_component_loads_and_the_meta_holds_the_sampling_options(case):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    dst, pipe, meta, stage = case["dst"], case["pipe"], case["meta"], case["stage"]
    assert_pipeline_components_load(dst, "AnimateDiffVideoToVideoControlNetPipeline")
    assert type(pipe).__name__ == "AnimateDiffVideoToVideoControlNetPipeline"
    ip = [n for n, p in pipe.unet.attn_processors.items() if isinstance(p, IPAdapterAttnProcessor2_0)]
    assert len(ip) == 4 and all("motion_modules" not in n for n in ip)  # down 1, up 2, mid 1 spatial attn2
    assert sorted(p.name for p in dst.glob("*.json")) == ["model_index.json", "v2v.json"]
    assert meta["format"] == "magdiff_jax_v2v_diffusers" and meta["task"] == "v2v" and meta["step"] == 7
    assert {k: meta[k] for k in OPTIONS} == OPTIONS and "noise_prior" not in meta
    assert meta["residual_decode"] is False  # the default: the pipeline's decoded output is the stage's
    assert meta["conditioning_scale"] == 0.7 and meta["ip_adapter_scale"] == 0.8 and meta["image_layer"] == -2
    assert meta["reference_factor"] == 2 and meta["text_max_length"] == 16
    assert meta["resolution"] == list(stage.config.data.resolution)
    assert meta["num_frames"] == stage.config.data.num_frames


def test_the_pipeline_runs_end_to_end(case):
    """A low-resolution clip, upsampled by `scale`, through the whole pipeline as the stage samples (v2v.json)."""
    import jax
    import torch
    from PIL import Image

    pipe, meta = case["pipe"], case["meta"]
    size = 2 * STAGE_LATENT  # the VAE's factor 2
    rng = np.random.RandomState(1)
    low = rng.uniform(size=(F, size // meta["scale"], size // meta["scale"], 3)).astype(np.float32)
    video = np.clip(np.asarray(jax.image.resize(low, (F, size, size, 3), "bicubic")), 0.0, 1.0)
    reference = Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8))
    steps = []
    out = pipe(video=video, prompt="a red circle moves left", height=size, width=size, num_inference_steps=2,
               strength=meta["strength"], guidance_scale=2.0, ip_adapter_image=reference,
               conditioning_frames=[reference] * F, controlnet_conditioning_scale=meta["conditioning_scale"],
               generator=torch.Generator().manual_seed(0), output_type="np",
               callback_on_step_end=lambda p, i, t, kw: steps.append(int(t)) or kw).frames
    assert out.shape == (1, F, size, size, 3) and np.isfinite(out).all(), out.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    # SDEdit: of the 2 scheduled steps, int(2 * strength) run, from the partly noised input
    assert len(steps) == int(2 * meta["strength"]) and steps[0] < pipe.scheduler.config.num_train_timesteps // 2


def test_one_denoiser_step_equals_the_diffusers_pipeline(case):
    """ControlNetModel + UNetMotionModel (IP-Adapter loaded) == I2VUNet, with each side's text and CLIP encoders."""
    errors = i2v_step_errors(case["pipe"], case["stage"], case["meta"], frames=F)
    print("V2V export parity (max|diff| / max|ref|):", errors)
    assert all(errors[k] <= TOL for k in ("text", "clip", "denoiser")), errors
    assert errors["no_control"] > 1e-2 and errors["no_image"] > 1e-2, errors


def test_the_folder_reads_back_bit_exactly(case):
    assert_i2v_reads_back(case["stage"], case["dst"])


def test_what_the_pipeline_cannot_run_is_refused_before_anything_is_written(case, tmp_path):
    stage, root = case["stage"], case["root"]
    no = tmp_path / "no"

    def with_options(**options):
        config = stage.config.copy_and_resolve_references()
        config.task_options.update(options)
        return dataclasses.replace(stage, config=config)

    concat_unet = get_model("i2v").build(get_model("i2v").config_from_dict(
        {**STAGE_CONFIGS["unet"], "unet": {**STAGE_UNET, "in_channels": 8, "out_channels": 4}}))
    concat = dataclasses.replace(with_options(low_res_input="concat"), modules={**stage.modules, "unet": concat_unet})
    with pytest.raises(ValueError, match=r"low_res_input='concat'.*AnimateDiffVideoToVideoControlNetPipeline gives its "
                                         r"U-Net the noisy latent alone; only an 'sdedit' V2V stage"):
        i2v_to_diffusers(concat, no, task="v2v")
    wide = dataclasses.replace(stage, modules={**stage.modules, "unet": concat_unet})
    with pytest.raises(ValueError, match=r"the U-Net reads 8 input channels, the VAE's latents have 4"):
        i2v_to_diffusers(wide, no, task="v2v")
    for options, message in (({"low_res_input": "pixels"}, r"low_res_input='pixels' must be one of"),
                             ({"strength": 1.5}, r"task_options.strength=1.5 must be a number in \(0, 1\]"),
                             ({"scale": 0}, r"task_options.scale=0 must be an int >= 1")):
        with pytest.raises(ValueError, match=message):
            i2v_to_diffusers(with_options(**options), no, task="v2v")
    with pytest.raises(ValueError, match="no noise prior applies"):
        i2v_to_diffusers(stage, no, task="v2v", prior=NoisePriorConfig())
    with pytest.raises(ValueError, match="holds a 'i2v' stage, not v2v"):
        i2v_to_diffusers(dataclasses.replace(stage, task="i2v"), no, task="v2v")
    with pytest.raises(ValueError, match="holds a 'v2v' stage, not i2v"):
        convert("i2v", str(root / "stage"), str(no))
    assert not no.exists()


def test_a_folder_of_the_other_pipeline_is_refused_on_reading(case, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(case["dst"], broken)
    index = json.loads((broken / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "_class_name": "AnimateDiffControlNetPipeline"}))
    with pytest.raises(sio.CheckpointFormatError, match=r"_class_name 'AnimateDiffControlNetPipeline', but v2v\.json "
                                                        r"is written beside AnimateDiffVideoToVideoControlNetPipeline"):
        i2v_from_diffusers(broken)
    (broken / "model_index.json").write_text(json.dumps(index))
    shutil.copy(broken / "v2v.json", broken / "i2v.json")
    with pytest.raises(sio.CheckpointFormatError, match=r"holds i2v\.json and v2v\.json"):
        read_i2v_meta(broken)
