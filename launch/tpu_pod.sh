#!/usr/bin/env bash
# Run one command on every worker of a Cloud TPU VM (a pod slice has several), all at once, through
# `gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command ...`.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh -- \
#       magdiff-jax train --config configs/t2v.py:base --workdir gs://my-bucket/runs/t2v
#   launch/tpu_pod.sh -n my-v5p-64 -z us-east5-a -s -- python -m magdiff_jax.train.distributed --check
#
# Usage: tpu_pod.sh [options] -- COMMAND...      (options, or the environment variable in brackets)
#   -n NAME     TPU VM name                                        [TPU_NAME]  required
#   -z ZONE     its zone                                           [ZONE]      required
#   -P PROJECT  Google Cloud project                               [PROJECT]   default: gcloud's own setting
#   -r DIR      the repository's checkout on every worker          [REPO_DIR]  default: ~/magdiff_jax
#   -v VENV     virtual environment to activate on every worker    [VENV]      default: none
#   -s          set up first: pip install -e ".[tpu]" in DIR        [SETUP=1]
#   -x FLAG     one more flag for gcloud's ssh, repeatable (e.g. -x --internal-ip)
#   -h          this help
#
# The command runs in DIR on every worker with MAGDIFF_DISTRIBUTED=auto: on a TPU pod, JAX finds the other
# workers by itself (jax.distributed.initialize() without arguments), so no coordinator is passed. The code must
# already be in DIR on every worker (git clone, or gcloud compute tpus tpu-vm scp --worker=all), and the trainer's
# --workdir must be storage every worker sees (gs://...). Arguments are quoted one by one; for a pipeline or
# several commands pass `bash -c '...'`.

set -euo pipefail

usage() {
    sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;};}' "$0"
}

die() {
    echo "tpu_pod.sh: $*" >&2
    echo "usage: tpu_pod.sh -n TPU_NAME -z ZONE [-P PROJECT] [-r REPO_DIR] [-v VENV] [-s] [-x GCLOUD_FLAG] -- COMMAND..." >&2
    exit 2
}

name=${TPU_NAME:-}
zone=${ZONE:-}
project=${PROJECT:-}
# shellcheck disable=SC2088  # the ~ is for the remote shell (see remote_path)
repo_dir=${REPO_DIR:-"~/magdiff_jax"}
venv=${VENV:-}
setup=${SETUP:-0}
extra=()

while getopts ":n:z:P:r:v:sx:h" opt; do
    case $opt in
        n) name=$OPTARG ;;
        z) zone=$OPTARG ;;
        P) project=$OPTARG ;;
        r) repo_dir=$OPTARG ;;
        v) venv=$OPTARG ;;
        s) setup=1 ;;
        x) extra+=("$OPTARG") ;;
        h) usage; exit 0 ;;
        :) die "option -$OPTARG needs a value" ;;
        *) die "unknown option -$OPTARG" ;;
    esac
done
shift $((OPTIND - 1))
[[ ${1:-} == "--" ]] && shift
[[ $# -gt 0 ]] || die "no command given (put it after --)"
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

remote="set -e; cd $(remote_path "$repo_dir")"
if [[ -n $venv ]]; then
    remote+="; source $(remote_path "$venv")/bin/activate"
fi
if [[ $setup == 1 ]]; then
    remote+="; python -m pip install --quiet -e '.[tpu]'"
fi
printf -v command_q '%q ' "$@"
remote+="; export MAGDIFF_DISTRIBUTED=auto; exec ${command_q% }"

args=(compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$remote")
if [[ -n $project ]]; then
    args+=(--project "$project")
fi
if ((${#extra[@]})); then
    args+=("${extra[@]}")
fi

echo "tpu_pod.sh: on every worker of $name ($zone): $remote" >&2
exec gcloud "${args[@]}"
