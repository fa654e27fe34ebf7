"""Workdirs, exports and converted models in a bucket (gs://...), through `tests/fake_gcs.py` (gs://bucket/x is a
local folder; a plain `open`/`os`/`pathlib` call on a URI escapes the mapping and leaves a relative `gs:` folder,
which every test checks is absent from its working directory):

- a tiny t2i run (configs/t2i.py:tiny) with its workdir in the bucket, stopped at step 2 and resumed to step 4,
  logs the same losses and ends with bitwise the same parameters as an uninterrupted local run; metrics.jsonl,
  TensorBoard events, checkpoints, frozen/ and the export (with its completion marker) are in the bucket;
- the export loads from the bucket (parameters equal to the local run's, tokenizer copied down) and samples;
- `magdiff-jax convert to-torch` / `to-flax` read and write the bucket, round trip bit-exact, sharded too;
- a bucket export or model folder without its completion marker is refused as incomplete (a local one is not);
- metrics.jsonl / event files grow by whole-object rewrites, PNGs upload whole;
- a resume's own files in a bucket (metrics cut back, an unrestorable checkpoint moved aside), and the CLI's
  sample/edit inputs copied down from one.
"""

import json
import os
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
import train_helpers as th
from fake_gcs import fake_gcs

from magdiff_jax.utils.files import COMPLETE

N = 2  # the interrupted run stops here and resumes to 2 * N


def _no_escape(cwd: Path) -> None:
    assert not (cwd / "gs:").exists(), f"a gs:// path escaped epath: {sorted(os.listdir(cwd / 'gs:'))}"


@pytest.fixture()
def cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    _no_escape(tmp_path)


MICRO = ("micro", "t2i")  # one-block models (the machinery is under test); trainable="" below: the U-Net alone


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(bucket root, local straight workdir): 2N uninterrupted local steps (no export), and the same run in
    gs://bucket/run stopped after N steps (no export) and resumed to 2N."""
    from magdiff_jax.train.trainer import train

    root, local, cwd = (tmp_path_factory.mktemp(n) for n in ("bucket", "straight", "cwd"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        train(th.config(*MICRO, steps=2 * N, ckpt_every=N, export=False, trainable=""), local)
        with fake_gcs(root):
            train(th.config(*MICRO, steps=N, ckpt_every=N, export=False, trainable=""), "gs://bucket/run")
            assert not (root / "bucket" / "run" / "export").exists()
            train(th.config(*MICRO, steps=2 * N, ckpt_every=N, trainable=""), "gs://bucket/run")
    _no_escape(cwd)
    return root, local


def test_a_bucket_workdir_resumes_exactly(runs, cwd):
    root, local = runs
    run = root / "bucket" / "run"
    ref, got = th.losses(local), th.losses(run)
    assert sorted(got) == list(range(1, 2 * N + 1)) and got == ref  # bitwise, across the resume
    assert th.checkpoints(run) == [N, 2 * N]
    for a, b in zip(jax.tree.leaves(th.params(local, 2 * N)), jax.tree.leaves(th.params(run, 2 * N)), strict=True):
        np.testing.assert_array_equal(a, b)
    for name in ("config.json", "models.json", "tokenizer/vocab.json", "frozen", f"export/{COMPLETE}",
                 "export/stage.json", f"export/unet/{COMPLETE}", "export/tokenizer/vocab.json"):
        assert (run / name).exists(), name
    events = list((run / "tensorboard").glob("events.out.tfevents.*"))  # one file per run (or second)
    assert events and all(e.stat().st_size > 0 for e in events)


def test_the_bucket_export_loads_and_samples(runs, cwd):
    from magdiff_jax.export import load_stage
    from magdiff_jax.export.stage import restore_frozen
    from magdiff_jax.models.tokenizer import CLIPTokenizer
    from magdiff_jax.pipelines.magdiff import MagDiffPipeline
    from magdiff_jax.train.tasks import get_task

    root, local = runs
    ref = {**restore_frozen(local), "unet": th.params(local, 2 * N)}
    with fake_gcs(root):
        stage = load_stage("gs://bucket/run/export")
        assert str(stage.path) == "gs://bucket/run/export" and stage.step == 2 * N
        tok = CLIPTokenizer.from_folder(stage.tokenizer_folder(), max_length=16)
        with pytest.raises(ValueError, match="'t2i' stage, not magdiff"):
            MagDiffPipeline.load("gs://bucket/run/export")
    assert sorted(ref) == sorted(stage.params)
    for name in ref:
        for a, b in zip(jax.tree.leaves(ref[name]), jax.tree.leaves(stage.params[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    config = stage.config.copy_and_resolve_references()
    config.preview.num_steps = 2
    batch = {"tokens": tok(["a red square moves left"]), "null_tokens": tok([""])}
    sample = jax.jit(lambda params, batch: get_task(stage.task).preview(stage.modules, params, batch,
                                                                        jax.random.key(0), config=config))
    video = sample(stage.params, batch)
    assert video.shape == (1, 1, 32, 32, 3) and np.isfinite(np.asarray(video)).all()


def test_convert_round_trip_through_the_bucket(runs, cwd):
    from magdiff_jax import cli
    from magdiff_jax.convert import load_torch, save_torch
    from magdiff_jax.export import load_model

    root, _ = runs

    def convert(*argv):
        cli._convert(cli.build_parser().parse_args(["convert", *argv]))

    with fake_gcs(root):
        _, module, params = load_model("gs://bucket/run/export/unet", kind="unet2d")
        convert("to-torch", "--kind", "unet2d", "gs://bucket/run/export/unet", "gs://bucket/torch/unet")
        with pytest.raises(FileExistsError, match="gs://bucket/torch/unet exists and is not empty"):
            convert("to-torch", "--kind", "unet2d", "gs://bucket/run/export/unet", "gs://bucket/torch/unet")
        convert("to-torch", "--kind", "unet2d", "--overwrite", "gs://bucket/run/export/unet", "gs://bucket/torch/unet")
        convert("to-flax", "--kind", "unet2d", "gs://bucket/torch/unet", "gs://bucket/flax/unet")
        _, _, back = load_model("gs://bucket/flax/unet", kind="unet2d")
        save_torch("unet2d", module, params, "gs://bucket/torch/sharded", max_shard_bytes=20_000)
        _, sharded = load_torch("unet2d", "gs://bucket/torch/sharded")
    files = sorted(p.name for p in (root / "bucket" / "torch" / "unet").iterdir())
    assert files == sorted(["config.json", "diffusion_pytorch_model.safetensors", COMPLETE])
    assert len(list((root / "bucket" / "torch" / "sharded").glob("*-of-*.safetensors"))) > 1
    for tree in (back, sharded):
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tree), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_folder_without_its_completion_marker_is_refused(runs, tmp_path, cwd):
    import shutil

    from magdiff_jax.export import load_model, load_stage

    root, _ = runs
    bucket = root / "bucket"
    shutil.copytree(bucket / "run" / "export", bucket / "cut")
    (bucket / "cut" / COMPLETE).unlink()
    (bucket / "cut" / "vae" / COMPLETE).unlink()
    with fake_gcs(root):
        with pytest.raises(FileNotFoundError, match=r"gs://bucket/cut: incomplete stage export \(no complete.json"):
            load_stage("gs://bucket/cut")
        with pytest.raises(FileNotFoundError, match=r"gs://bucket/cut/vae: incomplete model folder"):
            load_model("gs://bucket/cut/vae")
    shutil.copytree(bucket / "cut" / "vae", tmp_path / "vae")  # a local folder is complete by its rename alone
    assert load_model(tmp_path / "vae")[0] == "vae"


def _records(data: bytes) -> int:
    pos = n = 0
    while pos < len(data):
        (size,) = struct.unpack_from("<Q", data, pos)
        pos, n = pos + 16 + size, n + 1
    assert pos == len(data)
    return n


def test_growing_files_and_pictures_in_a_bucket(tmp_path, cwd):
    from PIL import Image

    from magdiff_jax.utils.files import GrowingFile
    from magdiff_jax.utils.images import save_png
    from magdiff_jax.utils.tensorboard import EventWriter

    image = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    with fake_gcs(tmp_path / "root"):
        with GrowingFile("gs://bucket/logs/m.jsonl") as f:
            f.append(b'{"step": 1}\n')
            f.append(b'{"step": 2}\n')
        with GrowingFile("gs://bucket/logs/m.jsonl") as f:  # continued, not restarted
            f.append(b'{"step": 3}\n')
        with EventWriter("gs://bucket/logs/tb") as tb:
            tb.scalars(1, {"loss": 0.5})
            tb.image(1, "samples", image)
        assert str(save_png("gs://bucket/samples/a.png", image)) == "gs://bucket/samples/a.png"
    logs = tmp_path / "root" / "bucket" / "logs"
    assert [json.loads(x)["step"] for x in (logs / "m.jsonl").read_text().splitlines()] == [1, 2, 3]
    (events,) = (logs / "tb").glob("events.out.tfevents.*")
    assert _records(events.read_bytes()) == 3
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "root" / "bucket" / "samples" / "a.png")), image)


def test_the_trainers_own_files_in_a_bucket(tmp_path, cwd):
    """What a resume does to the workdir, in a bucket: metrics.jsonl cut back to the checkpoint (a torn last line
    dropped), an unrestorable checkpoint moved aside (no rename in an object store: copied, then removed)."""
    from magdiff_jax.train.trainer import UNRESTORABLE, _restore_newest, _truncate_metrics
    from magdiff_jax.utils.files import as_path

    class Manager:  # checkpoint 4 cannot be restored, 2 can
        def all_steps(self):
            return [2, 4]

        def restore(self, step, args):
            if step == 4:
                raise ValueError("truncated")
            return {"step": step}

        def reload(self):
            pass

    root = tmp_path / "root"
    run = root / "bucket" / "w"
    (run / "checkpoints" / "4" / "group_unet").mkdir(parents=True)
    (run / "checkpoints" / "4" / "group_unet" / "data").write_bytes(b"half")
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    with fake_gcs(root):
        workdir = as_path("gs://bucket/w")
        assert _restore_newest(Manager(), workdir, None, main=True) == (2, {"step": 2})
        _truncate_metrics(workdir / "metrics.jsonl", 2)
    assert not (run / "checkpoints" / "4").exists()
    assert (run / UNRESTORABLE / "4" / "group_unet" / "data").read_bytes() == b"half"
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


def test_cli_inputs_and_outputs_in_a_bucket(tmp_path, cwd):
    """`magdiff-jax sample` / `edit` read their subject, mask, video and masks from a bucket (copied down: the image
    and video readers read local files) and upload the videos they write."""
    import contextlib

    from magdiff_jax.cli import _local_input

    root = tmp_path / "root"
    (root / "bucket" / "in" / "masks").mkdir(parents=True)
    (root / "bucket" / "in" / "dog.png").write_bytes(b"png bytes")
    (root / "bucket" / "in" / "masks" / "0.png").write_bytes(b"mask bytes")
    with fake_gcs(root), contextlib.ExitStack() as stack:
        image = _local_input("gs://bucket/in/dog.png", stack)
        masks = _local_input("gs://bucket/in/masks", stack)
        assert _local_input("local.png", stack) == "local.png"
        assert Path(image).name == "dog.png" and Path(image).read_bytes() == b"png bytes"
        assert (Path(masks) / "0.png").read_bytes() == b"mask bytes"
        with pytest.raises(FileNotFoundError, match=r"gs://bucket/in/cat\.png"):
            _local_input("gs://bucket/in/cat.png", stack)
    assert not Path(image).exists() and not Path(masks).exists()  # removed with the stack
