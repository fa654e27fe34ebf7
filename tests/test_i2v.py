"""MagicVideo-V2's image-to-video stage (PAPERS.md B.3): the denoiser (video U-Net + appearance encoder + ControlNet
on the reference), its conditioning, the task's parameter groups, joint image/video training through the trainer
(resumed exactly), and `magdiff-jax i2v` on the trained stage's export."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from magdiff_jax.demo import load_config
from magdiff_jax.models.i2v import I2VConfig, I2VUNet, reference_condition
from magdiff_jax.models.registry import get_model
from magdiff_jax.models.unet_motion import UNetMotionModel

# one block each: the smallest I2V stage (the tiny config's layout is configs/i2v.py's)
MICRO_UNET = {"sample_size": 8, "block_out_channels": (32,), "layers_per_block": 1,
              "down_block_types": ("CrossAttnDownBlockMotion",), "up_block_types": ("CrossAttnUpBlockMotion",),
              "num_attention_heads": 4, "cross_attention_dim": 32, "norm_num_groups": 8,
              "motion_num_attention_heads": 4, "motion_max_seq_length": 8}
MICRO_RESAMPLER = {"dim": 32, "depth": 1, "dim_head": 8, "heads": 4, "num_queries": 4, "embedding_dim": 32,
                   "output_dim": 32, "ff_mult": 2}


def micro_config(**kw) -> I2VConfig:
    return I2VConfig.from_dict({"unet": MICRO_UNET, "resampler": MICRO_RESAMPLER,
                                "conditioning_embedding_out_channels": (16, 32), **kw})


@pytest.fixture(scope="module")
def micro():
    """A micro I2V denoiser with its ControlNet's zero convolutions perturbed (a live ControlNet), and inputs."""
    cfg = micro_config()
    module = I2VUNet(cfg)
    k = jax.random.split(jax.random.key(0), 6)
    b, f, h = 2, 3, 8
    x = jax.random.normal(k[0], (b, f, h, h, 4))
    ctx = jax.random.normal(k[1], (b, 5, 32))
    embeds = jax.random.normal(k[2], (b, 6, 32))
    ref = jax.random.uniform(k[3], (b, 2 * h, 2 * h, 3))
    params = jax.jit(module.init)(k[4], x, jnp.array([10, 500]), ctx, image_embeds=embeds, reference=ref)["params"]
    params = nn.meta.unbox(params)
    flat = traverse_util.flatten_dict(params)
    zero = {p for p, v in flat.items() if p[0] == "controlnet" and not np.any(np.asarray(v))}
    assert any("controlnet_down_blocks_0" in p for p in zero), "the ControlNet's output convolutions start at zero"
    for n, p in enumerate(sorted(zero)):
        flat[p] = 0.05 * jax.random.normal(jax.random.fold_in(k[5], n), flat[p].shape)
    live = traverse_util.unflatten_dict(flat)
    run = jax.jit(lambda p, scale, x=x: module.apply({"params": p}, x, jnp.array([10, 500]), ctx,
                                                     image_embeds=embeds, reference=ref, conditioning_scale=scale))
    return dict(cfg=cfg, module=module, params=params, live=live, run=run, x=x, ctx=ctx, embeds=embeds, ref=ref)


def test_config_derives_a_fitting_controlnet_and_refuses_misfits():
    cfg = micro_config()
    assert cfg.unet.image_attention and cfg.controlnet is not None
    assert cfg.controlnet.block_out_channels == cfg.unet.block_out_channels and cfg.reference_factor == 2
    assert I2VConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg  # the JSON round trip
    assert micro_config(use_controlnet=False).controlnet is None
    with pytest.raises(ValueError, match="output_dim=16 must equal the U-Net's cross_attention_dim 32"):
        micro_config(resampler={**MICRO_RESAMPLER, "output_dim": 16})
    other = dict(cfg.to_dict()["controlnet"], block_out_channels=(64,), norm_num_groups=8)
    with pytest.raises(ValueError, match=r"controlnet\.block_out_channels"):
        micro_config(controlnet=other)


def test_at_the_start_the_controlnet_changes_nothing(micro):
    """With its zero convolutions at zero, the denoiser is the video U-Net with the resampled appearance tokens."""
    m = micro
    out = m["run"](m["params"], 1.0)
    tokens = get_model("i2v")  # registered
    assert tokens.config_cls is I2VConfig
    from magdiff_jax.layers.resampler import Resampler

    @jax.jit  # one compile instead of dispatching the U-Net op by op
    def reference(p):
        tok = Resampler(m["cfg"].resampler).apply({"params": p["image_proj"]}, m["embeds"])
        return UNetMotionModel(m["cfg"].unet).apply({"params": p["unet"]}, m["x"], jnp.array([10, 500]), m["ctx"],
                                                    image_hidden_states=tok)

    ref = reference(m["params"])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_per_example_conditioning_scale(micro):
    """A live ControlNet moves the output; a per-example scale of 0 removes it from that example alone."""
    m = micro
    off = m["run"](m["params"], 1.0)  # zero convs: no control
    on = m["run"](m["live"], 1.0)
    half = m["run"](m["live"], jnp.array([0.0, 1.0]))
    assert float(jnp.abs(on - off).max()) > 1e-3
    np.testing.assert_allclose(half[0], off[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(half[1], on[1], rtol=1e-5, atol=1e-5)


def test_one_frame_bypasses_the_motion_modules(micro):
    """Joint image/video training: an image is a one-frame video; the denoiser runs it (no motion modules)."""
    m = micro
    x1 = m["x"][:, :1]
    out = m["module"].apply({"params": m["live"]}, x1, jnp.array([10, 500]), m["ctx"], image_embeds=m["embeds"],
                            reference=m["ref"])
    assert out.shape == x1.shape and np.isfinite(np.asarray(out)).all()


def test_bad_reference_shapes_are_named(micro):
    m = micro
    with pytest.raises(ValueError, match=r"reference must be \(B=2, 16, 16, 3\)"):
        m["module"].apply({"params": m["params"]}, m["x"], 10, m["ctx"], image_embeds=m["embeds"],
                          reference=m["ref"][:, :8, :8])
    with pytest.raises(ValueError, match="image_embeds must be"):
        m["module"].apply({"params": m["params"]}, m["x"], 10, m["ctx"], image_embeds=m["embeds"][0],
                          reference=m["ref"])


def test_reference_condition_and_its_dropout(micro):
    from magdiff_jax.models.clip import CLIPVisionConfig, CLIPVisionModel

    m = micro
    enc = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, projection_dim=32,
                                           num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8))
    ref = m["ref"] * 2 - 1  # [-1, 1]
    enc_params = enc.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))["params"]
    models = {"unet": m["module"], "image_encoder": enc}
    params = {"image_encoder": enc_params}
    cond = reference_condition(models, params, ref)
    assert cond["image_embeds"].shape == (2, 5, 32)  # 4 patches + the class token
    np.testing.assert_allclose(cond["reference"], m["ref"], atol=1e-6)
    np.testing.assert_array_equal(cond["conditioning_scale"], [1.0, 1.0])
    dropped = reference_condition(models, params, ref, drop=1.0)
    np.testing.assert_array_equal(dropped["conditioning_scale"], [0.0, 0.0])
    black = reference_condition(models, params, -jnp.ones_like(ref))  # a black reference's CLIP tokens
    np.testing.assert_allclose(dropped["image_embeds"], black["image_embeds"], rtol=1e-5, atol=1e-5)
    some = reference_condition(models, params, ref, drop=0.5, key=jax.random.key(3))
    assert set(np.asarray(some["conditioning_scale"]).tolist()) <= {0.0, 1.0}


def test_the_task_trains_the_papers_groups():
    """Motion modules, ControlNet and appearance (resampler + to_k_ip / to_v_ip) are separate groups; the rest of the
    U-Net is frozen unless task_options.train_spatial; the VAE and the encoders never train."""
    from magdiff_jax.train.groups import split_params
    from magdiff_jax.train.tasks import get_task

    c = load_config("i2v", "base")
    c.model.unet = {"unet": MICRO_UNET, "resampler": MICRO_RESAMPLER,
                    "conditioning_embedding_out_channels": (16, 32)}
    c.init_from = ""
    cfg = micro_config()
    abstract = get_model("i2v").abstract_params(I2VUNet(cfg))
    tree = {"unet": traverse_util.unflatten_dict({p: np.zeros(()) for p in abstract}), "vae": {"w": np.zeros(())}}
    task = get_task("i2v")
    for spatial in (False, True):
        c.task_options.train_spatial = spatial
        groups = task.groups(c)
        assert list(groups) == ["motion", "controlnet", "appearance", *(["spatial"] if spatial else [])]
        claimed, frozen = split_params(tree, groups)
        flat = {g: {"/".join(p) for p in traverse_util.flatten_dict(v)} for g, v in claimed.items()}
        assert flat["motion"] and all("motion_modules_" in p for p in flat["motion"])
        assert flat["controlnet"] and all(p.startswith("unet/controlnet/") for p in flat["controlnet"])
        assert all(p.startswith("unet/image_proj/") or "to_k_ip" in p or "to_v_ip" in p for p in flat["appearance"])
        assert any("to_k_ip" in p for p in flat["appearance"]) and any("image_proj" in p for p in flat["appearance"])
        rest = {"/".join(p) for p in traverse_util.flatten_dict(frozen)}
        assert "vae/w" in rest
        spatial_params = {p for p in (flat.get("spatial") or rest) if p.startswith("unet/unet/")}
        assert "unet/unet/conv_in/kernel" in spatial_params
        assert not any("motion_modules_" in p or "to_k_ip" in p for p in spatial_params)


def micro_stage_config():
    """configs/i2v.py:tiny with one-block models, joint image/video batches of 2 + 2, 2 steps."""
    c = load_config("i2v", "tiny")  # puts configs/ on sys.path
    import t2i

    m = t2i.micro_models()
    c.model.unet = {"unet": MICRO_UNET, "resampler": MICRO_RESAMPLER, "conditioning_embedding_out_channels": (16,)}
    c.model.vae, c.model.text_encoder = m.vae, m.text_encoder
    c.model.image_encoder.update(image_size=16, patch_size=8)
    c.steps, c.ckpt_every, c.log_every, c.progress = 2, 1, 1, False
    c.trainable = r"^unet/"  # the text encoder frozen: a smaller program to compile (test_train_scale trains one)
    c.global_batch_size, c.image_batch_size = 2, 2
    c.data.synthetic.num = c.image_data.synthetic.num = 8
    c.preview.every = 0
    c.task_options.reference = "random"
    c.task_options.reference_dropout = 0.5  # trains the "no reference" input two-scale guidance reads
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from magdiff_jax.train.trainer import train

    workdir = tmp_path_factory.mktemp("i2v")
    return workdir, train(micro_stage_config(), workdir)


def _data_state(workdir, step):
    files = [p for p in (workdir / "checkpoints" / str(step) / "data").rglob("*") if p.is_file()]
    states = [json.loads(p.read_text()) for p in files if p.read_text().lstrip().startswith("{")]
    return next(s for s in states if "video" in s)


def test_joint_training_saves_both_streams(trained):
    """Each checkpoint holds both streams' global positions; the export holds every model inference needs."""
    workdir, last = trained
    assert last["step"] == 2 and np.isfinite(last["loss"])
    for step in (1, 2):
        state = _data_state(workdir, step)
        assert state["video"]["batch"] == step and state["image"]["batch"] == step
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    models = json.loads((workdir / "export" / "stage.json").read_text())["models"]
    assert models == {"unet": "i2v", "vae": "vae", "text_encoder": "clip_text", "image_encoder": "clip_vision"}


def test_joint_stream_resumes_both_positions():
    """`JointIterator`: batch k of each stream after set_state equals batch k of an uninterrupted run; a state
    without both entries is refused."""
    from magdiff_jax.data.pipeline import JointIterator, make_dataset

    c = micro_stage_config()
    c.data.tokenizer = c.image_data.tokenizer = ""

    def joint():
        return JointIterator(make_dataset(c.data, batch_size=2), make_dataset(c.image_data, batch_size=3))

    it = joint()
    batches = [next(it) for _ in range(3)]
    assert batches[0]["video"].shape[:2] == (2, 2) and batches[0]["image_video"].shape[:2] == (3, 1)
    state = {"video": {"batch": 2, "bad": {}}, "image": {"batch": 2, "bad": {}}}
    resumed = joint()
    resumed.set_state(json.loads(json.dumps(state)))
    again = next(resumed)
    for k in ("video", "image_video"):
        np.testing.assert_array_equal(again[k], batches[2][k])
    assert resumed.get_state()["video"]["batch"] == 3 and resumed.get_state()["image"]["batch"] == 3
    with pytest.raises(ValueError, match="'video' and 'image' entries"):
        resumed.set_state({"batch": 2})
    it.close()
    resumed.close()


def test_joint_training_config_errors():
    from magdiff_jax.train.trainer import check_config

    c = micro_stage_config()
    c.image_batch_size = 3
    with pytest.raises(ValueError, match="image_batch_size=3"):
        check_config(c, 2, 1)


def test_i2v_command_on_the_export(trained, tmp_path):
    """`magdiff-jax i2v` on the trained export: a reference PNG and a prompt -> keyframes, with two-scale guidance,
    DPM-Solver++ and the FrameInit prior (the default settings run in the demo)."""
    from magdiff_jax import cli
    from magdiff_jax.data.pipeline import synthetic_config
    from magdiff_jax.data.synthetic import make_clip
    from magdiff_jax.data.video_io import read_video
    from magdiff_jax.utils.images import save_png

    workdir, _ = trained
    c = micro_stage_config()
    clip = make_clip(100, synthetic_config(c.data.synthetic))
    save_png(tmp_path / "ref.png", clip.frames[0])
    out = tmp_path / "keys.mp4"
    cli.main(cli.parse_flags(["magdiff-jax", "i2v", "--export", str(workdir / "export"), "--image",
                              str(tmp_path / "ref.png"), "--prompt", clip.caption, "--frames", "3", "--num-steps",
                              "3", "--sampler", "dpm", "--image-guidance", "1.5", "--prior", "frame_init",
                              "--out", str(out)]))
    video = read_video(out)
    assert video.shape == (3, 32, 32, 3)
    with pytest.raises(ValueError, match="cutoff"):
        cli.main(cli.parse_flags(["magdiff-jax", "i2v", "--export", str(workdir / "export"), "--image",
                                  str(tmp_path / "ref.png"), "--prompt", "x", "--prior", "frame_init", "--cutoff",
                                  "-1", "--out", str(out)]))


def test_two_scale_guidance_needs_a_model_trained_without_references(trained):
    from magdiff_jax.pipelines.i2v import I2VPipeline

    workdir, _ = trained
    pipe = I2VPipeline.load(workdir / "export")
    config = pipe.config.copy_and_resolve_references()
    config.task_options.reference_dropout = 0.0
    pipe.config = config
    with pytest.raises(ValueError, match="reference_dropout > 0"):
        pipe([np.zeros((32, 32, 3), np.uint8)], ["a red circle moves left"], [0], image_guidance=1.5)
