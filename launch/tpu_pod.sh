#!/usr/bin/env bash
# Trains on a Cloud TPU VM or pod slice: create it, copy and install this checkout on every
# worker, run the same vision_jax.main command on all workers (logs streamed here), delete it.
#
# Usage: launch/tpu_pod.sh [--dry-run] [--keep] [--spot] --name=NAME --zone=ZONE \
#            [--accelerator=v4-32] [--version=tpu-ubuntu2204-base] [--project=PROJECT] \
#            --config=configs/vit_fsdp.py --workdir=gs://BUCKET/runs/NAME [--config.key=value ...]
#
# The config file may be anywhere in the checkout: it is copied with vision_jax/ and configs/
# (only the file: what it imports must be in those). The workdir must be on GCS (gs://): every
# worker writes its checkpoint shards there. After a preemption, run the same command again:
# it resumes from the latest checkpoint in the workdir.
# --version is the TPU VM image: tpu-ubuntu2204-base for v4, v2-alpha-tpuv5-lite for v5e.
# --keep leaves the TPU running (and skips create if it is READY; a preempted one is deleted
# and created again) for a next command.
# Signals: Ctrl-C or SIGTERM during training sends SIGTERM to this run's vision_jax.main on every
# worker (gcloud ssh --worker=all --command='pkill -TERM -f ...--workdir=WORKDIR'): each process
# saves a checkpoint at a step they agree on and exits 75. The script waits for the ssh sessions
# and exits with the run's status (rerun the same command to resume). A second signal sends
# SIGKILL on every worker; a third stops waiting (workers out of reach) and exits 128+signal.
# A signal during create waits for gcloud and deletes the TPU (unless --keep). Started in the
# background by a script (a sweep's `launch/tpu_pod.sh ... &`), it ignores Ctrl-C, as bash makes
# a script's background jobs do: stop it with kill -TERM PID.
# Each worker gets Python 3.11 (the TPU images ship 3.10) from uv, in ~/vision_jax_env.
# VISION_JAX_DRY_RUN=1 is --dry-run: print the exact gcloud commands instead of running them.
set -euo pipefail

name=""
zone=""
accelerator="v4-32"
version="tpu-ubuntu2204-base"
project=""
keep=0
spot=0
dry_run="${VISION_JAX_DRY_RUN:-0}"
if [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 && -z "${VISION_JAX_DRY_RUN:-}" ]]; then
  echo "tpu_pod.sh: error: DRY_RUN is no longer read (VISION_JAX_DRY_RUN is): set VISION_JAX_DRY_RUN=1 or pass --dry-run to print the commands, or unset DRY_RUN to launch." >&2
  exit 2
fi
main_args=()
config=""
workdir=""

usage() { sed -n '2,/^set /s/^# \{0,1\}//p' "$0"; }
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
repo="$(cd "$(dirname "$0")/.." && pwd -P)"
config_file="${config%%:*}"
variant="${config#"$config_file"}"  # ":name", or empty
config_file="${config_file#"$repo"/}"  # an absolute path inside the checkout: relative to it
[[ -f "$repo/$config_file" ]] \
  || die "config '$config_file' is not a file in $repo (give it relative to the checkout)."
# The workers get the folders packed below and the config file, wherever in the checkout it is
# (e.g. myexp/x.py, at the same path; only the file: what it imports must be in vision_jax/ or
# configs/). Its path is resolved, and one outside the checkout refused.
config_dir="$(cd "$repo/$(dirname "$config_file")" && pwd -P)"
[[ ! -L "$repo/$config_file" ]] \
  || die "config '$config_file' is a symbolic link: give the file it points to (in the checkout)."
[[ "$config_dir/" == "$repo"/* ]] \
  || die "config '$config_file' is outside the checkout $repo: copy it into the checkout."
config_path="${config_dir#"$repo"}/$(basename "$config_file")"
config_path="${config_path#/}"
for i in "${!main_args[@]}"; do  # main on the workers loads it at that path
  if [[ "${main_args[i]}" == --config=* ]]; then
    main_args[i]="--config=$config_path$variant"
  fi
done
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
if [[ -n "$project" ]]; then
  where+=("--project=$project")
fi
archive="/tmp/vision_jax_${name}.tar.gz"
remote_dir="vision_jax"
# TPU VM images ship Python 3.10; vision_jax (and jax 0.10) need 3.11: uv installs it into a
# virtual environment on each worker ($HOME expands there).
# shellcheck disable=SC2016
remote_env='$HOME/vision_jax_env' uv='$HOME/.local/bin/uv'
remote_python="$remote_env/bin/python"

create=("${gcloud_tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator"
        "--version=$version")
if ((spot)); then
  create+=(--spot)
fi
shipped=(pyproject.toml README.md vision_jax configs launch)
case "$config_path" in
  vision_jax/*|configs/*|launch/*) ;;
  *) shipped+=("$config_path") ;;
esac
pack=(tar -czf "$archive" -C "$repo" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info'
      --exclude=.venv "${shipped[@]}")
copy=("${gcloud_tpu[@]}" scp "$archive" "$name:vision_jax.tar.gz" "${where[@]}" --worker=all)
install_cmd="mkdir -p $remote_dir && tar -xzf vision_jax.tar.gz -C $remote_dir && cd $remote_dir"
install_cmd+=" && { [ -x $uv ] || curl -LsSf https://astral.sh/uv/install.sh | sh; }"
install_cmd+=" && $uv venv -q --allow-existing --python 3.11 $remote_env"
install_cmd+=" && $uv pip install -q --python $remote_python 'jax[tpu]>=0.10.2,<0.11' -e ."
install=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$install_cmd")
train_cmd="cd $remote_dir && exec $remote_python -m vision_jax.main"
for arg in "${main_args[@]}"; do
  train_cmd+=" $(printf '%q' "$arg")"
done
train_cmd+=" --distributed"
train=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all "--command=$train_cmd")
delete=("${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet)

# The stop commands send a signal to this run's processes on every worker: vision_jax.main with
# this workdir (regex-escaped: other runs on a --keep TPU are left alone; [v] keeps pkill's own
# shell from matching), trying for up to 15 s on a worker where ssh has not started it yet.
# shellcheck disable=SC2016  # a sed expression, not a shell one
workdir_regex="$(printf '%s' "$workdir" | sed 's/[][\.*^$(){}+?|]/\\&/g')"
stop_pattern="[v]ision_jax[.]main .*--workdir=${workdir_regex}( |\$)"
# shellcheck disable=SC2329  # called by the traps
stop_command() {  # sets stop to the command that sends signal $1
  local pkill_cmd
  pkill_cmd="pkill -$1 -f $(printf '%q' "$stop_pattern")"
  stop=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all
        "--command=for _ in \$(seq 15); do $pkill_cmd && break; sleep 1; done; true")
}

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

jobs_started=()  # local background gcloud commands, each the leader of its own process group

# Runs a command in the background in a process group of its own (a Ctrl-C in the terminal does
# not reach it; kill -- -PID reaches gcloud and its ssh children); sets job to its pid.
start_job() {
  echo "+ $*" >&2
  set -m
  "$@" </dev/null &
  job=$!
  set +m
  jobs_started+=("$job")
}

# Waits until job $1 has ended (a trapped signal only interrupts wait); returns its status.
wait_job() {
  local code
  while :; do
    code=0
    wait "$1" 2>/dev/null || code=$?  # 2>/dev/null: no "Killed" line for a job we killed
    if ((code > 128 && woken)); then
      woken=0  # woken by a signal, or the job ended by one: bash answers again either way
      continue
    fi
    return "$code"
  done
}

# Kills job $1's process group; disown: bash prints no "Killed" line for it, whenever it notices.
# shellcheck disable=SC2329  # called by the traps
kill_job() {
  kill -s KILL -- "-$1" 2>/dev/null || true
  disown "$1" 2>/dev/null || true
}

# shellcheck disable=SC2329  # called by the traps
forward() {
  local pid
  woken=1
  signals=$((signals + 1))
  if ((signals == 1)); then
    echo "tpu_pod.sh: $1: every worker saves a checkpoint and stops ($1 again: kill now)." >&2
    stop_command TERM
    start_job "${stop[@]}"
    term_stop=$job
  elif ((signals == 2)); then
    echo "tpu_pod.sh: second $1: killing the run on every worker now ($1 again: stop waiting)." >&2
    stop_command KILL
    start_job "${stop[@]}"
    kill_stop=$job
  else
    echo "tpu_pod.sh: $1: not waiting for the workers any more; check them with gcloud" \
         "compute tpus tpu-vm ssh $name --worker=all --command='pgrep -af vision_jax'" >&2
    for pid in "${jobs_started[@]}"; do
      kill_job "$pid"
    done
    gave_up=$((128 + $2))
  fi
}

# Stops whatever local gcloud still runs and deletes the TPU this script created or began to
# create (unless --keep; without --keep a TPU of this name that exists already is refused
# before create). A failed delete is named; the script still exits with the run's status.
# shellcheck disable=SC2329  # called by the trap
on_exit() {
  local pid
  exit_on_signal
  for pid in ${jobs_started[@]+"${jobs_started[@]}"}; do
    kill_job "$pid"  # never leave a local gcloud or ssh behind, whatever ends this script
  done
  if ((!keep && created)); then
    run "${delete[@]}" || echo "tpu_pod.sh: error: deleting the TPU failed; it may still" \
      "be running (and billed): ${delete[*]}" >&2
  fi
}

# Creates the TPU. A signal during create (gcloud's operation goes on on Google's side) ends
# the script after it, deleting the TPU on the way out.
create_tpu() {
  trap 'created=1; exit 130' INT
  trap 'created=1; exit 143' TERM
  run "${create[@]}"
  created=1
  exit_on_signal
}

# A signal ends the script (after the command it runs; the EXIT trap deletes the TPU). Not
# `trap - INT`: a sweep script's `tpu_pod.sh ... &` starts with SIGINT ignored, and bash's
# reset would make its terminal's Ctrl-C kill this one (the TPU deleted under the workers).
exit_on_signal() {
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

created=0
trap on_exit EXIT
run "${pack[@]}"
state=""  # of a TPU of this name that exists already
if [[ "$dry_run" != 1 ]]; then
  state="$("${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' \
           2>/dev/null || true)"
fi
if [[ -n "$state" ]] && ((!keep)); then
  die "a TPU named $name exists already ($state): --keep runs on it, or choose another --name."
fi
case "$state" in
  "") create_tpu ;;
  READY) echo "tpu_pod.sh: reusing the existing TPU $name." >&2 ;;
  PREEMPTED|TERMINATED)  # a Spot TPU after preemption: it cannot run again
    echo "tpu_pod.sh: the TPU $name is $state: deleting it and creating it again." >&2
    run "${delete[@]}"
    create_tpu ;;
  *) die "the TPU $name is $state, not READY: wait for it, or delete it (${delete[*]})." ;;
esac
run "${copy[@]}"
run rm -f "$archive"  # every worker has it
run "${install[@]}"
if [[ "$dry_run" == 1 ]]; then
  run "${train[@]}"
  exit 0
fi

signals=0
woken=0
term_stop=""
kill_stop=""
gave_up=""
trap 'forward SIGINT 2' INT
trap 'forward SIGTERM 15' TERM
start_job "${train[@]}"
train_job=$job
status=0
wait_job "$train_job" || status=$?
for pid in "$term_stop" "$kill_stop"; do  # the stop commands, till they are done
  if [[ -n "$pid" ]]; then
    wait_job "$pid" || true
  fi
done
exit "${gave_up:-$status}"
