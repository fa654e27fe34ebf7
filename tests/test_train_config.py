"""Bad trainer configs are refused before anything compiles, with one clear line."""

import subprocess

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
    assert r.returncode != 0 and "learning_rte" in r.stderr
    r = subprocess.run(th.cli_args(tmp_path, **{"mesh.data": 2}), capture_output=True, text=True, timeout=120,
                       cwd=th.ROOT)
    assert r.returncode == 1 and "magdiff-jax: error: mesh" in r.stderr and "needs 2 devices" in r.stderr
    assert not (tmp_path / "checkpoints").exists()
    c = th.config()
    c.schedule.timestep_bias = -1.0
    with pytest.raises(ValueError, match="timestep_bias must be >= 0"):
        check_config(c, num_devices=1, process_count=1)


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
