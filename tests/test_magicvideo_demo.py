"""`magdiff-jax demo --system magicvideo` shortened (magdiff_jax/demo.py `run_magicvideo_demo`): the tiny VAE and the
four stages (the demo's configs with one-level U-Nets and a two-level EDSC, compiled at XLA's lowest optimisation
level as the rest of the suite is) trained on the synthetic dataset with fewer steps, the four-stage pipeline on two
held-out subjects
each asked for the four motions, and each stage's measurement. Checked against chance: the T2I references have their
caption's colour and the I2V keyframes keep it (chance 1/6 each: 5 of 8 hits by chance has probability 0.5%).
The keyframes' motion needs the full demo's 500 I2V steps and V2V's and VFI's gains over their baselines more
training than a test affords: here they are checked to be measured on the held-out clips (their baselines recomputed
independently), with their values in the full demo's record (benchmarks/README.md)."""

import json

import numpy as np
import pytest

from magdiff_jax.demo import MAGICVIDEO_STEPS, dominant_colour, magicvideo_configs, run_magicvideo_demo

STEPS = {"vae": 60, "t2i": 150, "i2v": 60, "v2v": 2, "vfi": 2}


def short_configs():
    """`magicvideo_configs(STEPS)` with one-level U-Nets (T2I, I2V, V2V) and a two-level EDSC, each compiled with the
    suite's XLA flags (conftest.py: the lowest optimisation level) instead of the configs' level 1."""
    c = magicvideo_configs(STEPS)
    c["t2i"].model.unet.update(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                               up_block_types=("CrossAttnUpBlock2D",))
    for name in ("i2v", "v2v"):
        c[name].model.unet.unet.update(block_out_channels=(32,), down_block_types=("CrossAttnDownBlockMotion",),
                                       up_block_types=("CrossAttnUpBlockMotion",))
    c["vfi"].model.interpolator.update(block_out_channels=(8, 8), head_channels=(8, 8))
    c["vfi"].model.perceptual = {"vgg": {"widths": (4, 4, 8, 8, 8)}}
    for config in c.values():
        config.compiler_options = ""
    return c


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's run. It keeps its compiled programs in WORKDIR/jax_cache, which JAX then uses for the rest of
    the process: the session's cache (conftest.py, shared by every xdist worker and subprocess) is put back after
    it, so that the test files this worker runs next share their programs with the other worker's."""
    import jax

    from magdiff_jax.train.trainer import use_compilation_cache

    session_cache = jax.config.values.get("jax_compilation_cache_dir") or ""
    workdir = tmp_path_factory.mktemp("magicvideo_demo")
    try:
        summary = run_magicvideo_demo(workdir, steps=STEPS, configs=short_configs(), num_subjects=2, num_steps=10,
                                      num_clips=2)
    finally:
        use_compilation_cache(session_cache)
    assert jax.config.values.get("jax_compilation_cache_dir") == session_cache
    return workdir, summary


def test_every_output_is_written(demo):
    from magdiff_jax.data.video_io import read_video

    workdir, summary = demo
    stages = json.loads((workdir / "stages.json").read_text())
    assert set(stages) == {"t2i", "i2v", "v2v", "vfi"}
    assert all((workdir / path / "stage.json").exists() for path in stages.values())
    run = json.loads((workdir / "videos" / "summary.json").read_text())
    assert run["complete"] and run["prompts"] == summary["prompts"] and len(summary["prompts"]) == 8
    for k in range(8):
        assert read_video(workdir / "videos" / f"keyframes_{k}.mp4").shape == (2, 32, 32, 3)
        assert read_video(workdir / "videos" / f"final_{k}.mp4").shape == (4, 64, 64, 3)  # 2 keyframes, factor 3
    for name in ("contact_sheet.png", "loss.png", "metrics.png"):
        assert (workdir / name).stat().st_size > 1000, name
    for name, steps in STEPS.items():
        assert summary[name]["train_seconds"] > 0
        if name != "vae":
            assert summary[name]["steps"] == steps
    assert summary["wall_seconds"] > sum(summary["pipeline_seconds"].values())
    assert set(MAGICVIDEO_STEPS) == set(STEPS)


def test_references_and_keyframes_have_the_captions_colour(demo):
    workdir, summary = demo
    refs = np.load(workdir / "videos" / "stages" / "t2i.npy")
    detected = [dominant_colour(im) for im in refs]
    assert detected == summary["t2i"]["detected_colours"]
    hits = sum(d == c for d, c in zip(detected, summary["colours"]))
    assert hits >= 5, (detected, summary["colours"])  # chance: 1/6 each
    keyframes = np.load(workdir / "videos" / "stages" / "i2v.npy")
    kept = sum(dominant_colour(v[0]) == c for v, c in zip(keyframes, summary["colours"]))
    assert kept >= 5, ([dominant_colour(v[0]) for v in keyframes], summary["colours"])
    assert summary["i2v"]["chance"] == 0.25 and 0 <= summary["i2v"]["keyframe_motion_accuracy"] <= 1


def test_v2v_and_vfi_are_scored_against_their_baselines(demo):
    """The baselines recomputed here from the held-out clips: bicubic upsampling of the box-downsampled clips and
    the t-weighted blend of the given frames; VFI's gain over blending."""
    from magdiff_jax.demo import frame_scores, magicvideo_configs, v2v_held_out, vfi_held_out
    from magdiff_jax.utils.images import upscale_video

    _, summary = demo
    configs = magicvideo_configs(STEPS)
    held = v2v_held_out(configs["v2v"], 2)
    bicubic = np.round((np.asarray(upscale_video(held["low_res"] / 127.5 - 1, held["hires"].shape[2:4])) + 1) * 127.5)
    assert summary["v2v"]["psnr_bicubic"] == pytest.approx(frame_scores(bicubic.clip(0, 255), held["hires"])[0],
                                                           abs=1e-3)
    videos = vfi_held_out(configs["vfi"], 4)["videos"].astype(np.float32)
    t = np.asarray([1 / 3, 2 / 3], np.float32)[None, :, None, None, None]
    blend = np.round((1 - t) * videos[:, :1] + t * videos[:, 3:]).clip(0, 255)
    assert summary["vfi"]["psnr_blend"] == pytest.approx(frame_scores(blend, videos[:, 1:3])[0], abs=1e-3)
    for stage, ours in (("v2v", "psnr_v2v"), ("vfi", "psnr_vfi")):
        s = summary[stage]
        assert np.isfinite(s[ours]) and s[ours] > 15.0, s  # a picture of the truth, not noise (noise: ~8 dB)
        assert s["psnr_gain"] == pytest.approx(s[ours] - s[f"psnr_{'bicubic' if stage == 'v2v' else 'blend'}"])
    # VFI with its motion prior beats blending the neighbours from its first steps (about +5 dB on the demo's clips)
    assert summary["vfi"]["psnr_gain"] > 2.0, summary["vfi"]
