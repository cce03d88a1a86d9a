#!/usr/bin/env bash
# Ingest a large source on a Slurm cluster: one array task per part, then one merge job.
#
# Writes two sbatch scripts and submits them:
#   - an array job of --parts tasks; task I runs
#       python -m data_pipeline.prepare --config C --out OUT --num_shards N --shard_index I
#     (every N-th record of the source, from I: see data_pipeline/ingest_parts.py). A task whose part
#     already finished exits at once, so resubmitting the same command redoes only failed parts;
#   - a merge job that Slurm starts only once every array task succeeded (--dependency=afterok):
#       python -m data_pipeline.prepare --out OUT --merge [--remove_parts] [--merge_workers W]
# OUT must be on a filesystem every node sees. --module data_pipeline.sft_prepare ingests SFT data.
#
# Usage:
#   launch/slurm_ingest.sh --parts N --out DIR --config PATH [options] [-- PREPARE_ARGS...]
#
# Example (64 parts, 16 at a time, each on one GPU for the VQ encoder):
#   launch/slurm_ingest.sh --parts 64 --max_running 16 --gpus_per_task 1 --partition gpu \
#     --setup "source ~/venvs/cm3leon/bin/activate" --out /shared/data/laion --config experiments/data_shapes.py \
#     -- --config.source=jsonl --config.jsonl=/shared/laion/manifest.jsonl \
#        --config.spm_model=/shared/spm/spm.model --config.vq_workdir=/shared/vq
#
# Add --dry_run to print both scripts and the submit commands without submitting.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/slurm_ingest.sh --parts N --out DIR --config PATH [options] [-- PREPARE_ARGS...]

Required:
  --parts N                parts of the source, one array task each (--num_shards of prepare)
  --out DIR                the data directory, absolute, on a filesystem every node sees
  --config PATH            ingestion config, relative to the repo or absolute (e.g. experiments/data_shapes.py)

Options:
  --module M               data_pipeline.prepare (default) or data_pipeline.sft_prepare
  --max_running K          array tasks running at once (default: no limit)
  --gpus_per_task G        GPUs per task, for the VQ encoder (default: 0: CPU)
  --cpus_per_task C        CPU cores per task (default: 8)
  --merge_workers W        files the merge writes at once (default: the merge job's cores)
  --remove_parts           delete OUT/parts once merged
  --partition P            Slurm partition
  --account A              Slurm account
  --qos Q                  Slurm QOS
  --time T                 time limit of each task, e.g. 04:00:00 (default: the partition's)
  --job_name NAME          default: cm3leon_ingest
  --repo_dir DIR           the repo as the nodes see it (default: this repo's absolute path)
  --setup CMD              shell command run before each task (e.g. "source VENV/bin/activate")
  --python PY              python executable on the nodes (default: python)
  --dry_run                print the sbatch scripts and commands instead of submitting
  --help                   show this help

Everything after a literal `--` is appended to each part's command (config overrides; an --overwrite
there is passed to the merge too), e.g.  -- --config.source=jsonl --config.jsonl=/shared/manifest.jsonl
Flags accept both `--flag=value` and `--flag value`.
EOF
}

# usage_error, shell_quote, quote_cmd, parse_flags, slurm_option_lines, set_slurm_flag, check_config_file, require_sbatch
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

# ---------------------------------------------------------------- flags
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PARTS=""
OUT=""
CONFIG=""
MODULE="data_pipeline.prepare"
MAX_RUNNING=""
GPUS_PER_TASK=0
CPUS_PER_TASK=8
MERGE_WORKERS=""
REMOVE_PARTS=0
PARTITION=""
ACCOUNT=""
QOS=""
TIME_LIMIT=""
JOB_NAME="cm3leon_ingest"
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
SETUP=""
PYTHON="python"
DRY_RUN=0
EXTRA_ARGS=()

VALUED="$SLURM_VALUED|--parts|--out|--config|--module|--max_running|--gpus_per_task|--merge_workers"

set_flag() {  # set_flag --name value
  set_slurm_flag "$1" "$2" && return
  case "$1" in
    --parts) PARTS=$2 ;;
    --out) OUT=$2 ;;
    --config) CONFIG=$2 ;;
    --module) MODULE=$2 ;;
    --max_running) MAX_RUNNING=$2 ;;
    --gpus_per_task) GPUS_PER_TASK=$2 ;;
    --merge_workers) MERGE_WORKERS=$2 ;;
    *) usage_error "unknown flag: $1" ;;
  esac
}

bool_flag() {  # bool_flag --name: 1 when unknown
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --remove_parts) REMOVE_PARTS=1 ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"

[[ -n $PARTS ]] || usage_error "missing required flag --parts"
[[ -n $OUT ]] || usage_error "missing required flag --out"
[[ -n $CONFIG ]] || usage_error "missing required flag --config"
for pair in "parts:$PARTS" "cpus_per_task:$CPUS_PER_TASK" ${MAX_RUNNING:+"max_running:$MAX_RUNNING"} \
            ${MERGE_WORKERS:+"merge_workers:$MERGE_WORKERS"}; do
  [[ ${pair#*:} =~ ^[0-9]+$ && ${pair#*:} -ge 1 ]] || usage_error "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[[ $GPUS_PER_TASK =~ ^[0-9]+$ ]] || usage_error "--gpus_per_task must be a whole number, got '$GPUS_PER_TASK'"
[[ $PARTS -ge 2 ]] || usage_error "--parts must be at least 2 (one part is a plain \`python -m $MODULE\` run)"
[[ $MODULE == data_pipeline.prepare || $MODULE == data_pipeline.sft_prepare ]] ||
  usage_error "--module must be data_pipeline.prepare or data_pipeline.sft_prepare, got '$MODULE'"
[[ $JOB_NAME =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--job_name may hold letters, digits, '.', '_' and '-' only"
check_config_file "$CONFIG"
[[ $OUT == /* ]] || usage_error "--out '$OUT' must be absolute (a shared path every node sees)"
require_sbatch

# ---------------------------------------------------------------- the sbatch scripts
quote_cmd "$PYTHON" -m "$MODULE" --config "$CONFIG" --out "$OUT" --num_shards "$PARTS" \
  ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
PART_CMD="$REPLY --shard_index \"\$SLURM_ARRAY_TASK_ID\""
MERGE_ARGS=(--out "$OUT" --merge)
[[ $REMOVE_PARTS -eq 1 ]] && MERGE_ARGS+=(--remove_parts)
[[ -n $MERGE_WORKERS ]] && MERGE_ARGS+=(--merge_workers "$MERGE_WORKERS")
# a rebuild's --overwrite must reach the merge too: without it the merge finds the old dataset and exits
for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
  [[ $arg == --overwrite || $arg == --overwrite=* ]] && MERGE_ARGS+=("$arg")
done
quote_cmd "$PYTHON" -m "$MODULE" "${MERGE_ARGS[@]}"
MERGE_CMD=$REPLY
shell_quote "$REPO_DIR"; REPO_Q=$REPLY

common_header() {  # common_header NAME: the #SBATCH lines both jobs share
  local h="#SBATCH --job-name=$1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=$CPUS_PER_TASK"
  slurm_option_lines
  REPLY=$h$REPLY
}

common_header "$JOB_NAME"
PARTS_HEADER="$REPLY
#SBATCH --array=0-$((PARTS - 1))${MAX_RUNNING:+%$MAX_RUNNING}
#SBATCH --output=slurm-%x-%A_%a.out"
[[ $GPUS_PER_TASK -gt 0 ]] && PARTS_HEADER+=$'\n'"#SBATCH --gpus-per-task=$GPUS_PER_TASK"
common_header "${JOB_NAME}_merge"
MERGE_HEADER="$REPLY
#SBATCH --output=slurm-%x-%j.out"

PARTS_SCRIPT="#!/usr/bin/env bash
# generated by launch/slurm_ingest.sh: part \$SLURM_ARRAY_TASK_ID of $PARTS of the source
$PARTS_HEADER
set -eo pipefail
cd $REPO_Q
${SETUP}
echo \"# \$(date -u +%FT%TZ) part \${SLURM_ARRAY_TASK_ID:-?} of $PARTS, job \${SLURM_JOB_ID:-?} on \$(hostname)\"
# several JAX processes may share a GPU node: none takes most of a GPU's memory up front
export XLA_PYTHON_CLIENT_PREALLOCATE=false
$PART_CMD
"
MERGE_SCRIPT="#!/usr/bin/env bash
# generated by launch/slurm_ingest.sh: joins the $PARTS parts (runs after every part succeeded)
$MERGE_HEADER
set -eo pipefail
cd $REPO_Q
${SETUP}
echo \"# \$(date -u +%FT%TZ) merging $PARTS parts, job \${SLURM_JOB_ID:-?} on \$(hostname)\"
$MERGE_CMD
"

TIMESTAMP=$(date +%Y%m%d_%H%M%S)
PARTS_FILE="slurm_${JOB_NAME}_${TIMESTAMP}.parts.sbatch"
MERGE_FILE="slurm_${JOB_NAME}_${TIMESTAMP}.merge.sbatch"
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# dry run: the parts' array script ($PARTS_FILE)"
  printf '%s' "$PARTS_SCRIPT"
  echo "# the merge script ($MERGE_FILE)"
  printf '%s' "$MERGE_SCRIPT"
  echo "+ sbatch --parsable $PARTS_FILE"
  echo "+ sbatch --dependency=afterok:PARTS_JOB_ID $MERGE_FILE"
  exit 0
fi
printf '%s' "$PARTS_SCRIPT" >"$PARTS_FILE"
printf '%s' "$MERGE_SCRIPT" >"$MERGE_FILE"
chmod +x "$PARTS_FILE" "$MERGE_FILE"
echo "+ sbatch --parsable $PARTS_FILE"
PARTS_JOB=$(sbatch --parsable "$PARTS_FILE")
PARTS_JOB=${PARTS_JOB%%;*}   # --parsable prints "jobid[;cluster]"
[[ $PARTS_JOB =~ ^[0-9]+$ ]] || { echo "error: sbatch returned no job id: '$PARTS_JOB'" >&2; exit 1; }
echo "+ sbatch --dependency=afterok:$PARTS_JOB $MERGE_FILE"
sbatch --dependency="afterok:$PARTS_JOB" "$MERGE_FILE"
