"""The trainer on one device: the t2i tiny config learns; a run killed after a checkpoint resumes to the same
losses and bitwise-equal parameters; SIGTERM saves the current step and exits 0, and the run resumes from it
exactly; non-finite batches are skipped, and too many stop the run."""

import json
import signal

import numpy as np
import pytest
import train_helpers as th

from magdiff_jax.train.trainer import train

STEPS = 60  # the uninterrupted reference run


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """60 uninterrupted steps (checkpoints every 12): the reference the interrupted runs must reproduce."""
    workdir = tmp_path_factory.mktemp("straight")
    train(th.config(steps=STEPS, ckpt_every=12, async_checkpoints=True, **{"preview.every": STEPS}), workdir)
    return workdir


def test_tiny_t2i_learns(straight):
    """60 steps of configs/t2i.py:tiny on synthetic data take the loss clearly down (to about 0.15 of the first
    ten steps' mean; 0.08 after 200 steps)."""
    loss = th.losses(straight)
    assert sorted(loss) == list(range(1, STEPS + 1))
    first, last = np.mean([loss[s] for s in range(1, 11)]), np.mean([loss[s] for s in range(STEPS - 9, STEPS + 1)])
    assert last < 0.4 * first, (first, last)


def test_what_a_person_reads(straight):
    """metrics.jsonl carries the throughput figures, TensorBoard has the same scalars, and the preview contact
    sheet of the config's prompts is written at the last step."""
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr/unet", "grad_norm/unet", "steps_per_s", "examples_per_s", "tflops_per_device",
            "nonfinite_skipped"} <= set(lines[-1])
    assert all(m["tflops_per_device"] > 0 and m["steps_per_s"] > 0 for m in lines)
    (events,) = (straight / "tensorboard").glob("events.out.tfevents.*")
    assert events.stat().st_size > STEPS * 40  # a scalar event per step and one image
    from PIL import Image

    sheet = np.asarray(Image.open(straight / "samples" / f"step_{STEPS:07d}.png"))
    assert sheet.ndim == 3 and sheet.shape[0] >= 3 * 32 and sheet.std() > 5


def test_sigkill_then_sigterm_then_resume_reproduce_the_straight_run(straight, tmp_path):
    """One workdir through both kinds of interruption: a run SIGKILLed after its step-6 checkpoint (before step 12)
    is resumed by a second run, which gets SIGTERM a few steps later: it saves the current step and exits 0. Resumed
    once more in-process past the next checkpoint of the reference, every logged loss is the straight run's, bitwise,
    and so are the parameters there."""
    import jax

    killed = th.start(th.cli_args(tmp_path, steps=200), tmp_path.with_suffix(".killed.log"))
    th.wait_for_step(killed, tmp_path, 8)  # past the step-6 checkpoint, before the step-12 one
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed_from = max(th.checkpoints(tmp_path))
    assert resumed_from < 12, "the run outpaced the kill"

    logged = max(th.losses(tmp_path))  # the killed run's last step; the resumed run logs from resumed_from + 1
    resumed = th.start(th.cli_args(tmp_path, steps=200, ckpt_every=100), tmp_path.with_suffix(".resumed.log"))
    th.wait_for_step(resumed, tmp_path, logged + 1)  # the resumed run is stepping (its signal handler is set)
    resumed.send_signal(signal.SIGTERM)
    resumed.wait(timeout=120)
    assert resumed.returncode == 0, th.output(resumed)[-3000:]
    stopped = max(th.losses(tmp_path))
    assert th.checkpoints(tmp_path) == [resumed_from, stopped] and stopped <= STEPS - 14, "the run outpaced the signal"

    end = -(-(stopped + 2) // 12) * 12  # the reference's next checkpoint, at least two steps on
    train(th.config(steps=end), tmp_path)
    ref, got = th.losses(straight), th.losses(tmp_path)
    assert sorted(got) == list(range(1, end + 1))
    assert all(got[s] == ref[s] for s in got)  # bitwise-equal per-step losses, before and after each interruption
    for a, b in zip(jax.tree.leaves(th.params(straight, end)), jax.tree.leaves(th.params(tmp_path, end)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


class _NaNAt:
    """A data pipeline whose batches at the given (1-based) positions carry NaN images."""

    def __init__(self, dataset, positions):
        self.it, self.positions, self.n = iter(dataset), set(positions), 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.it)
        self.n += 1
        if self.n in self.positions or "all" in self.positions:
            batch = dict(batch, video=np.full(batch["video"].shape, np.nan, np.float32))
        return batch

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


def test_nonfinite_batches_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    """One run: the NaN batch at step 2 is skipped and counted (the step-4 checkpoint and the logged losses are
    finite); NaN batches from step 5 on stop it at step 6 (max_nonfinite 2), naming the last good checkpoint."""
    from magdiff_jax.data import pipeline

    real = pipeline.make_dataset
    monkeypatch.setattr(pipeline, "make_dataset", lambda *a, **k: _NaNAt(real(*a, **k), {2, *range(5, 11)}))
    c = th.config(steps=10, ckpt_every=4, max_nonfinite=2)  # float images (th.OVERRIDES), so a batch can hold NaN
    with pytest.raises(FloatingPointError, match=r"2 non-finite steps in a row .* at step 6; last good checkpoint: "
                                                 r"step 4 in .*checkpoints"):
        train(c, tmp_path)
    logged = {m["step"]: m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert logged[4]["nonfinite_skipped"] == 1 and all(np.isfinite(logged[s]["loss"]) for s in (1, 3, 4))
    import jax

    assert th.checkpoints(tmp_path) == [4]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(th.params(tmp_path, 4)))


class _HalfSizeAt(_NaNAt):
    """A data pipeline whose batches at the given positions are cropped to half their height and width (another
    bucket's shape)."""

    def __next__(self):
        batch = next(self.it)
        self.n += 1
        if self.n in self.positions:
            h, w = batch["video"].shape[2:4]
            batch = dict(batch, video=np.ascontiguousarray(batch["video"][:, :, :h // 2, :w // 2]))
        return batch


def test_each_batch_shape_compiles_its_own_step(tmp_path, monkeypatch, caplog):
    """Buckets: a batch of another shape gets its own compiled step (the first step's compiled program would refuse
    its arguments), and later batches of a known shape reuse theirs."""
    import logging

    from magdiff_jax.data import pipeline

    real = pipeline.make_dataset
    monkeypatch.setattr(pipeline, "make_dataset", lambda *a, **k: _HalfSizeAt(real(*a, **k), {2, 4}))
    caplog.set_level(logging.INFO)
    train(th.config("micro", steps=4, ckpt_every=4, export=False), tmp_path)
    compiles = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step compiled for")]
    assert len(compiles) == 2 and "(8, 1, 32, 32, 3)" in compiles[0] and "(8, 1, 16, 16, 3)" in compiles[1]
    assert sorted(th.losses(tmp_path)) == [1, 2, 3, 4] and th.checkpoints(tmp_path) == [4]


def test_the_stage_exports_itself(straight, tmp_path):
    """Training wrote WORKDIR/export at its last step: every model the stage's inference needs (the frozen VAE and
    text encoder included), the tokenizer and the scheduler; the workdir itself, exported on the fly, holds the
    same parameters; `magdiff-jax export` writes any checkpoint's stage."""
    import shutil

    import jax

    from magdiff_jax import cli
    from magdiff_jax.export import load_stage
    from magdiff_jax.models.tokenizer import CLIPTokenizer

    stage = load_stage(straight / "export")
    assert stage.task == "t2i" and stage.step == STEPS and stage.kinds == {"unet": "unet2d", "vae": "vae",
                                                                          "text_encoder": "clip_text"}
    assert CLIPTokenizer.from_folder(stage.tokenizer_folder(), max_length=16)(["a red square"]).shape == (1, 16)
    scheduler = json.loads((straight / "export" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["beta_schedule"] == "scaled_linear"
    live = load_stage(straight)
    for name in stage.params:
        for a, b in zip(jax.tree.leaves(stage.params[name]), jax.tree.leaves(live.params[name]), strict=True):
            np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(stage.params["unet"]), jax.tree.leaves(th.params(straight, STEPS)), strict=True):
        np.testing.assert_array_equal(a, b)

    args = cli.build_parser().parse_args(["export", "--workdir", str(straight), "--out", str(tmp_path / "s12"),
                                          "--step", "12"])
    cli._export(args)
    early = load_stage(tmp_path / "s12")
    assert early.step == 12
    for a, b in zip(jax.tree.leaves(early.params["unet"]), jax.tree.leaves(th.params(straight, 12)), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileExistsError, match="not empty"):
        cli._export(args)

    shutil.rmtree(tmp_path / "s12" / "vae")  # a missing model is an error naming it
    with pytest.raises(FileNotFoundError, match="lists model 'vae'"):
        load_stage(tmp_path / "s12")


def test_a_workdir_without_its_frozen_parameters_is_refused(straight, tmp_path):
    """The frozen models come from WORKDIR/frozen (written when the run started), never from a fresh
    initialisation: without it the export names what is missing."""
    import shutil

    from magdiff_jax.export import load_stage

    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("config.json", "models.json", "tokenizer"):
        src = straight / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, copy / name)
    shutil.copytree(straight / "checkpoints" / "12", copy / "checkpoints" / "12")
    with pytest.raises(FileNotFoundError, match="no frozen/"):
        load_stage(copy)


def _truncate_largest_file(folder):
    """Cut the largest file under `folder` to half its size (what a crash in the middle of a write leaves)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    big = max(files, key=lambda p: p.stat().st_size)
    big.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    return big


def test_resume_survives_what_a_crash_leaves(straight, tmp_path):
    """A torn last line in metrics.jsonl and a newest checkpoint with a truncated data file: the run names the
    checkpoint it cannot restore, moves it aside (kept for inspection), resumes from the one before and reproduces
    the straight run's losses; when no checkpoint restores, the error names the newest and nothing moves."""
    train(th.config(steps=6, ckpt_every=3), tmp_path)
    _truncate_largest_file(tmp_path / "checkpoints" / "6" / "group_unet")
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 7, "loss": 0.12')  # killed in the middle of an append
    train(th.config(steps=8, ckpt_every=3), tmp_path)
    assert (tmp_path / "checkpoints.unrestorable" / "6" / "group_unet").is_dir()
    assert th.checkpoints(tmp_path) == [3, 6, 8]
    ref, got = th.losses(straight), th.losses(tmp_path)
    assert sorted(got) == list(range(1, 9)) and all(got[s] == ref[s] for s in got)

    for step in (3, 6, 8):
        _truncate_largest_file(tmp_path / "checkpoints" / str(step) / "group_unet")
    with pytest.raises(FileNotFoundError, match=r"no checkpoint restores; the newest, step 8 \(.*checkpoints/8\)"):
        train(th.config(steps=10, ckpt_every=3), tmp_path)
    assert th.checkpoints(tmp_path) == [3, 6, 8]
