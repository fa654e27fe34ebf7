"""Several processes on fake CPU devices, started by launch/local_multiprocess.sh, each run logging the losses of
one device: 2 processes x 4 devices on mesh data=2 x fsdp=2 x tensor=2; a tensor axis spanning 2 processes (both
load every row), then resumed on one process; SIGTERM to one of two processes, the workdir in a (fake) gs://
bucket, with a preview of more examples than a process loads. The models are configs/t2i.py:micro."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import train_helpers as th

from magdiff_jax.train.trainer import train

D2F2T2 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return th.shared_reference_run(tmp_path_factory)  # one per session, shared with test_train_scale.py


def _launch(n, d, args, timeout=900):
    launch = th.ROOT / "launch" / "local_multiprocess.sh"
    r = subprocess.run(["bash", str(launch), "-n", str(n), "-d", str(d), "--", *args], capture_output=True, text=True,
                       timeout=timeout, cwd=th.ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def test_a_model_axis_across_processes_then_a_resume_on_one(one_device, tmp_path):
    """2 processes x 2 devices with mesh tensor=4: the tensor axis spans both processes and the batch is replicated
    over it, so both load every row of each global batch (rows from the batch sharding): the losses of 1 device
    (each process loading its own half made them differ by 3%). Its step-3 checkpoint (the data position saved by 2
    processes) resumed by 1 process continues the same curve at steps 4-5 (resumes on 4 processes: the data
    position's own test in test_data_pipeline.py)."""
    run = tmp_path / "run"
    _launch(2, 2, th.cli_args(run, "micro", steps=3, **{"mesh.data": 1, "mesh.tensor": 4}))
    th.close(th.losses(run), one_device[1], range(1, 4))
    assert th.checkpoints(run) == [3]
    train(th.config("micro", steps=5, ckpt_every=3), run)
    th.close(th.losses(run), one_device[1], range(1, 6))
    assert th.checkpoints(run) == [3, 5]


def test_two_processes_log_the_losses_of_one(one_device, tmp_path):
    """2 processes x 4 devices, mesh data=2 x fsdp=2 x tensor=2 (8 fake devices, parameters split over fsdp and
    tensor, batch over data and fsdp): the losses of 1 device over 3 steps (two updates; each step
    takes ~3 s on 2 processes x 4 fake devices)."""
    args = th.cli_args(tmp_path / "run", "micro", steps=3, **D2F2T2)
    _launch(2, 4, args)
    th.close(th.losses(tmp_path / "run"), one_device[1], range(1, 4))
    assert th.checkpoints(tmp_path / "run") == [3]


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
    """Two processes with their workdir in a bucket (gs://, tests/fake_gcs.py in each process), previewing more
    examples than one process loads (rows gathered from both): SIGTERM reaches process 1 alone; both agree on the
    step to stop at (distributed.StopVote), both save it (one checkpoint, in the bucket) and exit 0, and the launch
    succeeds; nothing lands in a local `gs:` folder."""
    import signal

    run = tmp_path / "bucket" / "run"  # gs://bucket/run
    # a preview at step 2 of 6 examples: more than a process's 4 rows (batch 8 over data=2), gathered from both
    args = th.cli_args("gs://bucket/run", "micro", steps=1000, ckpt_every=1000, progress=False,
                       **{"preview.every": 2, "preview.num": 6, "preview.num_steps": 2})
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
    assert (run / "samples" / "step_0000002.png").is_file()
    assert (run / "config.json").is_file() and not (th.ROOT / "gs:").exists()


