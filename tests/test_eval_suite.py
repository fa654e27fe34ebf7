"""`magdiff-jax eval suite` (magdiff_jax/eval/suite.py) on the synthetic dataset (6 clips of 16 frames, 32 x 32,
written by `data.synthetic.write_synthetic` as `magdiff-jax data synth` does) with a tiny random MagDiff export
(configs/magdiff.py:tiny's models with a one-level U-Net and one-layer CLIP towers, 16 frames of 32 x 32, every
parameter N(0, 0.1^2): `helpers.random_model`; 2 DDIM steps) and the width/16 I3D and narrow C3D of test_eval_cli.py
(FVD on 8 frames of 64 x 64 with the I3D's final pool shrunk to match, IS on the C3D's 16 frames):

- suite ucf101 makes N samples (mp4, manifest, prompts), its report's FVD and IS equal `runner.evaluate_fvd` /
  `evaluate_is` on the sample folder (fresh caches, within 1e-6 relative), the real folder holds the clips the
  subjects came from, and a rerun generates nothing; a changed setting in the same OUT is an error naming it;
- suite vimeo through the CLI with a tiny random VFI stage: PSNR / SSIM of frames 2, 4, 6 equal `eval.image` on the
  decoded septuplets and the stored samples, the input frames pass through;
- errors: an export of the wrong task, a --data folder without a layout the suite reads, fewer clips than
  --num-videos, a suite without its networks, davis without edit prompts or with a clip the data lacks.
"""

import json

import numpy as np
import pytest
from etils import epath
from helpers import eval_networks, notebook_kernel, random_model, tiny_vfi_stage

from magdiff_jax import cli
from magdiff_jax.data.synthetic import SyntheticConfig, make_clip, write_synthetic
from magdiff_jax.data.synthetic import write_tokenizer as write_synthetic_tokenizer
from magdiff_jax.eval import runner, suite
from magdiff_jax.eval.fvd import FVDProtocol, I3DFeatures, NotEnoughVideosError
from magdiff_jax.eval.image import psnr, ssim
from magdiff_jax.eval.videos import read_videos, video_files
from magdiff_jax.export.stage import Stage, save_stage
from magdiff_jax.models.i3d import I3D, I3DConfig
from magdiff_jax.pipelines import load_pipeline
from magdiff_jax.pipelines.magdiff import MagDiffPipeline

N = 4
FVD = FVDProtocol("small", num_videos=N, num_frames=8, resolution=(64, 64))
UCF = dict(load_pipeline=load_pipeline, num_videos=N, num_steps=2, guidance=3.0, batch_size=2,
           feature_batch_size=2, fvd_protocol=FVD, is_protocol=runner.ISProtocol(num_videos=N, num_splits=2))
STAGE_MODELS = {"unet": "magdiff", "vae": "vae", "text_encoder": "clip_text", "image_encoder": "clip_vision"}
SYNTH = SyntheticConfig(num_frames=16, size=32)


def _magdiff_export(root):
    from magdiff_jax.demo import load_config

    config = load_config("magdiff", "tiny")
    config.model.unet.unet.update(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock3D",),
                                  up_block_types=("CrossAttnUpBlock3D",))
    config.model.text_encoder.num_hidden_layers = config.model.image_encoder.num_hidden_layers = 1
    config.data.num_frames = 16  # the FVD and IS protocols' 16 frames
    modules, params = {}, {}
    for n, (name, kind) in enumerate(STAGE_MODELS.items()):
        modules[name], params[name] = random_model(kind, config.model[name].to_dict(), seed=n)
    tokenizer = write_synthetic_tokenizer(root / "tokenizer")
    stage = Stage("magdiff", 3, config, dict(STAGE_MODELS), modules, params, epath.Path(tokenizer), epath.Path(root))
    return save_stage(stage, root / "export")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    data = write_synthetic(root / "data", 6, SYNTH)
    export = _magdiff_export(root)
    (_, i3d_params), (c3d, c3d_params) = eval_networks(root).values()
    save_stage(tiny_vfi_stage(root), root / "vfi")
    # FVD on 8 frames of 64 x 64 (the I3D's final pool shrunk to match), IS on the C3D's 16 frames
    nets = dict(i3d=I3DFeatures(I3D(I3DConfig(width_divisor=16, pool_size=(1, 2, 2))), i3d_params, name="small"),
                c3d=runner.C3DProbabilities(c3d, c3d_params))
    out = root / "out"
    suite.run_suite("ucf101", suite.export_labels([str(export)]), data, out, **UCF, **nets)
    return dict(root=root, data=data, export=export, out=out, **nets)


def _eval(*argv):
    cli.main(cli.parse_flags(["magdiff-jax", "eval", "suite", *map(str, argv)]))


def _ucf_args(root, export, out, *extra):
    return ("--export", export, "--suite", "ucf101", "--data", root / "data", "--num-videos", N, "--out", out,
            "--i3d", root / "i3d.safetensors", "--c3d", root / "c3d.safetensors", "--steps", 2, "--guidance", 3.0,
            "--batch-size", 2, "--feature-batch-size", 2, "--splits", 2, *extra)


def test_ucf101_suite_generates_scores_and_resumes(setup, tmp_path, monkeypatch):
    s = setup
    samples = s["out"] / "samples" / "step_3"
    names = sorted(p.name for p in samples.iterdir())
    assert names == [f"{i:05d}.mp4" for i in range(N)] + ["manifest.json", "prompts.json"]
    decoded = [v for _, v in read_videos(video_files(samples))]
    assert all(v.shape == (16, 32, 32, 3) for v in decoded)
    manifest = json.loads((samples / "manifest.json").read_text())
    captions = [make_clip(i, SYNTH).caption for i in range(N)]  # 6 clips, 6 captions: one "class" each
    assert [m["prompt"] for m in manifest["samples"]] == captions
    assert [m["seed"] for m in manifest["samples"]] == list(range(N))
    assert manifest["settings"]["num_steps"] == 2 and manifest["settings"]["prompt_template"] == "{}"
    real = sorted(p.name for p in (s["out"] / "real").iterdir())
    assert real == [f"{i:05d}_{i:05d}.mp4" for i in range(N)]

    report = json.loads((s["out"] / "report.json").read_text())
    (row,) = report["rows"]
    assert (row["label"], row["step"], row["num_videos"]) == ("step_3", 3, N)
    assert report["suite"] == "ucf101" and report["data"]["layout"] == "caption_folder"
    assert report["protocols"]["fvd"]["name"] == "small" and report["protocols"]["is"]["num_splits"] == 2
    # the scores are the runner's on the sample folder, from scratch (another cache)
    (want_fvd,) = runner.evaluate_fvd(s["i3d"], s["out"] / "real", {"x": samples}, FVD, cache=tmp_path / "c",
                                      batch_size=2)
    (want_is,) = runner.evaluate_is(s["c3d"], {"x": samples}, UCF["is_protocol"], cache=tmp_path / "c",
                                    batch_size=2)
    assert want_fvd["fvd"] > 0 and abs(row["fvd"] - want_fvd["fvd"]) <= 1e-6 * want_fvd["fvd"]
    assert want_is["is"] > 1 and abs(row["is"] - want_is["is"]) <= 1e-6 * want_is["is"]
    assert "FVD" in (s["out"] / "report.md").read_text()

    def no_generation(*_, **__):
        raise AssertionError("a sample was generated again")

    monkeypatch.setattr(MagDiffPipeline, "__call__", no_generation)
    nets = {k: s[k] for k in ("i3d", "c3d")}
    again = suite.run_suite("ucf101", {"step_3": s["export"]}, s["data"], s["out"], **UCF, **nets)
    assert again["rows"][0]["generation"]["generated"] == 0 and again["rows"][0]["generation"]["existing"] == N
    assert again["rows"][0]["fvd"] == row["fvd"] and again["rows"][0]["is"] == row["is"]
    with pytest.raises(ValueError, match=r"other settings \(num_steps: 2 -> 3\)"):
        suite.run_suite("ucf101", {"step_3": s["export"]}, s["data"], s["out"], **{**UCF, "num_steps": 3}, **nets)


def test_vimeo_suite_scores_the_in_between_frames(setup, tmp_path):
    s = setup
    out = tmp_path / "vimeo"
    _eval("--export", f"vfi_4={s['root'] / 'vfi'}", "--suite", "vimeo", "--data", s["data"], "--num-videos", 2,
          "--out", out)
    (row,) = json.loads((out / "report.json").read_text())["rows"]
    want = {"psnr": [], "ssim": []}
    for i in range(2):
        pred = np.load(out / "samples" / "vfi_4" / f"{i:05d}.npy")
        truth = next(read_videos([s["data"] / "videos" / f"{i:05d}.mp4"]))[1][:7]
        assert pred.shape == truth.shape == (7, 32, 32, 3)
        np.testing.assert_array_equal(pred[::2], truth[::2])  # the input frames pass through
        x, y = (v[1::2].astype(np.float32) / 127.5 - 1.0 for v in (pred, truth))
        want["psnr"].append(float(np.mean(psnr(x, y))))
        want["ssim"].append(float(np.mean(ssim(x, y))))
    for k, v in want.items():
        assert abs(row[k] - np.mean(v)) <= 1e-6 * abs(np.mean(v)), (k, row[k], v)
    assert row["step"] == 4 and "lpips" not in row


def test_bad_exports_data_and_counts_are_named(setup, tmp_path):
    s = setup
    with pytest.raises(ValueError, match=r"holds a 'vfi' stage; suite ucf101 generates with a 'magdiff' stage"):
        _eval(*_ucf_args(s["root"], s["root"] / "vfi", tmp_path / "a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(suite.SuiteDataError, match=r"neither a video-caption folder .* nor the msrvtt layout"):
        _eval("--export", s["export"], "--suite", "msrvtt", "--data", tmp_path / "empty", "--num-videos", 2,
              "--out", tmp_path / "b", "--i3d", s["root"] / "i3d.safetensors")
    with pytest.raises(NotEnoughVideosError, match=r"6 test clips usable by suite ucf101, --num-videos asks for 9"):
        _eval(*_ucf_args(s["root"], s["export"], tmp_path / "c")[:7], 9, "--out", tmp_path / "c",
              "--i3d", s["root"] / "i3d.safetensors")
    with pytest.raises(ValueError, match="give its network"):
        suite.run_suite("msrvtt", {"a": s["export"]}, s["data"], tmp_path / "d", num_videos=2,
                        load_pipeline=load_pipeline)
    with pytest.raises(ValueError, match="--clip"):
        suite.run_suite("davis", {"a": s["export"]}, s["data"], tmp_path / "d", num_videos=2,
                        load_pipeline=load_pipeline)
    with pytest.raises(suite.SuiteDataError, match="gives no edit prompts"):
        suite.suite_items("davis", s["data"])
    with pytest.raises(suite.SuiteDataError, match=r"no clip \['videos/00042.mp4'\]"):
        suite.suite_items("davis", s["data"], edit_prompts={"videos/00042.mp4": "a blue circle moves up"})
    items, _ = suite.suite_items("davis", s["data"], edit_prompts={"00001.mp4": "a blue circle moves up"})
    assert [(i.key, i.prompt) for i in items] == [("videos/00001.mp4", "a blue circle moves up")]
    assert items[0].mask.endswith("masks/00001")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    with notebook_kernel(tmp_path_factory.mktemp("jupyter")) as name:
        yield name


def test_the_evaluate_notebook_scores_and_shows_the_report(setup, kernel, tmp_path):
    """notebooks/evaluate.ipynb (papermill, tests/test_notebooks.py's kernel) on the ucf101 suite of the synthetic
    data, its output folder holding the samples `setup` generated with the same settings: it generates nothing, loads
    the I3D and C3D from their files, scores FVD under fvd2048_16f (16 frames at 224, renamed for 4 videos) and IS
    with 2 splits, displays the report's table, and shows SHOW samples; off Colab its set-up cell does nothing."""
    import shutil

    from helpers import cell_text, cell_videos, notebook_cell, run_notebook

    s = setup
    out = tmp_path / "out"
    shutil.copytree(s["out"] / "samples", out / "samples")
    params = dict(REPO_URL="", SUITE="ucf101", EXPORT=str(s["export"]), DATA_DIR=str(s["data"]), NUM_VIDEOS=N,
                  OUTPUT_DIR=str(out), I3D_FILE=str(s["root"] / "i3d.safetensors"),
                  C3D_FILE=str(s["root"] / "c3d.safetensors"), NUM_STEPS=2, GUIDANCE=3.0, BATCH_SIZE=2, IS_SPLITS=2,
                  SHOW=2, DISPLAY_HEIGHT=64)
    nb = run_notebook("evaluate.ipynb", kernel, params, tmp_path)
    report = json.loads((out / "report.json").read_text())
    (row,) = report["rows"]
    assert row["generation"]["generated"] == 0 and row["generation"]["existing"] == N
    assert report["protocols"]["fvd"]["name"] == "fvd2048_16f_n4" and report["protocols"]["fvd"]["num_frames"] == 16
    assert report["protocols"]["is"]["name"] == "isv2048_ucf_n4" and report["protocols"]["is"]["num_splits"] == 2
    assert row["fvd"] > 0 and row["is"] >= 1 and row["num_videos"] == N
    assert "step_3: 0 samples generated, 4 already there" in cell_text(notebook_cell(nb, "run"))
    tables = [o["data"].get("text/markdown", "") for o in notebook_cell(nb, "report").outputs
              if o.output_type == "display_data"]
    assert any("| step_3 | 3 | 4 |" in t for t in tables), tables
    assert "fvd: " in cell_text(notebook_cell(nb, "report"))
    assert cell_videos(notebook_cell(nb, "samples")) == 2
    assert "i3d: " in cell_text(notebook_cell(nb, "networks")) and "c3d: " in cell_text(notebook_cell(nb, "networks"))
    assert notebook_cell(nb, "setup").outputs == []


def test_davis_suite_edits_each_clip_and_scores_it_against_its_prompt(setup, tmp_path):
    """davis on the synthetic data: the clips the edit prompts name, edited from noise with their masks kept (2
    DDIM steps), written with their prompts; text alignment and frame consistency equal `evaluate_clip` on the
    sample folder (a fresh cache), with the tiny CLIPModel folder of tests/helpers.py."""
    from helpers import tiny_clip_model_folder

    s = setup
    tiny_clip_model_folder(tmp_path / "clip")
    clip = runner.load_clip(tmp_path / "clip")
    prompts = {"00001.mp4": "a blue circle moves up", "00003.mp4": "a red square moves left"}
    out = tmp_path / "davis"
    report = suite.run_suite("davis", {"step_3": s["export"]}, s["data"], out, load_pipeline=load_pipeline,
                             num_videos=2, num_steps=2, guidance=3.0, batch_size=2, clip=clip, edit_prompts=prompts)
    samples = out / "samples" / "step_3"
    written = json.loads((samples / "prompts.json").read_text())
    assert sorted(written.values()) == sorted(prompts.values())
    assert all(v.shape == (16, 32, 32, 3) for _, v in read_videos(video_files(samples)))
    (row,) = report["rows"]
    (want,) = runner.evaluate_clip(*clip, {"x": samples}, {"x": written}, cache=tmp_path / "c")
    for score in ("text_alignment", "frame_consistency"):
        assert abs(row[score] - want[score]) <= 1e-6 * abs(want[score]), (score, row[score], want[score])
    assert 0 < row["frame_consistency"] <= 100 + 1e-3 and row["num_videos"] == 2
