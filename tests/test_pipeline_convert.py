"""`load_pipeline_torch` on a whole diffusers StableDiffusionPipeline folder, proven end to end: our converted
tokenizer + CLIPTextModel + UNet2DConditionModel + DDIM sampler with classifier-free guidance reproduce
diffusers' `StableDiffusionPipeline(..., output_type="latent")` (fp32, max|diff|/max|ref| <= 1e-4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import EOS, nchw, nhwc, perturb_, rel_err, write_tokenizer

from magdiff_jax.diffusion import DDIMSampler, classifier_free_guidance

PROMPT = "the cat of the dog"


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    root = tmp_path_factory.mktemp("sd")
    vocab = write_tokenizer(root / "tok_src", pad_token=EOS)
    tokenizer = CLIPTokenizer.from_pretrained(str(root / "tok_src"), local_files_only=True)
    torch.manual_seed(0)
    text = perturb_(CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS], projection_dim=16)).eval())
    unet = perturb_(UNet2DConditionModel(
        sample_size=8, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
        attention_head_dim=2, norm_num_groups=8).eval(), scale=0.05)
    vae = perturb_(AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                 up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                                 sample_size=16).eval())
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    return root / "pipe", pipe


def test_every_component_converts(sd_folder):
    from magdiff_jax.convert import load_pipeline_torch

    folder, ref = sd_folder
    pipe = load_pipeline_torch(folder)
    assert {name: kind for name, (kind, _, _) in pipe.models.items()} == {
        "unet": "unet2d", "vae": "vae", "text_encoder": "clip_text"}
    assert pipe.tokenizer is not None and pipe.scheduler_class == "DDIMScheduler"
    assert pipe.schedule_config.beta_schedule == "scaled_linear" and pipe.schedule_config.steps_offset == 1
    np.testing.assert_array_equal(pipe.tokenizer([PROMPT]), ref.tokenizer([PROMPT], padding="max_length",
                                                                          max_length=77).input_ids)


def test_text_to_latent_matches_stable_diffusion_pipeline(sd_folder):
    """3 DDIM steps at guidance 7.5 from the same initial latents: our components == diffusers' pipeline."""
    from magdiff_jax.convert import load_pipeline_torch

    folder, ref = sd_folder
    pipe = load_pipeline_torch(folder, components=("unet", "text_encoder", "tokenizer", "scheduler"))
    latents = np.random.RandomState(0).randn(1, 8, 8, 4).astype(np.float32)
    with torch.no_grad():
        want = ref(PROMPT, num_inference_steps=3, guidance_scale=7.5, latents=nchw(latents),
                   output_type="latent").images

    _, text_module, text_params = pipe["text_encoder"]
    _, unet, unet_params = pipe["unet"]
    ids = pipe.tokenizer(["", PROMPT])  # unconditional first, as diffusers concatenates
    context = text_module.apply({"params": text_params}, ids).last_hidden_state
    sampler = DDIMSampler(pipe.schedule_config)
    state = sampler.set_timesteps(3)

    @jax.jit
    def denoise(x):
        def body(x, i):
            t = state.timesteps[i]
            eps = unet.apply({"params": unet_params}, jnp.concatenate([x, x]), jnp.full((2,), t), context)
            eps = classifier_free_guidance(eps[:1], eps[1:], 7.5)
            x, _ = sampler.step(state, (), i, eps, x)
            return x, None

        return jax.lax.scan(body, x * state.init_noise_sigma, jnp.arange(3))[0]

    ours = denoise(latents)
    err = rel_err(ours, nhwc(want))
    print(f"SD pipeline (3 DDIM steps, CFG 7.5) rel err {err:.2e}")
    assert err <= 1e-4


def test_cli_converts_a_pipeline(sd_folder, tmp_path):
    import subprocess
    import sys

    folder, _ = sd_folder
    r = subprocess.run([sys.executable, "-m", "magdiff_jax.cli", "convert", "to-flax", "--kind", "pipeline",
                        str(folder), str(tmp_path / "sd")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("unet", "vae", "text_encoder"):
        assert (tmp_path / "sd" / name / "config.json").exists()
    from magdiff_jax.models.tokenizer import CLIPTokenizer

    assert CLIPTokenizer.from_folder(tmp_path / "sd" / "tokenizer")([PROMPT]).shape == (1, 77)
    assert (tmp_path / "sd" / "scheduler" / "scheduler_config.json").exists()
    from magdiff_jax.convert import load_torch
    from magdiff_jax.export import load_model

    kind, module, params = load_model(tmp_path / "sd" / "unet")
    assert kind == "unet2d" and module.config.cross_attention_dim == 32
    _, direct = load_torch("unet2d", folder / "unet")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(direct)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
