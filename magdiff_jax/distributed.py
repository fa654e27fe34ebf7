"""Multi-process start-up: `initialize()` once per process, before any other JAX call.

Where the process layout comes from (first match wins):

1. explicit arguments: the trainer passes its config keys `distributed.coordinator`, `distributed.num_processes`
   and `distributed.process_id`;
2. the environment variables `MAGDIFF_COORDINATOR` (host:port of process 0), `MAGDIFF_NUM_PROCESSES` and
   `MAGDIFF_PROCESS_ID`, which `launch/local_multiprocess.sh` sets. 1 and 2 merge field by field: an argument
   replaces only its own variable;
3. a cluster that `jax.distributed.initialize()` sets up by itself: a TPU VM pod or multislice job
   (`TPU_WORKER_HOSTNAMES`/`TPU_PROCESS_ADDRESSES` naming more than one host, `MEGASCALE_*`, `CLOUD_TPU_TASK_ID`),
   Open MPI (`mpirun`, `OMPI_COMM_WORLD_SIZE` > 1) and SLURM (`srun` with `SLURM_NTASKS` > 1);
4. otherwise one process, and nothing is initialised.

`MAGDIFF_DISTRIBUTED=auto` replaces step 3 by a plain `jax.distributed.initialize()` whatever the environment shows
(a GCE TPU VM pod shows itself only through its metadata server; `launch/tpu_pod.sh` sets it), and
`MAGDIFF_DISTRIBUTED=off` skips step 3 (one process even inside an allocation).

Under SLURM or Open MPI with one task per host, every GPU of the host belongs to that task (JAX alone would give
each task the single GPU of its local rank); `JAX_LOCAL_DEVICE_IDS` or the `local_device_ids` argument override.

`resolve` is the decision alone (a mapping of environment variables in, a plan out, nothing touched);
`initialize` carries it out.

    python -m magdiff_jax.distributed --check

initialises from the environment and prints one JSON line per process with a cross-process sum: the smoke test of
the launch scripts (`launch/README.md`).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR = "MAGDIFF_COORDINATOR"
ENV_NUM_PROCESSES = "MAGDIFF_NUM_PROCESSES"
ENV_PROCESS_ID = "MAGDIFF_PROCESS_ID"
ENV_MODE = "MAGDIFF_DISTRIBUTED"

ARG_COORDINATOR = "distributed.coordinator"
ARG_NUM_PROCESSES = "distributed.num_processes"
ARG_PROCESS_ID = "distributed.process_id"

MODES = ("explicit", "env", "tpu", "slurm", "mpi", "auto", "single")

_lock = threading.Lock()
_state: dict[str, Any] | None = None
_state_plan: dict[str, Any] | None = None


# ----------------------------------------------------------------------------------------------------------------
# the decision


def _text(env: Mapping[str, str], name: str) -> str:
    return str(env.get(name) or "").strip()


def _env_int(env: Mapping[str, str], name: str, minimum: int) -> int | None:
    raw = _text(env, name)
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return value


def _plan(mode: str, *, initialize: bool, source: str, coordinator: str | None = None,
          num_processes: int | None = None, process_id: int | None = None, method: str | None = None,
          all_local_gpus: bool = False, notes: Sequence[str] = ()) -> dict[str, Any]:
    return {"mode": mode, "initialize": initialize, "source": source, "coordinator": coordinator,
            "num_processes": num_processes, "process_id": process_id, "cluster_detection_method": method,
            "all_local_gpus": all_local_gpus, "notes": list(notes)}


def _check_address(address: str, name: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{name}={address!r} is not host:port (the address of process 0 and a free port)")
    return address


def _explicit_or_env(env: Mapping[str, str], coordinator: str, num_processes: int | None,
                     process_id: int | None) -> dict[str, Any] | None:
    """Steps 1 and 2: arguments and MAGDIFF_* variables, merged field by field; None when neither sets anything."""
    coord, coord_name = None, ENV_COORDINATOR
    if coordinator:
        coord, coord_name = str(coordinator).strip(), ARG_COORDINATOR
    elif _text(env, ENV_COORDINATOR):
        coord = _text(env, ENV_COORDINATOR)

    n, n_name = None, ENV_NUM_PROCESSES
    if num_processes is not None and int(num_processes) != 0:
        n, n_name = int(num_processes), ARG_NUM_PROCESSES
        if n < 0:
            raise ValueError(f"{ARG_NUM_PROCESSES}={n} must be positive (0 leaves it unset)")
    else:
        n = _env_int(env, ENV_NUM_PROCESSES, 1)

    pid, pid_name = None, ENV_PROCESS_ID
    if process_id is not None and int(process_id) != -1:
        pid, pid_name = int(process_id), ARG_PROCESS_ID
        if pid < 0:
            raise ValueError(f"{ARG_PROCESS_ID}={pid} must be >= 0 (-1 leaves it unset)")
    else:
        pid = _env_int(env, ENV_PROCESS_ID, 0)

    if coord is None and n is None and pid is None:
        return None
    from_args = any(name.startswith("distributed.") and value is not None
                    for name, value in ((coord_name, coord), (n_name, n), (pid_name, pid)))
    mode = "explicit" if from_args else "env"
    source = ", ".join(f"{name}={value}" for name, value in ((coord_name, coord), (n_name, n), (pid_name, pid))
                       if value is not None)

    if n is None:
        name, value = (coord_name, coord) if coord is not None else (pid_name, pid)
        raise ValueError(f"{name}={value!r} is set but the number of processes is not: "
                         f"set {ARG_NUM_PROCESSES} or {ENV_NUM_PROCESSES} as well")
    if pid is not None and pid >= n:
        raise ValueError(f"{pid_name}={pid} is out of range for {n_name}={n} (process ids are 0..{n - 1})")
    if n == 1:
        notes = [f"{coord_name}={coord} is not used by a single process"] if coord else []
        return _plan(mode, initialize=False, source=source, num_processes=1, process_id=0, notes=notes)
    if coord is None:
        raise ValueError(f"{n_name}={n} needs a coordinator: set {ARG_COORDINATOR} or {ENV_COORDINATOR} "
                         f"to host:port of process 0")
    if pid is None:
        raise ValueError(f"{n_name}={n} needs this process's id: set {ARG_PROCESS_ID} or {ENV_PROCESS_ID} "
                         f"(0..{n - 1}, a different one on every process)")
    _check_address(coord, coord_name)
    # All four arguments are known: JAX's own cluster detection stays off, so it cannot narrow the visible devices.
    return _plan(mode, initialize=True, source=source, coordinator=coord, num_processes=n, process_id=pid,
                 method="deactivate")


def _tpu(env: Mapping[str, str]) -> dict[str, Any] | None:
    signs = []
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        hosts = [h for h in _text(env, name).split(",") if h.strip()]
        if len(hosts) > 1:
            signs.append(f"{name} ({len(hosts)} hosts)")
            break
    if _text(env, "MEGASCALE_COORDINATOR_ADDRESS"):
        signs.append("MEGASCALE_COORDINATOR_ADDRESS")
    slices = _env_int(env, "MEGASCALE_NUM_SLICES", 1)
    if slices is not None and slices > 1:
        signs.append(f"MEGASCALE_NUM_SLICES={slices}")
    if _text(env, "CLOUD_TPU_TASK_ID"):
        signs.append("CLOUD_TPU_TASK_ID")
    if not signs:
        return None
    return _plan("tpu", initialize=True, source=", ".join(signs))


def _mpi(env: Mapping[str, str]) -> dict[str, Any] | None:
    size = _env_int(env, "OMPI_COMM_WORLD_SIZE", 1)
    if size is None or size == 1:
        return None
    rank = _env_int(env, "OMPI_COMM_WORLD_RANK", 0)
    if rank is None:
        raise ValueError(f"OMPI_COMM_WORLD_SIZE={size} is set but OMPI_COMM_WORLD_RANK is not")
    if rank >= size:
        raise ValueError(f"OMPI_COMM_WORLD_RANK={rank} is out of range for OMPI_COMM_WORLD_SIZE={size}")
    notes = []
    if "OMPI_MCA_orte_hnp_uri" in env:
        method = "ompi"
    else:
        method = "mpi4py"
        notes.append("Open MPI without OMPI_MCA_orte_hnp_uri (Open MPI 5): the coordinator comes from mpi4py")
    local_size = _env_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)
    return _plan("mpi", initialize=True, source=f"OMPI_COMM_WORLD_SIZE={size}", num_processes=size,
                 process_id=rank, method=method, notes=notes,
                 all_local_gpus=local_size == 1 and not _text(env, "JAX_LOCAL_DEVICE_IDS"))


def _slurm(env: Mapping[str, str]) -> dict[str, Any] | None:
    ntasks = _env_int(env, "SLURM_NTASKS", 1)
    if ntasks is None or ntasks == 1:
        return None
    missing = [v for v in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID") if v not in env]
    if missing:
        note = (f"SLURM_NTASKS={ntasks} but {', '.join(missing)} unset (not inside an srun step): running one "
                f"process; start the command with srun to use every task")
        return _plan("single", initialize=False, source="SLURM batch step", num_processes=1, process_id=0,
                     notes=[note])
    procid = _env_int(env, "SLURM_PROCID", 0)
    if procid is None or procid >= ntasks:
        raise ValueError(f"SLURM_PROCID={procid} is out of range for SLURM_NTASKS={ntasks}")
    nodes = _env_int(env, "SLURM_STEP_NUM_NODES", 1) or _env_int(env, "SLURM_NNODES", 1)
    return _plan("slurm", initialize=True, source=f"SLURM_NTASKS={ntasks}", num_processes=ntasks, process_id=procid,
                 method="slurm", all_local_gpus=nodes == ntasks and not _text(env, "JAX_LOCAL_DEVICE_IDS"))


def resolve(env: Mapping[str, str], coordinator: str = "", num_processes: int | None = 0,
            process_id: int | None = -1) -> dict[str, Any]:
    """Decide how this process joins the job; pure (reads `env` only, initialises nothing).

    `coordinator=""`, `num_processes=0` and `process_id=-1` (or None) mean "not set". Returns a dict with
    `mode` (one of MODES), `initialize` (whether `jax.distributed.initialize` is called), `source` (what decided it,
    for logs), `coordinator`/`num_processes`/`process_id` (None where JAX detects them itself),
    `cluster_detection_method` (passed to JAX), `all_local_gpus` (one task per host: it gets every local GPU) and
    `notes` (warnings for the log). Raises ValueError, naming the setting, for inconsistent settings.
    """
    plan = _explicit_or_env(env, coordinator, num_processes, process_id)
    if plan is not None:
        return plan
    switch = _text(env, ENV_MODE).lower()
    if switch not in ("", "auto", "off"):
        raise ValueError(f"{ENV_MODE}={switch!r}: expected 'auto' or 'off' (or unset)")
    if switch == "off":
        return _plan("single", initialize=False, source=f"{ENV_MODE}=off", num_processes=1, process_id=0)
    if switch == "auto":
        return _plan("auto", initialize=True, source=f"{ENV_MODE}=auto")
    for detect in (_tpu, _mpi, _slurm):
        plan = detect(env)
        if plan is not None:
            return plan
    return _plan("single", initialize=False, source="no multi-process settings or cluster found", num_processes=1,
                 process_id=0)


# ----------------------------------------------------------------------------------------------------------------
# carrying it out


def _local_gpu_count(env: Mapping[str, str]) -> int:
    """GPUs this process may use, without starting a JAX backend (CUDA_VISIBLE_DEVICES, else /dev/nvidiaN)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [x.strip() for x in visible.split(",") if x.strip()]
        if not ids or ids[0] in ("-1", "NoDevFiles"):
            return 0
        return len(ids)
    dev = Path("/dev")
    return sum(1 for p in dev.glob("nvidia*") if p.name[len("nvidia"):].isdigit()) if dev.is_dir() else 0


def _summary(mode: str, plan: Mapping[str, Any]) -> dict[str, Any]:
    devices = jax.devices()
    return {"mode": mode, "process_index": jax.process_index(), "process_count": jax.process_count(),
            "local_devices": jax.local_device_count(), "global_devices": len(devices),
            "platform": devices[0].platform, "coordinator": plan.get("coordinator"), "source": plan.get("source")}


def initialize(coordinator: str = "", num_processes: int | None = 0, process_id: int | None = -1,
               local_device_ids: Sequence[int] | int | None = None, *,
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Start JAX multi-process when the settings or the cluster call for it; once per process, idempotent.

    Call it before anything else touches JAX (devices, arrays, jit). Arguments follow `resolve`;
    `local_device_ids` restricts this process to those local devices (multi-process modes only); `env` defaults to
    `os.environ`. Returns {"mode", "process_index", "process_count", "local_devices", "global_devices", "platform",
    "coordinator", "source"}; later calls return the first call's answer.
    """
    global _state, _state_plan
    with _lock:
        env = os.environ if env is None else env
        if _state is not None:
            if (coordinator or num_processes or (process_id is not None and process_id != -1)) and _state_plan:
                again = resolve(env, coordinator, num_processes, process_id)
                keys = ("mode", "coordinator", "num_processes", "process_id")
                if any(again[k] != _state_plan[k] for k in keys):
                    log.warning("distributed: already initialised as %s; ignoring the new settings (%s)",
                                describe(), again["source"])
            return dict(_state)

        plan = resolve(env, coordinator, num_processes, process_id)
        for note in plan["notes"]:
            log.warning("distributed: %s", note)
        mode = plan["mode"]
        if jax.distributed.is_initialized():
            log.info("distributed: jax.distributed was initialised elsewhere; using it")
            mode = "external"
        elif plan["initialize"]:
            kwargs: dict[str, Any] = {}
            if plan["coordinator"] is not None:
                kwargs.update(coordinator_address=plan["coordinator"], num_processes=plan["num_processes"],
                              process_id=plan["process_id"])
            if plan["cluster_detection_method"] is not None:
                kwargs["cluster_detection_method"] = plan["cluster_detection_method"]
            if local_device_ids is not None:
                kwargs["local_device_ids"] = local_device_ids
            elif plan["all_local_gpus"] and (count := _local_gpu_count(env)):
                kwargs["local_device_ids"] = list(range(count))
            log.info("distributed: %s (%s): jax.distributed.initialize(%s)", mode, plan["source"],
                     ", ".join(f"{k}={v!r}" for k, v in kwargs.items()))
            try:
                jax.distributed.initialize(**kwargs)
            except RuntimeError as e:
                raise RuntimeError(f"distributed.initialize ({mode}: {plan['source']}) failed: {e}. It must run "
                                   f"before any other JAX call (devices, arrays, jit) in this process.") from e
        _state_plan = plan
        _state = _summary(mode, plan)
        log.info("distributed: %s", describe())
        return dict(_state)


class MainProcessInfo(logging.Filter):
    """A log-handler filter: records below WARNING pass on process 0 only, once `initialize` has run (before it the
    process index is unknown, and asking JAX for it would start a backend: every process passes them). WARNING and
    above always pass. `magdiff-jax` puts it on the root logger's handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        state = _state
        return record.levelno >= logging.WARNING or state is None or state["process_index"] == 0


def is_main_process() -> bool:
    """True on process 0, the one that writes logs, summaries and other single-copy files."""
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier: every process waits here until all reach the same `name`; nothing to wait for in one process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def rows_over_devices(arrays: dict) -> dict:
    """Arrays that every process holds whole, split by rows over all devices of all processes (each process hands
    its own devices their rows; the row count must divide over the devices): a sampling batch on several devices."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("rows",)), PartitionSpec("rows"))
    return {k: jax.make_array_from_callback(np.shape(v), sharding, lambda index, v=v: np.asarray(v)[index])
            for k, v in arrays.items()}


def to_host(x):
    """`x` as one numpy array on every process: gathered first where some of its rows are on other processes'
    devices (numpy refuses an array that is neither fully addressable nor fully replicated)."""
    import numpy as np

    if not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


class StopVote:
    """The step at which every process stops after a signal (SIGTERM, Ctrl-C) reached one of them, or several at
    different times, agreed through the coordination service's key-value store (host to host: no device is waited
    for, and the processes that did not get the signal learn of it).

    `poll(done, requested)` runs at the start of every step, on every process, before the step is dispatched
    (`done`: the steps finished so far; `requested`: this process got a signal). It returns None until a stop is
    requested somewhere; then the process posts its `done`, waits for every other process's, and from then on
    returns the largest: each process trains on to that step, saves it, and stops. A process cannot be waiting
    here while another waits on its device for a step it has not dispatched: each posts the step it reached before
    dispatching more, and the slowest one's post decides. In one process, the signal's step."""

    PREFIX = "magdiff_jax/stop"

    def __init__(self, timeout_s: float = 600.0):
        self.count, self.index = jax.process_count(), jax.process_index()
        self.timeout_ms = int(timeout_s * 1000)
        self.client = None
        if self.count > 1:
            from jax._src import distributed as jax_distributed

            self.client = jax_distributed.global_state.client
        self.stop_at: int | None = None

    def _requested_elsewhere(self) -> bool:
        try:
            self.client.key_value_try_get(f"{self.PREFIX}/requested")
        except Exception:  # NOT_FOUND (JAX raises its runtime error type): no request yet
            return False
        return True

    def poll(self, done: int, requested: bool) -> int | None:
        if self.stop_at is not None:
            return self.stop_at
        if self.client is None:
            self.stop_at = done if requested else None
            return self.stop_at
        if requested:
            self.client.key_value_set(f"{self.PREFIX}/requested", str(self.index), allow_overwrite=True)
        elif not self._requested_elsewhere():
            return None
        self.client.key_value_set(f"{self.PREFIX}/step/{self.index}", str(done), allow_overwrite=True)
        steps = []
        for q in range(self.count):
            try:
                steps.append(int(self.client.blocking_key_value_get(f"{self.PREFIX}/step/{q}", self.timeout_ms)))
            except Exception as e:
                raise RuntimeError(f"stopping: process {q} did not post its step within "
                                   f"{self.timeout_ms / 1000:.0f} s ({e})") from e
        self.stop_at = max(steps)
        log.info("stop requested: every process stops after step %d (steps reached: %s)", self.stop_at, steps)
        return self.stop_at


def exit_multiprocess(status: int = 0) -> None:
    """In a multi-process job, exit now with `status` after the normal clean-up but without the interpreter's last
    garbage collection; in one process, return (the interpreter exits as usual).

    A CPU job with Gloo collectives can hang in that last collection, after every exit handler has run (one
    process of two stuck there in 2 of ~210 runs of `--check` on a loaded machine). So: flush, run the exit
    handlers (JAX's backend clean-up and its distributed shutdown barrier, logging, worker processes), then
    `os._exit`. Call it once the command's work is done and written.
    """
    if not jax.distributed.is_initialized():
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def describe() -> str:
    """One line for logs: this process's place in the job and its devices.

    Meant for after `initialize`; before it, it reads JAX's devices (starting the backend, after which a
    multi-process start is no longer possible).
    """
    state = _state or _summary("uninitialised", {})
    line = (f"process {state['process_index']}/{state['process_count']} on {socket.gethostname()} "
            f"[{state['mode']}]: {state['local_devices']} local / {state['global_devices']} global "
            f"{state['platform']} devices")
    if state.get("coordinator"):
        line += f", coordinator {state['coordinator']}"
    return line


# ----------------------------------------------------------------------------------------------------------------
# smoke test


def check() -> dict[str, Any]:
    """Initialise from the environment and sum across processes two ways; returns this process's report.

    `device_sum`: a jitted sum over an array sharded across a 1-D mesh of every global device, each device holding
    its own process's index (so N processes with D devices each give D * (0 + ... + N-1)). `process_sum`: the sum
    of `multihost_utils.process_allgather` of the process indices (0 + ... + N-1).
    """
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    info = initialize()
    me = jax.process_index()
    devices = jax.devices()
    mesh = Mesh(np.asarray(devices), ("devices",))
    x = jax.make_array_from_callback((len(devices),), NamedSharding(mesh, PartitionSpec("devices")),
                                     lambda index: np.full((1,), me, np.int32))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(x)
    device_sum = int(np.asarray(total.addressable_data(0)))
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(me, np.int32)))
    process_sum = int(gathered.sum())
    n = jax.process_count()
    report = {**info, "host": socket.gethostname(),
              "device_sum": device_sum, "device_sum_expected": sum(d.process_index for d in devices),
              "process_sum": process_sum, "process_sum_expected": n * (n - 1) // 2}
    report["ok"] = (report["device_sum"] == report["device_sum_expected"]
                    and report["process_sum"] == report["process_sum_expected"])
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m magdiff_jax.distributed",
        description="Multi-process smoke test: initialise JAX from the environment (MAGDIFF_* variables, TPU pod, "
                    "SLURM, Open MPI, or one process) and sum across all processes.")
    parser.add_argument("--check", action="store_true",
                        help="print one JSON line for this process (process index/count, devices, cross-process "
                             "sums); exit 0 when the sums are right")
    args = parser.parse_args(argv)
    if not args.check:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: nothing to do (use --check)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    report = check()
    print(json.dumps(report, sort_keys=True), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    code = main()
    exit_multiprocess(code)
    sys.exit(code)
