"""MagicVideo-V2's video-to-video super-resolution stage (PAPERS.md B.4): the v2v task on (low-res, high-res) clip
pairs through the trainer (SDEdit input; concat input's channels and groups), its pipeline (SDEdit start, overlapped
tiles beyond the trained size, residual decoding) and `magdiff-jax v2v` on the trained export."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_i2v import MICRO_RESAMPLER, MICRO_UNET

from magdiff_jax.demo import load_config


def micro_v2v_config():
    """configs/v2v.py:tiny with one-block models on 16 px clips (8 px low-res), SDEdit input, 2 steps."""
    c = load_config("v2v", "tiny")  # puts configs/ on sys.path
    import t2i

    m = t2i.micro_models()
    c.model.unet = {"unet": {**MICRO_UNET, "sample_size": 8}, "resampler": MICRO_RESAMPLER,
                    "conditioning_embedding_out_channels": (16,)}
    c.model.vae, c.model.text_encoder = m.vae, m.text_encoder
    c.model.image_encoder.update(image_size=16, patch_size=8)
    c.steps, c.ckpt_every, c.log_every, c.progress = 2, 2, 1, False
    c.global_batch_size = 2
    # SDEdit input here (the tiny config's concat input is traced in test_concat_input_...)
    c.task_options.update(low_res_input="sdedit", max_timestep=600, strength=0.5, residual_decode=False)
    c.data.synthetic.update(num=8, size=16, shape_size=0.4)
    c.data.resolution = (16, 16)
    c.preview.every = 0
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from magdiff_jax.train.trainer import train

    workdir = tmp_path_factory.mktemp("v2v")
    return workdir, train(micro_v2v_config(), workdir)


def test_the_task_trains_on_low_and_high_resolution_pairs(trained):
    workdir, _ = trained
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2] and all(np.isfinite(m["loss"]) for m in lines)
    stage = json.loads((workdir / "export" / "stage.json").read_text())
    assert stage["task"] == "v2v" and set(stage["models"]) == {"unet", "vae", "text_encoder", "image_encoder"}


def test_config_errors_name_the_setting():
    from magdiff_jax.train.tasks import get_task

    task = get_task("v2v")
    c = micro_v2v_config()
    c.data.task = "video"
    with pytest.raises(ValueError, match=r"data\.task 'vsr'"):
        task.batch_keys(c)
    c = micro_v2v_config()
    c.task_options.low_res_input = "concat"
    with pytest.raises(ValueError, match=r"in_channels=8"):
        task.models(c)
    c.model.unet.unet["in_channels"] = 8
    assert task.models(c)["unet"][1].unet.in_channels == 8
    assert {"motion", "controlnet", "appearance", "conv_in"} == set(task.groups(_untrainable(c)))
    c.task_options.low_res_input = "pixels"
    with pytest.raises(ValueError, match="low_res_input must be one of"):
        task.models(c)
    c = micro_v2v_config()
    c.task_options.max_timestep = 2000
    from magdiff_jax.diffusion.losses import sample_timesteps

    with pytest.raises(ValueError, match="max_timestep must be in"):
        sample_timesteps(jax.random.key(0), 2, 1000, 0.0, c.task_options.max_timestep)
    t = np.asarray(sample_timesteps(jax.random.key(0), 4096, 1000, 0.0, 600))
    assert t.min() >= 0 and t.max() < 600 and t.max() > 550


def _untrainable(c):
    c = c.copy_and_resolve_references()
    c.trainable = ""
    return c


def test_concat_input_reaches_the_denoiser_at_every_step():
    """Concat input: the upsampled clip's latent is concatenated to the noisy one at every step (the U-Net's and
    ControlNet's 8-channel input convolutions would refuse a 4-channel latent), traced end to end through the
    sampler (shapes only, nothing compiled)."""
    from magdiff_jax.models.registry import get_model
    from magdiff_jax.pipelines.v2v import super_resolve
    from magdiff_jax.train.tasks import get_task
    from magdiff_jax.train.tasks.base import schedule_from

    c = micro_v2v_config()
    c.task_options.low_res_input = "concat"
    c.model.unet.unet["in_channels"] = 8
    specs = get_task("v2v").models(c)
    modules = {name: get_model(kind).build(cfg) for name, (kind, cfg) in specs.items()}
    params = {name: nn.meta.unbox(get_model(kind).abstract_variables(modules[name])["params"])
              for name, (kind, _) in specs.items()}

    def run(p, mode):
        cfg = c.copy_and_resolve_references()
        cfg.task_options.low_res_input = mode
        return super_resolve(modules, p, low_res=jnp.zeros((1, 2, 8, 8, 3)), reference=jnp.zeros((1, 16, 16, 3)),
                             tokens=jnp.zeros((1, 16), jnp.int32), null_tokens=jnp.zeros((1, 16), jnp.int32),
                             key=jax.random.key(0), size=(16, 16), schedule=schedule_from(c).config, config=cfg,
                             num_steps=2, guidance=2.0)

    assert jax.eval_shape(lambda p: run(p, "concat"), params).shape == (1, 2, 16, 16, 3)
    with pytest.raises(ValueError, match=r"must be \(B, h, w, 8\)"):  # the same U-Net without the concatenation
        jax.eval_shape(lambda p: run(p, "sdedit"), params)


def test_v2v_command_tiles_beyond_the_trained_size(trained, tmp_path):
    """`magdiff-jax v2v` on the trained export: a 16 px clip x 2 -> 32 px, twice the trained 16 px, so the
    denoiser runs on overlapping tiles of the trained latent size; the residual decoding path and the strength
    refusal too."""
    from magdiff_jax import cli
    from magdiff_jax.data.video_io import read_video, write_video
    from magdiff_jax.pipelines.v2v import V2VPipeline
    from magdiff_jax.utils.images import save_png

    workdir, _ = trained
    rng = np.random.default_rng(0)
    src = write_video(tmp_path / "low.mp4", rng.integers(0, 255, (2, 16, 16, 3), np.uint8), fps=4)
    save_png(tmp_path / "ref.png", rng.integers(0, 255, (40, 30, 3), np.uint8))
    out = tmp_path / "high.mp4"
    cli.main(cli.parse_flags(["magdiff-jax", "v2v", "--export", str(workdir / "export"), "--video", str(src),
                              "--image", str(tmp_path / "ref.png"), "--prompt", "a red circle moves left",
                              "--scale", "2", "--strength", "0.5", "--num-steps", "4", "--vae-frames", "1",
                              "--out", str(out)]))
    assert read_video(out).shape == (2, 32, 32, 3)
    pipe = V2VPipeline.load(workdir / "export")
    low = rng.integers(0, 255, (1, 2, 8, 8, 3), np.uint8)
    plain = pipe(low, [low[0, 0]], ["x"], [0], num_steps=4, guidance=1.0)
    pipe.config = pipe.config.copy_and_resolve_references()
    pipe.config.task_options.residual_decode = True
    pipe._fns.clear()
    resid = pipe(low, [low[0, 0]], ["x"], [0], num_steps=4, guidance=1.0)
    assert plain.shape == resid.shape == (1, 2, 16, 16, 3) and not np.array_equal(plain, resid)
    with pytest.raises(ValueError, match="strength"):
        pipe(low, [low[0, 0]], ["x"], [0], num_steps=4, strength=0.1)  # no step of 4 left to run
    with pytest.raises(ValueError, match="position table holds 8"):  # more frames than the motion modules know
        pipe(rng.integers(0, 255, (1, 9, 8, 8, 3), np.uint8), [low[0, 0]], ["x"], [0])
