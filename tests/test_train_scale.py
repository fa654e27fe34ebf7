"""The trainer at scale, on fake CPU devices, each run logging the losses of one device (several processes:
tests/test_multihost.py): the 1-device run's step-3 checkpoint resumed by 1 process x 8 devices on fsdp=4 x
tensor=2 (steps 4-5 on the new mesh); init_from folders with bf16 compute; and the text encoder trained alongside
the U-Net (every micro run trains both). The models are configs/t2i.py:micro (one block each): the machinery is
under test, and compiling it on 8 devices is the cost (one compile per sharded run)."""

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


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    return th.shared_reference_run(tmp_path_factory)  # one per session, shared with test_multihost.py


def _seed_init(config):
    """(modules, params) of a t2i config as the trainer initialises them from its seed."""
    from magdiff_jax.train.trainer import initial_models

    return initial_models(config)


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
    th.close(got, one_device[1], range(1, 6))
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
