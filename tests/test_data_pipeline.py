"""The Grain data pipeline: frame sampling, resizing and cropping, the MagDiff subject, interpolation and
super-resolution pairs, captions; bad input (real broken files) skipped, counted and reported; per-process
shards, seeded order, and iterator state restored through Orbax."""

import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from magdiff_jax.data import transforms
from magdiff_jax.data.bad_input import BadInputReport, TooManyBadInputs
from magdiff_jax.data.pipeline import data_config, loader_spec, make_dataset
from magdiff_jax.data.sources import ImageCaptionFolder, SyntheticSource, VideoCaptionFolder, parse_frames
from magdiff_jax.data.synthetic import COLORS, SyntheticConfig, make_clip, write_synthetic
from magdiff_jax.data.video_io import read_frames, write_video
from magdiff_jax.utils import images

GOOD = 6
SYN = SyntheticConfig(num_frames=8, size=32, seed=3)


def _rows(root):
    with open(root / "captions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _append(root, *lines):
    with open(root / "captions.csv", "a") as fh:
        for line in lines:
            fh.write(line + "\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Six good synthetic clips (8 frames, 32x32) followed by real bad files and malformed rows."""
    root = write_synthetic(tmp_path_factory.mktemp("data") / "clips", GOOD, SYN)
    good = (root / "videos" / "00000.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "videos" / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (root / "videos" / "empty.mp4").write_bytes(b"")
    write_video(root / "videos" / "short.mp4", make_clip(0, SyntheticConfig(num_frames=3, size=32)).frames)
    small = root / "masks" / "small"
    small.mkdir()
    import imageio.v3 as iio

    for t in range(8):
        iio.imwrite(small / f"{t:03d}.png", np.full((16, 16), 255, np.uint8))
    _append(root,
            "videos/truncated.mp4,a truncated clip,masks/00000",
            "videos/noise.mp4,random bytes,masks/00000",
            "videos/empty.mp4,an empty file,masks/00000",
            "videos/short.mp4,three frames only,masks/00000",
            "videos/00001.mp4,a mask of the wrong size,masks/small",
            "videos/missing.mp4,a file that is not there,",
            "videos/00002.mp4,,masks/00002",
            "videos/00003.mp4,one field,too,many,")
    return root


BAD_FILES = {"videos/truncated.mp4", "videos/noise.mp4", "videos/empty.mp4", "videos/short.mp4"}


def _config(**overrides):
    c = data_config()
    c.source = "synthetic"
    c.synthetic.update(num=GOOD, num_frames=SYN.num_frames, size=SYN.size, seed=SYN.seed)
    c.num_frames, c.resolution, c.prefetch = 4, (32, 32), 0
    for k, v in overrides.items():
        target = c
        *path, last = k.split(".")
        for p in path:
            target = target[p]
        target[last] = v
    return c


def _all(ds):
    it = iter(ds)
    return list(it)


# --- sources -----------------------------------------------------------------------------------------------------


def test_folder_source_keeps_malformed_rows_out_and_names_them(folder):
    src = VideoCaptionFolder(folder)
    bad = dict(src.bad)
    assert src.total == len(_rows(folder)) == GOOD + 8
    assert "captions.csv:13 (videos/missing.mp4)" not in bad  # files are checked when loaded (not at start)
    assert any("no caption" in r for r in bad.values())
    assert any("fields, header has 3" in r for r in bad.values())
    assert len(src) == GOOD + 6  # the missing and broken files themselves are only found when loaded
    rec = src[0]
    assert rec["key"] == "videos/00000.mp4" and rec["mask"].endswith("masks/00000") and rec["frames"] is None


def test_frame_lists_and_jsonl(tmp_path):
    assert parse_frames("0-3") == [0, 1, 2, 3] and parse_frames("[2, 4]") == [2, 4] and parse_frames("1 5,7") == [
        1, 5, 7]
    assert parse_frames("") is None
    root = write_synthetic(tmp_path / "j", 2, SYN)
    (root / "captions.csv").unlink()
    lines = [json.dumps({"video": "videos/00000.mp4", "caption": ["first", "second"], "frames": [1, 3, 5, 7]}),
             "{not json", json.dumps({"video": "videos/00001.mp4", "caption": "x", "frames": "seven"})]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    src = VideoCaptionFolder(root)
    assert len(src) == 1 and len(src.bad) == 2
    assert src[0]["caption"] == ["first", "second"] and src[0]["frames"] == [1, 3, 5, 7]


def test_image_folder_is_one_frame_videos(tmp_path):
    import imageio.v3 as iio

    (tmp_path / "im").mkdir()
    img = make_clip(4, SYN).frames[0]
    iio.imwrite(tmp_path / "im" / "a.png", img)
    (tmp_path / "captions.csv").write_text("image,caption\nim/a.png,a picture\n")
    src = ImageCaptionFolder(tmp_path)
    c = _config(source="images", path=str(tmp_path), num_frames=1, normalize=False)
    (batch,) = _all(make_dataset(c, batch_size=1, train=False, source=src))
    assert batch["video"].shape == (1, 1, 32, 32, 3)
    np.testing.assert_array_equal(batch["video"][0, 0], img)


# --- bad input ---------------------------------------------------------------------------------------------------


def test_bad_files_are_skipped_counted_and_reported(folder, tmp_path):
    c = _config(source="folder", path=str(folder), max_bad_fraction=0.9, masks=True)
    report = tmp_path / "bad_inputs.json"
    batches = _all(make_dataset(c, batch_size=2, train=False, report_path=report))
    keys = sorted(k for b in batches for k in b["key"])
    assert keys == [f"videos/{i:05d}.mp4" for i in range(GOOD)]
    data = json.loads(report.read_text())
    reasons = {b["key"]: b["reason"] for b in data["bad"]}
    assert set(reasons) >= BAD_FILES
    assert "videos/00001.mp4" in reasons and "mask is 16x16, video is 32x32" in reasons["videos/00001.mp4"]
    assert "3 usable frames" in reasons["videos/short.mp4"]
    assert reasons["videos/missing.mp4"] == "video videos/missing.mp4 does not exist"  # found when loaded
    assert "captions.csv:14 (videos/00002.mp4)" in reasons
    assert data["num_bad"] == len(reasons) == 8 and data["total"] == GOOD + 6 + 2


def test_too_many_bad_inputs_stop_naming_the_first(folder, tmp_path):
    c = _config(source="folder", path=str(folder), masks=True)  # default threshold: 1%
    with pytest.raises(TooManyBadInputs, match=r"captions\.csv:14 \(videos/00002\.mp4\): no caption"):
        _all(make_dataset(c, batch_size=2, train=False, report_path=tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["num_bad"] == 1


def test_report_threshold_counts_unique_bad_keys(tmp_path):
    r = BadInputReport(total=10, max_bad_fraction=0.2, path=tmp_path / "r.json")
    r.add("a", "x")
    r.add("a", "x")  # a repeat in a later epoch is the same file
    r.add("b", "y")
    with pytest.raises(TooManyBadInputs, match=r"3 of 10 inputs are bad.*a: x; b: y; c: z"):
        r.add("c", "z")
    assert json.loads((tmp_path / "r.json").read_text())["num_bad"] == 3


# --- sampling, resizing, cropping --------------------------------------------------------------------------------


def test_sample_indices_valid_lists_strides_and_shortfalls():
    rng = np.random.default_rng(0)
    assert transforms.sample_indices(range(10), 4, 2, None) == [0, 2, 4, 6]
    starts = {transforms.sample_indices(range(10), 4, 2, rng)[0] for _ in range(50)}
    assert starts == {0, 1, 2, 3}
    assert transforms.sample_indices([3, 5, 8, 9, 11], 2, 3, None) == [3, 9]
    with pytest.raises(ValueError, match="5 usable frames, 3 frames at stride 3 need 7"):
        transforms.sample_indices([3, 5, 8, 9, 11], 3, 3, None)


def test_clip_is_the_decoded_frames_at_the_sampled_indices(folder):
    """Eval: the first frames, stride 2, centre crop of a frame scaled to cover (24, 16)."""
    c = _config(source="folder", path=str(folder), stride=2, resolution=(24, 16), normalize=False,
                max_bad_fraction=1.0)
    src = VideoCaptionFolder(folder)
    ex = transforms.load_example(src[0], loader_spec(c, train=False), np.random.default_rng(0))
    full = read_frames(src[0]["video"], [0, 2, 4, 6], resize=(24, 24))
    np.testing.assert_array_equal(ex["video"], full[:, :, 4:20])
    assert ex["video"].shape == (4, 24, 16, 3) and ex["caption"] == make_clip(0, SYN).caption


def test_fps_sets_the_stride(tmp_path):
    root = write_synthetic(tmp_path / "f", 2, SyntheticConfig(num_frames=16, size=32))  # written at 8 fps
    src = VideoCaptionFolder(root)
    c = _config(source="folder", path=str(root), fps=2.0, num_frames=4, normalize=False)
    spec = loader_spec(c, train=False)
    ex = transforms.load_example(src[1], spec, np.random.default_rng(0))
    np.testing.assert_array_equal(ex["video"], read_frames(src[1]["video"], [0, 4, 8, 12]))


def test_non_square_source_is_covered_then_cropped(tmp_path):
    frames = np.random.default_rng(0).integers(0, 255, (5, 40, 64, 3), dtype=np.uint8)
    assert transforms.scaled_size(40, 64, 32, 32) == (32, 51)
    spec = transforms.LoaderSpec(num_frames=5, height=32, width=32, train=True, normalize=False)
    xs = {transforms.load_example({"key": "k", "video": frames, "caption": "c"}, spec,
                                  np.random.default_rng(s))["video"].tobytes() for s in range(6)}
    assert len(xs) > 1  # random crops differ


# --- examples ----------------------------------------------------------------------------------------------------


def test_batches_are_normalized_and_seeded(tmp_path):
    c = _config(caption_dropout=0.0)
    a = next(iter(make_dataset(c, batch_size=3)))
    b = next(iter(make_dataset(c, batch_size=3)))
    c.seed = 1
    d = next(iter(make_dataset(c, batch_size=3)))
    assert a["video"].dtype == np.float32 and a["video"].shape == (3, 4, 32, 32, 3)
    assert a["video"].min() >= -1.0 and a["video"].max() <= 1.0
    np.testing.assert_array_equal(a["video"], b["video"])
    assert list(a["key"]) == list(b["key"]) and list(a["key"]) != list(d["key"])


def test_processes_read_their_slice_of_the_same_global_batches():
    """Training: process i of 2 holds half of each global batch, and the halves put together are the batch one
    process reads alone (same examples, same random crops). Evaluation: disjoint records covering the data."""
    c = _config()
    one = iter(make_dataset(c, batch_size=4, process_index=0, process_count=1))
    halves = [iter(make_dataset(c, batch_size=2, process_index=i, process_count=2)) for i in range(2)]
    for _ in range(3):  # crosses an epoch (6 clips)
        whole, parts = next(one), [next(h) for h in halves]
        assert list(whole["key"]) == [k for p in parts for k in p["key"]]
        np.testing.assert_array_equal(whole["video"], np.concatenate([p["video"] for p in parts]))
    keys = [[k for b in _all(make_dataset(c, batch_size=1, train=False, process_index=i, process_count=2))
             for k in b["key"]] for i in range(2)]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(SyntheticSource(SYN, GOOD)[i]["key"] for i in range(GOOD))


def test_subject_entity_pyramid_and_clip_inputs():
    spec = transforms.LoaderSpec(num_frames=4, height=32, width=32, train=False, masks=True, subject=True,
                                 subject_sizes=(48, 40, 32), clip_size=24, normalize=False, sda_eval_mode="all")
    rec = SyntheticSource(SYN, GOOD)[2]
    ex = transforms.load_example(rec, spec, np.random.default_rng(0))
    m = ex["mask"].astype(bool)
    np.testing.assert_array_equal(ex["subject_32"][~m], 0)  # black outside the subject
    np.testing.assert_array_equal(ex["subject_32"][m], ex["video"][m])
    assert ex["subject_48"].shape == (4, 48, 48, 3) and ex["subject_clip"].shape == (4, 24, 24, 3)
    assert ex["subject_frames"].all() and ex["subject_mode"] == 2
    color = make_clip(2, SYN).color
    mean = ex["subject_48"][0][ex["subject_48"][0].sum(-1) > 0].mean(0)
    assert min(COLORS, key=lambda k: np.linalg.norm(mean - COLORS[k])) == color
    # generation mode: only the first frame carries the entity
    first = transforms.subject_inputs(ex["video"], m, dataclasses.replace(spec, sda_eval_mode="first"), None)
    assert first["subject_frames"].tolist() == [True, False, False, False]
    assert first["subject_40"][1:].max() == 0 and first["subject_40"][0].max() > 0
    normed = transforms.normalize_example(ex)
    np.testing.assert_allclose(normed["subject_clip"][0, 0, 0], (0 - np.array(images.CLIP_MEAN)) /
                               np.array(images.CLIP_STD), rtol=1e-6)


def test_subject_modes_follow_their_probabilities():
    spec = transforms.LoaderSpec(num_frames=2, height=32, width=32, subject=True, subject_sizes=(32,), clip_size=32,
                                 sda_probs=(0.2, 0.5, 0.3))
    rec = SyntheticSource(SYN, 1)[0]
    frames, masks = rec["video"][:2], rec["mask"][:2] > 0
    rng = np.random.default_rng(0)
    modes = [int(transforms.subject_inputs(frames, masks, spec, rng)["subject_mode"]) for _ in range(600)]
    np.testing.assert_allclose(np.bincount(modes, minlength=3) / 600, [0.2, 0.5, 0.3], atol=0.06)


def test_interpolation_windows_and_super_resolution_pairs():
    rec = SyntheticSource(SYN, 1)[0]
    spec = transforms.LoaderSpec(task="interp", interp_window=7, interp_targets=(2, 4), height=32, width=32,
                                 train=False, normalize=False)
    ex = transforms.load_example(rec, spec, np.random.default_rng(0))
    np.testing.assert_array_equal(ex["frame0"], rec["video"][0])
    np.testing.assert_array_equal(ex["frame1"], rec["video"][6])
    np.testing.assert_array_equal(ex["targets"], rec["video"][[2, 4]])
    np.testing.assert_allclose(ex["times"], [1 / 3, 2 / 3])
    vsr = transforms.LoaderSpec(task="vsr", vsr_scale=4, num_frames=3, height=32, width=32, train=False,
                                normalize=False)
    ex = transforms.load_example(rec, vsr, np.random.default_rng(0))
    assert ex["low_res"].shape == (3, 8, 8, 3)
    np.testing.assert_allclose(ex["low_res"][0, 0, 0], ex["video"][0, :4, :4].reshape(-1, 3).mean(0), atol=1)
    with pytest.raises(ValueError, match="does not divide"):
        transforms.LoaderSpec(task="vsr", vsr_scale=3, height=32, width=32)


def test_caption_dropout_and_tokens(tmp_path):
    from helpers import EOS, write_tokenizer

    from magdiff_jax.models.tokenizer import CLIPTokenizer

    write_tokenizer(tmp_path / "tok", EOS)
    c = _config(caption_dropout=1.0, tokenizer=str(tmp_path / "tok"))
    b = next(iter(make_dataset(c, batch_size=2)))
    assert list(b["caption"]) == ["", ""]
    np.testing.assert_array_equal(b["tokens"][0], CLIPTokenizer.from_folder(tmp_path / "tok")([""])[0])
    c.caption_dropout = 0.0
    b = next(iter(make_dataset(c, batch_size=2, train=False)))
    np.testing.assert_array_equal(b["tokens"], CLIPTokenizer.from_folder(tmp_path / "tok")(list(b["caption"])))


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match=r"6 records, fewer than a global batch of 8 \(4 per process x 2\)"):
        make_dataset(_config(), batch_size=4, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="data task must be one of"):
        make_dataset(_config(task="audio"), batch_size=1)
    with pytest.raises(ValueError, match=r"needs data\.path"):
        make_dataset(_config(source="folder"), batch_size=1)
    with pytest.raises(FileNotFoundError, match="no annotation file"):
        make_dataset(_config(source="folder", path=os.path.dirname(__file__)), batch_size=1)


# --- resumption --------------------------------------------------------------------------------------------------


def test_iterator_state_restores_through_orbax(tmp_path):
    """A training stream resumed from its state in an Orbax checkpoint (a JSON item: the global batch position and
    the bad inputs seen) yields exactly the batches the uninterrupted one does, across an epoch boundary and with
    the thread prefetch on."""
    import orbax.checkpoint as ocp

    c = _config(prefetch=2)
    it = iter(make_dataset(c, batch_size=2))
    for _ in range(2):
        next(it)
    assert it.get_state() == {"batch": 2, "bad": {}}
    mgr = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    mgr.save(2, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
    mgr.wait_until_finished()
    expected = [next(it) for _ in range(4)]  # crosses into the second epoch (6 clips, batches of 2)

    fresh = iter(make_dataset(c, batch_size=2))
    fresh.set_state(mgr.restore(2, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"])
    for want in expected:
        got = next(fresh)
        assert list(got["key"]) == list(want["key"])
        np.testing.assert_array_equal(got["video"], want["video"])


def test_a_position_saved_by_two_processes_resumes_on_one_and_four():
    """The state is a global batch position: two processes' halves of batches 3.. after restoring it are the
    batches one process (or four quarters) reads from there."""
    c = _config(caption_dropout=0.0)
    halves = [iter(make_dataset(c, batch_size=2, process_index=i, process_count=2)) for i in range(2)]
    for h in halves:
        for _ in range(3):
            next(h)
    (state,) = {json.dumps(h.get_state()) for h in halves}
    ref = [next(h) for h in halves]
    for count in (1, 4):
        parts = [iter(make_dataset(c, batch_size=4 // count, process_index=i, process_count=count))
                 for i in range(count)]
        for p in parts:
            p.set_state(json.loads(state))
        got = [next(p) for p in parts]
        assert [k for b in got for k in b["key"]] == [k for b in ref for k in b["key"]]
        np.testing.assert_array_equal(np.concatenate([b["video"] for b in got]),
                                      np.concatenate([b["video"] for b in ref]))


def test_bad_examples_in_training_are_replaced_within_their_batch(tmp_path):
    """Training: a bad example is counted and reported, and its row takes a good example of the same batch, so
    every batch keeps its shape and the batches after it are those of the same data without the bad example."""
    rng = np.random.default_rng(0)
    good = [{"key": f"clip{i}", "video": rng.integers(0, 255, (4, 32, 32, 3), dtype=np.uint8), "caption": "c"}
            for i in range(6)]
    broken = {"key": "broken", "video": np.zeros((4, 32), np.uint8), "caption": "c"}  # not (F, H, W, 3)
    c = _config(shuffle=False, max_bad_fraction=0.5, caption_dropout=0.0)
    it = iter(make_dataset(c, batch_size=2, source=[*good[:3], broken, *good[3:5]],
                           report_path=tmp_path / "bad.json"))
    batches = [next(it) for _ in range(3)]
    assert [list(b["key"]) for b in batches] == [["clip0", "clip1"], ["clip2", "clip2"], ["clip3", "clip4"]]
    assert all(b["video"].shape == (2, 4, 32, 32, 3) for b in batches)
    assert list(it.get_state()["bad"]) == ["broken"]
    assert [b["key"] for b in json.loads((tmp_path / "bad.json").read_text())["bad"]] == ["broken"]


def test_rows_shared_by_processes_are_the_same_rows():
    """A model axis spanning processes: both processes hold all rows of each global batch (process_rows of a
    sharding that replicates the batch across them) and read the same examples as one process does."""
    c = _config(caption_dropout=0.0)
    one = next(iter(make_dataset(c, batch_size=4, process_index=0, process_count=1)))
    for i in range(2):
        both = next(iter(make_dataset(c, batch_size=4, process_index=i, process_count=2, global_batch=4,
                                      first_row=0)))
        assert list(both["key"]) == list(one["key"])
        np.testing.assert_array_equal(both["video"], one["video"])
    upper = next(iter(make_dataset(c, batch_size=2, process_index=0, process_count=1, global_batch=4,
                                   first_row=2)))
    assert list(upper["key"]) == list(one["key"])[2:]
    with pytest.raises(ValueError, match=r"rows \[3, 5\) are not rows of a global batch of 4"):
        make_dataset(c, batch_size=2, global_batch=4, first_row=3)


def test_worker_processes_give_the_same_batches():
    c = _config()
    it = iter(make_dataset(c, batch_size=2))
    ref = [next(it) for _ in range(3)]
    c.worker_count = 1
    it = iter(make_dataset(c, batch_size=2))
    for want in ref:
        got = next(it)
        np.testing.assert_array_equal(got["video"], want["video"])


def test_buckets_batch_by_aspect_ratio_and_length():
    rng = np.random.default_rng(0)

    def rec(key, f, h, w):
        return {"key": key, "video": rng.integers(0, 255, (f, h, w, 3), dtype=np.uint8), "caption": key}

    source = ([rec(f"square{i}", 8, 32, 32) for i in range(4)] + [rec(f"wide{i}", 8, 32, 48) for i in range(4)]
              + [rec(f"short{i}", 2, 40, 40) for i in range(2)])
    buckets = ((4, 32, 32), (4, 24, 36), (2, 32, 32))
    assert transforms_bucket_names(source, buckets) == ["square"] * 4 + ["wide"] * 4 + ["short"] * 2
    c = _config(buckets=buckets)
    it = iter(make_dataset(c, batch_size=2, source=source))
    seen = {}
    for _ in range(12):
        b = next(it)
        kinds = {k.rstrip("0123456789") for k in b["key"]}
        assert len(kinds) == 1
        seen.setdefault(kinds.pop(), set()).add(b["video"].shape)
    assert seen == {"square": {(2, 4, 32, 32, 3)}, "wide": {(2, 4, 24, 36, 3)}, "short": {(2, 2, 32, 32, 3)}}


def transforms_bucket_names(source, buckets):
    from magdiff_jax.data.pipeline import assign_buckets

    names = {0: "square", 1: "wide", 2: "short"}
    return [names[b] for b in assign_buckets(source, range(len(source)), list(buckets))]


def test_inspect_counts_and_draws_a_contact_sheet(folder, tmp_path):
    import subprocess
    import sys

    from magdiff_jax.data.summary import inspect_dataset

    s = inspect_dataset(folder, out=tmp_path / "sheet.png", num=GOOD + 6, seed=1)
    assert s["kind"] == "VideoCaptionFolder" and s["records"] == GOOD + 6 and s["bad_rows"] == 2
    assert sorted(p.split(":")[0].split("/")[-1] for p in s["undecodable"]) == [
        "empty.mp4", "missing.mp4", "noise.mp4", "truncated.mp4"]
    assert s["sizes"] == {"32x32": GOOD + 2} and s["frames"]["min"] == 3 and s["frames"]["max"] == 8
    import imageio.v3 as iio

    sheet = iio.imread(tmp_path / "sheet.png")
    assert sheet.shape[0] > (GOOD + 2) * 96 and sheet.shape[2] == 3  # a row (frames + caption) per clip
    r = subprocess.run([sys.executable, "-m", "magdiff_jax.cli", "data", "inspect", str(folder), "--num", "3",
                        "--seed", "1",
                        "--out", str(tmp_path / "cli.png")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sampled"] == 3 and (tmp_path / "cli.png").is_file()


def test_frame_folders_and_mask_videos(tmp_path):
    """A `video` that is a folder of frame images, and a `mask` that is a video, load like mp4 + PNG masks."""
    import imageio.v3 as iio

    clip = make_clip(1, SYN)
    (tmp_path / "frames").mkdir()
    for t, f in enumerate(clip.frames):
        iio.imwrite(tmp_path / "frames" / f"{t:04d}.png", f)
    masks = np.repeat(clip.masks[..., None].astype(np.uint8) * 255, 3, axis=-1)
    write_video(tmp_path / "mask.mp4", masks)
    (tmp_path / "captions.csv").write_text("video,caption,mask,frames\nframes,a clip,mask.mp4,2-7\n")
    c = _config(source="folder", path=str(tmp_path), num_frames=3, stride=2, masks=True, normalize=False)
    (b,) = _all(make_dataset(c, batch_size=1, train=False))
    np.testing.assert_array_equal(b["video"][0], clip.frames[[2, 4, 6]])
    agree = (b["mask"][0] > 0) == clip.masks[[2, 4, 6]]
    assert agree.mean() > 0.99  # H.264 blurs the mask edge a little


def test_a_tfds_build_feeds_the_same_examples_as_its_folder(tmp_path):
    from magdiff_jax.data.builders import build

    root = write_synthetic(tmp_path / "clips", 3, SYN)
    out = build("video_caption", root, tmp_path / "tfds")
    kw = dict(num_frames=4, masks=True, normalize=False, num_epochs=1)
    from_folder = _all(make_dataset(_config(source="folder", path=str(root), **kw), batch_size=3, train=False))
    from_tfds = _all(make_dataset(_config(source="tfds", path=str(out), **kw), batch_size=3, train=False))
    (a,), (b,) = from_folder, from_tfds
    order = np.argsort(b["key"])
    assert list(a["key"]) == list(b["key"][order])
    np.testing.assert_array_equal(a["video"], b["video"][order])
    np.testing.assert_array_equal(a["mask"], b["mask"][order])
