"""The trainer at scale, on fake CPU devices, each run logging the losses of one device: 2 processes x 4 devices on
mesh data=2 x fsdp=2 x tensor=2, started by launch/local_multiprocess.sh; the 1-device run's step-3 checkpoint resumed
by 1 process x 8 devices on fsdp=4 x tensor=2 (steps 4-5 on the new mesh); init_from folders with bf16 compute; and
the text encoder trained alongside the U-Net (every micro run trains both). The models are configs/t2i.py:micro (one
block each): the machinery is under test, and compiling it on 8 devices is the cost (one compile per sharded run)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
import train_helpers as th

from magdiff_jax.train.trainer import train

D2F2T2 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """The reference run's workdir (1 device, checkpoints at steps 3 and 5) and its losses."""
    workdir = tmp_path_factory.mktemp("one")
    train(th.config("micro", steps=5, ckpt_every=3), workdir)
    return workdir, th.losses(workdir)


def _seed_init(config):
    """(modules, params) of a t2i config as the trainer initialises them from its seed."""
    from magdiff_jax.train.trainer import initial_models

    return initial_models(config)


def _close(got: dict, ref: dict, steps):
    assert sorted(got) == list(steps), sorted(got)
    for s in steps:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


def test_two_processes_log_the_losses_of_one(one_device, tmp_path):
    """2 processes x 4 devices, mesh data=2 x fsdp=2 x tensor=2 (8 fake devices, parameters split over fsdp and
    tensor, batch over data and fsdp): the losses of 1 device over 3 steps (two updates; each step
    takes ~3 s on 2 processes x 4 fake devices), and a preview of more examples than one process loads."""
    launch = th.ROOT / "launch" / "local_multiprocess.sh"
    # a preview of 6 examples at step 3: more than a process's 4 rows, gathered from both
    args = th.cli_args(tmp_path / "run", "micro", steps=3, **D2F2T2, **{"preview.every": 3, "preview.num": 6,
                                                                         "preview.num_steps": 2})
    r = subprocess.run(["bash", str(launch), "-n", "2", "-d", "4", "--", *args], capture_output=True, text=True,
                       timeout=900, cwd=th.ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _close(th.losses(tmp_path / "run"), one_device[1], range(1, 4))
    assert th.checkpoints(tmp_path / "run") == [3]
    assert (tmp_path / "run" / "samples" / "step_0000003.png").is_file()


def _launch(n, d, args, timeout=900):
    launch = th.ROOT / "launch" / "local_multiprocess.sh"
    r = subprocess.run(["bash", str(launch), "-n", str(n), "-d", str(d), "--", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=th.ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_a_model_axis_across_processes_then_a_resume_on_four(one_device, tmp_path):
    """2 processes x 2 devices with mesh tensor=4: the tensor axis spans both processes and the batch is replicated
    over it, so both load every row of each global batch (rows from the batch sharding): the losses of 1 device
    (each process loading its own half made them differ by 3%). Its step-3 checkpoint (data position saved by 2
    processes) resumed by 4 processes x 1 device (data=4: 2 rows each) continues the same curve at steps 4-5."""
    run = tmp_path / "run"
    _launch(2, 2, th.cli_args(run, "micro", steps=3, **{"mesh.data": 1, "mesh.tensor": 4}))
    _close(th.losses(run), one_device[1], range(1, 4))
    assert th.checkpoints(run) == [3]
    _launch(4, 1, th.cli_args(run, "micro", steps=5))
    _close(th.losses(run), one_device[1], range(1, 6))
    assert th.checkpoints(run) == [3, 5]


def _pids_of_process(index: int, marker: str) -> list[int]:
    """PIDs of the launched processes whose MAGDIFF_PROCESS_ID is `index` and whose command line holds `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"MAGDIFF_PROCESS_ID={index}".encode() in environ and marker in cmdline and "magdiff" in cmdline:
            found.append(int(entry.name))
    return found


def test_sigterm_to_one_process_stops_every_process_at_the_same_step(tmp_path):
    """Two processes with their workdir in a bucket (gs://, tests/fake_gcs.py in each process): SIGTERM reaches
    process 1 alone; both agree on the step to stop at (distributed.StopVote), both save it (one checkpoint, in the
    bucket) and exit 0, and the launch succeeds; nothing lands in a local `gs:` folder."""
    import signal

    run = tmp_path / "bucket" / "run"  # gs://bucket/run
    args = th.cli_args("gs://bucket/run", "micro", steps=1000, ckpt_every=1000, progress=False)
    assert args[1:4] == ["-m", "magdiff_jax.cli", "train"]
    command = [sys.executable, str(th.ROOT / "tests" / "fake_gcs.py"), str(tmp_path), "--", "magdiff-jax", *args[3:]]
    launch = th.ROOT / "launch" / "local_multiprocess.sh"
    proc = th.start(["bash", str(launch), "-n", "2", "-d", "1", "--", *command], tmp_path / "log.txt")
    th.wait_for_step(proc, run, 2, timeout=600)
    pids = _pids_of_process(1, "gs://bucket/run")
    assert pids, th.output(proc)[-3000:]
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, th.output(proc)[-3000:]
    out = th.output(proc)
    stopped = {line.split("]")[0] + "]": line for line in out.splitlines() if "stopping" in line}
    assert set(stopped) == {"[0]", "[1]"}, out[-3000:]
    (saved,) = th.checkpoints(run)
    assert all(f"saved step {saved}, stopping" in line for line in stopped.values()), stopped
    assert "SIGTERM" in stopped["[1]"] and "another process" in stopped["[0]"], stopped
    assert 2 <= saved < 1000 and max(th.losses(run)) == saved
    assert (run / "config.json").is_file() and not (th.ROOT / "gs:").exists()


def test_restore_on_another_mesh(one_device, tmp_path):
    """The 1-device run's step-3 checkpoint, resumed by 1 process x 8 devices on fsdp=4 x tensor=2: steps 4-5
    continue the same curve."""
    moved = tmp_path / "moved"
    shutil.copytree(one_device[0], moved)
    shutil.rmtree(moved / "checkpoints" / "5")
    env = {**os.environ, "PYTHONPATH": str(th.ROOT)}
    script = Path(__file__).with_name("train_mesh_check.py")
    spec = {"variant": "micro", "changes": {"steps": 5, "ckpt_every": 3, "mesh.data": 1, "mesh.fsdp": 4,
                                            "mesh.tensor": 2}}
    r = subprocess.run([sys.executable, str(script), str(moved), json.dumps(spec)], capture_output=True, text=True,
                       env=env, timeout=900, cwd=th.ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {int(s): v for s, v in json.loads(r.stdout.strip().splitlines()[-1])["loss"].items()}
    _close(got, one_device[1], range(1, 6))
    assert th.checkpoints(moved) == [3, 5]


def test_init_from_converted_folders_in_bfloat16(one_device, tmp_path):
    """init_from: the model configs and weights come from `magdiff-jax convert`-style folders (no model config
    given), here holding the very weights the 1-device run initialised from its seed; with compute_dtype=bfloat16
    and lr 0, the first loss is that run's within 5% but not equal (the models ran in bf16), and the parameters stay
    exactly the saved ones, in float32."""
    from magdiff_jax.export import save_model
    from magdiff_jax.train.tasks import get_task

    ref = th.config("micro")
    task = get_task("t2i")
    modules, saved = _seed_init(ref)
    for name, (kind, _) in task.models(ref).items():
        save_model(kind, modules[name], saved[name], tmp_path / "models" / name)

    c = th.config("micro", steps=1, compute_dtype="bfloat16", **{"optim.lr": 0.0, "optim.weight_decay": 0.0})
    c.init_from = str(tmp_path / "models")
    c.model = ml_collections.ConfigDict({"unet": {}, "vae": {}, "text_encoder": {}})
    train(c, tmp_path / "run")
    got = th.losses(tmp_path / "run")[1]
    first = one_device[1][1]
    assert abs(got - first) <= 0.05 * abs(first) and got != first, (got, first)
    params = th.params(tmp_path / "run", 1)["unet"]
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(np.float32)}
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved["unet"]), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_a_trainable_text_encoder_learns(one_device):
    """`trainable` naming the text encoder too (as every micro run here does): its parameters are trained (the task
    passes the text features to the U-Net without stop_gradient; a frozen encoder is split off before jax.grad).
    After the reference run's 3 steps without weight decay, the token embedding and nearly every other text-encoder
    parameter have moved from the seed's init."""
    c = th.config("micro")
    assert c.trainable == r"^(unet|text_encoder)/" and c.optim.weight_decay == 0.0
    _, init = _seed_init(c)
    trained = th.params(one_device[0], 3)["text_encoder"]  # the micro runs' group `unet` claims it too
    flat_init = dict(jax.tree_util.tree_flatten_with_path(init["text_encoder"])[0])
    moved = {jax.tree_util.keystr(k): not np.array_equal(v, np.asarray(flat_init[k]))
             for k, v in jax.tree_util.tree_flatten_with_path(trained)[0]}
    assert moved[next(k for k in moved if "token_embedding" in k)], moved
    assert sum(moved.values()) >= 0.9 * len(moved), moved
