#!/usr/bin/env bash
# Launch cm3leon_jax training on a Slurm GPU cluster: one JAX process per node, each driving all
# of its node's GPUs (jax.distributed reads the coordinator, process count and index from Slurm).
#
# Writes an sbatch script (./slurm_<job>_<timestamp>.sbatch) and submits it. The job:
#   - cds to --repo_dir (a path every node sees: the repo on a shared filesystem),
#   - runs --setup (e.g. activating a virtual environment), then
#   - srun's `python -m cm3leon_jax.train --config ... --workdir ...` once per node.
# The workdir must be shared by every node (a shared filesystem or a gs:// bucket).
#
# Time limits and preemption: Slurm signals the batch shell --signal_seconds before the job's time
# limit (#SBATCH --signal=B:USR1@N). The script then sends SIGTERM to the training tasks, which save
# a checkpoint and exit (cm3leon_jax.checkpointing.PreemptionWatcher), and requeues the job
# (scontrol requeue): the requeued job reruns the same command, which resumes from the workdir. A
# job preempted by Slurm itself is requeued by Slurm (#SBATCH --requeue), and resumes the same way.
#
# Usage:
#   launch/slurm_run.sh --nodes N --gpus_per_node G --workdir DIR [options] [-- TRAIN_ARGS...]
#
# Example:
#   launch/slurm_run.sh --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 \
#     --setup "source ~/venvs/cm3leon/bin/activate" \
#     --config experiments/cm3leon_350m.py --workdir /shared/runs/350m -- --config.mesh.fsdp=-1
#
# Add --dry_run to print the sbatch script and the submit command without submitting.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/slurm_run.sh --workdir DIR [options] [-- TRAIN_ARGS...]

Required:
  --workdir DIR            training workdir every node can reach (shared filesystem or gs://...)

Options:
  --nodes N                nodes, one JAX process each (default: 1)
  --gpus_per_node G        GPUs per node (default: 8)
  --cpus_per_task C        CPU cores per process, for the data pipeline (default: 16)
  --partition P            Slurm partition
  --account A              Slurm account
  --qos Q                  Slurm QOS
  --time T                 time limit, e.g. 24:00:00 (default: the partition's)
  --job_name NAME          default: cm3leon
  --config PATH            config file, relative to the repo or absolute (default: experiments/tiny_cpu.py)
  --repo_dir DIR           the repo as the nodes see it (default: this repo's absolute path)
  --setup CMD              shell command run on the nodes before training (e.g. "source VENV/bin/activate")
  --python PY              python executable on the nodes (default: python)
  --signal_seconds S       checkpoint and requeue S seconds before the time limit (below --time; default: 300)
  --no_requeue             neither requeue at the time limit nor after a Slurm preemption
  --dry_run                print the sbatch script and the sbatch command instead of submitting
  --help                   show this help

Everything after a literal `--` is appended to the train command,
e.g.  -- --config.total_steps=1000
Flags accept both `--flag=value` and `--flag value`.
EOF
}

# usage_error, shell_quote, quote_cmd, parse_flags, slurm_option_lines, set_slurm_flag, check_config_file, require_sbatch
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

# ---------------------------------------------------------------- flags
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NODES=1
GPUS_PER_NODE=8
CPUS_PER_TASK=16
PARTITION=""
ACCOUNT=""
QOS=""
TIME_LIMIT=""
JOB_NAME="cm3leon"
CONFIG="experiments/tiny_cpu.py"
WORKDIR=""
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
SETUP=""
PYTHON="python"
SIGNAL_SECONDS=300
REQUEUE=1
DRY_RUN=0
EXTRA_ARGS=()

VALUED="$SLURM_VALUED|--nodes|--gpus_per_node|--config|--workdir|--signal_seconds"

set_flag() {  # set_flag --name value
  set_slurm_flag "$1" "$2" && return
  case "$1" in
    --nodes) NODES=$2 ;;
    --gpus_per_node) GPUS_PER_NODE=$2 ;;
    --config) CONFIG=$2 ;;
    --workdir) WORKDIR=$2 ;;
    --signal_seconds) SIGNAL_SECONDS=$2 ;;
    *) usage_error "unknown flag: $1" ;;
  esac
}

bool_flag() {  # bool_flag --name: 1 when unknown
  case "$1" in
    --dry_run) DRY_RUN=1 ;;
    --no_requeue) REQUEUE=0 ;;
    *) return 1 ;;
  esac
}

parse_flags "$@"

[[ -n $WORKDIR ]] || usage_error "missing required flag --workdir"
for pair in "nodes:$NODES" "gpus_per_node:$GPUS_PER_NODE" "cpus_per_task:$CPUS_PER_TASK" \
            "signal_seconds:$SIGNAL_SECONDS"; do
  [[ ${pair#*:} =~ ^[0-9]+$ && ${pair#*:} -ge 1 ]] || usage_error "--${pair%%:*} must be a positive integer, got '${pair#*:}'"
done
[[ $JOB_NAME =~ ^[A-Za-z0-9._-]+$ ]] || usage_error "--job_name may hold letters, digits, '.', '_' and '-' only"

# Seconds in a Slurm time limit (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); empty for any other (UNLIMITED).
slurm_seconds() {
  local d=0 h=0 m=0 s=0
  if [[ $1 =~ ^([0-9]+)-([0-9]+)(:([0-9]+)(:([0-9]+))?)?$ ]]; then
    d=${BASH_REMATCH[1]} h=${BASH_REMATCH[2]} m=${BASH_REMATCH[4]:-0} s=${BASH_REMATCH[6]:-0}
  elif [[ $1 =~ ^([0-9]+)$ ]]; then m=${BASH_REMATCH[1]}
  elif [[ $1 =~ ^([0-9]+):([0-9]+)$ ]]; then m=${BASH_REMATCH[1]} s=${BASH_REMATCH[2]}
  elif [[ $1 =~ ^([0-9]+):([0-9]+):([0-9]+)$ ]]; then h=${BASH_REMATCH[1]} m=${BASH_REMATCH[2]} s=${BASH_REMATCH[3]}
  else REPLY=""; return 0; fi
  REPLY=$(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}
# a signal due before the job starts comes at once: every requeued job would checkpoint and requeue again
if [[ $REQUEUE -eq 1 && -n $TIME_LIMIT ]]; then
  slurm_seconds "$TIME_LIMIT"
  if [[ -n $REPLY && $SIGNAL_SECONDS -ge $REPLY ]]; then
    usage_error "--signal_seconds=$SIGNAL_SECONDS is not below --time $TIME_LIMIT ($REPLY s): the job would be" \
                "signalled, checkpointed and requeued as soon as it starts, again and again; lower --signal_seconds"
  fi
fi
check_config_file "${CONFIG%%:*}"   # (a config may take an argument: file.py:ARG)
if [[ $WORKDIR != /* && $WORKDIR != *://* ]]; then
  usage_error "--workdir '$WORKDIR' must be absolute (a shared path every node sees) or a gs:// URL"
fi
require_sbatch

# ---------------------------------------------------------------- the sbatch script
quote_cmd "$PYTHON" -m cm3leon_jax.train --config "$CONFIG" --workdir "$WORKDIR" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}
TRAIN_CMD=$REPLY
shell_quote "$REPO_DIR"; REPO_Q=$REPLY

HEADER="#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$GPUS_PER_NODE
#SBATCH --cpus-per-task=$CPUS_PER_TASK
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append"
slurm_option_lines
HEADER+=$REPLY
if [[ $REQUEUE -eq 1 ]]; then
  HEADER+=$'\n'"#SBATCH --requeue"$'\n'"#SBATCH --signal=B:USR1@$SIGNAL_SECONDS"
fi

BATCH_SCRIPT="#!/usr/bin/env bash
# generated by launch/slurm_run.sh: $NODES node(s) x $GPUS_PER_NODE GPU(s), one JAX process per node
$HEADER
set -eo pipefail
cd $REPO_Q
${SETUP}
echo \"# \$(date -u +%FT%TZ) job \${SLURM_JOB_ID:-?} (restart \${SLURM_RESTART_COUNT:-0}) on \${SLURM_JOB_NODELIST:-?}\"
TRAIN_PID=\"\""
if [[ $REQUEUE -eq 1 ]]; then
  BATCH_SCRIPT+="
# near the time limit: the tasks save a checkpoint on SIGTERM and exit, then the job is requeued and resumes
on_time_limit() {
  echo \"# \$(date -u +%FT%TZ) time limit in ${SIGNAL_SECONDS}s: checkpointing, then requeueing job \$SLURM_JOB_ID\"
  [[ -n \$TRAIN_PID ]] && kill -TERM \"\$TRAIN_PID\" 2>/dev/null && wait \"\$TRAIN_PID\" || true
  scontrol requeue \"\$SLURM_JOB_ID\"
  exit 0
}
trap on_time_limit USR1"
fi
BATCH_SCRIPT+="
# the training tasks: jax.distributed.initialize() reads the coordinator and ranks from Slurm's env
srun --kill-on-bad-exit=1 --ntasks-per-node=1 $TRAIN_CMD &
TRAIN_PID=\$!
wait \"\$TRAIN_PID\"
"

TIMESTAMP=$(date +%Y%m%d_%H%M%S)
SBATCH_FILE="slurm_${JOB_NAME}_${TIMESTAMP}.sbatch"
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# dry run: the sbatch script ($SBATCH_FILE) and the command that would submit it"
  printf '%s' "$BATCH_SCRIPT"
  echo "+ sbatch $SBATCH_FILE"
  exit 0
fi
printf '%s' "$BATCH_SCRIPT" >"$SBATCH_FILE"
chmod +x "$SBATCH_FILE"
echo "+ sbatch $SBATCH_FILE"
sbatch "$SBATCH_FILE"
