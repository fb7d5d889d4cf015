#!/usr/bin/env bash
# Trains on a Cloud TPU VM or pod slice: create it, copy and install this checkout on every
# worker, run the same vision_jax.main command on all workers (logs streamed here), delete it.
#
# Usage: launch/tpu_pod.sh [--dry-run] [--keep] [--spot] --name=NAME --zone=ZONE \
#            [--accelerator=v4-32] [--version=tpu-ubuntu2204-base] [--project=PROJECT] \
#            --config=configs/vit_fsdp.py --workdir=gs://BUCKET/runs/NAME [--config.key=value ...]
#
# The workdir must be on GCS (gs://): every worker writes its checkpoint shards there. After a
# preemption, run the same command again: it resumes from the latest checkpoint in the workdir.
# --version is the TPU VM image: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e.
# --keep leaves the TPU running (and skips create if it exists) for a next command.
# DRY_RUN=1 is --dry-run: print the exact gcloud commands instead of running them.
set -euo pipefail

name=""
zone=""
accelerator="v4-32"
version="tpu-ubuntu2204-base"
project=""
keep=0
spot=0
dry_run="${DRY_RUN:-0}"
main_args=()
config=""
workdir=""

usage() { sed -n '2,13s/^# \{0,1\}//p' "$0"; }
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

while (($#)); do
  case "$1" in
    --dry-run) dry_run=1 ;;
    --keep) keep=1 ;;
    --spot) spot=1 ;;
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}"; main_args+=("$1") ;;
    --workdir=*) workdir="${1#*=}"; main_args+=("$1") ;;
    -h|--help) usage; exit 0 ;;
    --*) main_args+=("$1") ;;
    *) die "unexpected argument '$1' (flags are --key=value)." ;;
  esac
  shift
done

[[ -n "$name" ]] || die "--name=TPU_NAME is required."
[[ -n "$zone" ]] || die "--zone=ZONE is required (e.g. us-central2-b for v4, us-west4-a for v5e)."
[[ -n "$config" ]] || die "--config=configs/<name>.py is required."
[[ "$workdir" == gs://* ]] || die "--workdir must be a gs:// path that every worker can write, got '$workdir'."
repo="$(cd "$(dirname "$0")/.." && pwd)"
[[ -f "$repo/$config" ]] || die "config '$config' is not a file in $repo (give it relative to the checkout)."
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
if [[ -n "$project" ]]; then
  where+=("--project=$project")
fi
archive="/tmp/vision_jax_${name}.tar.gz"
remote_dir="vision_jax"
remote_python=python3

create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator"
        "--version=$version")
if ((spot)); then
  create+=(--spot)
fi
pack=(tar -czf "$archive" -C "$repo" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info'
      --exclude=.venv pyproject.toml README.md vision_jax configs launch)
copy=("${gcloud_tpu[@]}" scp "$archive" "$name:vision_jax.tar.gz" "${where[@]}" --worker=all)
install_cmd="mkdir -p $remote_dir && tar -xzf vision_jax.tar.gz -C $remote_dir && cd $remote_dir"
install_cmd+=" && $remote_python -m pip install -q 'jax[tpu]>=0.10.2,<0.11' -e ."
install=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$install_cmd")
train_cmd="cd $remote_dir && $remote_python -m vision_jax.main"
for arg in "${main_args[@]}"; do
  train_cmd+=" $(printf '%q' "$arg")"
done
train_cmd+=" --distributed"
train=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$train_cmd")
delete=("${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet)

# Prints a command shell-quoted (dry run) or runs it.
run() {
  if [[ "$dry_run" == 1 ]]; then
    printf '%q' "$1"
    shift
    printf ' %q' "$@"
    echo
  else
    echo "+ $*" >&2
    "$@"
  fi
}

run "${pack[@]}"
if ((keep)) && [[ "$dry_run" != 1 ]] \
    && "${gcloud_tpu[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  echo "tpu_pod.sh: reusing the existing TPU $name." >&2
else
  run "${create[@]}"
fi
if ((!keep)); then
  # shellcheck disable=SC2329  # called by the trap
  cleanup() { run "${delete[@]}"; }
  trap cleanup EXIT
fi
run "${copy[@]}"
run "${install[@]}"
run "${train[@]}"
