#!/usr/bin/env bash
# Build the retrieval stage (embeddings, ScaNN shards, neighbours) of a large prepared dataset on a
# Slurm cluster: the stages of data_pipeline/index_parts.py as a chain of jobs.
#
# Writes one sbatch script per stage and submits them, each starting only once the one before
# succeeded (--dependency=afterok):
#   - train (one task; left out with --embeddings or --clip_model): the retriever;
#   - embed, search, select: array jobs of --hosts tasks; task h runs
#       python -m data_pipeline.index --data DATA --stage STAGE --num_hosts H --host_index h
#     A task whose part already finished exits at once, so resubmitting redoes only failed parts;
#   - finish (one task): the neighbour sidecar the trainer reads.
# DATA must be on a filesystem every node sees.
#
# Usage:
#   launch/slurm_index.sh --hosts H --data DIR [options]
#
# Example (32 hosts, 64 ScaNN shards, embeddings from the user's CLIP on one GPU per embed task):
#   launch/slurm_index.sh --hosts 32 --num_shards 64 --clip_model /shared/clip-vit-l14 --gpus_per_task 1 \
#     --partition cpu --setup "source ~/venvs/cm3leon/bin/activate" --data /shared/data/laion
#
# Add --dry_run to print the scripts and the submit commands without submitting.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/slurm_index.sh --hosts H --data DIR [options]

Required:
  --hosts H                hosts each of the embed, search and select stages is split over
  --data DIR               the prepared data directory, absolute, on a filesystem every node sees

Options:
  --num_shards S           ScaNN shards, S >= H (default: H); host h builds shards h, h+H, ...
  --candidates C           candidates kept per document and query by the search (default 128)
  --embeddings PATH        a .npy [N, D] of document embeddings computed elsewhere (no train job)
  --clip_model DIR         a local Hugging Face CLIP checkpoint: the paper's frozen retriever (no train job)
  --steps N                retriever training steps (default: the retriever config's)
  --seed N                 retriever training and query dropout seed (default 0)
  --remove_parts           delete DATA/index_parts once the sidecar is written
  --overwrite              redo finished parts and an existing sidecar
  --max_running K          array tasks running at once (default: no limit)
  --gpus_per_task G        GPUs for the train and embed tasks (default: 0: CPU)
  --cpus_per_task C        CPU cores per task (default: 8)
  --partition P            Slurm partition
  --account A              Slurm account
  --qos Q                  Slurm QOS
  --time T                 time limit of each task, e.g. 04:00:00 (default: the partition's)
  --job_name NAME          default: cm3leon_index
  --repo_dir DIR           the repo as the nodes see it (default: this repo's absolute path)
  --setup CMD              shell command run before each task (e.g. "source VENV/bin/activate")
  --python PY              python executable on the nodes (default: python)
  --dry_run                print the sbatch scripts and commands instead of submitting
  --help                   show this help

Flags accept both `--flag=value` and `--flag value`.
EOF
}

# usage_error, shell_quote, quote_cmd, parse_flags, slurm_option_lines, set_slurm_flag, require_sbatch
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

# ---------------------------------------------------------------- flags
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOSTS=""
DATA=""
NUM_SHARDS=""
CANDIDATES=""
EMBEDDINGS=""
CLIP_MODEL=""
STEPS=""
SEED=""
REMOVE_PARTS=0
OVERWRITE=0
MAX_RUNNING=""
GPUS_PER_TASK=0
CPUS_PER_TASK=8
PARTITION=""
ACCOUNT=""
QOS=""
TIME_LIMIT=""
JOB_NAME="cm3leon_index"
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
SETUP=""
PYTHON="python"
DRY_RUN=0
EXTRA_ARGS=()

VALUED="$SLURM_VALUED|--hosts|--data|--num_shards|--candidates|--embeddings|--clip_model|--steps|--seed|--max_running|--gpus_per_task"

set_flag() {  # set_flag --name value
  set_slurm_flag "$1" "$2" && return
  case "$1" in
    --hosts) HOSTS=$2 ;;
    --data) DATA=$2 ;;
    --num_shards) NUM_SHARDS=$2 ;;
    --candidates) CANDIDATES=$2 ;;
    --embeddings) EMBEDDINGS=$2 ;;
    --clip_model) CLIP_MODEL=$2 ;;
    --steps) STEPS=$2 ;;
    --seed) SEED=$2 ;;
    --max_running) MAX_RUNNING=$2 ;;
    --gpus_per_task) GPUS_PER_TASK=$2 ;;
    *) usage_error "unknown flag: $1" ;;
  esac
}

bool_flag() {  # bool_flag --name: 1 when unknown
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --remove_parts) REMOVE_PARTS=1 ;;
    --overwrite) OVERWRITE=1 ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"

[[ ${#EXTRA_ARGS[@]} -eq 0 ]] || usage_error "no arguments after '--' (the stages take the flags above)"
[[ -n $HOSTS ]] || usage_error "missing required flag --hosts"
[[ -n $DATA ]] || usage_error "missing required flag --data"
for pair in "hosts:$HOSTS" "cpus_per_task:$CPUS_PER_TASK" ${MAX_RUNNING:+"max_running:$MAX_RUNNING"} \
            ${NUM_SHARDS:+"num_shards:$NUM_SHARDS"} ${CANDIDATES:+"candidates:$CANDIDATES"} ${STEPS:+"steps:$STEPS"}; do
  [[ ${pair#*:} =~ ^[0-9]+$ && ${pair#*:} -ge 1 ]] || usage_error "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[[ -z $SEED || $SEED =~ ^[0-9]+$ ]] || usage_error "--seed must be a whole number, got '$SEED'"
[[ $GPUS_PER_TASK =~ ^[0-9]+$ ]] || usage_error "--gpus_per_task must be a whole number, got '$GPUS_PER_TASK'"
[[ $HOSTS -ge 2 ]] || usage_error "--hosts must be at least 2 (one host is a plain \`python -m data_pipeline.index\` run)"
[[ -z $NUM_SHARDS || $NUM_SHARDS -ge $HOSTS ]] ||
  usage_error "--num_shards ($NUM_SHARDS) must be at least --hosts ($HOSTS): every host builds at least one shard"
[[ -z $EMBEDDINGS || -z $CLIP_MODEL ]] || usage_error "give --embeddings or --clip_model, not both"
[[ -z $STEPS || (-z $EMBEDDINGS && -z $CLIP_MODEL) ]] ||
  usage_error "--steps trains our retriever: not with --embeddings or --clip_model"
[[ $JOB_NAME =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--job_name may hold letters, digits, '.', '_' and '-' only"
for pair in "data:$DATA" ${EMBEDDINGS:+"embeddings:$EMBEDDINGS"} ${CLIP_MODEL:+"clip_model:$CLIP_MODEL"}; do
  [[ ${pair#*:} == /* ]] || usage_error "--${pair%%:*} '${pair#*:}' must be absolute (a shared path every node sees)"
done
require_sbatch

# ---------------------------------------------------------------- the sbatch scripts
shell_quote "$REPO_DIR"; REPO_Q=$REPLY
COMMON=(--data "$DATA")
[[ -n $SEED ]] && COMMON+=(--seed "$SEED")
[[ $OVERWRITE -eq 1 ]] && COMMON+=(--overwrite)
STAGES=()
[[ -z $EMBEDDINGS && -z $CLIP_MODEL ]] && STAGES+=(train)
STAGES+=(embed search select finish)

stage_args() {  # stage_args STAGE: the stage's own flags in ARGS
  ARGS=(--stage "$1")
  case "$1" in
    train) [[ -n $STEPS ]] && ARGS+=(--steps "$STEPS") ;;
    embed)
      [[ -n $EMBEDDINGS ]] && ARGS+=(--embeddings "$EMBEDDINGS")
      [[ -n $CLIP_MODEL ]] && ARGS+=(--clip_model "$CLIP_MODEL") ;;
    search)
      [[ -n $NUM_SHARDS ]] && ARGS+=(--num_shards "$NUM_SHARDS")
      [[ -n $CANDIDATES ]] && ARGS+=(--candidates "$CANDIDATES") ;;
    finish) [[ $REMOVE_PARTS -eq 1 ]] && ARGS+=(--remove_parts) ;;
  esac
  return 0
}

stage_script() {  # stage_script STAGE: the stage's sbatch script in REPLY
  local stage=$1 header cmd what
  stage_args "$stage"
  quote_cmd "$PYTHON" -m data_pipeline.index "${COMMON[@]}" "${ARGS[@]}"
  cmd=$REPLY
  slurm_option_lines
  header="#SBATCH --job-name=${JOB_NAME}_$stage
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=$CPUS_PER_TASK$REPLY"
  if [[ $stage == embed || $stage == search || $stage == select ]]; then
    cmd+=" --num_hosts $HOSTS --host_index \"\$SLURM_ARRAY_TASK_ID\""
    header+=$'\n'"#SBATCH --array=0-$((HOSTS - 1))${MAX_RUNNING:+%$MAX_RUNNING}"$'\n'"#SBATCH --output=slurm-%x-%A_%a.out"
    what="host \${SLURM_ARRAY_TASK_ID:-?} of $HOSTS"
  else
    header+=$'\n'"#SBATCH --output=slurm-%x-%j.out"
    what="one task"
  fi
  [[ $GPUS_PER_TASK -gt 0 && ($stage == train || $stage == embed) ]] && header+=$'\n'"#SBATCH --gpus-per-task=$GPUS_PER_TASK"
  REPLY="#!/usr/bin/env bash
# generated by launch/slurm_index.sh: the retrieval stage's $stage step
$header
set -eo pipefail
cd $REPO_Q
${SETUP}
echo \"# \$(date -u +%FT%TZ) $stage, $what, job \${SLURM_JOB_ID:-?} on \$(hostname)\"
# several JAX processes may share a GPU node: none takes most of a GPU's memory up front
export XLA_PYTHON_CLIENT_PREALLOCATE=false
$cmd
"
}

TIMESTAMP=$(date +%Y%m%d_%H%M%S)
PREVIOUS=""
for stage in "${STAGES[@]}"; do
  stage_script "$stage"
  script=$REPLY
  file="slurm_${JOB_NAME}_${TIMESTAMP}.$stage.sbatch"
  if [[ $DRY_RUN -eq 1 ]]; then
    echo "# dry run: the $stage script ($file)"
    printf '%s' "$script"
    echo "+ sbatch --parsable${PREVIOUS:+ --dependency=afterok:$PREVIOUS} $file"
    PREVIOUS="${stage^^}_JOB_ID"
    continue
  fi
  printf '%s' "$script" >"$file"
  chmod +x "$file"
  echo "+ sbatch --parsable${PREVIOUS:+ --dependency=afterok:$PREVIOUS} $file"
  job=$(sbatch --parsable ${PREVIOUS:+--dependency=afterok:$PREVIOUS} "$file")
  job=${job%%;*}   # --parsable prints "jobid[;cluster]"
  [[ $job =~ ^[0-9]+$ ]] || { echo "error: sbatch returned no job id for the $stage job: '$job'" >&2; exit 1; }
  echo "$stage: job $job"
  PREVIOUS=$job
done
