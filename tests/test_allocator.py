"""The CPU allocator set-up (magdiff_jax/cpu/allocator.py): the huge-page tunable and the restart that adds it."""

import os
import subprocess
import sys

import pytest

from magdiff_jax.cpu import allocator

PRINT_TUNABLES = ("from magdiff_jax.cpu.allocator import reexec_with_tunables; reexec_with_tunables(); "
                  "import os; print(os.environ.get('GLIBC_TUNABLES', ''))")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return {**env, **extra}


ALL = ":".join(allocator.TUNABLES)


@pytest.mark.parametrize("given, expected", [
    ("", ALL),
    ("glibc.malloc.arena_max=2", f"glibc.malloc.arena_max=2:{ALL}"),
    # the user's choices stand; only the tunables not named are added
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0:" + ":".join(allocator.KEEP_FREED)),
    (f"glibc.malloc.mmap_max=7:{allocator.HUGEPAGES}",
     f"glibc.malloc.mmap_max=7:{allocator.HUGEPAGES}:{allocator.KEEP_FREED[1]}"),
    (ALL, ALL),
])
def test_with_tunables(given, expected):
    env = {"GLIBC_TUNABLES": given} if given else {}
    assert allocator.with_tunables(env)["GLIBC_TUNABLES"] == expected
    assert allocator.named_tunables({"GLIBC_TUNABLES": "glibc.malloc.hugetlbx=1"}) == {"glibc.malloc.hugetlbx"}
    assert allocator.with_tunables({"A": "1"}, ())["A"] == "1"


def _child_stdout(code: str, *args: str, **env) -> str:
    """What a child Python running `code` with `args` prints, in this environment less GLIBC_TUNABLES and
    LD_PRELOAD, plus `env`."""
    return subprocess.run([sys.executable, "-c", code, *args], env=_clean_env(**env), capture_output=True, text=True,
                          check=True).stdout


def _tunables_seen(**env) -> str:
    """GLIBC_TUNABLES as a restarted-if-needed child process sees it."""
    out = _child_stdout(PRINT_TUNABLES, **env).splitlines()
    assert len(out) == 1, out  # the command ran to the end once
    return out[0]


def test_reexec_adds_the_tunables_once():
    """A process started without the tunables restarts itself with those glibc and the kernel support and then
    runs to the end once; one started with them, or with an allocator preloaded, does not restart."""
    supported = allocator.supported_tunables()
    assert _tunables_seen() == ":".join(supported)
    if supported:
        assert _tunables_seen(GLIBC_TUNABLES=ALL) == ALL
        assert _tunables_seen(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == ":".join(
            ["glibc.malloc.hugetlb=0", *allocator.KEEP_FREED])
    assert _tunables_seen(LD_PRELOAD="libtcmalloc_minimal.so.4x") == ""  # (a missing library: ld.so warns only)


# A jitted program with a 128 MB intermediate (a dot's result, the next dot's operand) that XLA allocates per
# call; prints the fewest page faults of six later calls (under heavy load a call now and then still runs on a
# worker thread, and faults)
FAULTS = """
import resource, sys
import jax, jax.numpy as jnp
from magdiff_jax.cpu import allocator
if sys.argv[1] == "sync":
    allocator.run_cpu_programs_on_calling_thread()
f = jax.jit(lambda a, b: jnp.sum((a @ b) @ b[:8].T))
a, b = jnp.ones((4096, 64), jnp.float32), jnp.ones((64, 8192), jnp.float32)
f(a, b).block_until_ready()
faults = []
for _ in range(6):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))
"""


def _faults(dispatch: str, **env) -> int:
    # XLA's default optimisation level, as runs use (the suite's level 0 allocates differently)
    xla_flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "")
    return int(_child_stdout(FAULTS, dispatch, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags, **env).split()[-1])


@pytest.mark.skipif(allocator.KEEP_FREED[0] not in allocator.supported_tunables(),
                    reason="needs glibc 2.26+ (its malloc tunables)")
def test_tunables_and_sync_dispatch_keep_buffers_mapped():
    """With glibc's default malloc every call faults its 128 MB intermediate in again (32k 4 KiB pages); with the
    tunables and programs run on the calling thread, a later call reuses the memory the earlier ones freed (here:
    64 faults; the tunables with asynchronous dispatch: 32k, see the allocator's docstring)."""
    plain = _faults("async")
    kept = _faults("sync", GLIBC_TUNABLES=":".join(allocator.KEEP_FREED))
    assert plain > 20_000, plain
    assert kept < plain / 20, (kept, plain)


def test_glibc_version_is_parsed():
    version = allocator.glibc_version()
    assert version is None or (len(version) == 2 and version >= (2, 0))


HINT = ("import sys; from magdiff_jax.cpu import allocator\n"
        "if sys.argv[1] == 'sync': allocator.run_cpu_programs_on_calling_thread()\n"
        "print(allocator.allocator_hint())")


@pytest.mark.skipif(not allocator.supported_tunables(), reason="needs glibc 2.26+ (its malloc tunables)")
def test_allocator_hint_names_what_is_missing():
    def hint(dispatch, **env):
        return _child_stdout(HINT, dispatch, **env).strip()

    every = ":".join(allocator.supported_tunables())
    assert hint("sync", GLIBC_TUNABLES=every) == "None"
    assert hint("sync", LD_PRELOAD="libtcmalloc_minimal.so.4x") == "None"
    only_dispatch = hint("async", GLIBC_TUNABLES=every)
    assert "run_cpu_programs_on_calling_thread" in only_dispatch and "GLIBC_TUNABLES" not in only_dispatch
    both = hint("async", GLIBC_TUNABLES="glibc.malloc.hugetlb=0")
    assert f"GLIBC_TUNABLES={':'.join(allocator.KEEP_FREED)} " in both and "run_cpu_programs" in both


def _no_files():
    return []


@pytest.mark.parametrize("env, files, expected", [
    ({}, [], None),
    ({"JAX_PLATFORMS": "cpu"}, ["/dev/nvidiactl", "/dev/nvidia0"], None),  # cpu forces the CPU path
    ({"JAX_PLATFORMS": "cpu", "TPU_ACCELERATOR_TYPE": "v5litepod-8"}, ["/dev/vfio/0"], None),
    ({"JAX_PLATFORMS": "cuda"}, [], "JAX_PLATFORMS=cuda"),
    ({"JAX_PLATFORMS": "tpu,cpu"}, [], "JAX_PLATFORMS=tpu,cpu"),
    ({}, ["/dev/nvidiactl", "/dev/nvidia0"], "/dev/nvidiactl"),
    ({}, ["/dev/accel0"], "/dev/accel0"),
    ({}, ["/dev/vfio/0"], "/dev/vfio/0"),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, [], "TPU_WORKER_HOSTNAMES"),
    ({"TPU_ACCELERATOR_TYPE": "v4-8"}, [], "TPU_ACCELERATOR_TYPE"),
    ({"TPU_ACCELERATOR_TYPE": " "}, [], None),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, ["/dev/nvidiactl", "/dev/nvidia0"], None),  # every GPU hidden
    ({"CUDA_VISIBLE_DEVICES": ""}, ["/dev/nvidia0", "/dev/accel0"], "/dev/accel0"),
])
def test_accelerator_host(env, files, expected):
    """Detected from JAX_PLATFORMS, TPU variables and device files alone: no JAX backend is started."""
    assert allocator.accelerator_host(env, files=lambda: files) == expected


def test_no_restart_on_an_accelerator_host(monkeypatch):
    """`reexec_with_tunables` (called by cpu.setup_process) replaces the process on a CPU host only."""
    calls = []
    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)  # a notebook test in this process imported it
    monkeypatch.setattr(allocator, "missing_tunables", lambda: list(allocator.KEEP_FREED))
    monkeypatch.setattr(allocator.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(allocator, "accelerator_files", lambda: ["/dev/nvidiactl"])
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    allocator.reexec_with_tunables()
    assert calls == []
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # a CPU run forced on the GPU host: restarts
    allocator.reexec_with_tunables()
    assert len(calls) == 1 and "glibc.malloc.mmap_max=0" in calls[0][2]["GLIBC_TUNABLES"]
    calls.clear()
    monkeypatch.setattr(allocator, "accelerator_files", _no_files)
    monkeypatch.delenv("JAX_PLATFORMS")
    for name, value in (("TPU_WORKER_HOSTNAMES", "w0,w1"), ("JAX_PLATFORMS", "tpu")):
        monkeypatch.setenv(name, value)
        allocator.reexec_with_tunables()
    assert calls == []


def test_tpu_variable_stops_the_restart_in_a_real_process():
    """A child process started without the tunables on a 'TPU host' (its variable set, JAX_PLATFORMS unset) runs
    on without restarting."""
    env = _clean_env(TPU_ACCELERATOR_TYPE="v5litepod-8")
    env.pop("JAX_PLATFORMS", None)
    out = subprocess.run([sys.executable, "-c", PRINT_TUNABLES], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [""]


def test_setup_process_restarts_a_cpu_process_that_imported_jax():
    """`cpu.setup_process` (the command line's first step) restarts with the tunables on a CPU host, also when jax
    was imported first: importing jax sets TPU_SKIP_MDS_QUERY on every host without TPU chips, which must not read
    as a TPU host."""
    code = ("import jax.numpy, os; from magdiff_jax import cpu; "
            "cpu.setup_process(); print(os.environ.get('GLIBC_TUNABLES', ''))")
    env = _clean_env()
    env.pop("TPU_SKIP_MDS_QUERY", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    expected = ":".join(allocator.supported_tunables()) if allocator.accelerator_host(env) is None else ""
    assert out == [expected]
    assert allocator.accelerator_host({"TPU_SKIP_MDS_QUERY": "1"}, files=_no_files) is None
