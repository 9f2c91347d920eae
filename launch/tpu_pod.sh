#!/usr/bin/env bash
# Trains on an existing Cloud TPU VM or pod slice: ship the code to every worker, install
# it, and start the same train command on all workers at once, detached from this session.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --project PROJECT [options] -- TRAIN_ARGS...
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --project PROJECT --run-name RUN --logs
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --project PROJECT --run-name RUN --stop
#
#   launch/tpu_pod.sh --tpu bioclip-v4-64 --zone us-central2-b --project my-project \
#       --run-name bioclip-v1 -- \
#       --config=configs/bioclip_vitb16.py --workdir=gs://my-bucket/runs/bioclip-v1 \
#       --config.data.train_shards='gs://my-bucket/tol10m/train/shard-{000000..000165}.tar'
#
# It creates nothing: make the TPU VM first (gcloud compute tpus tpu-vm create ...).
# Every worker must reach the same --workdir (gs://BUCKET/runs/NAME; Orbax writes to
# Cloud Storage itself) and the same shards (gs:// URLs, or a read-only gcsfuse mount at
# the same path on every worker): see docs/scaling.md, "Where data and workdir live".
# Each worker is told BIOCLIP_JAX_DISTRIBUTED=1, so jax.distributed reads the slice
# topology from the TPU metadata. Rerunning the same command resumes from the latest
# checkpoint, also after the slice was recreated with another number of hosts.
# Each worker runs one training process, so --config.data.workers=-1 (the default) sizes
# its Grain worker processes from that VM's CPUs, less one; give --config.data.workers=N
# to choose. The batches do not depend on it.
#
# On each worker the run is started with setsid + nohup, so it goes on when this ssh
# session drops or this script is interrupted. Each worker keeps, in ~/bioclip_jax_logs/:
# RUN.log (the output, appended to on every start), RUN.pid and, once the run has ended,
# RUN.status (its exit status). Without --detach the script then follows worker 0's log
# until the run ends and exits with the run's status: 0 finished, 75 stopped after saving
# a checkpoint (rerun the same command to resume), 1 an error (docs/exit_statuses.md).
# Ctrl-C stops the following, not the run.
#
# Options:
#   --tpu NAME --zone ZONE --project PROJECT   the TPU VM (required)
#   --run-name NAME     names the run: its log files, and what --logs and --stop act on
#                       (default train-DATE-TIME, printed)
#   --source DIR        code to ship (default: this repository)
#   --skip-install      the workers already have this version installed
#   --install CMD       install command run on each worker in the unpacked source
#                       (default: "$PYTHON -m pip install -q 'jax[tpu]==$JAX_VERSION' .")
#   --python PY         interpreter on the workers (default python3)
#   --detach            start training on the workers and return at once
#   --logs              follow the run's log on one worker (--worker, default 0) until the
#                       run ends; exit with its status. Starts nothing.
#   --worker N          the worker whose log --logs and the default mode follow (default 0)
#   --stop              stop the run on every worker: SIGTERM (it saves a checkpoint and
#                       exits 75), then SIGKILL to its process group after --stop-timeout
#                       seconds (default 300; 0 kills at once). Only processes started by
#                       this script under this --run-name are touched.
#   --dry-run           print the gcloud commands instead of running them
#
# Environment: JAX_VERSION, the jax[tpu] release installed on the workers (default below:
# the version this package was last tested with).
set -euo pipefail

JAX_VERSION=${JAX_VERSION:-0.10.2}

TPU="" ZONE="" PROJECT="" SKIP_INSTALL=0 DETACH=0 DRY_RUN=0 MODE=train WORKER=0 STOP_TIMEOUT=300
SOURCE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=python3
INSTALL=""
RUN_NAME=""

die() { echo "error: $*" >&2; exit 2; }
need_value() { [[ $# -ge 2 && -n $2 && $2 != --* ]] || die "$1 needs a value"; }

while [[ $# -gt 0 ]]; do
  case $1 in
    --tpu) need_value "$@"; TPU=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --source) need_value "$@"; SOURCE=$2; shift 2 ;;
    --install) need_value "$@"; INSTALL=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --run-name) need_value "$@"; RUN_NAME=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --stop-timeout) need_value "$@"; STOP_TIMEOUT=$2; shift 2 ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --detach) DETACH=1; shift ;;
    --logs) MODE=logs; shift ;;
    --stop) MODE=stop; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (train arguments go after --)" ;;
  esac
done
[[ -n $TPU && -n $ZONE && -n $PROJECT ]] || die "--tpu, --zone and --project are required"
[[ $WORKER =~ ^[0-9]+$ ]] || die "--worker takes a worker number"
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die "--stop-timeout takes a number of seconds"
if [[ $MODE == train ]]; then
  [[ $# -gt 0 ]] || die "no train arguments after -- (at least --config=... --workdir=...)"
  [[ " $* " == *" --workdir="* || " $* " == *" --workdir "* ]] || die "give --workdir=DIR (gs://BUCKET/runs/NAME)"
  [[ -d $SOURCE ]] || die "--source $SOURCE is not a directory"
  RUN_NAME=${RUN_NAME:-"train-$(date +%Y%m%d-%H%M%S)"}
else
  [[ $# -eq 0 ]] || die "--$MODE takes no train arguments"
  [[ -n $RUN_NAME ]] || die "--$MODE needs the --run-name of the run"
fi
[[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-name may hold letters, digits, '.', '_' and '-' only"
INSTALL=${INSTALL:-"$PYTHON -m pip install -q 'jax[tpu]==$JAX_VERSION' ."}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" --project "$PROJECT")
REMOTE_SRC="bioclip_jax_src"
ARCHIVE="${TMPDIR:-/tmp}/bioclip_jax_src_$$.tar.gz"
# On the workers ($HOME expands there): RUN.log, RUN.pid, RUN.status.
# shellcheck disable=SC2016
FILES='$HOME/bioclip_jax_logs/'"$RUN_NAME"
# The run's main python and nothing else: its command line starts `PYTHON -X
# bioclip_jax_run=RUN -u -m bioclip_jax.train` (-X sets an entry of sys._xoptions, which
# nothing reads). The shells that start, follow or stop it have `bash -c ...` there, and
# its Grain worker processes `PYTHON -X bioclip_jax_run=RUN -c ...`: neither matches.
MARK="bioclip_jax_run=$RUN_NAME"
PATTERN="^[^ ]+ -X ${MARK//./\\.} -u -m bioclip_jax\\.train( |\$)"

quote() {  # one argument as the shell reads it back: bare when safe, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

quote_all() { local out="" arg; for arg in "$@"; do out+=" $(quote "$arg")"; done; printf '%s' "${out# }"; }

run() {  # prints the command; runs it unless --dry-run
  echo "+ $(quote_all "$@")" >&2
  ((DRY_RUN)) || "$@"
}

# Remote commands (POSIX sh, run by each worker's login shell).
FOLLOW="f=$FILES; [ -f \"\$f.log\" ] || { echo \"no run $RUN_NAME on \$(hostname)\" >&2; exit 1; };\
 pid=\$(cat \"\$f.pid\" 2>/dev/null);\
 if [ -n \"\$pid\" ] && kill -0 \"\$pid\" 2>/dev/null; then tail -n 100 -f --pid=\"\$pid\" \"\$f.log\";\
 else tail -n 100 \"\$f.log\"; fi;\
 if [ -s \"\$f.status\" ]; then exit \"\$(cat \"\$f.status\")\"; fi;\
 echo \"run $RUN_NAME has no exit status on \$(hostname): it was killed\" >&2; exit 1"
STOP="p=$(quote "$PATTERN");\
 if ! pgrep -f \"\$p\" >/dev/null; then echo \"\$(hostname): run $RUN_NAME is not running\"; exit 0; fi;\
 echo \"\$(hostname): asking run $RUN_NAME to save a checkpoint and stop\";\
 pkill -TERM -f \"\$p\"; i=0;\
 while [ \$i -lt $STOP_TIMEOUT ] && pgrep -f \"\$p\" >/dev/null; do sleep 1; i=\$((i + 1)); done;\
 for g in \$(pgrep -f \"\$p\" | xargs -r -n1 ps -o pgid= -p); do\
 echo \"\$(hostname): still running after ${STOP_TIMEOUT}s; killing process group \$g\"; pkill -KILL -g \"\$g\"; done; true"
follow_command() { quote_all "$0" --tpu "$TPU" "${WHERE[@]}" --run-name "$RUN_NAME" --logs; }

follow() {  # worker $WORKER's log until the run ends; exits with the run's status
  local status=0
  trap 'echo "stopped following; run $RUN_NAME goes on (follow again: $(follow_command))" >&2; exit 130' INT
  run "${GCLOUD[@]}" ssh "$TPU" --worker="$WORKER" "${WHERE[@]}" --command "$FOLLOW" || status=$?
  ((!DRY_RUN)) || exit 0
  case $status in
    0) echo "run $RUN_NAME finished" >&2 ;;
    75) echo "run $RUN_NAME stopped after saving a checkpoint; rerun the same command to resume" >&2 ;;
    255) echo "lost the connection (or ssh failed); the run goes on: $(follow_command)" >&2 ;;
    *) echo "run $RUN_NAME ended with status $status; its log: ~/bioclip_jax_logs/$RUN_NAME.log on each worker" >&2 ;;
  esac
  exit "$status"
}

if ((!DRY_RUN)); then
  command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"
fi

case $MODE in
  logs) follow ;;
  stop)
    run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command "$STOP"
    exit ;;
esac

if ((!SKIP_INSTALL)); then
  run tar -czf "$ARCHIVE" -C "$SOURCE" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude=runs --exclude='workdir*' --exclude=.pytest_cache .
  ((DRY_RUN)) || trap 'rm -f "$ARCHIVE"' EXIT
  run "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU:~/$REMOTE_SRC.tar.gz" --worker=all "${WHERE[@]}"
  run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command \
      "rm -rf ~/$REMOTE_SRC && mkdir -p ~/$REMOTE_SRC && tar -xzf ~/$REMOTE_SRC.tar.gz -C ~/$REMOTE_SRC && cd ~/$REMOTE_SRC && $INSTALL"
fi

# What each worker runs in the background: the training, then its status into RUN.status.
TRAIN="BIOCLIP_JAX_DISTRIBUTED=1 $(quote_all "$PYTHON" -X "$MARK" -u -m bioclip_jax.train "$@") ;\
 echo \$? > \"$FILES.status\""
START="f=$FILES; p=$(quote "$PATTERN"); mkdir -p \"\$(dirname \"\$f\")\" && cd ~/$REMOTE_SRC || exit 1;\
 if pgrep -f \"\$p\" >/dev/null; then echo \"error: run $RUN_NAME is already running on \$(hostname); use --stop first\" >&2; exit 1; fi;\
 rm -f \"\$f.status\"; echo \"==== \$(date -Is) \$(hostname): starting run $RUN_NAME\" >> \"\$f.log\";\
 setsid nohup bash -c $(quote "$TRAIN") >> \"\$f.log\" 2>&1 < /dev/null & echo \$! > \"\$f.pid\""
run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command "$START"

echo "run $RUN_NAME started on every worker; its log there: ~/bioclip_jax_logs/$RUN_NAME.log" >&2
echo "  follow: $(follow_command) [--worker N]" >&2
echo "  stop:   $(quote_all "$0" --tpu "$TPU" "${WHERE[@]}" --run-name "$RUN_NAME" --stop)" >&2
((DETACH)) || follow
