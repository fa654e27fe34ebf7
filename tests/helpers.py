"""Test utilities shared by the parity suites."""

from __future__ import annotations

import string

import numpy as np

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "o f</w>"]


def perturb_(module, scale: float = 0.1, seed: int = 0):
    """Move every parameter of a PyTorch module away from its init (norm weights != 1, biases != 0)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref| (arrays, or PyTorch tensors)."""
    ours, ref = (np.asarray(x.detach().numpy() if hasattr(x, "detach") else x, np.float64) for x in (ours, ref))
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def flat_params(tree) -> dict:
    """A nested parameter tree as {"a/b/c": leaf}."""
    from flax import traverse_util

    return {"/".join(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def nchw(x: np.ndarray):
    """channels-last numpy -> channels-first torch tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


def nhwc(t) -> np.ndarray:
    """channels-first torch tensor -> channels-last numpy."""
    return np.moveaxis(t.detach().numpy(), 1, -1)


def assert_same_state_dict(a: dict, b: dict):
    """Identical key sets and bit-identical tensors."""
    assert set(a) == set(b), (sorted(set(a) - set(b))[:10], sorted(set(b) - set(a))[:10])
    for k in a:
        x, y = a[k].detach().numpy(), b[k].detach().numpy()
        assert x.shape == y.shape, k
        assert np.array_equal(x, y), k


def write_tokenizer(folder, pad_token: str):
    """A CLIP-style byte-level BPE vocabulary (letters and a little punctuation, with and without `</w>`, some
    merges) in the file layout of an SD `tokenizer/` folder."""
    from magdiff_jax.models.tokenizer import write_vocabulary

    vocab: dict[str, int] = {}
    chars = string.ascii_lowercase + "!,."
    for suffix in ("", "</w>"):
        for ch in chars:
            vocab[ch + suffix] = len(vocab)
    for merge in MERGES:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    write_vocabulary(folder, vocab, list(MERGES), BOS, EOS, pad_token)
    return vocab


def random_params(module, *example_args, seed: int = 0, scale: float = 0.1, **example_kwargs):
    """Random parameters shaped like `module.init(...)`'s, drawn with numpy: no init program is compiled (compiling
    a U-Net's init costs several times its forward on CPU). Every leaf is N(0, scale^2); norm scales 1 + that."""
    import flax.linen as nn
    import jax
    from flax import traverse_util

    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_args, **example_kwargs))["params"]
    flat = traverse_util.flatten_dict(nn.meta.unbox(abstract))
    rng = np.random.RandomState(seed)
    out = {}
    for path, leaf in flat.items():
        value = scale * rng.standard_normal(leaf.shape).astype(np.float32)
        out[path] = value + 1.0 if path[-1] == "scale" else value
    return traverse_util.unflatten_dict(out)


# --- the tiny I2V / V2V stage of the diffusers pipeline exports (test_i2v_export, test_v2v_export) -----------------
# the denoiser (`models.i2v.I2VUNet`): one cross-attention block of 32 channels, 4 heads, 3 frames of motion; an
# IP-Adapter-Plus resampler of 1 head of 64, depth 4, ff x4, 4 queries, 32 -> 32 wide, which diffusers' loader can
# rebuild; image cross-attention lambda 0.8; a ControlNet reading the reference at 2x the latent size, residuals x 0.7.
# A two-block VAE (factor 2), CLIP text and vision towers (32 wide, 2 layers; the vision tower without a projection).
STAGE_LATENT = 8  # latent size (pixels: 2x)
STAGE_UNET = {"sample_size": STAGE_LATENT, "block_out_channels": (32,), "layers_per_block": 1,
              "down_block_types": ("CrossAttnDownBlockMotion",), "up_block_types": ("CrossAttnUpBlockMotion",),
              "num_attention_heads": 4, "cross_attention_dim": 32, "norm_num_groups": 8,
              "motion_num_attention_heads": 4, "motion_max_seq_length": 8, "image_attention_scale": 0.8}
STAGE_RESAMPLER = {"dim": 64, "depth": 4, "dim_head": 64, "heads": 1, "num_queries": 4, "embedding_dim": 32,
                   "output_dim": 32, "ff_mult": 4}
STAGE_CONFIGS = {
    "unet": {"unet": STAGE_UNET, "resampler": STAGE_RESAMPLER, "conditioning_embedding_out_channels": (16, 32),
             "conditioning_scale": 0.7},
    "vae": {"block_out_channels": (16, 32), "down_block_types": ("DownEncoderBlock2D",) * 2,
            "up_block_types": ("UpDecoderBlock2D",) * 2, "layers_per_block": 1, "norm_num_groups": 8,
            "sample_size": 2 * STAGE_LATENT},
    "text_encoder": {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "projection_dim": 32,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 16,
                     "bos_token_id": 108, "eos_token_id": 109, "pad_token_id": 109},
    "image_encoder": {"hidden_size": 32, "intermediate_size": 64, "projection_dim": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
}
STAGE_PROMPTS = ["a red circle moves left", "a blue square moves up"]


def random_model(kind: str, config: dict, seed: int):
    """A registered model with every parameter N(0, 0.1^2) (norm scales 1 + that), shapes from eval_shape: the
    ControlNet's zero convolutions are random too (a live ControlNet)."""
    from flax import traverse_util

    from magdiff_jax.models.registry import get_model

    spec = get_model(kind)
    module = spec.build(spec.config_from_dict(config))
    rng = np.random.RandomState(seed)
    flat = {p: (0.1 * rng.standard_normal(a.shape) + (p[-1] == "scale")).astype(np.float32)
            for p, a in spec.abstract_params(module).items()}
    return module, traverse_util.unflatten_dict(flat)


def tiny_i2v_stage(root, task: str = "i2v", step: int = 7, seed: int = 0, **task_options):
    """The tiny random stage above as `export.stage.Stage` of `task` (configs/i2v.py:tiny's training config, its
    `model` and `task` replaced, `task_options` updated; model n's weights drawn with seed `seed + n`), with the
    synthetic tokenizer written to root/tokenizer."""
    from etils import epath

    from magdiff_jax.convert.i2v import STAGE_MODELS as KINDS
    from magdiff_jax.data.synthetic import write_tokenizer as write_synthetic_tokenizer
    from magdiff_jax.demo import load_config
    from magdiff_jax.export.stage import Stage

    modules, params = {}, {}
    for n, (name, kind) in enumerate(KINDS.items()):
        modules[name], params[name] = random_model(kind, STAGE_CONFIGS[name], seed=seed + n)
    config = load_config("i2v", "tiny")
    config.model = STAGE_CONFIGS
    config.task = task
    config.task_options.update(task_options)
    write_synthetic_tokenizer(root / "tokenizer")
    return Stage(task, step, config, dict(KINDS), modules, params, epath.Path(root / "tokenizer"), epath.Path(root))


def assert_pipeline_components_load(dst, pipeline_class: str) -> None:
    """A pipeline folder of `convert.i2v`: model_index.json names `pipeline_class` and exactly the components its
    __init__ takes; every weighted component loads with no missing, unexpected or mis-shaped key
    (`from_pretrained(output_loading_info=True)`)."""
    import inspect
    import json

    import diffusers
    from diffusers import AutoencoderKL, ControlNetModel, MotionAdapter, UNetMotionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    index = json.loads((dst / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class
    init = inspect.signature(getattr(diffusers, pipeline_class).__init__).parameters
    assert {k for k in index if not k.startswith("_")} == set(init) - {"self"}
    for name, cls in (("unet", UNetMotionModel), ("motion_adapter", MotionAdapter), ("controlnet", ControlNetModel),
                      ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel),
                      ("image_encoder", CLIPVisionModelWithProjection)):
        _, info = cls.from_pretrained(dst / name, output_loading_info=True)
        problems = {k: v for k, v in info.items() if k != "error_msgs" and len(v)}
        assert not problems and not info.get("error_msgs"), (name, problems, info.get("error_msgs"))


def i2v_step_errors(pipe, stage, meta, prompts=STAGE_PROMPTS, frames: int = 3, seed: int = 0) -> dict:
    """One denoiser step of a `convert.i2v` pipeline folder, fp32: diffusers ControlNetModel on the B*F frames (the
    reference repeated, the meta's conditioning scale) then UNetMotionModel with IPAdapterAttnProcessor2_0 (the
    meta's scale), against our I2VUNet, each side with its own text embeddings (pipe.tokenizer + pipe.text_encoder
    vs our tokenizer + CLIPTextModel) and CLIP tokens (hidden_states[-2] of the same pixel_values:
    CLIPImageProcessor resizes unlike us). Returns max|diff| / max|ref| of "text", "clip" and "denoiser", and of the
    diffusers step with the ControlNet ("no_control") or the image attention ("no_image") switched off against the
    full one (both far above any parity tolerance when the comparison sees the conditionings)."""
    import jax
    import jax.numpy as jnp
    import torch

    from magdiff_jax.models.tokenizer import CLIPTokenizer

    b, f, h = len(prompts), frames, STAGE_LATENT
    rng = np.random.RandomState(seed)
    x = rng.standard_normal((b, f, h, h, 4)).astype(np.float32)
    t = np.linspace(10, 500, b).astype(np.int64)
    reference = rng.uniform(size=(b, 2 * h, 2 * h, 3)).astype(np.float32)  # [0, 1]
    size = stage.modules["image_encoder"].config.image_size
    pixels = rng.standard_normal((b, 3, size, size)).astype(np.float32)  # CLIP input, already normalised

    length = pipe.tokenizer.model_max_length
    tok = pipe.tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
    ours_tok = np.asarray(CLIPTokenizer.from_folder(stage.tokenizer_folder(), max_length=length)(prompts))
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

    module = stage.modules["unet"]
    ours = np.asarray(jax.jit(lambda p: module.apply({"params": p}, jnp.asarray(x), jnp.asarray(t), ctx,
                                                     image_embeds=clip, reference=reference))(stage.params["unet"]))

    def diffusers_step(cond_scale, ip_scale):
        pipe.set_ip_adapter_scale(ip_scale)
        frames_ = nchw(x.reshape(b * f, h, h, 4))
        ctx_f = ref_ctx.repeat_interleave(f, dim=0)
        cond = nchw(np.repeat(reference, f, 0))
        t_f = torch.from_numpy(np.repeat(t, f))
        with torch.no_grad():
            down, mid = pipe.controlnet(frames_, t_f, encoder_hidden_states=ctx_f, controlnet_cond=cond,
                                        conditioning_scale=cond_scale, return_dict=False)
            out = pipe.unet(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))), torch.from_numpy(t),
                            encoder_hidden_states=ctx_f, added_cond_kwargs={"image_embeds": [ref_clip[:, None]]},
                            down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        return out.numpy().transpose(0, 2, 3, 4, 1)

    try:
        ref = diffusers_step(meta["conditioning_scale"], meta["ip_adapter_scale"])
        errors["denoiser"] = rel_err(ours, ref)
        errors["no_control"] = rel_err(diffusers_step(0.0, meta["ip_adapter_scale"]), ref)
        errors["no_image"] = rel_err(diffusers_step(meta["conditioning_scale"], 0.0), ref)
    finally:
        pipe.set_ip_adapter_scale(meta["ip_adapter_scale"])
    return errors


def assert_i2v_reads_back(stage, dst) -> None:
    """`i2v_from_diffusers` gives the stage's denoiser back bit-exactly; the VAE and CLIP towers read back with
    `load_torch` (the vision tower with the zero projection the export adds to a tower without one)."""
    from flax import traverse_util

    from magdiff_jax.convert import load_torch
    from magdiff_jax.convert.i2v import i2v_from_diffusers

    module, params = i2v_from_diffusers(dst)
    assert module.config == stage.modules["unet"].config
    ours, want = (traverse_util.flatten_dict(p) for p in (params, stage.params["unet"]))
    assert set(ours) == set(want)
    differ = ["/".join(p) for p in want if not np.array_equal(ours[p], np.asarray(want[p]))]
    assert not differ, differ[:5]
    for name, kind in (("vae", "vae"), ("text_encoder", "clip_text"), ("image_encoder", "clip_vision")):
        _, back = load_torch(kind, dst / name)
        back, want = traverse_util.flatten_dict(back), traverse_util.flatten_dict(stage.params[name])
        if name == "image_encoder" and not stage.modules[name].config.with_projection:
            assert not np.any(np.asarray(back.pop(("visual_projection", "kernel"))))
        assert set(back) == set(want) and all(np.array_equal(back[p], want[p]) for p in want), name


T2I_UNET = {"sample_size": 8, "block_out_channels": (32,), "layers_per_block": 1,
            "down_block_types": ("CrossAttnDownBlock2D",), "up_block_types": ("CrossAttnUpBlock2D",),
            "attention_head_dim": 4, "cross_attention_dim": 32, "norm_num_groups": 8}


def tiny_t2i_stage(root):
    """A tiny random T2I stage (a one-level unet2d, the stage VAE and text encoder above) at 16 px."""
    from etils import epath

    from magdiff_jax.data.synthetic import write_tokenizer
    from magdiff_jax.demo import load_config
    from magdiff_jax.export.stage import Stage

    configs = {"unet": ("unet2d", T2I_UNET), "vae": ("vae", STAGE_CONFIGS["vae"]),
               "text_encoder": ("clip_text", STAGE_CONFIGS["text_encoder"])}
    modules, params = {}, {}
    for n, (name, (kind, cfg)) in enumerate(configs.items()):
        modules[name], params[name] = random_model(kind, cfg, seed=20 + n)
    config = load_config("t2i", "tiny")
    config.model = {name: cfg for name, (_, cfg) in configs.items()}
    config.data.resolution = (16, 16)
    write_tokenizer(root / "t2i_tokenizer")
    return Stage("t2i", 5, config, {n: k for n, (k, _) in configs.items()}, modules, params,
                 epath.Path(root / "t2i_tokenizer"), epath.Path(root))


def tiny_vfi_stage(root):
    """A tiny random EDSC (three levels of 8 channels) as a VFI stage."""
    from etils import epath

    from magdiff_jax.demo import load_config
    from magdiff_jax.export.stage import Stage

    module, params = random_model("edsc", {"block_out_channels": (8, 8, 8), "head_channels": (8, 8)}, seed=30)
    return Stage("vfi", 4, load_config("vfi", "tiny"), {"interpolator": "edsc"}, {"interpolator": module},
                 {"interpolator": params}, None, epath.Path(root))


def tiny_magicvideo_stages(root):
    """root/stages/{t2i,i2v,v2v,vfi}: tiny random MagicVideo-V2 stage exports that chain (16 px references and
    keyframes, x2 to 32 px by V2V, SDEdit at strength 0.6); returns root/stages."""
    from magdiff_jax.export.stage import save_stage

    i2v = tiny_i2v_stage(root / "src_i2v", "i2v", seed=0)
    i2v.config.data.resolution = (16, 16)
    v2v = tiny_i2v_stage(root / "src_v2v", "v2v", seed=10, scale=2, strength=0.6, low_res_input="sdedit")
    v2v.config.data.resolution = (32, 32)
    for name, stage in (("t2i", tiny_t2i_stage(root)), ("i2v", i2v), ("v2v", v2v), ("vfi", tiny_vfi_stage(root))):
        save_stage(stage, root / "stages" / name)
    return root / "stages"


NOTEBOOK_KERNEL = "magdiff-jax-notebooks"


def notebook_kernel(prefix):
    """A context in which papermill finds NOTEBOOK_KERNEL: a kernelspec under `prefix` running this Python with this
    checkout first on its path (through JUPYTER_PATH). Yields the kernel's name."""
    import contextlib
    import os
    from pathlib import Path

    import pytest
    from ipykernel.kernelspec import install

    repo = Path(__file__).parents[1]

    @contextlib.contextmanager
    def kernel():
        path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
        install(kernel_name=NOTEBOOK_KERNEL, prefix=str(prefix), env={"PYTHONPATH": path})
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("JUPYTER_PATH", str(Path(prefix) / "share" / "jupyter"))
            yield NOTEBOOK_KERNEL

    return kernel()


def run_notebook(notebook: str, kernel: str, parameters: dict, workdir):
    """notebooks/`notebook` executed by papermill with `parameters` in `workdir` -> the executed notebook (a cell that
    raises fails with papermill's error naming it)."""
    from pathlib import Path

    import nbformat
    import papermill

    out = Path(workdir) / f"executed_{notebook}"
    papermill.execute_notebook(str(Path(__file__).parents[1] / "notebooks" / notebook), str(out),
                               parameters=parameters, kernel_name=kernel, cwd=str(workdir), progress_bar=False,
                               log_output=False, execution_timeout=600)
    return nbformat.read(out, as_version=4)


def notebook_cell(nb, cell_id: str):
    return next(c for c in nb.cells if c.get("id") == cell_id)


def cell_text(cell) -> str:
    """What a cell printed."""
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def cell_videos(cell) -> int:
    """How many <video>s a cell displayed."""
    return sum(o.get("data", {}).get("text/html", "").count("<video") for o in cell.outputs
               if o.output_type == "display_data")


def tiny_clip_model_folder(root):
    """A tiny random transformers CLIPModel saved whole in `root` (config.json + model.safetensors, both towers) with
    a CLIP-style tokenizer beside it, as openai/clip-vit-base-patch32's folder is laid out; returns the torch model
    (2 layers of width 32 per tower, 32 px images in 8 px patches, 24-d projections)."""
    import torch
    import transformers

    vocab = write_tokenizer(root, pad_token="!")
    text = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=48,
                                       num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                       bos_token_id=vocab[BOS], eos_token_id=vocab[EOS], pad_token_id=vocab["!"])
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8)
    config = transformers.CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
    torch.manual_seed(3)
    model = perturb_(transformers.CLIPModel(config), scale=0.1, seed=4).eval()
    model.save_pretrained(root)
    return model


def random_eval_params(kind: str, module, seed: int):
    """Random parameters of an evaluation network drawn from its abstract tree (nothing compiled): He-scaled
    kernels, norm scales and BatchNorm variances near 1, the C3D's pixel mean in the pixel range, small others."""
    from flax import traverse_util

    from magdiff_jax.models.registry import get_model

    rng = np.random.default_rng(seed)

    def draw(path, shape):
        if path[-1] == "kernel":
            return rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape)
        if path[-1] in ("scale", "var"):
            return rng.uniform(0.7, 1.3, shape)
        if path[-1] == "mean" and kind == "c3d":
            return rng.uniform(90, 160, shape)
        return rng.normal(0, 0.05, shape)

    flat = {path: draw(path, a.shape).astype(np.float32) for path, a in get_model(kind).abstract_params(module).items()}
    return traverse_util.unflatten_dict(flat)


def eval_networks(root) -> dict:
    """A width/16 I3D (the protocols' 16 x 224 x 224 clips) and a narrow 11-class C3D with random weights, saved in
    their PyTorch layouts as root/i3d.safetensors and root/c3d.safetensors: {"i3d": (module, params), "c3d": ...}."""
    from magdiff_jax.convert import save_torch
    from magdiff_jax.models.c3d import C3D, C3DConfig
    from magdiff_jax.models.i3d import I3D, I3DConfig

    nets = {"i3d": I3D(I3DConfig(width_divisor=16)),
            "c3d": C3D(C3DConfig(widths=(4, 4, 8, 8, 8, 8, 8, 8), fc_widths=(16, 16), num_classes=11))}
    out = {}
    for seed, (kind, module) in enumerate(nets.items()):
        params = random_eval_params(kind, module, seed)
        save_torch(kind, module, params, root / f"{kind}.safetensors")
        out[kind] = (module, params)
    return out
