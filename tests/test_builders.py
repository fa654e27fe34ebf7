"""TFDS builders (array_record, no TensorFlow) over tiny fixtures in each dataset's official layout, read back
through TfdsSource; bad inputs skipped and reported; too many bad inputs fail the build without leaving a dataset."""

import csv
import io
import json
import pickle
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from magdiff_jax.data.bad_input import REPORT_NAME, TooManyBadInputs
from magdiff_jax.data.builders import BUILDERS, TfdsSource, build, camel_to_words
from magdiff_jax.data.synthetic import SyntheticConfig, make_clip, write_synthetic
from magdiff_jax.data.video_io import read_frames, write_video

F, S = 8, 32  # frames, size


def _frames(seed: int, n: int = F, h: int = S, w: int = S) -> np.ndarray:
    return make_clip(seed, SyntheticConfig(num_frames=n, size=max(h, w))).frames[:, :h, :w]


def _write_avi(path: Path, frames: np.ndarray, fps: int = 25) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_image(path: Path, array: np.ndarray, fmt: str = "PNG", palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, mode="P" if palette else None)
    if palette:
        img.putpalette([0, 0, 0, 200, 0, 0, 0, 200, 0] + [0] * (256 * 3 - 9))
    img.save(path, format=fmt)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _report(out: Path, name: str) -> dict:
    return json.loads((out / name / REPORT_NAME).read_text())


def _no_dataset(out: Path) -> None:
    """Nothing half-written: no record files, no dataset_info, no staging folders."""
    if not out.exists():
        return
    leftovers = [p for p in out.rglob("*") if "array_record" in p.name or p.name == "dataset_info.json"
                 or ".building." in p.name or "incomplete" in p.name]
    assert not leftovers, leftovers


# ---------------------------------------------------------------------------------------------------------------
# video_caption / image_caption


@pytest.fixture(scope="module")
def video_folder(tmp_path_factory) -> Path:
    """3 synthetic clips (mp4 + mask PNG folders) and a frame-folder clip with frames, fps and a caption list."""
    root = write_synthetic(tmp_path_factory.mktemp("vc") / "data", 3, SyntheticConfig(num_frames=F, size=S))
    frames = _frames(5)
    for t, frame in enumerate(frames):
        _write_image(root / "frames" / "clip" / f"{t:03d}.jpg", frame, "JPEG")
    rows = _rows(root)
    rows.append({"video": "frames/clip", "caption": '["first caption", "second caption"]', "mask": "",
                 "frames": "2-5", "fps": "4"})
    _write_csv(root / "captions.csv", rows)
    return root


def _rows(root: Path) -> list[dict]:
    with open(root / "captions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv(path: Path, rows: list[dict], extra_lines: str = "") -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
        fh.write(extra_lines)


def test_video_caption_roundtrip(video_folder, tmp_path):
    out = build("video_caption", video_folder, tmp_path / "out")
    assert out == tmp_path / "out" / "video_caption" / "1.0.0"
    src = TfdsSource(tmp_path / "out", split="train")
    assert len(src) == src.total == 4 and src.bad == []
    records = {r["key"]: r for r in (src[i] for i in range(len(src)))}
    rows = {r["video"]: r for r in _rows(video_folder)}
    assert set(records) == set(rows)
    for key in ("videos/00000.mp4", "videos/00002.mp4"):
        rec = records[key]
        assert isinstance(rec["video"], bytes) and rec["video"] == (video_folder / key).read_bytes()
        assert rec["caption"] == rows[key]["caption"]
        video = read_frames(rec["video"])
        assert video.shape == (F, S, S, 3)
        assert isinstance(rec["mask"], list) and len(rec["mask"]) == F
        mask = read_frames(rec["mask"], gray=True)
        assert mask.shape == (F, S, S) and set(np.unique(mask)) <= {0, 255}
        assert rec["frames"] is None and rec["fps"] == pytest.approx(8.0)
    clip = records["frames/clip"]
    assert isinstance(clip["video"], list) and len(clip["video"]) == F
    assert read_frames(clip["video"]).shape == (F, S, S, 3)
    assert clip["caption"] == ["first caption", "second caption"]
    assert clip["mask"] is None and clip["frames"] == [2, 3, 4, 5] and clip["fps"] == 4.0
    assert "label" not in clip
    assert _report(tmp_path / "out", "video_caption")["num_bad"] == 0
    assert (out / REPORT_NAME).is_file()

    # picklable before and after first use (Grain workers), and reads the same in a copy
    again = pickle.loads(pickle.dumps(src))
    assert again[0] == src[0] and len(pickle.dumps(src)) < 2000
    # the dataset folder itself and data_dir + builder name work too
    assert len(TfdsSource(out)) == 4 and len(TfdsSource(tmp_path / "out", builder="video_caption")) == 4
    with pytest.raises(ValueError, match="no split 'test'"):
        TfdsSource(out, split="test")
    # a second build reuses the complete dataset
    assert build("video_caption", video_folder, tmp_path / "out") == out


def test_image_caption(tmp_path):
    root = tmp_path / "images"
    rows = []
    for i in range(3):
        _write_image(root / "img" / f"{i}.png", _frames(i, n=1, h=24, w=S)[0])
        _write_image(root / "mask" / f"{i}.png", np.full((24, S), 255 * (i % 2), np.uint8))
        rows.append({"image": f"img/{i}.png", "caption": f"picture {i}", "mask": f"mask/{i}.png"})
    _write_csv(root / "captions.csv", rows)
    build("image_caption", root, tmp_path / "out")
    src = TfdsSource(tmp_path / "out", "image_caption")
    records = {r["key"]: r for r in (src[i] for i in range(len(src)))}
    assert sorted(records) == ["img/0.png", "img/1.png", "img/2.png"]
    rec = records["img/1.png"]
    assert rec["caption"] == "picture 1"
    assert read_frames(rec["video"]).shape == (1, 24, S, 3)
    assert read_frames(rec["mask"], gray=True).max() == 255


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture()
def bad_folder(tmp_path) -> Path:
    """6 good clips plus real bad files: a truncated mp4, random bytes named .mp4, a mask folder of the wrong
    size, a malformed caption row (an extra field) and a row whose valid frames are out of range."""
    root = write_synthetic(tmp_path / "bad", 6, SyntheticConfig(num_frames=F, size=S))
    good = (root / "videos" / "00000.mp4").read_bytes()
    (root / "videos" / "truncated.mp4").write_bytes(good[: len(good) // 2])
    (root / "videos" / "random.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    write_video(root / "videos" / "wrongmask.mp4", _frames(1), fps=8)
    for t in range(F):
        (root / "masks" / "small" / f"{t:03d}.png").parent.mkdir(parents=True, exist_ok=True)
        (root / "masks" / "small" / f"{t:03d}.png").write_bytes(_png(np.zeros((16, 16), np.uint8)))
    rows = [{**r, "frames": ""} for r in _rows(root)]
    rows.append({"video": "videos/00002.mp4", "caption": "frame 99", "mask": "", "frames": "0 99"})
    _write_csv(root / "captions.csv", rows, "videos/truncated.mp4,a truncated video,,\n"
               "videos/random.mp4,random bytes,,\n"
               "videos/wrongmask.mp4,a mask of the wrong size,masks/small,\n"
               "videos/00001.mp4,too,many,fields,here\n")  # line 12: one field too many
    return root


def test_bad_inputs_skipped_and_reported(bad_folder, tmp_path, caplog):
    out = build("video_caption", bad_folder, tmp_path / "out", max_bad_fraction=0.5)
    src = TfdsSource(out)
    assert len(src) == 6
    keys = {src[i]["key"] for i in range(len(src))}
    assert keys == {f"videos/{i:05d}.mp4" for i in range(6)}
    report = _report(tmp_path / "out", "video_caption")
    assert report["total"] == 11 and report["num_bad"] == 5
    bad = {b["key"]: b["reason"] for b in report["bad"]}
    assert set(bad) == {"captions.csv:12", "videos/00002.mp4#2", "videos/truncated.mp4", "videos/random.mp4",
                        "videos/wrongmask.mp4"}
    assert "fields" in bad["captions.csv:12"]
    assert "truncated.mp4" in bad["videos/truncated.mp4"] and "cannot" in bad["videos/truncated.mp4"]
    assert "random.mp4" in bad["videos/random.mp4"]
    assert "masks/small" in bad["videos/wrongmask.mp4"] and "16x16" in bad["videos/wrongmask.mp4"]
    assert "99" in bad["videos/00002.mp4#2"]
    assert json.loads((out / REPORT_NAME).read_text()) == report
    assert sum("skipping bad input" in r.getMessage() for r in caplog.records) == 5


def test_too_many_bad_inputs(bad_folder, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(TooManyBadInputs, match=r"captions\.csv:12"):
        build("video_caption", bad_folder, out)  # the malformed row alone is 1 of 11 > 1%
    _no_dataset(out)
    assert _report(out, "video_caption")["num_bad"] >= 1

    # found while writing examples: the first bad file is named, nothing is left behind
    rows = [r for r in _rows(bad_folder) if r["video"] in ("videos/00000.mp4", "videos/truncated.mp4")]
    _write_csv(bad_folder / "captions.csv", rows)
    with pytest.raises(TooManyBadInputs, match=r"videos/truncated\.mp4"):
        build("video_caption", bad_folder, out, max_bad_fraction=0.1)
    _no_dataset(out)


def test_failed_rebuild_keeps_previous_dataset(video_folder, bad_folder, tmp_path):
    out = tmp_path / "out"
    built = build("video_caption", video_folder, out)
    before = sorted(p.name for p in built.iterdir())
    with pytest.raises(TooManyBadInputs):
        build("video_caption", bad_folder, out, overwrite=True)
    assert sorted(p.name for p in built.iterdir()) == before
    assert len(TfdsSource(out)) == 4
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # a successful rebuild replaces it
    build("video_caption", bad_folder, out, overwrite=True, max_bad_fraction=0.5)
    assert len(TfdsSource(out)) == 6


def test_layout_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in BUILDERS:
        with pytest.raises(FileNotFoundError, match=str(empty)):
            build(name, empty, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build("ucf101", tmp_path / "missing", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown builder"):
        build("kinetics", empty, tmp_path / "out")
    _no_dataset(tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# UCF-101, MSR-VTT, DAVIS, Vimeo-90K in their official layouts


def test_camel_to_words():
    assert camel_to_words("ApplyEyeMakeup") == "apply eye makeup"
    assert camel_to_words("YoYo") == "yo yo"
    assert camel_to_words("HandstandPushups") == "handstand pushups"


def test_ucf101(tmp_path):
    root = tmp_path / "manual" / "UCF101"  # manual_dir one level above UCF-101/ and ucfTrainTestlist/
    classes = ["ApplyEyeMakeup", "YoYo"]
    train, test = [], []
    for c, name in enumerate(classes):
        for g, lst in ((8, train), (1, test)):
            rel = f"{name}/v_{name}_g{g:02d}_c01.avi"
            _write_avi(root / "UCF-101" / rel, _frames(c * 10 + g))
            lst.append(f"{rel} {c + 1}" if lst is train else rel)
    lists = root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {n}\r\n" for i, n in enumerate(classes)))
    (lists / "trainlist01.txt").write_text("\r\n".join(train) + "\r\n")
    (lists / "testlist01.txt").write_text("\r\n".join(test) + "\r\n")
    build("ucf101", tmp_path / "manual", tmp_path / "out", full_decode=True, num_workers=1)
    for split, n in (("train", 2), ("test", 2)):
        src = TfdsSource(tmp_path / "out", "ucf101", split=split)
        assert len(src) == n
        for rec in (src[i] for i in range(n)):
            cls = rec["key"].split("/")[1]
            assert rec["key"].startswith("UCF-101/") and rec["key"].endswith(".avi")
            assert rec["label"] == classes.index(cls)
            assert rec["caption"] == {"ApplyEyeMakeup": "apply eye makeup", "YoYo": "yo yo"}[cls]
            assert read_frames(rec["video"]).shape == (F, S, S, 3)
            assert rec["fps"] == pytest.approx(25.0) and rec["mask"] is None


def test_msrvtt_official_and_jsfusion(tmp_path):
    official = tmp_path / "official"
    videos, sentences = [], []
    for v in (7010, 7011):
        write_video(official / "TestVideo" / f"video{v}.mp4", _frames(v), fps=8)
        videos.append({"video_id": f"video{v}", "split": "test", "id": v})
        sentences += [{"caption": f"clip {v} caption {k}", "video_id": f"video{v}", "sen_id": v * 10 + k}
                      for k in range(3)]
    (official / "test_videodatainfo.json").write_text(json.dumps({"videos": videos, "sentences": sentences}))
    build("msrvtt", official, tmp_path / "out1")
    src = TfdsSource(tmp_path / "out1", split="test")
    records = {r["key"]: r for r in (src[i] for i in range(len(src)))}
    assert sorted(records) == ["TestVideo/video7010.mp4", "TestVideo/video7011.mp4"]
    assert records["TestVideo/video7011.mp4"]["caption"] == [f"clip 7011 caption {k}" for k in range(3)]
    assert read_frames(records["TestVideo/video7010.mp4"]["video"]).shape == (F, S, S, 3)

    repack = tmp_path / "repack" / "MSRVTT"
    write_video(repack / "videos" / "all" / "video7020.mp4", _frames(3), fps=8)
    (repack / "msrvtt_data").mkdir()
    (repack / "msrvtt_data" / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr7020,video7020,a person is cooking\n"
        "ret1,msr7021,video7021,a missing video\n")
    build("msrvtt", tmp_path / "repack", tmp_path / "out2", max_bad_fraction=0.5)
    src = TfdsSource(tmp_path / "out2", split="test")
    assert len(src) == 1
    assert src[0]["key"] == "videos/all/video7020.mp4" and src[0]["caption"] == "a person is cooking"
    assert [b["key"] for b in _report(tmp_path / "out2", "msrvtt")["bad"]] == ["videos/all/video7021.mp4"]


def test_davis(tmp_path):
    root = tmp_path / "manual" / "DAVIS"
    seqs = {"car-roundabout": "train", "bmx-trees": "val"}
    for seq in seqs:
        for t, frame in enumerate(_frames(len(seq), n=4, h=24, w=S)):
            _write_image(root / "JPEGImages" / "480p" / seq / f"{t:05d}.jpg", frame, "JPEG")
            ids = np.zeros((24, S), np.uint8)
            ids[2:8, 2:8], ids[10:14, 20:30] = 1, 2
            _write_image(root / "Annotations" / "480p" / seq / f"{t:05d}.png", ids, palette=True)
    (root / "ImageSets" / "2017").mkdir(parents=True)
    for split in ("train", "val"):
        (root / "ImageSets" / "2017" / f"{split}.txt").write_text(
            "".join(f"{s}\n" for s, sp in seqs.items() if sp == split))
    build("davis", root, tmp_path / "out")  # manual_dir = DAVIS/ itself
    for split, seq in (("train", "car-roundabout"), ("validation", "bmx-trees")):
        rec = TfdsSource(tmp_path / "out", split=split)[0]
        assert rec["key"] == f"JPEGImages/480p/{seq}"
        assert rec["caption"] == seq.replace("-", " ")
        assert read_frames(rec["video"]).shape == (4, 24, S, 3)
        mask = read_frames(rec["mask"], gray=True)
        assert mask.shape == (4, 24, S) and set(np.unique(mask)) == {0, 255}
        assert (mask[:, 2:8, 2:8] == 255).all() and (mask[:, 10:14, 20:30] == 255).all()
        assert (mask == 255).sum() == 4 * (36 + 40)


def test_vimeo90k(tmp_path):
    root = tmp_path / "manual" / "vimeo_septuplet"
    for seq in ("00001/0001", "00001/0002", "00002/0001"):
        for i, frame in enumerate(_frames(len(seq), n=7, h=16, w=24), 1):
            _write_image(root / "sequences" / seq / f"im{i}.png", frame)
    (root / "sep_trainlist.txt").write_text("00001/0001\n00001/0002\n\n")
    (root / "sep_testlist.txt").write_text("00002/0001\n")
    build("vimeo90k", tmp_path / "manual", tmp_path / "out")
    train = TfdsSource(tmp_path / "out", split="train")
    assert len(train) == 2 and len(TfdsSource(tmp_path / "out", split="test")) == 1
    rec = train[0]
    assert rec["key"].startswith("sequences/00001/") and rec["caption"] == ""
    assert len(rec["video"]) == 7 and read_frames(rec["video"]).shape == (7, 16, 24, 3)
    assert rec["video"][0] == (root / rec["key"] / "im1.png").read_bytes()
