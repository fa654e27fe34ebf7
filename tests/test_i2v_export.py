"""The I2V stage as a diffusers AnimateDiffControlNetPipeline folder (`convert.i2v`, `magdiff-jax convert to-torch
--kind i2v`).

The stage: a tiny random I2V export written by `export.stage.save_stage`: the denoiser (`models.i2v.I2VUNet`: one
cross-attention block of 32 channels, 4 heads, 3 frames of motion; an IP-Adapter-Plus resampler of 1 head of 64, depth
4, ff x4, 4 queries, 32 -> 32 wide, which diffusers' loader can rebuild; image cross-attention lambda 0.8; a
ControlNet reading the reference at 2x the latent size, residuals x 0.7), a two-block VAE (factor 2), CLIP text and
vision towers (32 wide, 2 layers; the vision tower without a projection) and the synthetic tokenizer. Every weight
random, the ControlNet's zero convolutions included (a live ControlNet).

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
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from etils import epath
from flax import traverse_util
from helpers import rel_err

from magdiff_jax.convert import ConversionError, load_torch
from magdiff_jax.convert import safetensors_io as sio
from magdiff_jax.convert.i2v import DDIM_KEYS, STAGE_MODELS, i2v_from_diffusers, i2v_to_diffusers, read_i2v_meta
from magdiff_jax.data.synthetic import write_tokenizer
from magdiff_jax.demo import load_config
from magdiff_jax.export.stage import Stage, save_stage
from magdiff_jax.models.registry import get_model
from magdiff_jax.models.tokenizer import CLIPTokenizer

TOL = 1e-4
B, F, H = 2, 3, 8  # videos, frames, latent size
UNET = {"sample_size": H, "block_out_channels": (32,), "layers_per_block": 1,
        "down_block_types": ("CrossAttnDownBlockMotion",), "up_block_types": ("CrossAttnUpBlockMotion",),
        "num_attention_heads": 4, "cross_attention_dim": 32, "norm_num_groups": 8, "motion_num_attention_heads": 4,
        "motion_max_seq_length": 8, "image_attention_scale": 0.8}
RESAMPLER = {"dim": 64, "depth": 4, "dim_head": 64, "heads": 1, "num_queries": 4, "embedding_dim": 32,
             "output_dim": 32, "ff_mult": 4}
MODELS = {
    "unet": {"unet": UNET, "resampler": RESAMPLER, "conditioning_embedding_out_channels": (16, 32),
             "conditioning_scale": 0.7},
    "vae": {"block_out_channels": (16, 32), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "norm_num_groups": 8,
            "sample_size": 2 * H},
    "text_encoder": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
                     "bos_token_id": 108, "eos_token_id": 109, "pad_token_id": 109},
    "image_encoder": {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
}
PROMPTS = ["a red circle moves left", "a blue square moves up"]


def random_model(kind: str, config: dict, seed: int):
    """A registered model with every parameter N(0, 0.1^2) (norm scales 1 + that), shapes from eval_shape."""
    spec = get_model(kind)
    module = spec.build(spec.config_from_dict(config))
    rng = np.random.RandomState(seed)
    flat = {p: (0.1 * rng.standard_normal(a.shape) + (p[-1] == "scale")).astype(np.float32)
            for p, a in spec.abstract_params(module).items()}
    return module, traverse_util.unflatten_dict(flat)


def convert(*argv):
    from magdiff_jax import cli

    cli._convert(cli.build_parser().parse_args(["convert", "to-torch", "--kind", "i2v", *argv]))


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The stage export, its conversion through the CLI, and the pipeline diffusers loads from it."""
    from diffusers import AnimateDiffControlNetPipeline

    root = tmp_path_factory.mktemp("i2v_export")
    modules, params = {}, {}
    for n, (name, kind) in enumerate(STAGE_MODELS.items()):
        modules[name], params[name] = random_model(kind, MODELS[name], seed=n)
    config = load_config("i2v", "tiny")
    config.model = MODELS
    write_tokenizer(root / "tokenizer")
    stage = Stage("i2v", 7, config, dict(STAGE_MODELS), modules, params, epath.Path(root / "tokenizer"),
                  epath.Path(root))
    save_stage(stage, root / "stage")
    convert(str(root / "stage"), str(root / "diffusers"))
    dst = root / "diffusers"
    pipe = AnimateDiffControlNetPipeline.from_pretrained(dst)
    pipe.load_ip_adapter(str(dst), subfolder="", weight_name="ip_adapter.safetensors")
    meta = read_i2v_meta(dst)
    pipe.set_ip_adapter_scale(meta["ip_adapter_scale"])
    return dict(root=root, dst=dst, stage=stage, pipe=pipe, meta=meta)


def test_every_component_loads_with_no_missing_or_unexpected_key(case):
    from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNetMotionModel
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from transformers import CLIPImageProcessor, CLIPTextModel, CLIPVisionModelWithProjection

    dst = case["dst"]
    index = json.loads((dst / "model_index.json").read_text())
    assert index["_class_name"] == "AnimateDiffControlNetPipeline"
    assert {k for k in index if not k.startswith("_")} == {
        "unet", "motion_adapter", "controlnet", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder",
        "feature_extractor"}
    for name, cls in (("unet", UNetMotionModel), ("motion_adapter", MotionAdapter), ("controlnet", ControlNetModel),
                      ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
                      ("image_encoder", CLIPVisionModelWithProjection)):
        _, info = cls.from_pretrained(dst / name, output_loading_info=True)
        problems = {k: v for k, v in info.items() if k != "error_msgs" and len(v)}
        assert not problems and not info.get("error_msgs"), (name, problems, info.get("error_msgs"))
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


def test_one_denoiser_step_equals_the_diffusers_pipeline(case):
    """ControlNetModel + UNetMotionModel (IP-Adapter loaded) == I2VUNet, with each side's text and CLIP encoders."""
    pipe, stage, meta = case["pipe"], case["stage"], case["meta"]
    rng = np.random.RandomState(0)
    x = rng.standard_normal((B, F, H, H, 4)).astype(np.float32)
    t = np.array([10, 500])
    reference = rng.uniform(size=(B, 2 * H, 2 * H, 3)).astype(np.float32)  # [0, 1]
    pixels = rng.standard_normal((B, 3, 32, 32)).astype(np.float32)  # CLIP input, already normalised

    # text: pipe.tokenizer + pipe.text_encoder vs ours
    tok = pipe.tokenizer(PROMPTS, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids
    ours_tok = np.asarray(CLIPTokenizer.from_folder(stage.tokenizer_folder(), max_length=16)(PROMPTS))
    np.testing.assert_array_equal(tok.numpy(), ours_tok)
    text, vision = stage.modules["text_encoder"], stage.modules["image_encoder"]
    ctx = np.asarray(jax.jit(lambda p, ids: text.apply({"params": p}, ids).last_hidden_state)(
        stage.params["text_encoder"], ours_tok))
    clip = np.asarray(jax.jit(lambda p, px: vision.apply({"params": p}, px, output_hidden_states=True)
                              .hidden_states[-2])(stage.params["image_encoder"], pixels.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        ref_ctx = pipe.text_encoder(tok)[0]
        ref_clip = pipe.image_encoder(torch.from_numpy(pixels), output_hidden_states=True).hidden_states[-2]
    errors = {"text": rel_err(ctx, ref_ctx), "clip": rel_err(clip, ref_clip)}

    # the denoiser
    module = stage.modules["unet"]
    ours = np.asarray(jax.jit(lambda p: module.apply({"params": p}, jnp.asarray(x), jnp.asarray(t), ctx,
                                                     image_embeds=clip, reference=reference))(stage.params["unet"]))

    def diffusers_step(cond_scale, ip_scale):
        pipe.set_ip_adapter_scale(ip_scale)
        frames = torch.from_numpy(np.ascontiguousarray(x.reshape(B * F, H, H, 4).transpose(0, 3, 1, 2)))
        ctx_f = ref_ctx.repeat_interleave(F, dim=0)
        cond = torch.from_numpy(np.ascontiguousarray(np.repeat(reference, F, 0).transpose(0, 3, 1, 2)))
        t_f = torch.from_numpy(np.repeat(t, F))
        with torch.no_grad():
            down, mid = pipe.controlnet(frames, t_f, encoder_hidden_states=ctx_f, controlnet_cond=cond,
                                        conditioning_scale=cond_scale, return_dict=False)
            out = pipe.unet(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))), torch.from_numpy(t),
                            encoder_hidden_states=ctx_f, added_cond_kwargs={"image_embeds": [ref_clip[:, None]]},
                            down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        return out.numpy().transpose(0, 2, 3, 4, 1)

    ref = diffusers_step(meta["conditioning_scale"], meta["ip_adapter_scale"])
    errors["denoiser"] = rel_err(ours, ref)
    print("I2V export parity (max|diff| / max|ref|):", errors)
    assert all(e <= TOL for e in errors.values()), errors
    # both conditionings move the output far beyond the tolerance: the comparison sees them
    assert rel_err(diffusers_step(0.0, meta["ip_adapter_scale"]), ref) > 1e-2
    assert rel_err(diffusers_step(meta["conditioning_scale"], 0.0), ref) > 1e-2
    pipe.set_ip_adapter_scale(meta["ip_adapter_scale"])


def test_the_folder_reads_back_bit_exactly(case):
    stage, dst = case["stage"], case["dst"]
    module, params = i2v_from_diffusers(dst)
    assert module.config == stage.modules["unet"].config
    ours, want = (traverse_util.flatten_dict(p) for p in (params, stage.params["unet"]))
    assert set(ours) == set(want)
    differ = ["/".join(p) for p in want if not np.array_equal(ours[p], np.asarray(want[p]))]
    assert not differ, differ[:5]
    for name, kind in (("vae", "vae"), ("text_encoder", "clip_text"), ("image_encoder", "clip_vision")):
        _, back = load_torch(kind, dst / name)
        back, want = traverse_util.flatten_dict(back), traverse_util.flatten_dict(stage.params[name])
        if name == "image_encoder":  # the projection the export adds (the stage's tower has none)
            assert not np.any(np.asarray(back.pop(("visual_projection", "kernel"))))
        assert set(back) == set(want) and all(np.array_equal(back[p], want[p]) for p in want), name


def test_existing_destination_refused_and_missing_tensors_named(case, tmp_path):
    root, dst = case["root"], case["dst"]
    with pytest.raises(FileExistsError, match=r"exists and is not empty.*overwrite"):
        convert(str(root / "stage"), str(dst))
    convert(str(root / "stage"), str(tmp_path / "again"))
    convert("--overwrite", str(root / "stage"), str(tmp_path / "again"))
    assert sorted(p.name for p in (tmp_path / "again").iterdir()) == sorted(p.name for p in dst.iterdir())

    stage = case["stage"]
    tiny = get_model("i2v").build(get_model("i2v").config_from_dict(
        {**MODELS["unet"], "resampler": {**RESAMPLER, "dim_head": 8, "heads": 8}}))
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
