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
