"""Two parameter groups with two optimizers and two losses in one jitted step, one of them switched on at a step:
configs/vae.py:tiny_gan (the tiny VAE against a patch discriminator, hinge loss). The groups train from their own
start, a run SIGKILLed after a checkpoint resumes to the same losses and bitwise-equal parameters of both groups,
and 8 fake devices (data 2 x fsdp 2 x tensor 2, the discriminator's kernels sharded) log the losses of 1."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import train_helpers as th

from magdiff_jax.train.trainer import initial_models, train

STEPS, DISC_START = 24, 3  # the discriminator trains from step 4 (its start_step 3 counts from 0)
GAN = {"file": "vae", "variant": "tiny_gan", "global_batch_size": 8, "ckpt_every": 4, "async_checkpoints": False,
       "task_options.disc_start": DISC_START}
D2F2T2 = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def _config(**changes):
    spec = {**GAN, **changes}
    return th.config(spec.pop("variant"), spec.pop("file"), **spec)


def _cli(workdir, **changes):
    spec = {**GAN, **changes}
    return th.cli_args(workdir, spec.pop("variant"), spec.pop("file"), **spec)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("gan")
    train(_config(steps=STEPS), workdir)
    return workdir


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_each_group_trains_from_its_own_start(straight):
    """Both losses and each group's gradient norm and learning rate are logged every step; the discriminator is
    exactly its initialisation until its start step and moves after it, the VAE moves from the first step; the
    export holds the VAE alone (inference needs no discriminator)."""
    from magdiff_jax.export import load_stage

    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    assert {"loss", "loss_d", "mse", "adversarial", "grad_norm/vae", "grad_norm/discriminator", "lr/vae",
            "lr/discriminator"} <= set(lines[0])
    assert all(np.isfinite(m["loss_d"]) and m["grad_norm/discriminator"] > 0 for m in lines)
    _, init = initial_models(_config())
    for group in ("discriminator", "vae"):  # step 4 updated the discriminator once, the VAE four times
        assert not _same(th.params(straight, 4, group), init[group]), group
    stage = load_stage(straight / "export")
    assert set(stage.modules) == {"vae"} and stage.task == "vae" and stage.step == STEPS


def test_a_group_waits_for_its_start_step(tmp_path):
    """A checkpoint at the discriminator's start step holds its initial parameters, bit for bit."""
    train(_config(steps=DISC_START, ckpt_every=DISC_START, export=False), tmp_path)
    _, init = initial_models(_config())
    assert _same(th.params(tmp_path, DISC_START, "discriminator"), init["discriminator"])
    assert not _same(th.params(tmp_path, DISC_START, "vae"), init["vae"])
    assert not (tmp_path / "export").exists()


def test_sigkill_then_resume_reproduces_both_groups(straight, tmp_path):
    killed = th.start(_cli(tmp_path, steps=200, ckpt_every=4), tmp_path.with_suffix(".killed.log"))
    th.wait_for_step(killed, tmp_path, 6)  # past the step-4 checkpoint
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    resumed_from = max(th.checkpoints(tmp_path))
    assert resumed_from < STEPS - 4, "the run outpaced the kill"
    train(_config(steps=STEPS), tmp_path)
    for key in ("loss", "loss_d"):
        ref, got = th.losses(straight, key), th.losses(tmp_path, key)
        assert sorted(got) == list(range(1, STEPS + 1))
        assert all(got[s] == ref[s] for s in got), key  # bitwise, before and after the kill
    for group in ("vae", "discriminator"):
        assert _same(th.params(straight, STEPS, group), th.params(tmp_path, STEPS, group)), group


def test_eight_devices_log_the_losses_of_one(straight, tmp_path):
    script = Path(__file__).with_name("train_mesh_check.py")
    spec = {"file": "vae", "variant": "tiny_gan", "metrics": ["loss", "loss_d"],
            "changes": {k: v for k, v in {**GAN, **D2F2T2, "steps": 5, "export": False}.items()
                        if k not in ("file", "variant")}}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "run"), json.dumps(spec)], capture_output=True,
                       text=True, env={**os.environ, "PYTHONPATH": str(th.ROOT)}, timeout=900, cwd=th.ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    for key in ("loss", "loss_d"):
        ref = th.losses(straight, key)
        values = {int(s): v for s, v in got[key].items()}
        assert sorted(values) == list(range(1, 6))
        for s, v in values.items():
            assert abs(v - ref[s]) <= 1e-5 * abs(ref[s]), (key, s, v, ref[s])
