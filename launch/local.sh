#!/usr/bin/env bash
# Runs N processes of vision_jax.main on this machine, joined through a coordinator on
# 127.0.0.1: the multi-host code path (process-sharded data, joint checkpoints) on one CPU box.
#
# Usage: launch/local.sh [--dry-run] [-n PROCESSES] [-d CPU_DEVICES_PER_PROCESS] [-p PORT] \
#            --config=configs/digits_pretrain.py --workdir=/tmp/vj_local [--config.key=value ...]
#
# Every argument from --config on goes to each process unchanged (the launcher's options come
# first). Each process's output is prefixed with [pN]. SIGTERM or SIGINT (Ctrl-C) is forwarded
# to every process as SIGTERM: they save a checkpoint at a step they agree on and exit 75
# (rerun the same command to resume); a second signal kills them at once. If one process
# fails, the others are sent SIGTERM and, if still alive after GRACE seconds (default 60),
# SIGKILL; the script returns only when every process has ended, with the first non-zero exit
# status (a process's 69, "a peer failed or is gone", gives way to the failure of the peer that
# ends after it). Needs bash >= 5.1. VISION_JAX_DRY_RUN=1 is --dry-run: print the exact commands
# instead of running them.
set -euo pipefail

num_processes=2
cpu_devices=2
port=""
dry_run="${VISION_JAX_DRY_RUN:-0}"
if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 && -z "${VISION_JAX_DRY_RUN:-}" ]]; then
  echo "local.sh: error: DRY_RUN is no longer read (VISION_JAX_DRY_RUN is): set VISION_JAX_DRY_RUN=1 or pass --dry-run to print the commands, or unset DRY_RUN to launch." >&2
  exit 2
fi

usage() { sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "$0"; }  # the header comment

# Exits naming option $1 when it has no value ($2: the arguments left, itself included).
needs_value() {
  if (($2 < 2)); then
    echo "local.sh: error: $1 needs a value." >&2
    exit 2
  fi
}

while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -n|--num-processes) needs_value "$1" $#; num_processes="$2"; shift 2 ;;
    -d|--cpu-devices) needs_value "$1" $#; cpu_devices="$2"; shift 2 ;;
    -p|--port) needs_value "$1" $#; port="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) break ;;
  esac
done

for arg in "$@"; do  # after main's first flag, a launcher option would go to every process
  case "$arg" in
    --dry-run|-n|--num-processes|-d|--cpu-devices|-p|--port|-h|--help)
      echo "local.sh: error: $arg is the launcher's option: put it before vision_jax.main's flags." >&2
      exit 2 ;;
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
if [[ -n "$port" ]] && ! [[ "$port" =~ ^[1-9][0-9]*$ ]]; then
  echo "local.sh: error: -p takes a port number." >&2
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

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  echo "local.sh: error: needs bash >= 5.1 (wait -n -p), this is $BASH_VERSION." >&2
  exit 2
fi
grace="${GRACE:-60}"
pids=()
signalled=0
killing=0  # after a second signal: the processes die as asked, not as failures
killer=""

# Sends signal $1 to every process still running.
signal_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}

# shellcheck disable=SC2329  # called by the traps
forward() {
  if ((signalled)); then
    echo "local.sh: second $1: killing every process now." >&2
    exec 2>/dev/null  # bash's "Killed" notices of them, wherever it prints one
    killing=1
    signal_all KILL
  else
    signalled=1
    echo "local.sh: $1: every process saves a checkpoint and stops ($1 again: kill now)." >&2
    signal_all TERM
  fi
}
# shellcheck disable=SC2329  # called by the trap
cleanup() {
  signal_all KILL  # never leave a process behind, whatever ends this script
  if [[ -n "$killer" ]]; then
    kill "$killer" 2>/dev/null || true
  fi
}
trap 'forward SIGINT' INT
trap 'forward SIGTERM' TERM
trap cleanup EXIT

# After a failure: SIGTERM to the others now, SIGKILL to any left after $grace seconds (a timer
# that takes its sleep along when it is stopped).
stop_others() {
  signal_all TERM
  (sleep "$grace" & timer=$!; trap 'kill "$timer"; exit 0' TERM; wait "$timer"; signal_all KILL) &
  killer=$!
}

for ((i = 0; i < num_processes; i++)); do
  command_for "$i"
  # The prefixing sed ignores INT/TERM (a Ctrl-C reaches the whole process group): it ends
  # when its process's output does, so the last lines are never lost.
  "${cmd[@]}" > >(trap '' INT TERM; exec sed -u "s/^/[p$i] /") 2>&1 &
  pids+=("$!")
done

# Sets finished and code to a process of running that bash reaped already (its saved status).
reaped_one() {
  local pid
  for pid in "${running[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      finished=$pid
      code=0
      wait "$pid" 2>/dev/null || code=$?
      return
    fi
  done
  sleep 0.1  # (none: wait -n failed otherwise; do not spin)
}

status=0
running=("${pids[@]}")
while ((${#running[@]})); do
  finished=""
  code=0
  wait -n -p finished "${running[@]}" 2>/dev/null || code=$?  # (no bash "Killed" lines)
  if [[ -z "${finished:-}" ]] && ((code == 127)); then
    reaped_one  # processes that died together: wait -n reports one, bash reaped the others
  fi
  [[ -n "${finished:-}" ]] || continue  # woken by a trapped signal
  left=()
  for pid in "${running[@]}"; do
    [[ "$pid" == "$finished" ]] || left+=("$pid")
  done
  running=("${left[@]}")
  for ((i = 0; i < num_processes; i++)); do
    [[ "${pids[i]}" == "$finished" ]] && index=$i
  done
  # The first failure's status; a peer's 69 ("a peer failed or is gone") gives way to the
  # failure that caused it when that process ends after it (not to a TERM or KILL this script
  # sent: 143, 137).
  ours=0
  [[ -n "$killer" ]] && ((code == 143 || code == 137)) && ours=1
  if ((code != 0 && (status == 0 || (status == 69 && code != 69 && code != 75 && !ours)))); then
    status=$code
    if ((code != 75 && !killing)); then
      how="exit $code"
      ((code > 128)) && how="killed by signal $((code - 128))"
      if ((${#running[@]})) && [[ -z "$killer" ]]; then
        echo "local.sh: process $index (pid $finished) failed ($how); stopping the others." >&2
        stop_others
      else
        echo "local.sh: process $index (pid $finished) failed ($how)." >&2
      fi
    fi
  fi
done
exit "$status"
