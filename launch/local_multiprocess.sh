#!/usr/bin/env bash
# Runs the train binary as NUM_PROCESSES cooperating jax processes on this machine.
#
#   launch/local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS -- TRAIN_ARGS...
#   launch/local_multiprocess.sh 2 4 -- --config=configs/synthetic_tiny.py --workdir=runs/mp
#
# Each process sees DEVICES_PER_PROCESS simulated CPU devices and joins a jax.distributed
# job through a coordinator on a free localhost port; CPU collectives go through gloo.
# This is the multi-host code path of a TPU pod or a GPU cluster (global arrays built
# from per-host slices, collective checkpoints, per-host data shards), runnable anywhere.
#
# Process 0 prints to this terminal; every process also logs to LOG_DIR/process-<i>.log
# (LOG_DIR defaults to a temporary directory, printed at start). The launcher waits for
# all processes; when one fails it stops the others (SIGTERM, then SIGKILL after
# KILL_GRACE_SECONDS, default 5) and exits with the failed process's status. SIGINT or
# SIGTERM to the launcher is forwarded, so the run saves a checkpoint and stops; rerun
# the same command to resume.
#
# Exit status (docs/exit_statuses.md): 0 when every process finished; 75 when they
# stopped after saving a checkpoint (status 75 from each, or from some with the others
# finished), whether the launcher or something else stopped them; otherwise the status of
# the first process that failed (a process killed by a signal: 128 + its number). A
# process that exits 75 is not a failure: the others get STOP_TIMEOUT_SECONDS to follow.
#
# The processes share this machine's CPUs: each gets --config.data.workers=CPUS/NUM_PROCESSES-1
# Grain worker processes (the rule of workers=-1, applied to its share) unless the train
# arguments name --config.data.workers. TRAIN_MODULE=bioclip_jax.cli.predict (or .embed) runs an
# archive-scale predict (embed) instead: each process takes its own slice of the inputs, and gets
# --workers=CPUS/NUM_PROCESSES-1 (at least 1) image decoders unless --workers is given.
#
# Environment: PYTHON (default python3), TRAIN_MODULE (default bioclip_jax.train),
# LOG_DIR, KILL_GRACE_SECONDS, STOP_TIMEOUT_SECONDS (default 300), COORDINATOR_PORT,
# CPUS (default: those this shell may use, `nproc`).
set -u

usage() {
  sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

[[ $# -ge 3 ]] || usage
NUM_PROCESSES=$1
DEVICES_PER_PROCESS=$2
[[ $3 == "--" ]] || { echo "error: expected '--' after DEVICES_PER_PROCESS, got '$3'" >&2; usage; }
shift 3
for pair in "NUM_PROCESSES:$NUM_PROCESSES" "DEVICES_PER_PROCESS:$DEVICES_PER_PROCESS"; do
  name=${pair%%:*}; value=${pair#*:}
  if ! [[ $value =~ ^[1-9][0-9]*$ ]]; then
    echo "error: $name must be a positive integer, got '$value'" >&2
    exit 2
  fi
done

PYTHON=${PYTHON:-python3}
TRAIN_MODULE=${TRAIN_MODULE:-bioclip_jax.train}
KILL_GRACE_SECONDS=${KILL_GRACE_SECONDS:-5}
STOP_TIMEOUT_SECONDS=${STOP_TIMEOUT_SECONDS:-300}
LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/bioclip_jax_mp.XXXXXX")}
mkdir -p "$LOG_DIR" || { echo "error: cannot create LOG_DIR=$LOG_DIR" >&2; exit 2; }
command -v "$PYTHON" >/dev/null || { echo "error: PYTHON=$PYTHON not found" >&2; exit 2; }

if [[ -z ${COORDINATOR_PORT:-} ]]; then
  COORDINATOR_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])') \
    || { echo "error: could not find a free port" >&2; exit 2; }
fi

# Simulated devices: drop any device-count flag the caller had, add ours.
XLA_FLAGS_BASE=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
PROCESS_XLA_FLAGS="$XLA_FLAGS_BASE --xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

CPUS=${CPUS:-$(nproc)}
[[ $CPUS =~ ^[1-9][0-9]*$ ]] || { echo "error: CPUS must be a positive integer, got '$CPUS'" >&2; exit 2; }
# Decoders per process: the train module's Grain workers (0: decode in the main process), or the
# image decoders of `predict`/`embed` (at least 1); another module gets no such flag.
case $TRAIN_MODULE in
  bioclip_jax.train) WORKER_FLAG=--config.data.workers; MIN_WORKERS=0 ;;
  bioclip_jax.cli.predict | bioclip_jax.cli.embed) WORKER_FLAG=--workers; MIN_WORKERS=1 ;;
  *) WORKER_FLAG= ;;
esac
WORKER_ARGS=()
if [[ -n $WORKER_FLAG && " $* " != *" $WORKER_FLAG"* ]]; then
  WORKERS=$((CPUS / NUM_PROCESSES - 1))
  ((WORKERS >= MIN_WORKERS)) || WORKERS=$MIN_WORKERS
  WORKER_ARGS=("$WORKER_FLAG=$WORKERS")
fi

SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)  # own process group: stop data workers too

echo "launching $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices, coordinator 127.0.0.1:$COORDINATOR_PORT, logs in $LOG_DIR" >&2
PIDS=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  log="$LOG_DIR/process-$i.log"
  command=(env JAX_PLATFORMS=cpu XLA_FLAGS="$PROCESS_XLA_FLAGS"
           JAX_COORDINATOR_ADDRESS="127.0.0.1:$COORDINATOR_PORT"
           JAX_NUM_PROCESSES="$NUM_PROCESSES" JAX_PROCESS_ID="$i"
           "${SETSID[@]}" "$PYTHON" -u -m "$TRAIN_MODULE" "$@" "${WORKER_ARGS[@]}")
  if ((i == 0)); then
    "${command[@]}" > >(tee "$log") 2>&1 &
  else
    "${command[@]}" >"$log" 2>&1 &
  fi
  PIDS+=($!)
  echo "$!" >"$LOG_DIR/process-$i.pid"
done

STOPPED=75  # bioclip_jax/exit_codes.py: saved a checkpoint, rerun to resume
declare -A STATUS_OF=()  # process index -> exit status, once it has ended

# Signals each process's group (an ended process's too: its data workers may outlive it),
# or the process alone where there was no setsid.
signal_all() {
  local sig=$1 i pid
  for i in "${!PIDS[@]}"; do
    pid=${PIDS[$i]}
    kill "-$sig" -- "-$pid" 2>/dev/null || [[ -n ${STATUS_OF[$i]:-} ]] || kill "-$sig" "$pid" 2>/dev/null
  done
}

any_alive() {
  local i
  for i in "${!PIDS[@]}"; do
    [[ -z ${STATUS_OF[$i]:-} ]] && kill -0 "${PIDS[$i]}" 2>/dev/null && return 0
  done
  return 1
}

reap() {  # $1: index of a process that has ended; records its exit status
  local pid=${PIDS[$1]} signals code
  while true; do  # a signal ends `wait` early; waiting again gives the process's own status
    signals=$SIGNALS
    wait "$pid"
    code=$?
    ((signals == SIGNALS)) && break
  done
  STATUS_OF[$1]=$code
}

stop_all() {  # SIGTERM, wait up to $1 seconds, then SIGKILL; records every status
  local deadline=$((SECONDS + $1)) i
  signal_all TERM
  while any_alive && ((SECONDS < deadline)); do sleep 0.2; done
  any_alive && signal_all KILL
  for i in "${!PIDS[@]}"; do
    [[ -n ${STATUS_OF[$i]:-} ]] || reap "$i"
  done
}

combined_status() {  # the first failure's status, else 75 if any process stopped, else 0
  local i code result=0
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    code=${STATUS_OF[$i]}
    if ((code != 0 && code != STOPPED)); then echo "$code"; return; fi
    ((code == STOPPED)) && result=$STOPPED
  done
  echo "$result"
}

STOP_REQUESTED=0 SIGNALS=0
trap 'STOP_REQUESTED=1; SIGNALS=$((SIGNALS + 1))' INT TERM

STOPPING_SINCE=""  # when the first process exited 75 on its own
while ((${#STATUS_OF[@]} < NUM_PROCESSES)); do
  if ((STOP_REQUESTED)); then
    echo "launcher: stop requested, asking every process to save and exit" >&2
    stop_all "$STOP_TIMEOUT_SECONDS"
    break
  fi
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ -n ${STATUS_OF[$i]:-} ]] && continue
    pid=${PIDS[$i]}
    kill -0 "$pid" 2>/dev/null && continue
    reap "$i"
    code=${STATUS_OF[$i]}
    if ((code == STOPPED)); then
      if [[ -z $STOPPING_SINCE ]]; then
        STOPPING_SINCE=$SECONDS
        echo "launcher: process $i stopped after saving a checkpoint; waiting for the others" >&2
      fi
    elif ((code != 0)); then
      echo "launcher: process $i (pid $pid) exited with status $code; stopping the others" >&2
      if ((i != 0)); then
        echo "---- last lines of $LOG_DIR/process-$i.log ----" >&2
        tail -n 20 "$LOG_DIR/process-$i.log" >&2
      fi
      stop_all "$KILL_GRACE_SECONDS"
      exit "$code"
    fi
  done
  if [[ -n $STOPPING_SINCE ]] && ((SECONDS - STOPPING_SINCE > STOP_TIMEOUT_SECONDS)); then
    echo "launcher: the other processes did not stop within ${STOP_TIMEOUT_SECONDS}s; stopping them" >&2
    stop_all "$KILL_GRACE_SECONDS"
    break
  fi
  sleep 0.2
done

STATUS=$(combined_status)
case $STATUS in
  0) echo "launcher: all $NUM_PROCESSES processes finished" >&2 ;;
  "$STOPPED") echo "launcher: stopped after saving a checkpoint (status $STOPPED); rerun the same command to resume" >&2 ;;
  *) echo "launcher: exiting with status $STATUS" >&2 ;;
esac
exit "$STATUS"
