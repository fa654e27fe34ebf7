"""Bad trainer configs are refused before anything compiles, with one clear line."""

import subprocess
import sys

import pytest
import train_helpers as th

from magdiff_jax.train.trainer import check_config


def test_bad_configs_fail_before_compiling(tmp_path):
    c = th.config()
    c.global_batch_size = 3
    with pytest.raises(ValueError, match="does not divide over the 2 data-parallel devices"):
        check_config(c, num_devices=2, process_count=1)
    c.global_batch_size = 4
    c.mesh.update(data=4, fsdp=2)
    with pytest.raises(ValueError, match="needs 8 devices, but 2 are available"):
        check_config(c, num_devices=2, process_count=1)
    r = subprocess.run(th.cli_args(tmp_path, **{"optim.learning_rte": 1}), capture_output=True, text=True,
                       timeout=120, cwd=th.ROOT)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
        "magdiff-jax: error: unknown config key --config.optim.learning_rte (the config file defines every key a "
        "run may set)") and "Traceback" not in r.stderr
    r = subprocess.run(th.cli_args(tmp_path, **{"mesh.data": 2}), capture_output=True, text=True, timeout=120,
                       cwd=th.ROOT)
    assert r.returncode == 1 and "magdiff-jax: error: mesh" in r.stderr and "needs 2 devices" in r.stderr
    assert not (tmp_path / "checkpoints").exists()
    c = th.config()
    c.schedule.timestep_bias = -1.0
    with pytest.raises(ValueError, match="timestep_bias must be >= 0"):
        check_config(c, num_devices=1, process_count=1)


@pytest.mark.parametrize(("changes", "message"), [
    ({"optim.lr": -1e-4}, "optim.lr must be >= 0"),
    ({"optim.weight_decay": -0.1}, "optim.weight_decay must be >= 0"),
    ({"optim.b2": 1.0}, r"optim.b2 must be in \[0, 1\)"),
    ({"global_batch_size": 0}, "global_batch_size must be a positive integer, got 0"),
    ({"steps": 0}, "steps must be a positive integer, got 0"),
    ({"ema_decay": 1.5}, r"ema_decay must be in \[0, 1\)"),
    ({"preview.num_steps": 0}, "preview.num_steps >= 1"),
])
def test_values_that_cannot_be_right_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        check_config(th.config(**changes), num_devices=1, process_count=1)


def test_a_group_optimizer_is_checked_and_a_long_warmup_warned(caplog):
    """A parameter group's own optimizer settings are checked under their own name; a warmup longer than the run is
    legal but warned about."""
    c = th.config("tiny_gan", "vae", **{"groups.discriminator.optim.lr": -1.0})
    with pytest.raises(ValueError, match=r"groups\.discriminator\.optim\.lr must be >= 0"):
        check_config(c, num_devices=1, process_count=1)
    with caplog.at_level("WARNING"):
        check_config(th.config(steps=5, **{"optim.warmup_steps": 10}), num_devices=1, process_count=1)
    assert "optim.warmup_steps=10 is longer than the run (5 steps)" in caplog.text


@pytest.mark.parametrize("argv", [
    ["train", "--config", f"{th.ROOT}/configs/t2i.py:tiny", "--workdir", "W", "--config.steps=abc"],
    ["train", "--config", f"{th.ROOT}/configs/t2i.py:nope", "--workdir", "W"],
    ["train", "--config", f"{th.ROOT}/configs/missing.py:tiny", "--workdir", "W"],
    ["export", "--workdir", "W/nowhere", "--out", "W/out"],
])
def test_the_cli_names_the_culprit_in_one_line(argv, tmp_path):
    """A bad value, a config file that raises or is missing, a workdir that is not there: exit 1 and one line."""
    argv = [a.replace("W", str(tmp_path)) for a in argv]
    r = subprocess.run([sys.executable, "-m", "magdiff_jax.cli", *argv], capture_output=True, text=True, timeout=120,
                       cwd=th.ROOT)
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert r.returncode == 1 and len(errors) == 1 and errors[0].startswith("magdiff-jax: error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    culprit = {"train": ("abc", "nope", "missing.py"), "export": ("nowhere",)}[argv[0]]
    assert any(c in errors[0] for c in culprit), errors


def test_timestep_bias_moves_training_timesteps_towards_high_noise():
    import jax
    import numpy as np

    from magdiff_jax.diffusion.losses import sample_timesteps

    c = th.config()
    key, n, big = jax.random.PRNGKey(0), 200_000, c.schedule.num_train_timesteps
    t = np.asarray(sample_timesteps(key, n, big))
    assert t.dtype == np.int32 and t.min() == 0 and t.max() == big - 1
    assert np.histogram(t, bins=10, range=(0, big))[0] / n == pytest.approx(np.full(10, 0.1), abs=0.005)
    for bias in (3.0, 8.0):  # density (t / T) ** bias: P(t < x T) = x ** (1 + bias)
        t = np.asarray(sample_timesteps(key, n, big, bias))
        assert t.min() >= 0 and t.max() <= big - 1 and t.dtype == np.int32
        for x in (0.5, 0.8, 0.9):
            assert np.mean(t < x * big) == pytest.approx(x ** (1 + bias), abs=0.005), (bias, x)


def test_compiler_options_are_parsed_and_checked():
    from magdiff_jax.train.trainer import compiler_options

    assert compiler_options("") == {}
    assert compiler_options("xla_backend_optimization_level=3, a=true,b=0.5 ,c=text") == {
        "xla_backend_optimization_level": 3, "a": True, "b": 0.5, "c": "text"}
    c = th.config()
    c.compiler_options = "xla_backend_optimization_level"
    with pytest.raises(ValueError, match="not name=value"):
        check_config(c, num_devices=1, process_count=1)
