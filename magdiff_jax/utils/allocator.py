"""The host memory allocator for CPU runs.

XLA's CPU runtime allocates a step's intermediates afresh on every call. glibc's malloc serves buffers that large
from mmap (its mmap threshold cannot be raised above 32 MiB, and from a second arena large buffers are mapped
whatever it says), so every step faults its memory in again, one 4 KiB page at a time: ~100k faults per step of
the demo's tiny MagDiff, ~500k for the 15M-parameter unet3d of `benchmarks/unet_cpu.py`.

glibc 2.35+ has a tunable that asks for transparent huge pages on the memory it maps
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, honoured when the kernel's THP mode is `madvise` or `always`): the
same buffers then fault in 2 MiB at a time. Measured on 2 cores, 150 steps of the demo's MagDiff training:
15.9M -> 0.63M page faults, system time 39 -> 12 s, 2.4 -> 3.2 steps/s. Tunables are read when a process starts,
so `magdiff-jax` re-executes itself with the tunable added (`reexec_with_hugepages`) unless GLIBC_TUNABLES already
names `glibc.malloc.hugetlb` (set it to 0 to opt out) or an allocator is preloaded. gperftools' tcmalloc
(LD_PRELOAD, `benchmarks/unet_cpu.py --malloc tcmalloc`) keeps freed memory instead and is about as fast.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

HUGEPAGES = "glibc.malloc.hugetlb=1"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def find_tcmalloc() -> str | None:
    """The installed tcmalloc library's name for LD_PRELOAD (the minimal build first), or None."""
    for name in ("tcmalloc_minimal", "tcmalloc"):
        found = ctypes.util.find_library(name)
        if found:
            return found
    return None


def preloaded_allocator() -> bool:
    """Whether an allocator library is preloaded into this process (LD_PRELOAD names a *malloc* library)."""
    return "malloc" in os.environ.get("LD_PRELOAD", "")


def glibc_version() -> tuple[int, int] | None:
    """(major, minor) of the C library when it is glibc, else None."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # not glibc, or no such confstr name here
        return None


def hugepages_supported() -> bool:
    """glibc >= 2.35 (which knows the hugetlb tunable) under a kernel whose THP mode honours madvise."""
    version = glibc_version()
    if version is None or version < (2, 35):
        return False
    try:
        mode = THP_MODE.read_text()
    except OSError:
        return False
    return "[never]" not in mode


def tunables_name_hugetlb(env: dict | None = None) -> bool:
    """Whether GLIBC_TUNABLES already sets glibc.malloc.hugetlb (to any value: the user's choice stands)."""
    tunables = (os.environ if env is None else env).get("GLIBC_TUNABLES", "")
    return any(t.split("=", 1)[0] == "glibc.malloc.hugetlb" for t in tunables.split(":"))


def with_hugepages(env: dict) -> dict:
    """A copy of `env` with the hugetlb tunable added to GLIBC_TUNABLES (kept when it names one already)."""
    if tunables_name_hugetlb(env):
        return dict(env)
    old = env.get("GLIBC_TUNABLES", "")
    return {**env, "GLIBC_TUNABLES": f"{old}:{HUGEPAGES}" if old else HUGEPAGES}


def wants_hugepages() -> bool:
    """Whether this process would run faster restarted with the hugetlb tunable (module docstring)."""
    return hugepages_supported() and not tunables_name_hugetlb() and not preloaded_allocator()


def reexec_with_hugepages() -> None:
    """Replace this process by the same command line with the hugetlb tunable, when `wants_hugepages()`.
    Call it first thing, before any work: nothing of this process survives (the new one sees the tunable set and
    does not restart again). An interactive interpreter or a notebook kernel is never replaced."""
    interactive = hasattr(sys, "ps1") or sys.flags.interactive or "ipykernel" in sys.modules
    if interactive or not sys.executable or not getattr(sys, "orig_argv", None) or not wants_hugepages():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, with_hugepages(dict(os.environ)))
    except OSError:  # the interpreter cannot be started again from here: go on as we are
        return


def allocator_hint() -> str | None:
    """A line for CPU runs started without the hugetlb tunable where it would help (library use: the tunable must
    be in the environment when Python starts), else None."""
    if not wants_hugepages():
        return None
    return (f"glibc's malloc without huge pages: CPU steps fault their memory in page by page; start Python with "
            f"GLIBC_TUNABLES={HUGEPAGES} for ~1.3x faster steps (magdiff_jax/utils/allocator.py)")
