"""The data package at pod scale: datasets, builds and encodings on cloud storage (a fake gs:// bucket), sources that
touch no media file when made and pickle small for Grain workers, bucketing from stored sizes (nothing probed), and
`data encode` split over processes (launch/local_multiprocess.sh) reading back like one process's output."""

from __future__ import annotations

import argparse
import builtins
import contextlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from fake_gcs import fake_gcs
from helpers import random_params, write_tokenizer

from magdiff_jax.data import encode
from magdiff_jax.data import pipeline as data_pipeline
from magdiff_jax.data.bad_input import REPORT_NAME
from magdiff_jax.data.encoded import EncodedSource
from magdiff_jax.data.pipeline import assign_buckets, data_config, make_dataset
from magdiff_jax.data.sources import SIZE_INDEX, ImageCaptionFolder, VideoCaptionFolder, write_size_index
from magdiff_jax.data.synthetic import SyntheticConfig, make_clip, write_synthetic
from magdiff_jax.data.video_io import write_video

ROOT = Path(__file__).parents[1]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"
SYN = SyntheticConfig(num_frames=8, size=32, seed=5)
BUCKETS = [(4, 32, 32), (4, 24, 36), (2, 32, 32)]  # square, wide, short


def _config(**overrides):
    c = data_config()
    c.update(num_frames=4, resolution=(32, 32), prefetch=0, normalize=False, masks=True, max_bad_fraction=0.9)
    c.update(overrides)
    return c


def _batches(config, **kwargs):
    return list(make_dataset(config, batch_size=2, train=False, **kwargs))


@contextlib.contextmanager
def array_record_on(root: Path):
    """array_record's readers (C++, with their own GCS client) opened on the fake bucket's local folder."""
    from array_record.python import array_record_module

    real = array_record_module.ArrayRecordReader

    def reader(path, *args, **kwargs):
        path = os.fspath(path)
        return real(str(root / path[len("gs://"):]) if path.startswith("gs://") else path, *args, **kwargs)

    with mock.patch.object(array_record_module, "ArrayRecordReader", reader):
        yield


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """3 synthetic clips (mp4 + mask frame folders) and a row naming a file that is not there."""
    root = write_synthetic(tmp_path_factory.mktemp("scale") / "clips", 3, SYN)
    with open(root / "captions.csv", "a") as fh:
        fh.write("videos/missing.mp4,a file that is not there,\n")
    return root


# ---------------------------------------------------------------------------------------------------------------
# cloud storage


def test_folder_dataset_on_gcs_reads_like_the_local_folder(clips, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path escaping the fake bucket would land in ./gs:
    bucket = tmp_path / "gcs"
    shutil.copytree(clips, bucket / "bucket" / "clips", symlinks=True)
    local = _batches(_config(source="folder", path=str(clips)), report_path=tmp_path / "local.json")
    with fake_gcs(bucket):
        remote = _batches(_config(source="folder", path="gs://bucket/clips"),
                          report_path=f"gs://bucket/run/{REPORT_NAME}")
        src = VideoCaptionFolder("gs://bucket/clips")
        assert str(src[0]["video"]) == "gs://bucket/clips/videos/00000.mp4"
        from magdiff_jax.data.summary import inspect_dataset

        summary = inspect_dataset("gs://bucket/clips", num=2)  # `data inspect`: its contact sheet in the bucket
        assert summary["contact_sheet"] == "gs://bucket/clips/contact_sheet.png" and summary["sampled"] == 2
    assert [list(b["key"]) for b in remote] == [list(b["key"]) for b in local]
    for a, b in zip(local, remote, strict=True):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["mask"], b["mask"])
    report = json.loads((bucket / "bucket" / "run" / REPORT_NAME).read_text())
    assert report["bad"] == [{"key": "videos/missing.mp4", "reason": "video videos/missing.mp4 does not exist"}]
    assert (bucket / "bucket" / "clips" / "contact_sheet.png").is_file()
    assert not (tmp_path / "gs:").exists()


def test_remote_paths_are_confined_by_their_normalised_path():
    from magdiff_jax.data.transforms import confined
    from magdiff_jax.data.video_io import is_inside

    assert is_inside("gs://b/data/videos/a.mp4", "gs://b/data")
    assert is_inside("gs://b/data/x/../a.mp4", "gs://b/data/")
    assert not is_inside("gs://b/data/../secret.mp4", "gs://b/data")
    assert not is_inside("gs://b/data2/a.mp4", "gs://b/data")  # a prefix of whole path components only
    assert not is_inside("gs://other/data/a.mp4", "gs://b/data")
    from magdiff_jax.data.bad_input import BadInput

    with pytest.raises(BadInput, match="path leaves the dataset folder"):
        confined({"key": "k", "video": "gs://b/data/videos/../../x.mp4", "mask": None, "root": "gs://b/data"})


def test_build_to_gcs_and_read_back_with_stored_sizes(clips, tmp_path, monkeypatch):
    from magdiff_jax.data.builders import SIZES_NAME, TfdsSource, build

    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "gcs"
    with fake_gcs(bucket), array_record_on(bucket):
        out = build("video_caption", clips, "gs://bucket/tfds", max_bad_fraction=0.5)
        assert os.fspath(out) == "gs://bucket/tfds/video_caption/1.0.0"
        # a complete build is found and reused
        assert build("video_caption", clips, "gs://bucket/tfds", max_bad_fraction=0.5) == out
        src = TfdsSource("gs://bucket/tfds")
        assert len(src) == 3 and len(pickle.dumps(src)) < 2000
        np.testing.assert_array_equal(src.sizes(), [[8, 32, 32]] * 3)
        with mock.patch.object(data_pipeline, "probe", side_effect=AssertionError("probed")):
            assert assign_buckets(src, range(3), BUCKETS) == [0, 0, 0]
        remote = _batches(_config(source="tfds", path="gs://bucket/tfds"))
    local = _batches(_config(source="folder", path=str(clips)), report_path=tmp_path / "r.json")
    built = bucket / "bucket" / "tfds" / "video_caption" / "1.0.0"
    assert (built / SIZES_NAME.format(split="train")).is_file() and (built / REPORT_NAME).is_file()
    report = json.loads((built / REPORT_NAME).read_text())
    assert [b["key"] for b in report["bad"]] == ["videos/missing.mp4"]
    order = np.argsort(np.concatenate([b["key"] for b in remote]))
    np.testing.assert_array_equal(np.concatenate([b["video"] for b in local]),
                                  np.concatenate([b["video"] for b in remote])[order])
    assert not (tmp_path / "gs:").exists()


# ---------------------------------------------------------------------------------------------------------------
# set-up cost: nothing per record at start, small pickles


@contextlib.contextmanager
def file_access_log():
    """Every path opened, stat'ed or listed (builtins.open, os.stat/lstat/listdir/scandir), in order."""
    seen: list[str] = []

    def logged(fn):
        def wrapper(path, *args, **kwargs):
            if isinstance(path, (str, bytes, os.PathLike)):
                seen.append(os.fsdecode(path))
            return fn(path, *args, **kwargs)
        return wrapper

    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(builtins, "open", logged(builtins.open)))
        for name in ("stat", "lstat", "listdir", "scandir"):
            stack.enter_context(mock.patch.object(os, name, logged(getattr(os, name))))
        yield seen


def _many_rows(root: Path, n: int) -> Path:
    root.mkdir(parents=True)
    lines = ["video,caption,mask,frames"] + [f"videos/{i:07d}.mp4,clip number {i} of many,masks/{i:07d},0-7"
                                             for i in range(n)]
    (root / "captions.csv").write_text("\n".join(lines) + "\n")
    return root


def test_a_source_is_made_without_touching_its_files_and_pickles_small(tmp_path):
    root = _many_rows(tmp_path / "many", 2000)  # none of the files it names exists
    with file_access_log() as seen:
        src = VideoCaptionFolder(root)
    assert len(src) == 2000 and src.bad == []
    touched = [p for p in seen if p.startswith(str(root / "videos")) or p.startswith(str(root / "masks"))]
    assert touched == [] and len(seen) < 20, seen[:20]
    blob = pickle.dumps(src)
    assert len(blob) < 10_000, len(blob)
    copy = pickle.loads(blob)
    assert copy._index is None and Path(copy._cache).is_file()  # read on first access: from this host's cache
    assert copy[1999] == src[1999] and copy[1999]["frames"] == list(range(8)) and len(copy) == 2000
    assert copy[5]["video"] == str(root / "videos" / "0000005.mp4")
    Path(copy._cache).unlink()
    again = pickle.loads(blob)  # no cache on this host: the annotations are parsed again
    assert again[1999] == src[1999] and again.bad == []


def test_a_missing_file_is_a_bad_input_when_loaded(clips, tmp_path):
    src = VideoCaptionFolder(clips)
    assert len(src) == 4 and src.bad == []  # the missing file is not looked for when the source is made
    keys = [k for b in _batches(_config(source="folder", path=str(clips)), report_path=tmp_path / "r.json")
            for k in b["key"]]
    assert sorted(keys) == [f"videos/{i:05d}.mp4" for i in range(3)]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["bad"] == [{"key": "videos/missing.mp4", "reason": "video videos/missing.mp4 does not exist"}]


# ---------------------------------------------------------------------------------------------------------------
# buckets from stored sizes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A square clip, a wide one and a square one whose valid frames are only 3: one of each bucket."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "v").mkdir()
    write_video(root / "v" / "square.mp4", make_clip(0, SYN).frames)
    write_video(root / "v" / "wide.mp4", np.zeros((6, 24, 36, 3), np.uint8))
    (root / "captions.csv").write_text("video,caption,frames\nv/square.mp4,a,\nv/wide.mp4,b,\nv/square.mp4,c,0-2\n")
    return root


def test_buckets_from_the_size_index_probe_nothing(shapes):
    path, count, failed = write_size_index(shapes)
    assert count == 2 and failed == [] and path == shapes / SIZE_INDEX
    src = VideoCaptionFolder(shapes)
    np.testing.assert_array_equal(src.sizes(), [[8, 32, 32], [6, 24, 36], [3, 32, 32]])
    with mock.patch.object(data_pipeline, "probe", side_effect=AssertionError("probed")):
        assert assign_buckets(src, range(3), BUCKETS) == [0, 1, 2]
    (shapes / SIZE_INDEX).unlink()
    assert (VideoCaptionFolder(shapes).sizes() == -1).all()  # no index: unknown, and then probed
    assert assign_buckets(VideoCaptionFolder(shapes), range(3), BUCKETS) == [0, 1, 2]


def test_buckets_from_annotation_columns(tmp_path):
    (tmp_path / "captions.csv").write_text("image,caption,num_frames,height,width\n"
                                           "a.png,square,1,32,32\nb.png,wide,1,24,36\n")
    src = ImageCaptionFolder(tmp_path)  # the images need not exist: only the stored sizes are read
    with mock.patch.object(data_pipeline, "probe", side_effect=AssertionError("probed")):
        assert assign_buckets(src, range(2), [(1, 32, 32), (1, 24, 36)]) == [0, 1]


def test_data_index_cli_on_gcs(shapes, tmp_path):
    bucket = tmp_path / "gcs"
    shutil.copytree(shapes, bucket / "bucket" / "shapes")
    (bucket / "bucket" / "shapes" / SIZE_INDEX).unlink(missing_ok=True)
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "fake_gcs.py"), str(bucket), "--", "magdiff-jax",
                        "data", "index", "gs://bucket/shapes"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wrote the sizes of 2 files to gs://bucket/shapes/sizes.csv" in r.stdout
    assert (bucket / "bucket" / "shapes" / SIZE_INDEX).read_text().splitlines() == [
        "media,num_frames,height,width", "v/square.mp4,8,32,32", "v/wide.mp4,6,24,36"]


# ---------------------------------------------------------------------------------------------------------------
# data encode over several processes


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from test_encode import CLIP_CONFIG, SIZE, VAE_CONFIG

    from magdiff_jax.export import save_model
    from magdiff_jax.models.clip import CLIPTextModel
    from magdiff_jax.models.vae import AutoencoderKL

    root = tmp_path_factory.mktemp("models")
    vae = AutoencoderKL(VAE_CONFIG)
    save_model("vae", vae, random_params(vae, np.zeros((1, SIZE, SIZE, 3), np.float32), seed=1), root / "vae")
    text = CLIPTextModel(CLIP_CONFIG)
    save_model("clip_text", text, random_params(text, np.zeros((1, 77), np.int32), seed=2), root / "text_encoder")
    write_tokenizer(root / "tokenizer", pad_token="<|endoftext|>")
    return root


def _encode_args(data, models, out, *extra) -> list[str]:
    return ["--data", str(data), "--vae", str(models / "vae"), "--text-encoder", str(models / "text_encoder"),
            "--tokenizer", str(models / "tokenizer"), "--out", str(out), "--frames", "3", "--resolution", "32",
            "--batch-size", "2", "--max-bad-fraction", "0.5", *extra]


def _read_all(path) -> dict[str, dict]:
    src = EncodedSource(path)
    return {r["key"]: r for r in (src[i] for i in range(len(src)))}


def test_encode_on_two_processes_reads_back_like_one(models, clips, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    parser = encode.add_encode_arguments(argparse.ArgumentParser())
    args = parser.parse_args(_encode_args(clips, models, one))
    encode.run_encode_cli(args)  # one process
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    for key in ("MAGDIFF_COORDINATOR", "MAGDIFF_NUM_PROCESSES", "MAGDIFF_PROCESS_ID", "MAGDIFF_DISTRIBUTED"):
        env.pop(key, None)
    start = time.time()
    r = subprocess.run(["bash", str(LAUNCH), "-n", "2", "-d", "1", "--", sys.executable, "-m", "magdiff_jax.cli",
                        "data", "encode", *_encode_args(clips, models, two)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    print(f"2-process encode: {time.time() - start:.1f} s")
    meta = json.loads((two / "encoded.json").read_text())
    assert meta["num_shards"] == 2
    counts = [json.loads((two / f"encoded-0000{i}-of-00002.json").read_text())["count"] for i in range(2)]
    assert counts == [2, 1]  # process 0: records 0 and 2; process 1: record 1 and the missing file (bad)
    a, b = _read_all(one), _read_all(two)
    assert sorted(a) == sorted(b) == [f"videos/{i:05d}.mp4" for i in range(3)]
    for key in a:
        assert a[key]["caption"] == b[key]["caption"]
        np.testing.assert_array_equal(a[key]["tokens"], b[key]["tokens"])
        for name in ("latents_mean", "latents_std", "text_embeddings"):
            np.testing.assert_allclose(a[key][name], b[key][name], rtol=1e-5, atol=1e-5, err_msg=f"{key} {name}")
    reports = [json.loads((two / name).read_text()) for name in (REPORT_NAME, "bad_inputs.1.json")]
    assert reports[0]["bad"] == [] and [x["key"] for x in reports[1]["bad"]] == ["videos/missing.mp4"]


def test_a_process_without_records_writes_an_empty_shard_on_gcs(models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = write_synthetic(tmp_path / "one_clip", 1, SYN)
    bucket = tmp_path / "gcs"
    parser = encode.add_encode_arguments(argparse.ArgumentParser())
    cfg = encode.encode_config_from_args(parser.parse_args(_encode_args(data, models, "gs://bucket/enc")))
    dirs = dict(vae_dir=models / "vae", text_encoder_dir=models / "text_encoder", tokenizer_dir=models / "tokenizer")
    with fake_gcs(bucket), array_record_on(bucket):
        for index in (1, 0):  # process 1 of 2 has no record: not an error
            encode.encode_dataset(cfg, out_dir="gs://bucket/enc", batch_size=2, process_index=index,
                                  process_count=2, **dirs)
        src = EncodedSource("gs://bucket/enc")
        assert len(src) == 1 and src[0]["key"] == "videos/00000.mp4"
        assert len(pickle.dumps(src)) < 10_000
    out = bucket / "bucket" / "enc"
    shard1 = json.loads((out / "encoded-00001-of-00002.json").read_text())
    assert shard1["count"] == 0 and (out / "encoded-00001-of-00002.array_record").is_file()
    assert sorted(p.name for p in out.iterdir()) == [
        "bad_inputs.json", "encoded-00000-of-00002.array_record", "encoded-00000-of-00002.json",
        "encoded-00001-of-00002.array_record", "encoded-00001-of-00002.json", "encoded.json", "null_text.msgpack"]
    assert not (tmp_path / "gs:").exists()
