"""The launch scripts: every `--config configs/X.py:VARIANT` example in them and the READMEs loads, and their dry
runs (DRY_RUN=1) print the commands they would run: tpu_pod.sh installs first, then starts detached with a log per
worker (the remote command is also run here, on this machine, as a worker would), slurm_gpu.sbatch passes
--cpus-per-task and the GPU binding to srun in both task layouts."""

import importlib.util
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
EXAMPLE_FILES = [*sorted(LAUNCH.glob("*.sh")), LAUNCH / "slurm_gpu.sbatch", LAUNCH / "README.md", ROOT / "README.md"]
CONFIG = re.compile(r"configs/(\w+)\.py:(\w+)")
PLACEHOLDER = ("X", "VARIANT")  # configs/X.py:VARIANT, the usage line


def _examples() -> dict[tuple[str, str], list[str]]:
    """(config file, variant) -> the files that name it."""
    found: dict[tuple[str, str], list[str]] = {}
    for path in EXAMPLE_FILES:
        for match in CONFIG.finditer(path.read_text()):
            if match.groups() != PLACEHOLDER:
                found.setdefault(match.groups(), []).append(str(path.relative_to(ROOT)))
    return found


def test_every_config_example_exists_and_loads():
    """Each `configs/X.py:VARIANT` in launch/*.sh, launch/slurm_gpu.sbatch, launch/README.md and README.md names a
    config file that exists and whose get_config(VARIANT) returns a config with a mesh (as `--config` loads it)."""
    examples = _examples()
    named_in = {name for names in examples.values() for name in names}
    assert named_in == {str(p.relative_to(ROOT)) for p in EXAMPLE_FILES}, named_in  # each file read, each has some
    for (file, variant), where in sorted(examples.items()):
        path = ROOT / "configs" / f"{file}.py"
        assert path.is_file(), f"configs/{file}.py (named in {where}) does not exist"
        spec = importlib.util.spec_from_file_location(f"launch_example_{file}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config(variant)
        assert "mesh" in config and "mesh_dcn" in config, (file, variant)


def test_every_magdiff_jax_example_names_a_command():
    """`magdiff-jax WORD` in the same files: WORD is one of the CLI's commands."""
    from magdiff_jax.cli import COMMANDS

    words = {(m.group(1), p.name) for p in EXAMPLE_FILES for m in re.finditer(r"magdiff-jax ([\w-]+)", p.read_text())}
    assert {w for w, _ in words} >= {"train"}
    assert all(word in COMMANDS for word, _ in words), sorted(words)


def _dry_run(script, *args, **env) -> list[list[str]]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TPU_", "ZONE", "LOG_DIR", "VENV"))}
    proc = subprocess.run(["bash", str(LAUNCH / script), *args], env={**full, "DRY_RUN": "1", **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.strip()]


def _remote(words: list[str]) -> str:
    assert words[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], words
    return words[words.index("--command") + 1]


TRAIN = ["magdiff-jax", "train", "--config", "configs/magdiff.py:base", "--workdir", "gs://bucket/runs/a b"]


def test_tpu_pod_installs_then_starts_detached_with_a_log_per_worker():
    install, start = _dry_run("tpu_pod.sh", "-n", "my-tpu", "-z", "us-east5-a", "-s", "-x", "--internal-ip", "--",
                              *TRAIN)
    for words in (install, start):
        assert words[5:9] == ["my-tpu", "--zone", "us-east5-a", "--worker=all"] and words[-1] == "--internal-ip"
    assert "pip install --quiet -e '.[tpu]'" in _remote(install) and "setsid" not in _remote(install)
    remote = _remote(start)
    assert "pip install" not in remote
    assert ("MAGDIFF_DISTRIBUTED=auto setsid nohup magdiff-jax train --config configs/magdiff.py:base --workdir "
            "'gs://bucket/runs/a b' >\"$HOME\"/magdiff_logs/$(hostname).log 2>&1 </dev/null &") in remote
    assert 'echo $! >"$HOME"/magdiff_logs/$(hostname).pid' in remote
    [start] = _dry_run("tpu_pod.sh", "-n", "t", "-z", "z", "-l", "/data/logs", "--", *TRAIN, LOG_DIR="ignored")
    assert ">/data/logs/$(hostname).log 2>&1 </dev/null &" in _remote(start)
    [attached] = _dry_run("tpu_pod.sh", "-F", "--", "python", "-m", "magdiff_jax.distributed", "--check",
                          TPU_NAME="t", ZONE="z")
    assert _remote(attached).endswith("exec python -m magdiff_jax.distributed --check")
    [stop] = _dry_run("tpu_pod.sh", "-n", "t", "-z", "z", "-k")
    assert "kill -TERM -- -$pid" in _remote(stop)


def _wait_for(check, seconds=30.0):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_tpu_pod_remote_commands_run_detached_and_stop(tmp_path):
    """The start command, run by a shell here as ssh runs it on a worker, returns at once and leaves the command
    running in a session of its own, writing LOG_DIR/<hostname>.log; a second start refuses while it runs; the stop
    command ends it."""
    (tmp_path / "magdiff_jax").mkdir()
    program = "import time; print('worker up', flush=True); time.sleep(120)"
    [start] = _dry_run("tpu_pod.sh", "-n", "t", "-z", "z", "--", sys.executable, "-c", program)
    [stop] = _dry_run("tpu_pod.sh", "-n", "t", "-z", "z", "-k")
    env = {**os.environ, "HOME": str(tmp_path)}
    log = tmp_path / "magdiff_logs" / f"{socket.gethostname()}.log"
    pidfile = log.with_suffix(".pid")
    pid = None
    try:
        t0 = time.monotonic()
        first = subprocess.run(["bash", "-c", _remote(start)], env=env, capture_output=True, text=True, timeout=30)
        assert first.returncode == 0 and time.monotonic() - t0 < 10, first.stderr
        pid = int(pidfile.read_text())
        assert f"started process group {pid}" in first.stdout
        assert _wait_for(lambda: "worker up" in log.read_text()), log.read_text()
        assert os.getsid(pid) == pid and os.getpgid(pid) == pid  # setsid: its own session and process group
        again = subprocess.run(["bash", "-c", _remote(start)], env=env, capture_output=True, text=True, timeout=30)
        assert again.returncode == 1 and "still running" in again.stderr
        stopped = subprocess.run(["bash", "-c", _remote(stop)], env=env, capture_output=True, text=True, timeout=30)
        assert f"sent SIGTERM to process group {pid}" in stopped.stdout

        def gone():
            try:
                os.kill(pid, 0)
                return False
            except ProcessLookupError:
                return True

        assert _wait_for(gone)
        pid = None
    finally:
        if pid is not None:
            os.killpg(pid, signal.SIGKILL)


SLURM_JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[01-02]",
             "SLURM_SUBMIT_DIR": str(ROOT)}


@pytest.mark.parametrize("tasks_per_node, gpus, cpus", [(1, 8, 32), (8, 1, 12)])
def test_slurm_srun_gets_cpus_per_task_and_the_gpu_binding(tasks_per_node, gpus, cpus):
    """One task per node (8 GPUs each) and one task per GPU: srun gets --cpus-per-task (not inherited since SLURM
    22.05), --gpus-per-task and --gpu-bind=per_task, and JAX uses every GPU its task sees."""
    env = {**SLURM_JOB, "SLURM_NTASKS": str(2 * tasks_per_node), "SLURM_NTASKS_PER_NODE": str(tasks_per_node),
           "SLURM_GPUS_PER_TASK": str(gpus), "SLURM_CPUS_PER_TASK": str(cpus), "CHECK_FIRST": "1"}
    lines = _dry_run("slurm_gpu.sbatch", "configs/magdiff.py:base", "/shared/runs/a b", "--config.steps=10", **env)
    assert ["export", f"JAX_LOCAL_DEVICE_IDS={','.join(map(str, range(gpus)))}"] in lines
    check, train = [words for words in lines if words[0] == "srun"]
    resources = ["--kill-on-bad-exit=1", f"--cpus-per-task={cpus}", f"--gpus-per-task={gpus}",
                 f"--gpu-bind=per_task:{gpus}"]
    assert check == ["srun", *resources, "python", "-m", "magdiff_jax.distributed", "--check"]
    assert train == ["srun", *resources, "magdiff-jax", "train", "--config", "configs/magdiff.py:base", "--workdir",
                     "/shared/runs/a b", "--config.steps=10"]
    header = (LAUNCH / "slurm_gpu.sbatch").read_text()
    assert "#SBATCH --cpus-per-task=" in header and "#SBATCH --gpus-per-task=8" in header


def test_local_multiprocess_dry_run_prints_each_process():
    lines = _dry_run("local_multiprocess.sh", "-n", "2", "-g", "2", "-p", "23456", "--", "magdiff-jax", "train",
                     "--config", "configs/t2i.py:tiny", "--workdir", "/tmp/run", CUDA_VISIBLE_DEVICES="4,5,6,7")
    assert lines == [["MAGDIFF_COORDINATOR=localhost:23456", "MAGDIFF_NUM_PROCESSES=2", f"MAGDIFF_PROCESS_ID={i}",
                      f"CUDA_VISIBLE_DEVICES={visible}", "magdiff-jax", "train", "--config", "configs/t2i.py:tiny",
                      "--workdir", "/tmp/run"] for i, visible in ((0, "4,5"), (1, "6,7"))]
