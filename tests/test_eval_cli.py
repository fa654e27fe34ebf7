"""`magdiff-jax eval fvd|is|clip` on folders of videos (magdiff_jax/eval/runner.py, videos.py, report.py): the
scores equal `video_stats` + `fvd_from_stats`, `inception_score` and the CLIP / DINO scores computed directly on the
same decoded videos; the report (JSON, markdown table, the scores against the training step) is written; the
feature caches make a rerun extract nothing and an interrupted run resume where it stopped; bad inputs (an
undecodable or too short video, too few videos, a video without a prompt) are errors naming the culprit, or with
--skip-bad / --allow-fewer recorded in the report. A whole transformers CLIPModel folder converts (both towers equal
transformers' `get_image_features` / `get_text_features`, 1e-5). The networks are a width/16 I3D (at the protocol's
16 x 224 x 224), a narrow C3D, a one-block DINO ViT and a two-layer CLIP, with random weights saved in their
PyTorch layouts."""

import json

import jax
import numpy as np
import pytest
from helpers import eval_networks, random_eval_params

from magdiff_jax import cli
from magdiff_jax.convert import save_torch
from magdiff_jax.data.video_io import write_video
from magdiff_jax.eval import runner
from magdiff_jax.eval.fvd import FVDProtocol, I3DFeatures, NotEnoughVideosError, fvd_from_stats, video_stats
from magdiff_jax.eval.inception_score import inception_score
from magdiff_jax.eval.videos import EvalVideoError, read_videos, video_files
from magdiff_jax.models.i3d import I3D, I3DConfig

PROTOCOL = FVDProtocol("fvd2048_16f_n2", num_videos=2)  # what --num-videos 2 makes of fvd2048_16f
SMALL = FVDProtocol("small", num_videos=4, num_frames=8, resolution=(64, 64))  # the runner's own tests


def _videos(n, seed, frames=16):
    """Smooth moving blobs (so that H.264 keeps them) as uint8 (n, frames, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32]
    out = np.zeros((n, frames, 32, 32, 3), np.uint8)
    for i in range(n):
        colour, (y0, x0), (vy, vx) = rng.uniform(60, 255, 3), rng.uniform(8, 24, 2), rng.uniform(-1, 1, 2)
        for t in range(frames):
            blob = np.exp(-((yy - y0 - vy * t) ** 2 + (xx - x0 - vx * t) ** 2) / 30.0)
            out[i, t] = (20 + blob[..., None] * colour).clip(0, 255).astype(np.uint8)
    return out


def _folder(path, videos, mp4=2):
    """The first `mp4` videos as .mp4 files in a class subfolder, the rest as one batch .npy."""
    (path / "class_a").mkdir(parents=True)
    for i in range(mp4):
        write_video(path / "class_a" / f"v{i}.mp4", videos[i])
    np.save(path / "rest.npy", videos[mp4:])
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    (i3d, i3d_params), (c3d, c3d_params) = eval_networks(root).values()
    folders = {"real": _folder(root / "real", _videos(5, 0)), "step_10": _folder(root / "f10", _videos(4, 1)),
               "step_20": _folder(root / "f20", _videos(4, 2), mp4=0)}
    decoded = {k: np.stack([v for _, v in read_videos(video_files(f))]) for k, f in folders.items()}
    # the reference: each folder's decoded videos as one array through `video_stats` (no folders, no caches)
    features = I3DFeatures(i3d, i3d_params, name="i3d")
    stats = {k: video_stats(v, features, PROTOCOL, batch_size=2) for k, v in decoded.items()}
    want = {k: fvd_from_stats(stats["real"], stats[k]) for k in ("step_10", "step_20")}
    # the runner's tests: the same I3D with a final pool for 8 frames of 64 x 64 (SMALL)
    small = I3DFeatures(I3D(I3DConfig(width_divisor=16, pool_size=(1, 2, 2))), i3d_params, name="small")
    stats = {k: video_stats(decoded[k], small, SMALL, batch_size=2) for k in ("real", "step_10")}
    want_small = fvd_from_stats(stats["real"], stats["step_10"])
    return dict(root=root, folders=folders, decoded=decoded, want=want, small=small, want_small=want_small,
                c3d=(c3d, c3d_params))


def _eval(*argv):
    cli.main(cli.parse_flags(["magdiff-jax", "eval", *map(str, argv)]))


def _fvd_args(s, out, *extra):
    f = s["folders"]
    return ("fvd", "--i3d", s["root"] / "i3d.safetensors", "--real", f["real"], "--fake", f"step_10={f['step_10']}",
            "--fake", f"step_20={f['step_20']}", "--num-videos", 2, "--batch-size", 2, "--out", out, *extra)


def test_fvd_command_writes_the_report_and_a_rerun_reads_the_caches(setup, tmp_path, monkeypatch):
    s = setup
    _eval(*_fvd_args(s, tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert [(r["step"], r["num_videos"], r["num_real"], r["complete"]) for r in rows.values()] == [(10, 2, 2, True),
                                                                                                 (20, 2, 2, True)]
    for label in ("step_10", "step_20"):
        want = s["want"][label]
        assert want > 0 and abs(rows[label]["fvd"] - want) <= 1e-6 * want, (label, rows[label]["fvd"], want)
        assert rows[label]["protocol"]["name"] == "fvd2048_16f_n2" and rows[label]["fvd_videos_per_second"] > 0
    table = (tmp_path / "out" / "report.md").read_text()
    assert "| step_10 | 10 | 2 |" in table and "FVD" in table
    assert (tmp_path / "out" / "scores.png").stat().st_size > 1000
    assert len(list((tmp_path / "out" / "cache").glob("fvd_*.npz"))) == 3  # the real statistics once

    def no_network(*_, **__):
        raise AssertionError("features extracted although every statistic is cached")

    monkeypatch.setattr(I3DFeatures, "extract_clips", no_network)
    _eval(*_fvd_args(s, tmp_path / "out"))
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [r["fvd"] for r in again["rows"]] == [r["fvd"] for r in report["rows"]]


def test_an_interrupted_evaluation_resumes_where_it_stopped(setup, tmp_path, monkeypatch):
    s = setup
    f = s["folders"]
    want = s["want_small"]
    calls = []
    real_extract = I3DFeatures.extract_clips

    def crash_on_the_third(self, clips, protocol):
        calls.append(len(clips))
        if len(calls) == 3:  # real: 2 batches done and cached; fake: the first batch dies
            raise RuntimeError("preempted")
        return real_extract(self, clips, protocol)

    monkeypatch.setattr(I3DFeatures, "extract_clips", crash_on_the_third)
    with pytest.raises(RuntimeError, match="preempted"):
        runner.evaluate_fvd(s["small"], f["real"], {"a": f["step_10"]}, SMALL, cache=tmp_path, batch_size=2)
    calls.clear()
    counted = lambda self, clips, protocol: calls.append(len(clips)) or real_extract(self, clips, protocol)
    monkeypatch.setattr(I3DFeatures, "extract_clips", counted)
    (row,) = runner.evaluate_fvd(s["small"], f["real"], {"a": f["step_10"]}, SMALL, cache=tmp_path, batch_size=2)
    assert calls == [2, 2]  # the generated videos only: the real ones were cached before the crash
    assert abs(row["fvd"] - want) <= 1e-6 * want


def test_bad_videos_and_too_few_are_named_or_reported(setup, tmp_path):
    s = setup
    bad = _folder(tmp_path / "bad", _videos(4, 3))
    (bad / "class_a" / "broken.mp4").write_bytes(b"not a video at all")
    np.save(bad / "short.npy", _videos(1, 4, frames=6)[0])
    options = dict(cache=tmp_path / "cache", batch_size=2)
    with pytest.raises(EvalVideoError, match=r"broken\.mp4"):
        runner.evaluate_fvd(s["small"], s["folders"]["real"], {"bad": bad}, SMALL, **options)
    with pytest.warns(UserWarning, match=r"short\.npy: 6 frames, the protocol needs at least 8"):
        (row,) = runner.evaluate_fvd(s["small"], s["folders"]["real"], {"bad": bad}, SMALL, skip_bad=True,
                                     **options)
    assert sorted(e["video"].rsplit("/", 1)[-1] for e in row["skipped"]) == ["broken.mp4", "short.npy"]
    assert row["num_videos"] == 4 and row["complete"]
    more = FVDProtocol("small_n6", num_videos=6, num_frames=8, resolution=(64, 64))
    with pytest.raises(NotEnoughVideosError, match="allow_fewer"):
        runner.evaluate_fvd(s["small"], s["folders"]["real"], {"f": s["folders"]["step_10"]}, more, **options)
    with pytest.warns(UserWarning, match="5 videos, protocol 'small_n6' needs 6"):
        (row,) = runner.evaluate_fvd(s["small"], s["folders"]["real"], {"f": s["folders"]["step_10"]}, more,
                                     allow_fewer=True, **options)
    assert not row["complete"] and (row["num_real"], row["num_videos"]) == (5, 4)
    with pytest.raises(EvalVideoError, match="no videos"):
        video_files(_empty(tmp_path))


def _empty(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no videos here")
    return tmp_path / "empty"


def test_is_command_equals_the_score_of_the_c3d_probabilities(setup, tmp_path):
    s = setup
    module, params = s["c3d"]
    _eval("is", "--c3d", s["root"] / "c3d.safetensors", "--fake", f"step_10={s['folders']['step_10']}",
          "--num-videos", 4, "--splits", 2, "--batch-size", 2, "--out", tmp_path / "is.json")
    (row,) = json.loads((tmp_path / "is.json").read_text())["rows"]
    x = s["decoded"]["step_10"][:4].astype(np.float32) / 127.5 - 1.0
    probs = jax.nn.softmax(module.apply({"params": params}, x).logits, axis=-1)
    mean, std = inception_score(np.asarray(probs, np.float64), 2)
    assert mean > 1.0 and abs(row["is"] - mean) <= 1e-6 * mean and abs(row["is_std"] - std) <= 1e-6 + 1e-6 * std
    assert row["num_videos"] == 4 and row["protocol"]["num_splits"] == 2
    assert "IS" in (tmp_path / "is.md").read_text() and (tmp_path / "is_cache").is_dir()


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    from helpers import tiny_clip_model_folder

    root = tmp_path_factory.mktemp("clip_model")
    return root, tiny_clip_model_folder(root)


def test_clip_model_folder_converts_both_towers(clip_folder):
    """`convert.clip.clip_model_from_torch` on a whole CLIPModel folder: image and text embeddings equal
    transformers' CLIPModel `get_image_features` / `get_text_features` (fp32, random weights, 1e-5)."""
    import torch

    from magdiff_jax.convert.clip import clip_model_from_torch

    root, model = clip_folder
    text, text_params, vision, vision_params = clip_model_from_torch(root)
    pixels = np.random.default_rng(5).standard_normal((2, 32, 32, 3)).astype(np.float32)
    ids = np.array([[text.config.bos_token_id, 5, 9, text.config.eos_token_id] + [text.config.pad_token_id] * 12],
                   np.int32)
    ours_img = vision.apply({"params": vision_params}, pixels).image_embeds
    ours_txt = text.apply({"params": text_params}, ids).text_embeds
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()))
        txt = model.get_text_features(input_ids=torch.from_numpy(ids).long())
    img, txt = getattr(img, "pooler_output", img).numpy(), getattr(txt, "pooler_output", txt).numpy()
    np.testing.assert_allclose(np.asarray(ours_img), img, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_txt), txt, atol=1e-5, rtol=1e-5)


def test_clip_command_scores_each_video_against_its_prompt_and_subject(setup, clip_folder, tmp_path):
    from PIL import Image

    from magdiff_jax.convert.clip import clip_model_from_torch
    from magdiff_jax.eval import clip_scores as cs
    from magdiff_jax.models.dino import DINOViT, DINOViTConfig
    from magdiff_jax.models.tokenizer import CLIPTokenizer

    s, (root, _) = setup, clip_folder
    folder = s["folders"]["step_10"]
    names = ["class_a/v0.mp4", "class_a/v1.mp4", "rest.npy[0]", "rest.npy[1]"]
    prompts = dict(zip(names, ["a cat", "the dog", "a dog of the cat", "the cat"]))
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    subjects = tmp_path / "subjects"
    (subjects / "class_a").mkdir(parents=True)
    for name, video in zip(names, s["decoded"]["step_10"]):
        stem = name.replace(".mp4", "").replace(".npy[", "_").rstrip("]")
        Image.fromarray(video[0]).save(subjects / f"{stem}.png")
    dino = DINOViT(DINOViTConfig(img_size=32, patch_size=16, embed_dim=64, depth=1, num_heads=1))
    dino_params = random_eval_params("dino_vit", dino, 6)
    save_torch("dino_vit", dino, dino_params, tmp_path / "dino.safetensors")
    _eval("clip", "--clip", root, "--fake", f"step_10={folder}", "--prompts", tmp_path / "prompts.json",
          "--subjects", subjects, "--dino", tmp_path / "dino.safetensors", "--num-videos", 3, "--out", tmp_path / "out")
    (row,) = json.loads((tmp_path / "out" / "report.json").read_text())["rows"]
    # the same scores computed here from the decoded videos, one video at a time
    clip = cs.CLIPEmbedder(*clip_model_from_torch(root))
    dino_embedder = cs.DINOEmbedder(dino, dino_params)
    tokenizer = CLIPTokenizer.from_folder(root, max_length=16)
    x = s["decoded"]["step_10"][:3].astype(np.float32) / 127.5 - 1.0
    want = {"clipsim": [float(cs.clipsim(clip, x[i : i + 1], tokenizer([prompts[n]]))[0]) for i, n in
                        enumerate(names[:3])],
            "frame_consistency": [float(cs.frame_consistency(clip, x[i : i + 1])[0]) for i in range(3)],
            "clip_i": [float(cs.clip_i(clip, x[i : i + 1], x[i : i + 1, 0])[0]) for i in range(3)],
            "dino": [float(cs.dino_score(dino_embedder, x[i : i + 1], x[i : i + 1, 0])[0]) for i in range(3)]}
    assert row["num_videos"] == 3
    for score, values in want.items():
        assert abs(row[score] - np.mean(values)) <= 1e-4 * (1 + abs(np.mean(values))), (score, row[score], values)
        assert abs(row[f"{score}_std"] - np.std(values)) <= 1e-4 * (1 + np.std(values)), score
    assert abs(row["text_alignment"] - 100 * row["clipsim"]) <= 1e-6 * abs(100 * row["clipsim"]) + 1e-9
    assert 0 < row["frame_consistency"] <= 100 + 1e-3
    table = (tmp_path / "out" / "report.md").read_text()
    assert "frame consistency" in table and "DINO" in table
    with pytest.raises(ValueError, match=r"no prompt for class_a/v1\.mp4"):
        runner.evaluate_clip(clip, tokenizer, {"f": folder}, {"f": {names[0]: "a cat"}})
