#!/usr/bin/env bash
# Runs N processes of vision_jax.main on this machine, joined through a coordinator on
# 127.0.0.1: the multi-host code path (process-sharded data, joint checkpoints) on one CPU box.
#
# Usage: launch/local.sh [--dry-run] [-n PROCESSES] [-d CPU_DEVICES_PER_PROCESS] [-p PORT] \
#            --config=configs/digits_pretrain.py --workdir=/tmp/vj_local [--config.key=value ...]
#
# Every argument from --config on goes to each process unchanged. Each process's output is
# prefixed with [pN]. If one process fails, the others are stopped. DRY_RUN=1 is --dry-run:
# print the exact commands instead of running them.
set -euo pipefail

num_processes=2
cpu_devices=2
port=""
dry_run="${DRY_RUN:-0}"

usage() { sed -n '2,10s/^# \{0,1\}//p' "$0"; }

while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -n|--num-processes) num_processes="$2"; shift 2 ;;
    -d|--cpu-devices) cpu_devices="$2"; shift 2 ;;
    -p|--port) port="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done

if (($# == 0)); then
  echo "local.sh: error: pass vision_jax.main's flags (--config=... --workdir=...)." >&2
  exit 2
fi
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ && "$cpu_devices" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: error: -n and -d take positive integers." >&2
  exit 2
fi
python="${PYTHON:-python3}"
if [[ -z "$port" ]]; then
  port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

# Sets cmd to process $1's command line.
command_for() {
  cmd=(env JAX_PLATFORMS=cpu "$python" -m vision_jax.main "${main_args[@]}"
       "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes"
       "--process_id=$1" "--num_cpu_devices=$cpu_devices")
}
main_args=("$@")

if [[ "$dry_run" == 1 ]]; then
  for ((i = 0; i < num_processes; i++)); do
    command_for "$i"
    printf '%q' "${cmd[0]}"
    printf ' %q' "${cmd[@]:1}"
    echo
  done
  exit 0
fi

pids=()
# shellcheck disable=SC2329  # called by the trap
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap stop_all EXIT INT TERM

for ((i = 0; i < num_processes; i++)); do
  command_for "$i"
  "${cmd[@]}" > >(sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
done

status=0
for ((i = 0; i < num_processes; i++)); do
  if ! wait -n "${pids[@]}"; then
    status=1
    echo "local.sh: a process failed; stopping the others." >&2
    break
  fi
done
exit "$status"
