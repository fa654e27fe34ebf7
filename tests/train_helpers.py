"""The trainer tests' configuration (configs/t2i.py:tiny on 24 synthetic clips, batch 4; the scale tests use
`micro`, the same with one-block models and batch 8, which divides over 8 data-parallel devices; `file="vae"` for
configs/vae.py), in-process and as `magdiff-jax train` arguments, so every run of a variant compiles the same step
(the session's compilation cache serves the repeats), and readers of a workdir's metrics and checkpoints."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# data.normalize: float images from the loader, so test_train.py's NaN batches run the same compiled step
OVERRIDES = {"global_batch_size": 4, "log_every": 1, "ckpt_every": 6, "keep_checkpoints": 100,
             "async_checkpoints": False, "data.synthetic.num": 24, "preview.every": 0, "data.normalize": True}


# the scale tests' runs (micro) train the text encoder too, without weight decay: test_train_scale.py reads from the
# reference run's checkpoint that its parameters moved (so gradients reached them), and every sharded run covers it
MICRO = {"global_batch_size": 8, "trainable": r"^(unet|text_encoder)/", "optim.weight_decay": 0.0}


def _overrides(variant, changes) -> dict:
    return {**OVERRIDES, **(MICRO if variant == "micro" else {}), **changes}


def config(variant="tiny", file="t2i", **changes):
    import importlib

    sys.path.insert(0, str(ROOT / "configs"))
    c = importlib.import_module(file).get_config(variant)
    for key, value in _overrides(variant, changes).items():
        *path, last = key.split(".")
        target = c
        for p in path:
            target = target[p]
        target[last] = value
    return c


def cli_args(workdir, variant="tiny", file="t2i", **changes) -> list[str]:
    def fmt(v):
        return str(v).lower() if isinstance(v, bool) else str(v)

    return [sys.executable, "-m", "magdiff_jax.cli", "train", "--config", f"{ROOT}/configs/{file}.py:{variant}",
            "--workdir", str(workdir), *(f"--config.{k}={fmt(v)}" for k, v in _overrides(variant, changes).items())]


def losses(workdir, key="loss") -> dict[int, float]:
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return {}
    return {m["step"]: m[key] for m in map(json.loads, path.read_text().splitlines())}


def params(workdir, step, group="unet"):
    """The trained parameters of parameter group `group` in the checkpoint of `step`."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ck:
        return ck.restore(Path(workdir) / "checkpoints" / str(step) / f"group_{group}")["params"]


def checkpoints(workdir) -> list[int]:
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def start(args, log) -> subprocess.Popen:
    """`args` run from the project root with stdout and stderr into the file `log` (not a pipe: one nobody reads
    while the test polls would fill up and stall a talkative run); `output(proc)` reads it."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True,
                                env=dict(os.environ))
    proc.log = Path(log)
    return proc


def output(proc: subprocess.Popen) -> str:
    return proc.log.read_text(errors="replace")


def wait_for_step(proc: subprocess.Popen, workdir, step: int, timeout: float = 300) -> None:
    """Poll metrics.jsonl until `step` is logged (fails with the process output if it exits first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if max(losses(workdir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{output(proc)[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


def reference_run(workdir) -> tuple[Path, dict[int, float]]:
    """The scale tests' reference: micro on 1 device, 5 steps, checkpoints at 3 and 5 -> (workdir, losses)."""
    from magdiff_jax.train.trainer import train

    train(config("micro", steps=5, ckpt_every=3), workdir)
    return Path(workdir), losses(workdir)


def session_folder(tmp_path_factory) -> Path:
    """A folder every xdist worker of this test session shares (the session's base temporary folder; without
    xdist, this process's own)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive lock on the file `path` (created if missing) for the block: one process of the session at
    a time."""
    import fcntl

    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def shared_reference_run(tmp_path_factory) -> tuple[Path, dict[int, float]]:
    """`reference_run` once per test session: the first test file to ask trains it in `session_folder`, under a
    file lock, and every later one (on any xdist worker) reads that workdir (read-only: copy it to resume it)."""
    shared = session_folder(tmp_path_factory)
    workdir, done = shared / "micro_reference", shared / "micro_reference.done"
    with _locked(shared / "micro_reference.lock"):
        if not done.exists():
            shutil.rmtree(workdir, ignore_errors=True)  # a run that failed part-way
            reference_run(workdir)
            done.touch()
    return workdir, losses(workdir)


def close(got: dict, ref: dict, steps) -> None:
    """Logged losses `got` are `ref`'s at `steps`, within 1e-5 relative."""
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])
