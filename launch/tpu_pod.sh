#!/usr/bin/env bash
# Start one command on every worker of a Cloud TPU VM (a pod slice has several) through
# `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command ...`, detached: each worker runs it under
# setsid/nohup with its output in LOG_DIR/<worker hostname>.log, so a dropped ssh connection does not stop it.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh -s -- \
#       magdiff-jax train --config configs/magdiff.py:base --workdir gs://my-bucket/runs/magdiff
#   launch/tpu_pod.sh -n my-v5p-64 -z us-east5-a -F -- python -m magdiff_jax.distributed --check
#   launch/tpu_pod.sh -n my-v5p-64 -z us-east5-a -k          # stop: SIGTERM, the trainer saves a checkpoint
#
# Usage: tpu_pod.sh [options] -- COMMAND...   or   tpu_pod.sh [options] -k
#   (options, or the environment variable in brackets)
#   -n NAME     TPU VM name                                        [TPU_NAME]  required
#   -z ZONE     its zone                                           [ZONE]      required
#   -P PROJECT  Google Cloud project                               [PROJECT]   default: gcloud's own setting
#   -r DIR      the repository's checkout on every worker          [REPO_DIR]  default: ~/magdiff_jax
#   -v VENV     virtual environment to activate on every worker    [VENV]      default: none
#   -l DIR      log folder on every worker                         [LOG_DIR]   default: ~/magdiff_logs
#   -s          install first, as a step of its own that must       [SETUP=1]
#               succeed on every worker: pip install -e ".[tpu]" in DIR
#   -F          run attached instead: output streams back, the      [FOREGROUND=1]
#               command ends with the ssh session (smoke tests)
#   -k          stop the detached command on every worker (SIGTERM to its process group)
#   -x FLAG     one more flag for gcloud's ssh, repeatable (e.g. -x --internal-ip)
#   -h          this help
#   DRY_RUN=1   print the gcloud commands instead of running them, and exit 0
#
# The command runs in DIR on every worker with MAGDIFF_DISTRIBUTED=auto: on a TPU pod, JAX finds the other
# workers by itself (jax.distributed.initialize() without arguments), so no coordinator is passed. The code must
# already be in DIR on every worker (git clone, or gcloud compute tpus tpu-vm scp --worker=all), and the trainer's
# --workdir must be storage every worker sees (gs://...). Arguments are quoted one by one; for a pipeline or
# several commands pass `bash -c '...'`. A worker whose previous command still runs (LOG_DIR/<hostname>.pid) refuses
# to start another.

set -euo pipefail

usage() {
    sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;};}' "$0"
}

die() {
    echo "tpu_pod.sh: $*" >&2
    echo "usage: tpu_pod.sh -n TPU_NAME -z ZONE [-P PROJECT] [-r REPO_DIR] [-v VENV] [-l LOG_DIR] [-s] [-F] [-k]" \
         "[-x GCLOUD_FLAG] -- COMMAND..." >&2
    exit 2
}

name=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
# shellcheck disable=SC2088  # the ~ is for the remote shell (see remote_path)
repo_dir=${REPO_DIR:-"~/magdiff_jax"}
venv=${VENV:-}
# shellcheck disable=SC2088
log_dir=${LOG_DIR:-"~/magdiff_logs"}
setup=${SETUP:-0}
foreground=${FOREGROUND:-0}
stop=0
extra=()

while getopts ":n:z:P:r:v:l:sFkx:h" opt; do
    case $opt in
        n) name=$OPTARG ;;
        z) zone=$OPTARG ;;
        P) project=$OPTARG ;;
        r) repo_dir=$OPTARG ;;
        v) venv=$OPTARG ;;
        l) log_dir=$OPTARG ;;
        s) setup=1 ;;
        F) foreground=1 ;;
        k) stop=1 ;;
        x) extra+=("$OPTARG") ;;
        h) usage; exit 0 ;;
        :) die "option -$OPTARG needs a value" ;;
        *) die "unknown option -$OPTARG" ;;
    esac
done
shift $((OPTIND - 1))
[[ ${1:-} == "--" ]] && shift
if [[ $stop == 1 ]]; then
    [[ $# -eq 0 ]] || die "-k takes no command"
else
    [[ $# -gt 0 ]] || die "no command given (put it after --)"
fi
[[ -n $name ]] || die "the TPU name is missing (-n NAME or TPU_NAME)"
[[ -n $zone ]] || die "the zone is missing (-z ZONE or ZONE)"

# A path for the remote shell: a leading ~/ becomes "$HOME"/ (expanded there), the rest is quoted.
remote_path() {
    if [[ $1 == "~/"* ]]; then
        # shellcheck disable=SC2016  # $HOME is for the remote shell
        printf '"$HOME"/%q' "${1#\~/}"
    else
        printf '%q' "$1"
    fi
}

# Words for a shell line: plain ones as they are, others in single quotes.
quote() {
    local word out=()
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
            out+=("$word")
        else
            out+=("${word@Q}")
        fi
    done
    echo "${out[*]}"
}

# The gcloud line that runs the remote shell command $1 on every worker (or on worker $2)
ssh_args() {
    local args=(compute tpus tpu-vm ssh "$name" --zone "$zone" "--worker=${2:-all}" --command "$1")
    [[ -z $project ]] || args+=(--project "$project")
    ((${#extra[@]} == 0)) || args+=("${extra[@]}")
    quote gcloud "${args[@]}"
}

run_gcloud() {  # $1: what it does (for the log line); the rest: the remote command and worker
    local what=$1
    shift
    local line
    line=$(ssh_args "$@")
    if [[ ${DRY_RUN:-0} == 1 ]]; then
        echo "$line"
        return 0
    fi
    echo "tpu_pod.sh: $what on every worker of $name ($zone)" >&2
    eval "$line"
}

logs=$(remote_path "$log_dir")
# shellcheck disable=SC2016  # $(hostname) is for the remote shell: one log and pid file per worker
pidfile="$logs/\$(hostname).pid"
# shellcheck disable=SC2016
logfile="$logs/\$(hostname).log"

if [[ $stop == 1 ]]; then
    remote="if [ -f $pidfile ]; then pid=\$(cat $pidfile); kill -TERM -- -\$pid 2>/dev/null"
    remote+=" && echo \"\$(hostname): sent SIGTERM to process group \$pid\" || echo \"\$(hostname): \$pid is not running\";"
    remote+=" else echo \"\$(hostname): no $pidfile\"; fi"
    run_gcloud "stopping the command" "$remote"
    exit 0
fi

cd_venv="cd $(remote_path "$repo_dir")"
if [[ -n $venv ]]; then
    cd_venv+=" && source $(remote_path "$venv")/bin/activate"
fi

if [[ $setup == 1 ]]; then
    run_gcloud "installing (pip install -e '.[tpu]')" "set -e; $cd_venv; python -m pip install --quiet -e '.[tpu]'"
fi

command_q=$(quote "$@")
if [[ $foreground == 1 ]]; then
    run_gcloud "running attached" "set -e; $cd_venv; export MAGDIFF_DISTRIBUTED=auto; exec $command_q"
    exit $?
fi

# Detached: setsid makes the command the leader of a new session and process group (its pid is the group id, kept
# in the pid file for -k); nohup and the redirections cut it off from the ssh session's terminal and pipes.
remote="set -e; $cd_venv; mkdir -p $logs"
remote+="; if [ -f $pidfile ] && kill -0 -- -\$(cat $pidfile) 2>/dev/null; then"
remote+=" echo \"\$(hostname): still running (process group \$(cat $pidfile)); stop it first (-k)\" >&2; exit 1; fi"
remote+="; MAGDIFF_DISTRIBUTED=auto setsid nohup $command_q >$logfile 2>&1 </dev/null &"
remote+=" echo \$! >$pidfile; echo \"\$(hostname): started process group \$(cat $pidfile), log $logfile\""
run_gcloud "starting detached" "$remote"

this=("$0" -n "$name" -z "$zone")
[[ -z $project ]] || this+=(-P "$project")
# shellcheck disable=SC2088
[[ $log_dir == "~/magdiff_logs" ]] || this+=(-l "$log_dir")
for flag in ${extra[@]+"${extra[@]}"}; do
    this+=(-x "$flag")
done
cat >&2 <<EOF
tpu_pod.sh: the command runs detached on every worker; each writes $log_dir/<worker hostname>.log
  follow worker 0:  $(ssh_args "tail -f $logfile" 0)
  stop (SIGTERM; the trainer saves a checkpoint and exits):  $(quote "${this[@]}" -k)
EOF
