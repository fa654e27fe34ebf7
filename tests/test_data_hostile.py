"""Hostile and broken dataset input, crafted for real on disk: each class is skipped, counted and named in the
bad-input report, or stops with one error line naming the culprit; nothing outside the dataset folder is read.

- paths leaving the dataset folder (`..`, absolute, symlinks to files and folders outside): folder sources, the
  training pipeline and every builder;
- `data build` into an output built from other input: refused, rebuilt with --overwrite;
- images PIL refuses or cannot decode (decompression bombs, truncated PNG/JPEG) as masks, frames, image-caption
  images, and `magdiff-jax sample/edit` inputs (one line, before any model is loaded);
- caption files with bytes that are not UTF-8.
"""

import csv
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from magdiff_jax.data.bad_input import REPORT_NAME
from magdiff_jax.data.builders import TfdsSource, build
from magdiff_jax.data.pipeline import data_config, make_dataset
from magdiff_jax.data.sources import VideoCaptionFolder
from magdiff_jax.data.synthetic import SyntheticConfig, make_clip, write_synthetic
from magdiff_jax.data.video_io import write_video

REPO = Path(__file__).parents[1]
SYN = SyntheticConfig(num_frames=8, size=32, seed=3)
LEAVES = "path leaves the dataset folder"


def _config(**overrides):
    c = data_config()
    c.update(num_frames=4, resolution=(32, 32), prefetch=0, normalize=False, max_bad_fraction=0.9)
    c.update(overrides)
    return c


def _load_all(config, report):
    batches = list(make_dataset(config, batch_size=1, train=False, report_path=report))
    reasons = {b["key"]: b["reason"] for b in json.loads(report.read_text())["bad"]}
    return [k for b in batches for k in b["key"]], reasons


def _append(root: Path, *lines: str, name: str = "captions.csv"):
    with open(root / name, "a") as fh:
        fh.write("".join(line + "\n" for line in lines))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG")
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring width x height 8-bit grey pixels, followed by almost no data (81 bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + chunk(b"IEND", b""))


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "magdiff_jax.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def _error_line(r: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command (and no traceback)."""
    assert r.returncode == 1, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("magdiff-jax: error: "), r.stderr[-3000:]
    return lines[-1]


# ---------------------------------------------------------------------------------------------------------------
# paths that leave the dataset folder


@pytest.fixture(scope="module")
def escaping(tmp_path_factory) -> dict:
    """A video-caption folder of 3 good clips (and a link to one of them, inside) whose other rows name files
    outside it: `../outside.mp4`, the same file by its absolute path, a symlink to it, a mask folder that is a
    symlink out, and a frame folder whose frames are symlinks out."""
    top = tmp_path_factory.mktemp("escape")
    root = write_synthetic(top / "data", 3, SYN)
    outside = make_clip(40, SYN)
    write_video(top / "outside.mp4", outside.frames)
    (top / "outside_masks").mkdir()
    (top / "outside_frames").mkdir()
    for t in range(SYN.num_frames):
        (top / "outside_masks" / f"{t:03d}.png").write_bytes(_png(np.full((32, 32), 255, np.uint8)))
        (top / "outside_frames" / f"{t:03d}.png").write_bytes(_png(outside.frames[t]))
    os.symlink(top / "outside.mp4", root / "videos" / "link.mp4")
    os.symlink("00002.mp4", root / "videos" / "alias.mp4")  # a link that stays inside is fine
    os.symlink(top / "outside_masks", root / "masks" / "linked")
    (root / "frames").mkdir()
    for t in range(SYN.num_frames):
        os.symlink(top / "outside_frames" / f"{t:03d}.png", root / "frames" / f"{t:03d}.png")
    _append(root,
            "../outside.mp4,dots lead out,masks/00000",
            f"{top / 'outside.mp4'},an absolute path,masks/00000",
            "videos/link.mp4,a symlink out,masks/00000",
            "videos/00001.mp4,a mask folder linking out,masks/linked",
            "frames,frames linking out,masks/00000",
            "videos/alias.mp4,a symlink inside,masks/00002")
    secret = {(top / "outside.mp4").read_bytes(), (top / "outside_masks" / "000.png").read_bytes(),
              (top / "outside_frames" / "000.png").read_bytes()}
    return {"root": root, "top": top, "secret": secret}


def test_rows_naming_files_outside_the_folder_are_bad_input_in_training(escaping, tmp_path):
    root = escaping["root"]
    src = VideoCaptionFolder(root)
    bad = dict(src.bad)
    target = os.path.realpath(escaping["top"] / "outside.mp4")
    assert bad["captions.csv:5 (../outside.mp4)"] == f"video ../outside.mp4: {LEAVES} (it leads to {target})"
    assert bad[f"captions.csv:6 ({escaping['top'] / 'outside.mp4'})"].endswith(
        f"{LEAVES} (absolute paths are not allowed)")
    # symlinks are resolved when a record is loaded (making the source touches no file): bad input then
    assert "captions.csv:7 (videos/link.mp4)" not in bad and "captions.csv:8 (videos/00001.mp4)" not in bad

    keys, reasons = _load_all(_config(source="folder", path=str(root), masks=True), tmp_path / REPORT_NAME)
    assert sorted(keys) == ["videos/00000.mp4", "videos/00001.mp4", "videos/00002.mp4", "videos/alias.mp4"]
    assert len(reasons) == 5 and all(LEAVES in r for r in reasons.values()), reasons
    assert reasons["frames"].startswith(f"{root / 'frames' / '000.png'}: {LEAVES}")
    assert reasons["videos/link.mp4"].startswith(f"{root / 'videos' / 'link.mp4'}: {LEAVES}")
    assert reasons["videos/00001.mp4"].startswith(f"{root / 'masks' / 'linked'}: {LEAVES}")  # its mask links out


def test_rows_naming_files_outside_the_folder_are_not_built(escaping, tmp_path):
    out = build("video_caption", escaping["root"], tmp_path / "out", max_bad_fraction=0.9)
    src = TfdsSource(out)
    records = [src[i] for i in range(len(src))]
    assert sorted(r["key"] for r in records) == ["videos/00000.mp4", "videos/00001.mp4", "videos/00002.mp4",
                                                 "videos/alias.mp4"]
    for r in records:
        blobs = {r["video"]} if isinstance(r["video"], bytes) else set(r["video"])
        blobs |= set(r["mask"] or [])
        assert not blobs & escaping["secret"], r["key"]
    report = json.loads((out / REPORT_NAME).read_text())
    reasons = {b["key"]: b["reason"] for b in report["bad"]}
    assert set(reasons) == {"captions.csv:5 (../outside.mp4)", f"captions.csv:6 ({escaping['top'] / 'outside.mp4'})",
                            "videos/link.mp4", "videos/00001.mp4#2", "frames"}
    assert all(LEAVES in r for r in reasons.values()), reasons


def test_image_caption_rows_naming_images_outside_the_folder_are_bad_input(tmp_path):
    root = tmp_path / "images"
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        (root / "img" / name).write_bytes(_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    (tmp_path / "outside.png").write_bytes(_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    os.symlink(tmp_path / "outside.png", root / "img" / "link.png")
    (root / "captions.csv").write_text(f"image,caption\nimg/a.png,inside\n../outside.png,dots\n"
                                       f"{tmp_path / 'outside.png'},absolute\nimg/link.png,a link out\n"
                                       f"img/b.png,inside too\n")
    keys, reasons = _load_all(_config(source="images", path=str(root), num_frames=1, resolution=(16, 16)),
                              tmp_path / REPORT_NAME)
    assert sorted(keys) == ["img/a.png", "img/b.png"]
    assert sorted(reasons) == ["captions.csv:3 (../outside.png)", f"captions.csv:4 ({tmp_path / 'outside.png'})",
                               "img/link.png"]  # the link is resolved when loaded
    link = reasons.pop("img/link.png")
    assert link.startswith(f"{root / 'img' / 'link.png'}: {LEAVES}"), link
    assert all(r.startswith(f"image {k.split('(')[1][:-1]}: {LEAVES}") for k, r in reasons.items()), reasons


def test_archive_builders_do_not_follow_paths_out(tmp_path):
    """Vimeo-90K: a sequence whose frame is a symlink out; MSR-VTT: a video_id with `..` in its csv."""
    outside = tmp_path / "outside"
    outside.mkdir()
    frames = make_clip(7, SyntheticConfig(num_frames=7, size=16)).frames
    (outside / "im1.png").write_bytes(_png(frames[0]))
    write_video(outside / "video9.mp4", make_clip(9, SYN).frames)
    root = tmp_path / "manual" / "vimeo_septuplet"
    for seq in ("00001/0001", "00001/0002"):
        for i, frame in enumerate(frames, 1):
            (root / "sequences" / seq).mkdir(parents=True, exist_ok=True)
            (root / "sequences" / seq / f"im{i}.png").write_bytes(_png(frame))
    (root / "sequences" / "00001/0002" / "im1.png").unlink()
    os.symlink(outside / "im1.png", root / "sequences" / "00001/0002" / "im1.png")
    (root / "sep_trainlist.txt").write_text("00001/0001\n00001/0002\n")
    (root / "sep_testlist.txt").write_text("00001/0001\n")
    build("vimeo90k", tmp_path / "manual", tmp_path / "out", max_bad_fraction=0.9)
    assert len(TfdsSource(tmp_path / "out", split="train")) == 1
    (bad,) = json.loads((tmp_path / "out" / "vimeo90k" / REPORT_NAME).read_text())["bad"]
    assert bad["key"] == "sequences/00001/0002" and LEAVES in bad["reason"]

    msr = tmp_path / "msr" / "MSRVTT"
    write_video(msr / "videos" / "all" / "video1.mp4", make_clip(1, SYN).frames)
    (msr / "MSRVTT_JSFUSION_test.csv").write_text(
        "key,vid_key,video_id,sentence\nret0,msr1,video1,a clip\nret1,msr2,../../../../outside/video9,a secret\n")
    build("msrvtt", tmp_path / "msr", tmp_path / "out_msr", max_bad_fraction=0.9)
    src = TfdsSource(tmp_path / "out_msr", split="test")
    assert len(src) == 1 and src[0]["key"] == "videos/all/video1.mp4"
    (bad,) = json.loads((tmp_path / "out_msr" / "msrvtt" / REPORT_NAME).read_text())["bad"]
    assert "video9" in bad["key"] and LEAVES in bad["reason"]


# ---------------------------------------------------------------------------------------------------------------
# building into an output built from other input


def test_build_into_an_output_of_other_input_is_refused_then_overwritten(tmp_path):
    first = write_synthetic(tmp_path / "first", 3, SYN)
    second = write_synthetic(tmp_path / "second", 2, SyntheticConfig(num_frames=8, size=32, seed=9))
    real_first, real_second = os.path.realpath(first), os.path.realpath(second)
    out = tmp_path / "out"
    built = build("video_caption", first, out)
    assert build("video_caption", first, out) == built  # the same input again: reused
    differs = re.escape(f"built from other input (manual_dir '{real_first}', not '{real_second}')")
    with pytest.raises(FileExistsError, match=differs):
        build("video_caption", second, out)
    with pytest.raises(FileExistsError, match=r"full_decode False, not True"):
        build("video_caption", first, out, full_decode=True)

    r = _cli("data", "build", "--builder", "video_caption", "--manual-dir", str(second), "--out", str(out))
    line = _error_line(r)
    assert str(built) in line and real_second in line and "--overwrite" in line
    assert len(TfdsSource(out)) == 3  # untouched
    r = _cli("data", "build", "--builder", "video_caption", "--manual-dir", str(second), "--out", str(out),
             "--overwrite")
    assert r.returncode == 0, r.stderr[-3000:]
    src = TfdsSource(out)
    assert len(src) == 2 and src[0]["video"] == (second / src[0]["key"]).read_bytes()
    assert build("video_caption", second, out) == built

    (built / "build.json").unlink()  # a dataset that does not say what it was built from is not reused either
    with pytest.raises(FileExistsError, match="no record of what it was built from"):
        build("video_caption", second, out)


# ---------------------------------------------------------------------------------------------------------------
# images PIL refuses or cannot decode


@pytest.fixture()
def images(tmp_path, monkeypatch) -> Path:
    """An image-caption folder of 16x16 images and masks, with PIL's pixel limit lowered to 600 (monkeypatched):
    a normal 32x32 image (1024 pixels: between the limit and twice it, where PIL itself only warns), a crafted
    100000x100000 PNG header (81 bytes), a truncated PNG and a truncated JPEG as images, and a truncated JPEG and a
    32x32 image as masks of good images."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 600)
    root = tmp_path / "images"
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (root / "img" / f"{i}.png").write_bytes(_png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)))
    (root / "mask" / "ok.png").write_bytes(_png(np.full((16, 16), 255, np.uint8)))
    (root / "img" / "big.png").write_bytes(_png(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)))
    (root / "mask" / "big.png").write_bytes(_png(np.full((32, 32), 255, np.uint8)))
    (root / "img" / "bomb.png").write_bytes(_bomb_png())
    png = _png(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    jpeg = _jpeg(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8))
    (root / "img" / "truncated.png").write_bytes(png[: len(png) // 2])
    (root / "img" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    mask_jpeg = _jpeg(np.full((16, 16), 255, np.uint8))
    (root / "mask" / "truncated.jpg").write_bytes(mask_jpeg[: len(mask_jpeg) // 2])
    (root / "captions.csv").write_text(
        "image,caption,mask\n"
        "img/0.png,good,mask/ok.png\n"
        "img/1.png,good too,mask/ok.png\n"
        "img/big.png,above the pixel limit,mask/big.png\n"
        "img/bomb.png,a decompression bomb,mask/ok.png\n"
        "img/truncated.png,half a png,mask/ok.png\n"
        "img/truncated.jpg,half a jpeg,mask/ok.png\n"
        "img/2.png,a truncated jpeg mask,mask/truncated.jpg\n"
        "img/3.png,a mask above the pixel limit,mask/big.png\n")
    return root


BROKEN_IMAGES = {"img/big.png": "decompression bomb", "img/bomb.png": "decompression bomb",
                 "img/truncated.png": "truncated", "img/truncated.jpg": "truncated",
                 "img/2.png": "truncated", "img/3.png": "decompression bomb"}


def test_broken_images_are_bad_input_in_training(images, tmp_path):
    keys, reasons = _load_all(_config(source="images", path=str(images), num_frames=1, resolution=(16, 16),
                                      masks=True), tmp_path / REPORT_NAME)
    assert sorted(keys) == ["img/0.png", "img/1.png"]
    assert set(reasons) == set(BROKEN_IMAGES)
    for key, what in BROKEN_IMAGES.items():
        assert what in reasons[key], (key, reasons[key])
    assert "mask/truncated.jpg" in reasons["img/2.png"] and "mask/big.png" in reasons["img/3.png"]


def test_broken_images_are_not_built(images, tmp_path):
    out = build("image_caption", images, tmp_path / "out", max_bad_fraction=0.9, num_workers=2)
    src = TfdsSource(out)
    assert sorted(src[i]["key"] for i in range(len(src))) == ["img/0.png", "img/1.png"]
    reasons = {b["key"]: b["reason"] for b in json.loads((out / REPORT_NAME).read_text())["bad"]}
    assert set(reasons) == set(BROKEN_IMAGES)
    for key, what in BROKEN_IMAGES.items():
        assert what in reasons[key], (key, reasons[key])


def test_broken_mask_frames_are_bad_input_in_training(tmp_path):
    """Mask folders whose first frame is a decompression bomb or a truncated PNG (PIL's own limit)."""
    root = write_synthetic(tmp_path / "clips", 4, SYN)
    for name, data in (("bomb", _bomb_png()), ("truncated", _png(np.full((32, 32), 255, np.uint8))[:60])):
        shutil.copytree(root / "masks" / "00000", root / "masks" / name)
        (root / "masks" / name / "000.png").write_bytes(data)
    write_video(root / "videos" / "a.mp4", make_clip(5, SYN).frames)
    write_video(root / "videos" / "b.mp4", make_clip(6, SYN).frames)
    _append(root, "videos/a.mp4,a bomb mask,masks/bomb", "videos/b.mp4,a truncated mask,masks/truncated")
    keys, reasons = _load_all(_config(source="folder", path=str(root), masks=True), tmp_path / REPORT_NAME)
    assert sorted(keys) == [f"videos/{i:05d}.mp4" for i in range(4)]
    assert "masks/bomb/000.png: refused as a possible decompression bomb" in reasons["videos/a.mp4"]
    assert "masks/truncated/000.png: cannot decode image" in reasons["videos/b.mp4"]


def test_sample_and_edit_name_a_broken_input_before_loading_a_model(tmp_path):
    empty = tmp_path / "no_model"
    empty.mkdir()
    (tmp_path / "bomb.png").write_bytes(_bomb_png())
    jpeg = _jpeg(np.zeros((64, 64, 3), np.uint8))
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    common = ("--workdir", str(empty), "--prompt", "a cat", "--out", str(tmp_path / "out.mp4"))
    line = _error_line(_cli("sample", "--subject", str(tmp_path / "bomb.png"), *common))
    assert line.startswith(f"magdiff-jax: error: {tmp_path / 'bomb.png'}: refused as a possible decompression bomb")
    assert str(empty) not in line

    clip = write_synthetic(tmp_path / "clip", 1, SYN)
    masks = clip / "masks" / "00000"
    (masks / "003.png").write_bytes((masks / "003.png").read_bytes()[:50])
    # edit reads as many frames as the stage makes: its config alone, no model (a stage.json without models here)
    (empty / "stage.json").write_text(json.dumps({"format": "magdiff_jax_stage", "format_version": 1, "task":
                                                  "magdiff", "step": 0, "models": {}, "tokenizer": None,
                                                  "config": {"data": {"num_frames": 4}}}))
    line = _error_line(_cli("edit", "--video", str(clip / "videos" / "00000.mp4"), "--masks", str(masks), *common))
    assert line.startswith(f"magdiff-jax: error: {masks / '003.png'}: cannot decode image"), line
    assert str(empty) not in line
    assert not (tmp_path / "out.mp4").exists()


# ---------------------------------------------------------------------------------------------------------------
# caption files that are not UTF-8


def test_caption_bytes_that_are_not_utf8_name_the_file_and_row(tmp_path):
    root = write_synthetic(tmp_path / "clips", 4, SYN)
    with open(root / "captions.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    lines = [",".join(r).encode() for r in rows]
    lines[3] = lines[3].replace(b"moves", b"mo\xffves")  # data row 3 (line 4)
    (root / "captions.csv").write_bytes(b"\n".join(lines) + b"\n")
    src = VideoCaptionFolder(root)
    assert src.bad == [("captions.csv:4", "not UTF-8 (byte 0xff in column 'caption')")]
    keys, reasons = _load_all(_config(source="folder", path=str(root)), tmp_path / REPORT_NAME)
    assert sorted(keys) == ["videos/00000.mp4", "videos/00001.mp4", "videos/00003.mp4"]
    assert reasons == {"captions.csv:4": "not UTF-8 (byte 0xff in column 'caption')"}
    out = build("video_caption", root, tmp_path / "out", max_bad_fraction=0.5)
    assert len(TfdsSource(out)) == 3
    assert [b["key"] for b in json.loads((out / REPORT_NAME).read_text())["bad"]] == ["captions.csv:4"]

    # jsonl: the row; a csv header that is not UTF-8: the file cannot be read at all, one error naming it
    (root / "captions.csv").unlink()
    (root / "captions.jsonl").write_bytes(b'{"video": "videos/00000.mp4", "caption": "fine"}\n\n'
                                          b'{"video": "videos/00001.mp4", "caption": "caf\xe9"}\n')
    assert VideoCaptionFolder(root).bad == [("captions.jsonl:3", "not UTF-8 (byte 0xe9 at column 46)")]
    (root / "captions.jsonl").unlink()
    (root / "captions.csv").write_bytes(b"vid\xe9o,caption\nvideos/00000.mp4,fine\n")
    with pytest.raises(ValueError, match=r"captions\.csv:1: the header is not UTF-8 \(byte 0xe9\)"):
        VideoCaptionFolder(root)
    line = _error_line(_cli("data", "inspect", str(root)))
    assert f"{root / 'captions.csv'}:1: the header is not UTF-8" in line
