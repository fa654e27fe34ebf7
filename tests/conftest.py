"""Shared test set-up: CPU JAX in fp32, parsed absl flags (Grain needs them), PyTorch on 2 threads."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests run tiny models, where XLA's compile time dwarfs run time: skip the costly LLVM optimisation passes
# (numerics are unchanged; subprocess checks inherit the flag and add their own).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# One persistent compilation cache for the whole session (xdist workers and subprocesses inherit the variable):
# the trainer tests run the same step program in-process, in subprocesses and after resumes.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="magdiff-jax-test-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2")  # only the costly programs
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Exact fp32 matmuls, here and in every subprocess check (the setting is part of the compilation cache's key: a
# subprocess that left it at the default would compile afresh what the test process compiled already)
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"
# glibc's malloc tuned as `magdiff-jax` runs (magdiff_jax/cpu/allocator.py): glibc reads the tunables when a process
# starts, so they reach the xdist workers and the subprocess checks (this process only collects)
from magdiff_jax.cpu.allocator import supported_tunables, with_tunables

os.environ.update(with_tunables(dict(os.environ), supported_tunables()))
# XLA's CPU convolutions on Eigen, as `magdiff-jax` runs them (magdiff_jax/cpu/xla_flags.py)
from magdiff_jax.cpu.xla_flags import FLAG, user_chose

if not user_chose():
    os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {FLAG}"

import pytest
from absl import flags

from magdiff_jax.cpu.allocator import run_cpu_programs_on_calling_thread

# JAX's CPU programs on the calling thread, as `magdiff-jax` runs them (magdiff_jax/cpu/allocator.py): with the
# tunables above, XLA's buffers stay mapped from one call to the next instead of being faulted in afresh
run_cpu_programs_on_calling_thread()

flags.FLAGS.mark_as_parsed()


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    try:
        import torch
    except ImportError:
        yield
        return
    torch.set_num_threads(2)
    torch.manual_seed(0)
    yield


# The slowest files, slowest first (a clean-clone run's worker-seconds per file on 2 busy cores: 376, 239, 231, 169,
# 158, 117, 111, 93, 75, 56, 55, then the files under 55 s that were measured slow before). Collected first, so that
# `-n 2 --dist loadfile --no-loadscope-reorder` hands them out first and the short files fill in around them
# (longest-first scheduling). test_multihost.py goes before test_train_scale.py: the first of the two trains the
# micro reference run both read (train_helpers.shared_reference_run).
SLOW_FILES = ("test_magicvideo_demo.py", "test_multihost.py", "test_magdiff_demo.py", "test_train.py",
              "test_cpu_tuning.py", "test_train_scale.py", "test_i2v.py", "test_train_groups.py",
              "test_eval_suite.py", "test_cloud_storage.py", "test_notebooks.py", "test_motion_prior.py",
              "test_remat.py", "test_sharding.py", "test_inflate.py", "test_compilation_cache.py",
              "test_magicvideo.py", "test_magdiff_model.py", "test_data_scale.py", "test_unet3d.py")


def pytest_collection_modifyitems(config, items):
    """Slow files first (SLOW_FILES). Tests marked `gpu` need a CUDA GPU: they run unchanged wherever JAX sees one,
    and are skipped elsewhere."""
    from pathlib import Path

    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(Path(str(item.fspath)).name, len(rank)))  # stable: file order kept

    from magdiff_jax.layers.attention import cudnn_available

    if cudnn_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU visible to JAX")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
