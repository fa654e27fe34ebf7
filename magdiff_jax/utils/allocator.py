"""The host memory allocator for CPU runs.

XLA's CPU runtime allocates a step's intermediates afresh on every call; glibc's malloc serves buffers that large
from mmap, so every step faults its memory in again (its per-thread arenas do so whatever the mmap and trim
thresholds say: setting them left the faults unchanged; one arena removes them but runs slower). gperftools'
tcmalloc keeps freed memory and was the fastest allocator measured (README, Training;
`benchmarks/unet_cpu.py --malloc tcmalloc`). It is loaded with LD_PRELOAD, before the process starts.
"""

from __future__ import annotations

import ctypes.util
import os


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
