"""The host memory allocator for CPU runs.

XLA's CPU runtime allocates a step's intermediates afresh on every call, in one large buffer. glibc's malloc
serves buffers that large from fresh mmaps and unmaps them on free, so every step faults its memory in again
(benchmarks/README.md has the system time this costs). So `cpu.setup_process` starts CPU runs with three glibc
tunables (read only when a process starts, so it re-executes itself once with them added, `reexec_with_tunables`):
  - `glibc.malloc.hugetlb=1` (glibc 2.35+, kernel THP mode `madvise` or `always`): what glibc maps faults in 2 MiB
    at a time;
  - `glibc.malloc.mmap_max=0` and `glibc.malloc.trim_threshold=64 GiB`: large buffers come from the main heap,
    which keeps freed memory, so the next step reuses the same pages (the process's memory stays at its peak);
and it runs CPU programs on the thread that calls them (`run_cpu_programs_on_calling_thread`: JAX's
`jax_cpu_enable_async_dispatch` off). The second pair needs that: with asynchronous dispatch XLA allocates on a
worker thread, whose glibc arena serves a buffer larger than its 64 MiB heaps from mmap whatever mmap_max says.
Measurements: benchmarks/README.md, "CPU tuning".

A tunable named in GLIBC_TUNABLES already is left as it is (e.g. `glibc.malloc.hugetlb=0` opts out of huge pages);
nothing is added when an allocator is LD_PRELOADed (gperftools' tcmalloc keeps freed memory itself), and an
interactive interpreter or notebook kernel is never restarted (the trainer logs a line saying what to do instead).
Nor is a process on a GPU or TPU host (`accelerator_host`): JAX runs there on the accelerator, and the restart would
only cost start-up time; JAX_PLATFORMS=cpu makes it a CPU run again.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from collections.abc import Mapping
from pathlib import Path

HUGEPAGES = "glibc.malloc.hugetlb=1"
KEEP_FREED = ("glibc.malloc.mmap_max=0", f"glibc.malloc.trim_threshold={64 << 30}")
TUNABLES = (HUGEPAGES, *KEEP_FREED)  # what `cpu.setup_process` runs CPU programs with (module docstring)
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# NVIDIA GPUs; TPUs (older generations: /dev/accelN; v5e and later: VFIO groups /dev/vfio/N)
ACCELERATOR_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/accel0", "/dev/vfio/[0-9]*")
# set on Cloud TPU VMs and in TPU containers (GKE, multislice). Not TPU_SKIP_MDS_QUERY: importing jax sets it on
# every host without TPU chips (jax._src.cloud_tpu_init), so it marks the opposite
TPU_VARIABLES = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "TPU_PROCESS_ADDRESSES",
                 "TPU_CHIPS_PER_HOST_BOUNDS", "TPU_HOST_BOUNDS", "CLOUD_TPU_TASK_ID", "MEGASCALE_COORDINATOR_ADDRESS")


def accelerator_files() -> list[str]:
    """The GPU or TPU device files this host has (ACCELERATOR_FILES)."""
    return [found for pattern in ACCELERATOR_FILES for found in sorted(glob.glob(pattern))]


def accelerator_host(env: Mapping[str, str] | None = None, files=None) -> str | None:
    """Why JAX would run on a GPU or TPU here (a short reason), or None for a CPU host; starts no JAX backend.

    JAX_PLATFORMS decides when set: "cpu" alone is a CPU run whatever the host has, any other platform named is an
    accelerator run. Otherwise a TPU variable (TPU_VARIABLES) or a device file (`files()`: NVIDIA, /dev/accelN,
    VFIO groups) makes it an accelerator host; NVIDIA files do not count with CUDA_VISIBLE_DEVICES hiding every GPU
    ("" or -1)."""
    env = os.environ if env is None else env
    files = accelerator_files if files is None else files
    platforms = [p.strip().lower() for p in env.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        others = [p for p in platforms if p != "cpu"]
        return f"JAX_PLATFORMS={env['JAX_PLATFORMS']}" if others else None
    for name in TPU_VARIABLES:
        if env.get(name, "").strip():
            return name
    gpus_hidden = env.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1")
    for path in files():
        if not (gpus_hidden and path.startswith("/dev/nvidia")):
            return path
    return None


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


def supported_tunables() -> tuple[str, ...]:
    """The members of TUNABLES this C library and kernel honour (mmap_max and trim_threshold: glibc 2.26+)."""
    version = glibc_version()
    if version is None or version < (2, 26):
        return ()
    return tuple(t for t in TUNABLES if t != HUGEPAGES or hugepages_supported())


def _name(tunable: str) -> str:
    return tunable.split("=", 1)[0]


def named_tunables(env: dict | None = None) -> set[str]:
    """The tunable names GLIBC_TUNABLES sets (to any value: the user's choices stand)."""
    tunables = (os.environ if env is None else env).get("GLIBC_TUNABLES", "")
    return {_name(t) for t in tunables.split(":") if t}


def with_tunables(env: dict, tunables: tuple[str, ...] = TUNABLES) -> dict:
    """A copy of `env` with each of `tunables` that GLIBC_TUNABLES does not name already appended to it."""
    named = named_tunables(env)
    missing = [t for t in tunables if _name(t) not in named]
    if not missing:
        return dict(env)
    return {**env, "GLIBC_TUNABLES": ":".join(filter(None, [env.get("GLIBC_TUNABLES", ""), *missing]))}


def missing_tunables() -> list[str]:
    """The supported tunables this process was started without, unless an allocator is preloaded."""
    if preloaded_allocator():
        return []
    named = named_tunables()
    return [t for t in supported_tunables() if _name(t) not in named]


def reexec_with_tunables() -> None:
    """Replace this process by the same command line with `missing_tunables()` added, when there are any and this
    is not a GPU or TPU host (`accelerator_host`). Call it first thing, before any work: nothing of this process
    survives (the new one has them all and does not restart again). An interactive interpreter or a notebook
    kernel is never replaced."""
    interactive = hasattr(sys, "ps1") or sys.flags.interactive or "ipykernel" in sys.modules
    if interactive or not sys.executable or not getattr(sys, "orig_argv", None) or not missing_tunables():
        return
    if accelerator_host() is not None:  # JAX runs on the accelerator: nothing to gain
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, with_tunables(dict(os.environ), supported_tunables()))
    except OSError:  # the interpreter cannot be started again from here: go on as we are
        return


def run_cpu_programs_on_calling_thread() -> None:
    """Turn JAX's asynchronous CPU dispatch off (module docstring: XLA then allocates from the main heap, where the
    tunables keep freed memory). It must run before JAX starts its CPU backend; other backends ignore it."""
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)


def allocator_hint() -> str | None:
    """A line for CPU runs that lack part of the set-up `cpu.setup_process` makes (library use: the tunables must
    be in the environment when Python starts, the dispatch setting made before JAX starts its CPU backend), else
    None."""
    import jax

    if preloaded_allocator() or not supported_tunables():
        return None
    missing = missing_tunables()
    steps = [f"start Python with GLIBC_TUNABLES={':'.join(missing)}"] if missing else []
    if jax.config.values.get("jax_cpu_enable_async_dispatch", False):
        steps.append("call magdiff_jax.cpu.allocator.run_cpu_programs_on_calling_thread() before using JAX")
    if not steps:
        return None
    return (f"XLA's CPU buffers are mapped and faulted in afresh every step here; for faster CPU steps "
            f"{' and '.join(steps)} (magdiff_jax/cpu/allocator.py)")
