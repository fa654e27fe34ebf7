"""The trainer: exact resume from a checkpoint (losses and parameters bitwise equal), the t2i tiny config
learning, and bad configs refused before anything compiles."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "configs"))

import t2i  # noqa: E402

from magdiff_jax.train.trainer import check_config, train  # noqa: E402


def _config(steps):
    c = t2i.get_config("tiny")
    c.steps, c.log_every, c.ckpt_every, c.global_batch_size = steps, 1, 6, 4
    c.data.synthetic.num = 24
    c.async_checkpoints = False
    return c


def _losses(workdir):
    return {m["step"]: m["loss"] for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())}


def _params(workdir, step):
    with ocp.StandardCheckpointer() as ck:
        return ck.restore(workdir / "checkpoints" / str(step) / "state")["params"]


def test_stopped_and_resumed_run_equals_the_straight_one(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(_config(12), straight)
    train(_config(6), resumed)  # stops after the step-6 checkpoint
    assert sorted(_losses(resumed)) == list(range(1, 7))
    train(_config(12), resumed)  # same workdir: resumes at step 6
    a, b = _losses(straight), _losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert a == b  # bitwise-equal per-step losses
    pa, pb = _params(straight, 12), _params(resumed, 12)
    import jax

    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.mean([a[s] for s in (10, 11, 12)]) < np.mean([a[s] for s in (1, 2, 3)])


def test_bad_configs_fail_before_compiling():
    c = _config(1)
    c.global_batch_size = 3
    with pytest.raises(ValueError, match="does not divide over the 2 data-parallel devices"):
        check_config(c, num_devices=2, process_count=1)
    c.global_batch_size = 4
    c.mesh.update(data=4, fsdp=2)
    with pytest.raises(ValueError, match="needs 8 devices, but 2 are available"):
        check_config(c, num_devices=2, process_count=1)


def test_unknown_config_key_is_named(tmp_path):
    r = subprocess.run([sys.executable, "-m", "magdiff_jax.cli", "train", "--config", f"{ROOT}/configs/t2i.py:tiny",
                        "--workdir", str(tmp_path), "--config.optim.learning_rte=1"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode != 0 and "learning_rte" in r.stderr
    assert not (tmp_path / "checkpoints").exists()
