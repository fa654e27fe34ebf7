"""MagicVideo-V2's frame-interpolation stage (PAPERS.md B.5): the vfi task (EDSC generator, LPIPS, patch GAN with its
own optimizer from a start step) through the trainer, the pipeline (frames in time order, tiles beyond the tile
size, the released networks' BGR order) and `magdiff-jax interpolate` on the trained export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magdiff_jax.demo import load_config


def micro_vfi_config():
    """configs/vfi.py:tiny with a 2-level EDSC (with its motion prior), a 2-level VGG and a 1-layer discriminator
    on 16 px frames, 3 steps (the discriminator from step 2)."""
    c = load_config("vfi", "tiny")
    c.model.interpolator = {"block_out_channels": (8, 8), "head_channels": (8, 8), "het_groups": 4,
                            "motion_prior": "bilateral"}
    c.model.perceptual = {"vgg": {"widths": (4, 4, 8, 8, 8)}}
    c.model.discriminator = {"channels": 8, "num_layers": 1, "norm_num_groups": 4}
    c.steps, c.ckpt_every, c.log_every, c.progress = 3, 3, 1, False
    c.global_batch_size = 2
    c.task_options.adversarial_start = 2
    c.data.synthetic.update(num=8, size=16)
    c.data.resolution = (16, 16)
    c.preview.every = 0
    return c


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from magdiff_jax.train.trainer import train

    workdir = tmp_path_factory.mktemp("vfi")
    return workdir, train(micro_vfi_config(), workdir)


def test_two_groups_the_discriminator_from_its_start_step(trained):
    workdir, _ = trained
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(np.isfinite(m["loss"]) for m in lines)
    assert "loss_d" in lines[-1] and "grad_norm/discriminator" in lines[-1] and "grad_norm/interpolator" in lines[-1]
    models = json.loads((workdir / "models.json").read_text())
    assert set(models["groups"]) == {"interpolator", "discriminator"}
    stage = json.loads((workdir / "export" / "stage.json").read_text())
    assert stage["task"] == "vfi" and set(stage["models"]) == {"interpolator"}  # the generator alone is exported


def test_losses_and_options():
    from magdiff_jax.train.tasks import get_task
    from magdiff_jax.train.tasks.vfi import VFIOptions, flatten_targets, reconstruction_loss

    d = jnp.asarray([0.0, 0.5, -2.0])
    assert float(reconstruction_loss(d, jnp.zeros(3), "l1")) == pytest.approx(2.5 / 3)
    want = np.mean(np.sqrt(np.asarray(d) ** 2 + 1e-6))
    assert float(reconstruction_loss(d, jnp.zeros(3), "charbonnier", 1e-3)) == pytest.approx(want, rel=1e-6)
    batch = {"frame0": jnp.zeros((2, 4, 4, 3)), "frame1": jnp.ones((2, 4, 4, 3)),
             "targets": jnp.arange(2 * 3 * 48.0).reshape(2, 3, 4, 4, 3), "times": jnp.asarray([[.25, .5, .75]] * 2)}
    f0, f1, tgt, t = flatten_targets(batch)
    assert f0.shape == f1.shape == tgt.shape == (6, 4, 4, 3) and np.allclose(t, [.25, .5, .75] * 2)
    assert np.array_equal(tgt[4], batch["targets"][1, 1])
    c = micro_vfi_config()
    c.task_options.reconstruction = "l2"
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        VFIOptions.from_config(c)
    c = micro_vfi_config()
    c.task_options.adversarial_weight = 0.0
    c.task_options.perceptual_weight = 0.0
    task = get_task("vfi")
    with pytest.raises(ValueError, match="unknown groups"):  # the discriminator's optimizer, with no discriminator
        task.groups(c)
    del c.groups["discriminator"]
    assert set(task.models(c)) == {"interpolator"} and set(task.groups(c)) == {"interpolator"}
    c.data.task = "video"
    with pytest.raises(ValueError, match=r"data\.task 'interp'"):
        task.batch_keys(c)


def test_interleave_and_the_pipeline_order(trained):
    from magdiff_jax.pipelines.vfi import VFIPipeline, interleave

    video = np.arange(3)[:, None]
    middles = np.asarray([[10, 11], [20, 21]])[:, :, None]
    assert interleave(video, middles)[:, 0].tolist() == [0, 10, 11, 1, 20, 21, 2]
    workdir, _ = trained
    pipe = VFIPipeline.load(workdir / "export", tile=8, overlap=2, pairs_per_call=3)
    rng = np.random.default_rng(0)
    videos = rng.integers(0, 255, (1, 3, 16, 24, 3), dtype=np.uint8)
    out = pipe(videos, factor=3)
    assert out.shape == (1, 7, 16, 24, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0, ::3], videos[0])  # the given frames are kept, in place
    assert len(pipe._fns) == 1 and out[0, 1:3].std() > 0
    with pytest.raises(ValueError, match="factor must be an integer >= 2"):
        pipe(videos, factor=1)
    with pytest.raises(ValueError, match="at least 2 frames"):
        pipe(videos[:, :1])


def test_interpolate_reads_the_released_colour_order():
    from magdiff_jax.models.edsc import EDSC, EDSCConfig, interpolate

    rgb = EDSC(EDSCConfig.tiny())
    bgr = EDSC(EDSCConfig.tiny(channel_order="bgr"))
    rng = np.random.default_rng(1)
    f0, f1 = (jnp.asarray(rng.uniform(-1, 1, (1, 8, 8, 3)), jnp.float32) for _ in range(2))
    params = rgb.init(jax.random.key(0), f0, f1, jnp.full((1,), 0.5))["params"]
    a = interpolate(rgb, params, f0[..., ::-1], f1[..., ::-1], 0.5)[..., ::-1]
    b = interpolate(bgr, params, f0, f1, 0.5)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    assert float(jnp.abs(a - interpolate(rgb, params, f0, f1, 0.5)).max()) > 1e-3


def test_interpolate_command(trained, tmp_path):
    from magdiff_jax import cli
    from magdiff_jax.data.video_io import probe, read_video, write_video

    workdir, _ = trained
    src = write_video(tmp_path / "in.mp4", np.random.default_rng(2).integers(0, 255, (4, 16, 16, 3), np.uint8), fps=8)
    out = tmp_path / "out.mp4"
    cli.main(cli.parse_flags(["magdiff-jax", "interpolate", "--export", str(workdir / "export"), "--video", str(src),
                              "--factor", "3", "--out", str(out)]))
    assert read_video(out).shape == (10, 16, 16, 3) and round(probe(out).fps) == 24
