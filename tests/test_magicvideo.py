"""MagicVideo-V2's four stages chained (`pipelines/magicvideo.py`, `magdiff-jax magicvideo`) on tiny random exports:
every stage's output written as it finishes, a rerun that skips what exists for the same settings (a crash in VFI
does not redo I2V; a changed V2V setting redoes V2V and VFI alone), and the chain checked from the stages' JSON
files before any weight loads (text encoders, tokenizers, aspect ratios, sizes, frame positions)."""

import dataclasses
import json
import os

import numpy as np
import pytest
from helpers import tiny_magicvideo_stages

from magdiff_jax.export.stage import read_stage_info
from magdiff_jax.pipelines.magicvideo import (
    STAGES,
    MagicVideoPipeline,
    MagicVideoSettings,
    check_chain,
    stage_paths,
)

PROMPTS = ["a red circle moves left", "a blue square moves up"]
SETTINGS = MagicVideoSettings(t2i_steps=2, i2v_steps=2, v2v_steps=2, frames=3, i2v_guidance=3.0, v2v_guidance=1.0)


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    return tiny_magicvideo_stages(tmp_path_factory.mktemp("magicvideo"))


@pytest.fixture(scope="module")
def first_run(stages, tmp_path_factory):
    """A run whose VFI stage fails, then the rerun that finishes it: (out dir, the failed run's summary, the
    rerun's result)."""
    out = tmp_path_factory.mktemp("mv_out")
    pipe = MagicVideoPipeline.load(stages, SETTINGS)

    def broken(self, hires):
        raise RuntimeError("the interpolator ran out of memory")

    original = MagicVideoPipeline._vfi
    MagicVideoPipeline._vfi = broken
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            pipe.run(PROMPTS, out, seeds=[0, 1], progress=False)
    finally:
        MagicVideoPipeline._vfi = original
    failed = json.loads((out / "summary.json").read_text())
    failed["files"] = sorted(p.name for p in out.iterdir() if p.is_file())
    return out, failed, pipe.run(PROMPTS, out, seeds=[0, 1], progress=False)


def test_each_stage_writes_as_it_finishes_and_a_rerun_skips_what_exists(first_run):
    from magdiff_jax.data.video_io import read_video

    out, failed, result = first_run
    assert failed["complete"] is False and set(failed["stages"]) == {"t2i", "i2v", "v2v"}
    assert failed["files"] == sorted(["summary.json", *(f"{n}_{k}.{e}" for n, e in (
        ("reference", "png"), ("keyframes", "mp4"), ("hires", "mp4")) for k in range(2))])
    stages = result.summary["stages"]
    assert [stages[s]["skipped"] for s in STAGES] == [True, True, True, False]  # VFI alone ran again
    assert result.summary["complete"] is True
    assert result.reference.shape == (2, 16, 16, 3)
    assert result.keyframes.shape == (2, 3, 16, 16, 3)
    assert result.hires.shape == (2, 3, 32, 32, 3)
    assert result.final.shape == (2, 7, 32, 32, 3)  # 3 + 2 x 2 frames at factor 3
    for k in range(2):
        for name in ("reference_{}.png", "keyframes_{}.mp4", "hires_{}.mp4", "final_{}.mp4"):
            assert (out / name.format(k)).exists(), name.format(k)
        assert read_video(out / f"final_{k}.mp4").shape == (7, 32, 32, 3)
    # the given frames pass through VFI unchanged: the final video's frames 0, 3, 6 are V2V's
    np.testing.assert_array_equal(result.final[:, ::3], result.hires)
    # each prompt has its own reference and the stages see it: different rows differ
    assert np.abs(result.reference[0].astype(int) - result.reference[1]).mean() > 1
    assert np.abs(result.hires[0].astype(int) - result.hires[1]).mean() > 1


def test_a_changed_setting_reruns_that_stage_and_the_ones_after(first_run, stages):
    out, _, before = first_run
    pipe = MagicVideoPipeline.load(stages, dataclasses.replace(SETTINGS, strength=1.0))
    again = pipe.run(PROMPTS, out, seeds=[0, 1], progress=False)
    stages_ = again.summary["stages"]
    assert [stages_[s]["skipped"] for s in STAGES] == [True, True, False, False]
    np.testing.assert_array_equal(again.keyframes, before.keyframes)
    assert np.abs(again.hires.astype(int) - before.hires).max() > 0  # SDEdit from another strength
    # other prompts or seeds: everything runs (the fingerprint of T2I changes, and with it every later one)
    prints = pipe.fingerprints(PROMPTS, [0, 2])
    assert all(prints[s] != again.summary["stages"][s]["fingerprint"] for s in STAGES)


def test_the_command_on_the_same_folder(first_run, stages, capsys):
    """`magdiff-jax magicvideo` with the first run's T2I and I2V settings reuses their outputs; run twice, the
    second finds every output and runs nothing."""
    from magdiff_jax import cli

    out, _, _ = first_run
    argv = ["magdiff-jax", "magicvideo", "--stages", str(stages), "--out", str(out), "--seed", "0", "--frames", "3",
            "--steps", "2", "--guidance", "7.5,3,1", "--strength", "1", *(a for p in PROMPTS for a in ("--prompt", p))]
    cli.main(cli.parse_flags(argv))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] is True and summary["stages"]["i2v"]["skipped"] and summary["stages"]["t2i"]["skipped"]
    cli.main(cli.parse_flags(argv))
    summary = json.loads((out / "summary.json").read_text())
    assert all(summary["stages"][s]["skipped"] for s in STAGES)  # the same settings: nothing ran
    assert "t2i skipped, i2v skipped, v2v skipped, vfi skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match="three"):
        cli.main(cli.parse_flags([*argv[:-4], "--steps", "2,2", "--prompt", "x"]))


@pytest.fixture(scope="module")
def infos(stages):
    return {name: read_stage_info(stages / name) for name in STAGES}


def test_the_chain_is_checked_before_anything_loads(infos):
    sizes = check_chain(infos, SETTINGS)
    assert sizes == {"reference": (16, 16), "keyframes": (16, 16), "frames": 3, "scale": 2, "hires": (32, 32)}

    def changed(name, **fields):
        return {**infos, name: dataclasses.replace(infos[name], **fields)}

    with pytest.raises(ValueError, match=r"the vfi stage .* holds a 'v2v' stage"):
        check_chain(changed("vfi", task="v2v"), SETTINGS)
    kind, cfg = infos["v2v"].models["text_encoder"]
    wider = {**infos["v2v"].models, "text_encoder": (kind, dataclasses.replace(cfg, hidden_size=64))}
    with pytest.raises(ValueError, match=r"v2v stage .* does not read prompts as the i2v stage.*hidden_size: 32 vs 64"):
        check_chain(changed("v2v", models=wider), SETTINGS)
    config = infos["v2v"].config.copy_and_resolve_references()
    config.data.max_length = 8
    with pytest.raises(ValueError, match="prompt lengths differ"):
        check_chain(changed("v2v", config=config), SETTINGS)
    with pytest.raises(ValueError, match="tokenizers differ"):
        check_chain(changed("v2v", tokenizer=None), SETTINGS)
    with pytest.raises(ValueError, match=r"16x32 images .* 16x16 keyframes"):
        check_chain(infos, dataclasses.replace(SETTINGS, t2i_size=(16, 32)))
    with pytest.raises(ValueError, match="9 keyframes: the i2v stage's motion modules hold 8"):
        check_chain(infos, dataclasses.replace(SETTINGS, frames=9))
    config = infos["i2v"].config.copy_and_resolve_references()
    config.data.resolution = (15, 15)
    with pytest.raises(ValueError, match=r"15x15.*x the v2v scale 1 give 15x15.*multiple of 2"):
        check_chain(changed("i2v", config=config), dataclasses.replace(SETTINGS, scale=1))
    with pytest.raises(ValueError, match=r"v2v stage at 2 steps: strength=0.3 leaves no step of 2"):
        check_chain(infos, dataclasses.replace(SETTINGS, strength=0.3))
    with pytest.raises(ValueError, match="factor must be an integer >= 2"):
        check_chain(infos, dataclasses.replace(SETTINGS, factor=1))


def test_stage_lists(stages, tmp_path):
    listing = tmp_path / "list.json"
    listing.write_text(json.dumps({"t2i": str(stages / "t2i"), "i2v": f"{stages.name}/i2v",
                                   "v2v": str(stages / "v2v"), "vfi": str(stages / "vfi")}))
    (tmp_path / stages.name).symlink_to(stages)
    paths = stage_paths(listing)
    assert os.path.realpath(paths["i2v"]) == os.path.realpath(stages / "i2v")
    assert MagicVideoPipeline.load(listing, SETTINGS).sizes["hires"] == (32, 32)
    listing.write_text(json.dumps({"t2i": "a", "i2v": "b", "v2v": "c", "vfi": "d", "vsr": "e"}))
    with pytest.raises(ValueError, match=r"missing \[\], unknown \['vsr'\]"):
        stage_paths(listing)
    with pytest.raises(FileNotFoundError, match="neither a folder of the four stages"):
        stage_paths(tmp_path / "nothing")
