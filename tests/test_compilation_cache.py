"""config.compilation_cache_dir: the trainer's programs go to JAX's persistent compilation cache in that folder."""

import os
import subprocess

import train_helpers as th


def test_compilation_cache_dir_receives_the_run_programs(tmp_path):
    """A one-step run with `--config.compilation_cache_dir` writes its compiled programs there, not into the
    folder JAX_COMPILATION_CACHE_DIR names (the test session's cache, which the config overrides)."""
    cache, env_cache = tmp_path / "cache", tmp_path / "env_cache"
    env_cache.mkdir()
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(env_cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    args = th.cli_args(tmp_path / "run", "micro", steps=1, export=False, compilation_cache_dir=str(cache))
    proc = subprocess.run(args, cwd=th.ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = [p for p in cache.rglob("*") if p.is_file()]
    assert len(entries) >= 2, sorted(cache.rglob("*"))  # at least the train step and the parameter init
    assert not any(env_cache.iterdir())
