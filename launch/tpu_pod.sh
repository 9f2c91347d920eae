#!/usr/bin/env bash
# Trains on an existing Cloud TPU VM or pod slice: ship the code to every worker, install
# it, and start the same train command on all workers at once.
#
#   launch/tpu_pod.sh --tpu NAME --zone ZONE --project PROJECT [options] -- TRAIN_ARGS...
#
#   launch/tpu_pod.sh --tpu bioclip-v4-64 --zone us-central2-b --project my-project -- \
#       --config=configs/bioclip_vitb16.py --workdir=/mnt/shared/runs/bioclip \
#       --config.data.train_shards='/mnt/shared/tol10m/train/shard-{000000..000165}.tar'
#
# It creates nothing: make the TPU VM first (gcloud compute tpus tpu-vm create ...).
# Every worker must see the same --workdir and the shards at the same path (Filestore/NFS,
# or a gcsfuse mount on every worker); checkpoints are written by all workers together.
# Each worker is told BIOCLIP_JAX_DISTRIBUTED=1, so jax.distributed reads the slice
# topology from the TPU metadata. Rerunning the same command resumes from the latest
# checkpoint, also after the slice was recreated with another number of hosts.
#
# Options:
#   --tpu NAME --zone ZONE --project PROJECT   the TPU VM (required)
#   --source DIR        code to ship (default: this repository)
#   --skip-install      the workers already have this version installed
#   --install CMD       install command run on each worker in the unpacked source
#                       (default: "$PYTHON -m pip install -q 'jax[tpu]' . ")
#   --python PY         interpreter on the workers (default python3)
#   --run-name NAME     names the per-worker logs ~/bioclip_jax_logs/NAME-<hostname>.log
#   --detach            start training in the background on the workers and return
#   --dry-run           print the gcloud commands instead of running them
set -euo pipefail

TPU="" ZONE="" PROJECT="" SKIP_INSTALL=0 DETACH=0 DRY_RUN=0
SOURCE=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=python3
INSTALL=""
RUN_NAME="train-$(date +%Y%m%d-%H%M%S)"

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
    --skip-install) SKIP_INSTALL=1; shift ;;
    --detach) DETACH=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (train arguments go after --)" ;;
  esac
done
[[ -n $TPU && -n $ZONE && -n $PROJECT ]] || die "--tpu, --zone and --project are required"
[[ $# -gt 0 ]] || die "no train arguments after -- (at least --config=... --workdir=...)"
[[ " $* " == *" --workdir="* || " $* " == *" --workdir "* ]] || die "give --workdir=DIR (on storage every worker sees)"
[[ -d $SOURCE ]] || die "--source $SOURCE is not a directory"
[[ $RUN_NAME =~ ^[A-Za-z0-9._-]+$ ]] || die "--run-name may hold letters, digits, '.', '_' and '-' only"
INSTALL=${INSTALL:-"$PYTHON -m pip install -q 'jax[tpu]' ."}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone "$ZONE" --project "$PROJECT")
REMOTE_SRC="bioclip_jax_src"
ARCHIVE="${TMPDIR:-/tmp}/bioclip_jax_src_$$.tar.gz"

quote() {  # one argument as the shell reads it back: bare when safe, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}

quote_all() { local out="" arg; for arg in "$@"; do out+=" $(quote "$arg")"; done; printf '%s' "${out# }"; }

run() {  # prints the command; runs it unless --dry-run
  echo "+ $(quote_all "$@")" >&2
  ((DRY_RUN)) || "$@"
}

if ((!DRY_RUN)); then
  command -v gcloud >/dev/null || die "gcloud is not installed (https://cloud.google.com/sdk)"
fi

if ((!SKIP_INSTALL)); then
  run tar -czf "$ARCHIVE" -C "$SOURCE" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
      --exclude=runs --exclude='workdir*' --exclude=.pytest_cache .
  ((DRY_RUN)) || trap 'rm -f "$ARCHIVE"' EXIT
  run "${GCLOUD[@]}" scp "$ARCHIVE" "$TPU:~/$REMOTE_SRC.tar.gz" --worker=all "${WHERE[@]}"
  run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command \
      "rm -rf ~/$REMOTE_SRC && mkdir -p ~/$REMOTE_SRC && tar -xzf ~/$REMOTE_SRC.tar.gz -C ~/$REMOTE_SRC && cd ~/$REMOTE_SRC && $INSTALL"
fi

LOG="~/bioclip_jax_logs/$RUN_NAME-\$(hostname).log"
TRAIN="cd ~/$REMOTE_SRC && BIOCLIP_JAX_DISTRIBUTED=1 $(quote_all "$PYTHON" -u -m bioclip_jax.train "$@")"
if ((DETACH)); then
  REMOTE="mkdir -p ~/bioclip_jax_logs && (nohup bash -c $(quote "$TRAIN") > $LOG 2>&1 < /dev/null &)"
else
  REMOTE="mkdir -p ~/bioclip_jax_logs && set -o pipefail && { $TRAIN ; } 2>&1 | tee $LOG"
fi
run "${GCLOUD[@]}" ssh "$TPU" --worker=all "${WHERE[@]}" --command "$REMOTE"

echo "per-worker logs: ~/bioclip_jax_logs/$RUN_NAME-<hostname>.log on each worker; e.g." >&2
echo "  $(quote_all "${GCLOUD[@]}" ssh "$TPU" --worker=0 "${WHERE[@]}" --command "tail -f ~/bioclip_jax_logs/$RUN_NAME-*.log")" >&2
