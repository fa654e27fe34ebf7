#!/usr/bin/env bash
# Start N JAX processes of one command on this machine: multi-process training and tests without a cluster.
#
#   launch/local_multiprocess.sh -n 2 -d 4 -- magdiff-jax train --config configs/t2i.py:tiny --workdir /tmp/run
#   launch/local_multiprocess.sh 2 -- python -m magdiff_jax.distributed --check
#
# Usage: local_multiprocess.sh (-n N | N) [-d DEVICES_PER_PROCESS] [-g GPUS_PER_PROCESS] [-p PORT] -- COMMAND...
#   -n N     number of processes (or N as the first argument)
#   -d D     D fake CPU devices per process: --xla_force_host_platform_device_count=D is added to XLA_FLAGS
#            (any other XLA_FLAGS are kept); for CPU runs, with JAX_PLATFORMS=cpu
#   -g G     G GPUs per process: process i gets GPUs i*G .. i*G+G-1 (of CUDA_VISIBLE_DEVICES when it is set)
#   -p PORT  coordinator port on localhost (default: a free one)
#   -h       this help
#   DRY_RUN=1  print each process's command line (with its MAGDIFF_* variables) instead, and exit 0
#
# Process i runs COMMAND with MAGDIFF_COORDINATOR=localhost:PORT, MAGDIFF_NUM_PROCESSES=N and
# MAGDIFF_PROCESS_ID=i (magdiff_jax.distributed.initialize reads them). Its output goes to stdout, each
# line prefixed "[i] "; with LOG_DIR set it is also written, unprefixed, to $LOG_DIR/process_i.log.
#
# The script waits for all processes. When one fails, the others get SIGTERM (SIGKILL after KILL_GRACE seconds,
# default 30) and the script exits with the failed process's status. Ctrl-C or SIGTERM to the script is forwarded
# to every process as SIGTERM, so trainers can save a checkpoint; a second one sends SIGKILL.

set -u

usage() {
    sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;};}' "$0"
}

note_fd=2
note() {
    echo "local_multiprocess.sh: $*" >&"$note_fd"
}

die() {
    note "$*"
    echo "usage: local_multiprocess.sh (-n N | N) [-d DEVICES_PER_PROCESS] [-g GPUS_PER_PROCESS] [-p PORT] -- COMMAND..." >&2
    exit 2
}

is_count() {
    [[ $1 =~ ^[0-9]+$ ]] && ((10#$1 > 0))
}

num=""
devices=""
gpus=""
port=""
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    num=$1
    shift
fi
while getopts ":n:d:g:p:h" opt; do
    case $opt in
        n) num=$OPTARG ;;
        d) devices=$OPTARG ;;
        g) gpus=$OPTARG ;;
        p) port=$OPTARG ;;
        h) usage; exit 0 ;;
        :) die "option -$OPTARG needs a value" ;;
        *) die "unknown option -$OPTARG" ;;
    esac
done
shift $((OPTIND - 1))
[[ ${1:-} == "--" ]] && shift
[[ $# -gt 0 ]] || die "no command given (put it after --)"
[[ -n $num ]] || die "the number of processes is missing (-n N)"
is_count "$num" || die "-n: expected a positive integer, got '$num'"
num=$((10#$num))
[[ -z $devices ]] || is_count "$devices" || die "-d: expected a positive integer, got '$devices'"
[[ -z $gpus ]] || is_count "$gpus" || die "-g: expected a positive integer, got '$gpus'"
if [[ -n $port ]]; then
    is_count "$port" && ((10#$port < 65536)) || die "-p: expected a port number, got '$port'"
fi

# A port nothing listens on, below the kernel's ephemeral range so outgoing connections do not take it meanwhile.
free_port() {
    local candidate tries
    for ((tries = 0; tries < 200; tries++)); do
        candidate=$((20000 + RANDOM % 12000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}
if [[ -z $port ]]; then
    port=$(free_port) || die "found no free port; pass one with -p"
fi

if [[ -n $devices ]]; then
    flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/(^|[[:space:]])--xla_force_host_platform_device_count=[^[:space:]]*//g; s/^[[:space:]]+//')
    export XLA_FLAGS="${flags:+$flags }--xla_force_host_platform_device_count=$devices"
fi

gpu_pool=()
if [[ -n $gpus ]]; then
    if [[ -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
        IFS=, read -r -a gpu_pool <<<"$CUDA_VISIBLE_DEVICES"
    else
        for ((k = 0; k < num * gpus; k++)); do gpu_pool+=("$k"); done
    fi
    ((${#gpu_pool[@]} >= num * gpus)) ||
        die "-g $gpus with $num processes needs $((num * gpus)) GPUs; CUDA_VISIBLE_DEVICES has ${#gpu_pool[@]}"
fi

if [[ ${DRY_RUN:-0} == 1 ]]; then  # each process's command line with its environment, then exit
    for ((i = 0; i < num; i++)); do
        line=(MAGDIFF_COORDINATOR="localhost:$port" MAGDIFF_NUM_PROCESSES="$num" MAGDIFF_PROCESS_ID="$i")
        [[ -z $devices ]] || line+=(XLA_FLAGS="$XLA_FLAGS")
        if [[ -n $gpus ]]; then
            line+=(CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${gpu_pool[*]:i * gpus:gpus}")")
        fi
        printf '%q ' "${line[@]}" "$@"
        echo
    done
    exit 0
fi

if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR" || die "cannot create LOG_DIR=$LOG_DIR"
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/magdiff_launch.XXXXXX") || die "mktemp failed"

# Every background job gets its own process group, so a signal reaches a command together with its children.
set -m

pids=()      # the commands
pipers=()    # their output prefixers
finished=()  # finished[i]=1 once process i has exited
remaining=0  # processes started and not yet finished
status=0
interrupted=0
stop_time=""
killed=""

prefix() {
    local line
    while IFS= read -r line || [[ -n $line ]]; do
        printf '[%s] %s\n' "$1" "$line"
    done
}

signal_running() {  # $1: signal name
    local idx
    for idx in "${!pids[@]}"; do
        [[ -n ${finished[idx]:-} ]] || kill -"$1" -- "-${pids[idx]}" 2>/dev/null || kill -"$1" "${pids[idx]}" 2>/dev/null
    done
}

stop_all() {
    if [[ -z $stop_time ]]; then
        stop_time=$SECONDS
        signal_running TERM
    elif [[ -z $killed ]]; then
        killed=1
        signal_running KILL
    fi
}

on_signal() {  # $1: signal name, $2: exit status to report
    note "got SIG$1; sending SIGTERM to all processes (again: SIGKILL)"
    ((interrupted)) || interrupted=$2
    stop_all
}

cleanup() {
    signal_running KILL
    local pid
    for pid in "${pipers[@]}"; do
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null
    done
    rm -rf "$tmp"
}

trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM
trap cleanup EXIT

note "$num processes, coordinator localhost:$port${devices:+, $devices CPU devices each}${gpus:+, $gpus GPUs each}"

for ((i = 0; i < num; i++)); do
    ((interrupted == 0)) || break
    fifo="$tmp/process_$i"
    mkfifo "$fifo" || die "mkfifo failed"
    if [[ -n ${LOG_DIR:-} ]]; then
        tee "$LOG_DIR/process_$i.log" <"$fifo" | prefix "$i" &
    else
        prefix "$i" <"$fifo" &
    fi
    pipers+=("$!")
    (
        export MAGDIFF_COORDINATOR="localhost:$port" MAGDIFF_NUM_PROCESSES="$num" MAGDIFF_PROCESS_ID="$i"
        if [[ -n $gpus ]]; then
            visible=$(IFS=,; echo "${gpu_pool[*]:i * gpus:gpus}")
            export CUDA_VISIBLE_DEVICES="$visible"
        fi
        trap - INT TERM EXIT
        exec "$@"
    ) >"$fifo" 2>&1 </dev/null &
    pids+=("$!")
    remaining=$((remaining + 1))
done
set +m  # the process groups stay
# Bash's own job notices ("Killed ...") go nowhere from here on; the script's notes keep the real stderr (fd 3).
exec 3>&2 2>/dev/null
note_fd=3

grace=${KILL_GRACE:-30}
while ((remaining > 0)); do
    for idx in "${!pids[@]}"; do
        [[ -z ${finished[idx]:-} ]] || continue
        kill -0 "${pids[idx]}" 2>/dev/null && continue
        wait "${pids[idx]}"
        rc=$?
        finished[idx]=1
        remaining=$((remaining - 1))
        if ((rc != 0 && status == 0)); then
            status=$rc
            if ((remaining > 0)) && [[ -z $stop_time ]]; then
                note "process $idx exited with status $rc; stopping the others"
                stop_all
            fi
        fi
    done
    if [[ -n $stop_time && -z $killed ]] && ((remaining > 0 && SECONDS - stop_time >= grace)); then
        note "processes still running ${grace}s after SIGTERM; sending SIGKILL"
        stop_all
    fi
    ((remaining > 0)) && sleep 0.2
done

# Let the prefixers print the last lines (bounded: a stray child may still hold a pipe open).
for ((tries = 0; tries < 50; tries++)); do
    alive=0
    for pid in "${pipers[@]}"; do
        kill -0 "$pid" 2>/dev/null && alive=1
    done
    ((alive)) || break
    sleep 0.1
done

if ((interrupted)); then
    exit "$interrupted"
fi
if ((status != 0)); then
    note "failed (status $status)"
fi
exit "$status"
