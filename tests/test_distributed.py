"""Multi-process start-up: resolving the layout, and two real JAX processes via launch/local_multiprocess.sh."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

from magdiff_jax import distributed
from magdiff_jax.distributed import resolve

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "local_multiprocess.sh"

ENV2 = {"MAGDIFF_COORDINATOR": "localhost:12345", "MAGDIFF_NUM_PROCESSES": "2", "MAGDIFF_PROCESS_ID": "1"}
SLURM4 = {"SLURM_JOB_ID": "777", "SLURM_STEP_NODELIST": "node[01-04]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
          "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "4"}
OMPI2 = {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "1",
         "OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:4000"}


def _launch(*args, env=None, timeout=120):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    for key in ("MAGDIFF_COORDINATOR", "MAGDIFF_NUM_PROCESSES", "MAGDIFF_PROCESS_ID", "MAGDIFF_DISTRIBUTED"):
        env.pop(key, None)
    return subprocess.run(["bash", str(LAUNCH), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


# ------------------------------------------------------------------------------------------------------------------
# the launcher, with real processes


def test_two_processes_sum_across_processes():
    proc = _launch("-n", "2", "-d", "2", "--", sys.executable, "-m", "magdiff_jax.distributed", "--check")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = {}
    for line in proc.stdout.splitlines():
        tag, _, rest = line.partition(" ")
        if rest.startswith("{"):
            # the JSON object alone: the CPU collectives' library (Gloo) writes its own connection messages to the
            # same stdout, and one can land on the end of this line
            reports[int(tag.strip("[]"))] = json.JSONDecoder().raw_decode(rest)[0]
    assert sorted(reports) == [0, 1], proc.stdout
    for i, r in reports.items():
        assert r["process_index"] == i
        assert r["process_count"] == 2
        assert r["mode"] == "env"
        assert (r["local_devices"], r["global_devices"]) == (2, 4)
        assert r["process_sum"] == 0 + 1  # process indices, gathered from both processes
        assert r["device_sum"] == 2 * (0 + 1)  # a sum over 4 devices, each holding its process's index
        assert r["ok"] is True


# Under absl.app as `magdiff-jax` runs: its logging set-up, then distributed.initialize, then the default mesh
MESH_AND_LOGS = """
import json, logging
from absl import app

def body(argv):
    import jax
    from magdiff_jax import cli, sharding
    from magdiff_jax import distributed
    cli.setup_logging()
    logging.info("info before initialize")
    distributed.initialize()
    logging.info("info after initialize")
    logging.warning("warning after initialize")
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    devices = mesh.devices  # MESH_AXES order: data, fsdp, tensor, context
    report = {"process": jax.process_index(), "shape": dict(mesh.shape),
              "data": [sorted({d.process_index for d in devices[i].flat}) for i in range(devices.shape[0])],
              "tensor": [sorted({d.process_index for d in devices[i, 0, :, 0]}) for i in range(devices.shape[0])]}
    print("MESH " + json.dumps(report), flush=True)
    import numpy as np
    full = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # every process holds all rows
    x = distributed.rows_over_devices({"x": full})["x"]
    y = distributed.to_host(jax.jit(lambda a: a * 2)(x))
    rows = {"split": not x.is_fully_addressable, "local_rows": sorted(int(s.data[0, 0]) // 3 for s in
            x.addressable_shards), "equal": bool(np.array_equal(y, full * 2))}
    print("ROWS " + json.dumps(rows), flush=True)
    distributed.exit_multiprocess(0)

app.run(body)
"""


@pytest.fixture(scope="module")
def mesh_and_logs():
    """2 processes x 2 CPU devices: stdout (each line prefixed by its process, stderr merged)."""
    proc = _launch("-n", "2", "-d", "2", "--", sys.executable, "-c", MESH_AND_LOGS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_hybrid_mesh_spans_processes_with_data_and_keeps_tensor_local(mesh_and_logs):
    """The default mesh_dcn (data over the processes, CPU devices: processes are the granules): each index of the
    data axis lies within one process, the two data halves in different processes, each tensor pair within one."""
    reports = {}
    for line in mesh_and_logs.splitlines():
        tag, _, rest = line.partition(" ")
        if rest.startswith("MESH "):
            reports[int(tag.strip("[]"))] = json.JSONDecoder().raw_decode(rest[5:])[0]
    assert sorted(reports) == [0, 1], mesh_and_logs
    for r in reports.values():
        assert r["shape"] == {"data": 2, "fsdp": 1, "tensor": 2, "context": 1}
        assert r["data"] == [[0], [1]]
        assert r["tensor"] == [[0], [1]]


def test_sampling_rows_split_over_processes_and_gather_back(mesh_and_logs):
    """distributed.rows_over_devices / to_host (MagDiffPipeline's multi-device batch and output): each process gives
    its own 2 devices their 2 of 8 rows, and the result, on devices of both processes, comes back whole to each."""
    reports = {}
    for line in mesh_and_logs.splitlines():
        tag, _, rest = line.partition(" ")
        if rest.startswith("ROWS "):
            reports[int(tag.strip("[]"))] = json.JSONDecoder().raw_decode(rest[5:])[0]
    assert reports == {0: {"split": True, "local_rows": [0, 2], "equal": True},
                       1: {"split": True, "local_rows": [4, 6], "equal": True}}, mesh_and_logs


def test_info_logs_from_process_0_only(mesh_and_logs):
    """After distributed.initialize, INFO lines appear from process 0 alone; warnings from every process (before
    it the process index is unknown, and both log)."""
    lines = mesh_and_logs.splitlines()

    def logged(process, text):
        return any(line.startswith(f"[{process}] ") and line.endswith(text) for line in lines)

    assert logged(0, "info after initialize") and not logged(1, "info after initialize"), mesh_and_logs
    assert logged(0, "warning after initialize") and logged(1, "warning after initialize")
    assert logged(0, "info before initialize") and logged(1, "info before initialize")


def test_one_failure_stops_the_others_and_fails_the_launch(tmp_path):
    command = ("import os, sys, time\n"
               "print('started', os.environ['MAGDIFF_PROCESS_ID'], flush=True)\n"
               "if os.environ['MAGDIFF_PROCESS_ID'] == '1': sys.exit(3)\n"
               "time.sleep(60)\n")
    start = time.monotonic()
    proc = _launch("-n", "2", "--", sys.executable, "-c", command, env={"LOG_DIR": str(tmp_path)})
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert time.monotonic() - start < 30  # process 0 was stopped, not waited for
    assert "process 1 exited with status 3" in proc.stderr
    assert "[1] started 1" in proc.stdout
    assert (tmp_path / "process_1.log").read_text() == "started 1\n"
    assert (tmp_path / "process_0.log").read_text() == "started 0\n"


def test_launcher_sets_the_environment_and_keeps_xla_flags():
    proc = _launch("3", "-d", "5", "--", "bash", "-c",
                   'echo "$MAGDIFF_PROCESS_ID/$MAGDIFF_NUM_PROCESSES $MAGDIFF_COORDINATOR $XLA_FLAGS"',
                   env={"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=8"})
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert [line.split()[:2] for line in lines] == [["[0]", "0/3"], ["[1]", "1/3"], ["[2]", "2/3"]]
    for line in lines:
        assert line.split()[2].startswith("localhost:")
        assert line.endswith("--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=5")


@pytest.mark.parametrize("args", [("-n", "2"), ("-n", "0", "--", "true"), ("-q", "--", "true"), ("--", "true")])
def test_launcher_usage_errors(args):
    assert _launch(*args).returncode == 2


# ------------------------------------------------------------------------------------------------------------------
# resolution order (pure: nothing is initialised)


def test_nothing_set_is_one_process():
    plan = resolve({})
    assert (plan["mode"], plan["initialize"], plan["num_processes"], plan["process_id"]) == ("single", False, 1, 0)


def test_environment_variables():
    plan = resolve(ENV2)
    assert plan["mode"] == "env" and plan["initialize"]
    assert (plan["coordinator"], plan["num_processes"], plan["process_id"]) == ("localhost:12345", 2, 1)
    assert plan["cluster_detection_method"] == "deactivate"


def test_arguments_override_the_environment_key_by_key():
    plan = resolve(ENV2, process_id=0)
    assert plan["mode"] == "explicit"
    assert (plan["coordinator"], plan["num_processes"], plan["process_id"]) == ("localhost:12345", 2, 0)
    plan = resolve(ENV2, coordinator="10.0.0.1:999", num_processes=4, process_id=3)
    assert (plan["coordinator"], plan["num_processes"], plan["process_id"]) == ("10.0.0.1:999", 4, 3)
    plan = resolve({}, coordinator="h:1", num_processes=2, process_id=0)
    assert plan["mode"] == "explicit" and plan["initialize"]
    # the "unset" values leave the environment in charge
    assert resolve(ENV2, coordinator="", num_processes=0, process_id=-1)["mode"] == "env"
    assert resolve(ENV2, coordinator="", num_processes=None, process_id=None)["mode"] == "env"


def test_explicit_and_environment_settings_win_over_clusters():
    assert resolve({**SLURM4, **OMPI2}, coordinator="h:1", num_processes=2, process_id=1)["mode"] == "explicit"
    assert resolve({**SLURM4, **OMPI2, "TPU_WORKER_HOSTNAMES": "a,b", **ENV2})["mode"] == "env"


def test_one_process_needs_no_initialisation():
    plan = resolve({"MAGDIFF_NUM_PROCESSES": "1"})
    assert (plan["mode"], plan["initialize"], plan["process_id"]) == ("env", False, 0)
    plan = resolve({}, coordinator="localhost:1", num_processes=1, process_id=0)
    assert (plan["mode"], plan["initialize"]) == ("explicit", False)
    assert plan["notes"]  # the coordinator is unused


def test_tpu_pods():
    assert resolve({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2"})["mode"] == "tpu"
    assert resolve({"TPU_PROCESS_ADDRESSES": "a:1,b:1"})["mode"] == "tpu"
    assert resolve({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2", "MEGASCALE_NUM_SLICES": "2"})["mode"] == "tpu"
    assert resolve({"CLOUD_TPU_TASK_ID": "0"})["mode"] == "tpu"
    plan = resolve({"TPU_WORKER_HOSTNAMES": "t-0,t-1"})
    assert plan["initialize"] and plan["coordinator"] is None and plan["cluster_detection_method"] is None
    # one host is not a pod
    assert resolve({"TPU_WORKER_HOSTNAMES": "t-0", "TPU_WORKER_ID": "0"})["mode"] == "single"


def test_slurm():
    plan = resolve(SLURM4)
    assert (plan["mode"], plan["num_processes"], plan["process_id"]) == ("slurm", 4, 2)
    assert plan["cluster_detection_method"] == "slurm"
    assert plan["all_local_gpus"]  # one task per node: all of its GPUs
    assert not resolve({**SLURM4, "SLURM_STEP_NUM_NODES": "1"})["all_local_gpus"]  # 4 tasks on one node
    assert not resolve({**SLURM4, "JAX_LOCAL_DEVICE_IDS": "0,1"})["all_local_gpus"]
    assert resolve({**SLURM4, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"})["mode"] == "single"
    # the batch script itself, outside srun: one process and a warning
    batch = {k: v for k, v in SLURM4.items() if k != "SLURM_STEP_NODELIST"}
    plan = resolve(batch)
    assert plan["mode"] == "single" and not plan["initialize"]
    assert "srun" in plan["notes"][0]
    with pytest.raises(ValueError, match="SLURM_PROCID=4"):
        resolve({**SLURM4, "SLURM_PROCID": "4"})


def test_open_mpi():
    plan = resolve(OMPI2)
    assert (plan["mode"], plan["cluster_detection_method"], plan["num_processes"], plan["process_id"]) == (
        "mpi", "ompi", 2, 1)
    assert plan["all_local_gpus"]
    newer = {k: v for k, v in OMPI2.items() if k != "OMPI_MCA_orte_hnp_uri"}
    plan = resolve({**newer, "OMPI_COMM_WORLD_LOCAL_SIZE": "2"})
    assert plan["cluster_detection_method"] == "mpi4py" and plan["notes"] and not plan["all_local_gpus"]
    assert resolve({**OMPI2, **SLURM4})["mode"] == "mpi"  # mpirun inside an allocation
    assert resolve({"OMPI_COMM_WORLD_SIZE": "1", "OMPI_COMM_WORLD_RANK": "0"})["mode"] == "single"
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK is not"):
        resolve({"OMPI_COMM_WORLD_SIZE": "2"})


def test_magdiff_distributed_switch():
    plan = resolve({"MAGDIFF_DISTRIBUTED": "auto"})
    assert (plan["mode"], plan["initialize"], plan["coordinator"]) == ("auto", True, None)
    assert resolve({"MAGDIFF_DISTRIBUTED": "off", **SLURM4})["mode"] == "single"
    assert resolve({"MAGDIFF_DISTRIBUTED": "off", **ENV2})["mode"] == "env"  # explicit settings still win
    with pytest.raises(ValueError, match="MAGDIFF_DISTRIBUTED='yes'"):
        resolve({"MAGDIFF_DISTRIBUTED": "yes"})


@pytest.mark.parametrize("env, kwargs, message", [
    ({**ENV2, "MAGDIFF_PROCESS_ID": "2"}, {}, r"MAGDIFF_PROCESS_ID=2 is out of range for MAGDIFF_NUM_PROCESSES=2"),
    (ENV2, {"process_id": 5}, r"distributed.process_id=5 is out of range"),
    (ENV2, {"num_processes": 1}, r"MAGDIFF_PROCESS_ID=1 is out of range for distributed.num_processes=1"),
    ({"MAGDIFF_COORDINATOR": "localhost:1"}, {}, r"MAGDIFF_COORDINATOR='localhost:1' is set but the number"),
    ({}, {"coordinator": "h:1"}, r"distributed.coordinator='h:1' is set but the number of processes"),
    ({"MAGDIFF_PROCESS_ID": "0"}, {}, r"MAGDIFF_PROCESS_ID=0 is set but the number of processes"),
    ({"MAGDIFF_NUM_PROCESSES": "2", "MAGDIFF_PROCESS_ID": "0"}, {}, r"MAGDIFF_NUM_PROCESSES=2 needs a coordinator"),
    ({}, {"coordinator": "h:1", "num_processes": 2}, r"distributed.num_processes=2 needs this process's id"),
    ({**ENV2, "MAGDIFF_COORDINATOR": "localhost"}, {}, r"MAGDIFF_COORDINATOR='localhost' is not host:port"),
    ({**ENV2, "MAGDIFF_COORDINATOR": "h:http"}, {}, r"is not host:port"),
    ({**ENV2, "MAGDIFF_NUM_PROCESSES": "two"}, {}, r"MAGDIFF_NUM_PROCESSES='two' is not an integer"),
    ({**ENV2, "MAGDIFF_NUM_PROCESSES": "0"}, {}, r"MAGDIFF_NUM_PROCESSES=0 must be >= 1"),
    ({}, {"num_processes": -2}, r"distributed.num_processes=-2 must be positive"),
    ({}, {"process_id": -3, "num_processes": 2}, r"distributed.process_id=-3 must be >= 0"),
])
def test_inconsistent_settings_name_the_culprit(env, kwargs, message):
    with pytest.raises(ValueError, match=message):
        resolve(env, **kwargs)


def test_local_gpu_count_from_cuda_visible_devices():
    assert distributed._local_gpu_count({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert distributed._local_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert distributed._local_gpu_count({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


# ------------------------------------------------------------------------------------------------------------------
# in this (single) process


def test_initialize_single_process_is_idempotent():
    info = distributed.initialize(env={})
    assert info["mode"] in ("single", "external")
    assert (info["process_index"], info["process_count"]) == (0, 1)
    assert info["global_devices"] == info["local_devices"] == jax.device_count()
    assert distributed.initialize(env={}) == info
    assert distributed.is_main_process()
    distributed.sync("nothing to wait for")
    assert distributed.describe().startswith("process 0/1 on ")
