"""The trainer at scale, on fake CPU devices: 8 devices (data x fsdp x tensor) log the losses of one device; a
checkpoint saved on data=2 x fsdp=2 x tensor=2 resumes on fsdp=4 x tensor=2 on the same curve; 2 processes x 4
devices, started by launch/local_multiprocess.sh, log the losses of 1 process. The models are configs/t2i.py:micro
(one block each): the machinery is under test, and compiling it on 8 devices is the cost."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import train_helpers as th

from magdiff_jax.train.trainer import train


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    train(th.config("micro", steps=5), workdir)
    return th.losses(workdir)


def _close(got: dict, ref: dict, steps):
    for s in steps:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


def test_eight_devices_and_a_restore_on_another_mesh(one_device, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(th.ROOT)}
    script = Path(__file__).with_name("train_mesh_check.py")
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=900, cwd=th.ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {k: {int(s): v for s, v in d.items()} for k, d in json.loads(r.stdout.strip().splitlines()[-1]).items()}
    _close(runs["data2_fsdp2_tensor2"], one_device, range(1, 6))
    moved = runs["moved_to_fsdp4_tensor2"]
    assert sorted(moved) == [1, 2, 3, 4, 5]  # steps 4-5 ran on the new mesh
    _close(moved, one_device, range(1, 6))


def test_two_processes_log_the_losses_of_one(one_device, tmp_path):
    launch = th.ROOT / "launch" / "local_multiprocess.sh"
    args = th.cli_args(tmp_path / "run", "micro", steps=5, **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    r = subprocess.run(["bash", str(launch), "-n", "2", "-d", "4", "--", *args], capture_output=True, text=True,
                       timeout=900, cwd=th.ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    _close(th.losses(tmp_path / "run"), one_device, range(1, 6))
    assert th.checkpoints(tmp_path / "run") == [5]
    assert np.isfinite(list(th.losses(tmp_path / "run").values())).all()
