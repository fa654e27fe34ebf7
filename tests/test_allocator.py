"""The CPU allocator set-up (magdiff_jax/utils/allocator.py): the huge-page tunable and the restart that adds it."""

import os
import subprocess
import sys

import pytest

from magdiff_jax.utils import allocator

PRINT_TUNABLES = ("from magdiff_jax.utils.allocator import reexec_with_hugepages; reexec_with_hugepages(); "
                  "import os; print(os.environ.get('GLIBC_TUNABLES', ''))")


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    return {**env, **extra}


@pytest.mark.parametrize("given, expected", [
    ("", "glibc.malloc.hugetlb=1"),
    ("glibc.malloc.arena_max=2", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0"),  # the user's choice stands
    ("glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2", "glibc.malloc.arena_max=1:glibc.malloc.hugetlb=2"),
])
def test_with_hugepages(given, expected):
    env = {"GLIBC_TUNABLES": given} if given else {}
    assert allocator.with_hugepages(env)["GLIBC_TUNABLES"] == expected
    assert allocator.tunables_name_hugetlb(allocator.with_hugepages(env))
    assert not allocator.tunables_name_hugetlb({"GLIBC_TUNABLES": "glibc.malloc.hugetlbx=1"})


def _tunables_seen(**env) -> str:
    """GLIBC_TUNABLES as a restarted-if-needed child process sees it."""
    out = subprocess.run([sys.executable, "-c", PRINT_TUNABLES], env=_clean_env(**env), capture_output=True,
                         text=True, check=True).stdout.splitlines()
    assert len(out) == 1, out  # the command ran to the end once
    return out[0]


def test_reexec_adds_the_tunable_once():
    """A process started without the tunable restarts itself with it (where glibc and the kernel support it) and
    then runs to the end once; one started with it, or with an allocator preloaded, does not restart."""
    assert _tunables_seen() == ("glibc.malloc.hugetlb=1" if allocator.hugepages_supported() else "")
    assert _tunables_seen(GLIBC_TUNABLES="glibc.malloc.hugetlb=0") == "glibc.malloc.hugetlb=0"
    assert _tunables_seen(LD_PRELOAD="libtcmalloc_minimal.so.4x") == ""  # (a missing library: ld.so warns only)


def test_glibc_version_is_parsed():
    version = allocator.glibc_version()
    assert version is None or (len(version) == 2 and version >= (2, 0))
