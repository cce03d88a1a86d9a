#!/usr/bin/env bash
# Launch cm3leon_jax training on a Google Cloud TPU VM slice.
#
# Steps: (1) create the TPU VM (or reuse it if it already exists), (2) copy this
# repo to every worker, (3) pip install jax[tpu] + this package on every worker,
# (4) run `python3 -m cm3leon_jax.train` on all workers at once (on TPU,
# jax.distributed auto-detects the coordinator, so no coordinator flags), with
# output streamed here and tee'd to ./tpu_run_<name>_<timestamp>.log,
# (5) optionally delete the TPU afterwards (--delete_after; also on failure).
#
# Usage:
#   launch/tpu_run.sh --tpu_name NAME --zone ZONE --workdir gs://BUCKET/RUN [options] [-- TRAIN_ARGS...]
#
# Example:
#   launch/tpu_run.sh --tpu_name leon-v5e --zone us-west4-a --spot \
#     --config experiments/tiny_cpu.py --workdir gs://my-bucket/runs/tiny \
#     --delete_after -- --config.total_steps=1000
#
# Add --dry_run to print every command (pasteable) without running anything.
# Run with --help for the full list of flags.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_run.sh --tpu_name NAME --zone ZONE --workdir DIR [options] [-- TRAIN_ARGS...]

Required:
  --tpu_name NAME          TPU VM name (created if it does not exist, else reused)
  --zone ZONE              GCP zone, e.g. us-west4-a
  --workdir DIR            training workdir, normally gs://BUCKET/PATH (shared by all hosts)

Options:
  --project PROJECT        GCP project (default: gcloud's configured project)
  --accelerator_type TYPE  default: v5litepod-8
  --runtime_version VER    default: v2-alpha-tpuv5-lite
  --spot                   create a spot (preemptible) slice
  --config PATH            config file, relative to the repo (checked here; default: experiments/tiny_cpu.py)
  --repo_dir DIR           code location on the workers (default: ~/cm3leon_jax;
                           quote a ~ so your local shell does not expand it)
  --dry_run                print every command instead of running it
  --delete_after           delete the TPU when the run ends (also on failure)
  --help                   show this help

Everything after a literal `--` is appended to the train command,
e.g.  -- --config.total_steps=1000
Flags accept both `--flag=value` and `--flag value`.
EOF
}

# usage_error, shell_quote, quote_cmd, parse_flags
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

# ---------------------------------------------------------------- flags
TPU_NAME=""
ZONE=""
PROJECT=""
ACCELERATOR_TYPE="v5litepod-8"
RUNTIME_VERSION="v2-alpha-tpuv5-lite"
SPOT=0
CONFIG="experiments/tiny_cpu.py"
WORKDIR=""
REPO_DIR="~/cm3leon_jax"
DRY_RUN=0
DELETE_AFTER=0
EXTRA_ARGS=()

VALUED="--tpu_name|--zone|--project|--accelerator_type|--runtime_version|--config|--workdir|--repo_dir"

set_flag() {  # set_flag --name value
  case "$1" in
    --tpu_name) TPU_NAME=$2 ;;
    --zone) ZONE=$2 ;;
    --project) PROJECT=$2 ;;
    --accelerator_type) ACCELERATOR_TYPE=$2 ;;
    --runtime_version) RUNTIME_VERSION=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --repo_dir) REPO_DIR=$2 ;;
  esac
}

bool_flag() {  # bool_flag --name: 1 when unknown
  case "$1" in
    --spot) SPOT=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --delete_after) DELETE_AFTER=1 ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"

[[ -n $TPU_NAME ]] || usage_error "missing required flag --tpu_name"
[[ -n $ZONE ]] || usage_error "missing required flag --zone"
[[ -n $WORKDIR ]] || usage_error "missing required flag --workdir"

if [[ $DRY_RUN -eq 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
  echo "error: gcloud not found on PATH; install the Google Cloud SDK" \
       "(https://cloud.google.com/sdk) or use --dry_run to only print the commands" >&2
  exit 1
fi

# ---------------------------------------------------------------- helpers
# A path for the remote shell: keeps a leading ~/ unquoted so it expands there.
remote_path() {
  if [[ $1 == "~" ]]; then
    REPLY="~"
  elif [[ $1 == "~/"* ]]; then
    shell_quote "${1#\~/}"
    REPLY="~/$REPLY"
  else
    shell_quote "$1"
  fi
}

# Print a command as `+ cmd`; execute it unless --dry_run.
run() {
  quote_cmd "$@"
  echo "+ $REPLY"
  if [[ $DRY_RUN -eq 0 ]]; then
    "$@"
  fi
}

# Like run, but also tee stdout+stderr to the log file given as $1.
run_logged() {
  local log=$1 logq
  shift
  quote_cmd "$@"
  local cmdq=$REPLY
  shell_quote "$log"; logq=$REPLY
  echo "+ $cmdq 2>&1 | tee -a $logq"
  if [[ $DRY_RUN -eq 0 ]]; then
    echo "+ $cmdq" >>"$log"
    "$@" 2>&1 | tee -a "$log"
  fi
}

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
LOCATION=(--zone "$ZONE")
if [[ -n $PROJECT ]]; then
  LOCATION+=(--project "$PROJECT")
fi

ssh_all() {  # ssh_all REMOTE_COMMAND
  run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" --worker=all --command "$1"
}

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# the config ships with this repo's code: a mistyped path is said now, not after the TPU is up
[[ -f $REPO_ROOT/${CONFIG%%:*} ]] || usage_error "--config ${CONFIG%%:*}: no such file in $REPO_ROOT"
TIMESTAMP=$(date +%Y%m%d_%H%M%S)
LOG_FILE="tpu_run_${TPU_NAME}_${TIMESTAMP}.log"
TARBALL_DIR=""
if [[ $DRY_RUN -eq 0 ]]; then
  TARBALL_DIR=$(mktemp -d)
  TARBALL="$TARBALL_DIR/cm3leon_jax_code.tar.gz"
else
  TARBALL="${TMPDIR:-/tmp}/cm3leon_jax_code_${TIMESTAMP}.tar.gz"
fi
REMOTE_TARBALL="/tmp/cm3leon_jax_code.tar.gz"
remote_path "$REPO_DIR"; REPO_Q=$REPLY

if [[ $DRY_RUN -eq 1 ]]; then
  echo "# dry run: printing commands only, nothing is executed"
fi
# object stores every worker shares, and the package extra that writes to each (setup.py)
case $WORKDIR in
  gs://*) EXTRAS="[gcs]" ;;
  s3://*) EXTRAS="[s3]" ;;
  az://*) EXTRAS="[az]" ;;
  *://*) usage_error "--workdir '$WORKDIR': only local paths and gs://, s3://, az:// URLs are supported" ;;
  *) EXTRAS=""
     echo "warning: --workdir '$WORKDIR' is not an object-store URL (gs://, s3://, az://); each worker will" \
          "write to its own local disk (relative paths are relative to --repo_dir)" >&2 ;;
esac

# ---------------------------------------------------------------- cleanup
cleanup() {
  local rc=$?
  trap - EXIT
  if [[ $DELETE_AFTER -eq 1 ]]; then
    echo "# --delete_after: deleting TPU $TPU_NAME (exit code so far: $rc)"
    run "${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${LOCATION[@]}" --quiet ||
      echo "warning: failed to delete TPU $TPU_NAME; delete it manually" >&2
  fi
  if [[ -n $TARBALL_DIR ]]; then
    rm -rf -- "$TARBALL_DIR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- 1. create
echo "# [1/4] TPU VM $TPU_NAME ($ACCELERATOR_TYPE in $ZONE)"
STATE=""
if [[ $DRY_RUN -eq 1 ]]; then
  run "${GCLOUD_TPU[@]}" describe "$TPU_NAME" "${LOCATION[@]}" "--format=value(state)"
  echo "# dry run: assuming $TPU_NAME does not exist yet"
else
  quote_cmd "${GCLOUD_TPU[@]}" describe "$TPU_NAME" "${LOCATION[@]}" "--format=value(state)"
  echo "+ $REPLY"
  STATE=$("${GCLOUD_TPU[@]}" describe "$TPU_NAME" "${LOCATION[@]}" \
            "--format=value(state)" 2>/dev/null) || STATE=""
fi

if [[ -n $STATE ]]; then
  echo "# $TPU_NAME already exists (state: $STATE); reusing it"
  case "$STATE" in
    PREEMPTED|TERMINATED|STOPPED)
      echo "error: TPU $TPU_NAME is $STATE; delete it first:" \
           "gcloud compute tpus tpu-vm delete $TPU_NAME --zone $ZONE" >&2
      exit 1 ;;
  esac
else
  CREATE=("${GCLOUD_TPU[@]}" create "$TPU_NAME" --zone "$ZONE"
          --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
  if [[ $SPOT -eq 1 ]]; then
    CREATE+=(--spot)
  fi
  if [[ -n $PROJECT ]]; then
    CREATE+=(--project "$PROJECT")
  fi
  run "${CREATE[@]}"
fi

# ---------------------------------------------------------------- 2. copy code
echo "# [2/4] copying $REPO_ROOT to $REPO_DIR on all workers"
if command -v git >/dev/null 2>&1 &&
   git -C "$REPO_ROOT" rev-parse --verify -q HEAD >/dev/null 2>&1; then
  if [[ -n $(git -C "$REPO_ROOT" status --porcelain 2>/dev/null) ]]; then
    echo "warning: uncommitted changes are NOT shipped (git archive HEAD)" >&2
  fi
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
else
  run tar -czf "$TARBALL" --exclude=.git --exclude=__pycache__ --exclude=workdirs \
    --exclude='*.egg-info' --exclude='tpu_run_*.log' -C "$REPO_ROOT" .
fi
run "${GCLOUD_TPU[@]}" scp "$TARBALL" "$TPU_NAME:$REMOTE_TARBALL" "${LOCATION[@]}" --worker=all
ssh_all "mkdir -p $REPO_Q && tar -xzf $REMOTE_TARBALL -C $REPO_Q && rm -f $REMOTE_TARBALL"

# ---------------------------------------------------------------- 3. install
echo "# [3/4] installing jax[tpu] and cm3leon_jax on all workers"
# an object-store workdir is written through etils.epath + fsspec: its backend is EXTRAS (above)
ssh_all "cd $REPO_Q && pip install -U \"jax[tpu]\" && pip install -e \".$EXTRAS\""

# ---------------------------------------------------------------- 4. train
echo "# [4/4] training on all workers (log: $LOG_FILE)"
quote_cmd python3 -m cm3leon_jax.train --config "$CONFIG" --workdir "$WORKDIR" \
  ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
TRAIN_CMD="cd $REPO_Q && $REPLY"
run_logged "$LOG_FILE" "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${LOCATION[@]}" \
  --worker=all --command "$TRAIN_CMD"

echo "# done (log: $LOG_FILE)"
# The EXIT trap deletes the TPU here when --delete_after is set.
