# Shell helpers the launchers share (sourced by launch/tpu_run.sh, launch/slurm_run.sh,
# launch/slurm_ingest.sh and launch/slurm_index.sh).

usage_error() {  # a bad flag: say so, point at --help, exit 2
  echo "error: $*" >&2
  echo "run '$0 --help' for usage" >&2
  exit 2
}

# Quote one word for a POSIX shell: as-is when printf %q leaves it unchanged,
# otherwise in single quotes (more readable than %q's backslashes). Sets REPLY.
shell_quote() {
  local q
  printf -v q '%q' "$1"
  if [[ $q == "$1" ]]; then
    REPLY=$1
  else
    REPLY="'${1//\'/\'\\\'\'}'"
  fi
}

# Quote a whole command line (one word per argument). Sets REPLY.
quote_cmd() {
  local out="" a
  for a in "$@"; do
    shell_quote "$a"
    out+="$REPLY "
  done
  REPLY=${out% }
}

# The launchers' flag loop: `--flag value` and `--flag=value` for the flags in VALUED (a regex
# alternation the caller sets), each passed to the caller's `set_flag NAME VALUE`; any other
# `--flag` to the caller's `bool_flag NAME`, which returns non-zero for an unknown one; everything
# after a literal `--` into EXTRA_ARGS.
parse_flags() {
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --) shift; EXTRA_ARGS=("$@"); break ;;
      -h|--help) usage; exit 0 ;;
      --*=*)
        [[ ${1%%=*} =~ ^($VALUED)$ ]] || usage_error "unknown flag: ${1%%=*}"
        set_flag "${1%%=*}" "${1#*=}" ;;
      --*)
        if [[ $1 =~ ^($VALUED)$ ]]; then
          if [[ $# -lt 2 || $2 == --* ]]; then usage_error "flag $1 requires a value"; fi
          set_flag "$1" "$2"
          shift
        else
          bool_flag "$1" || usage_error "unknown flag: $1"
        fi ;;
      *) usage_error "unknown argument: $1" ;;
    esac
    shift
  done
}

# The #SBATCH lines for the Slurm options the Slurm launchers share, when given (PARTITION,
# ACCOUNT, QOS, TIME_LIMIT). Sets REPLY: empty, or those lines, each after a newline.
slurm_option_lines() {
  REPLY=""
  [[ -n $PARTITION ]] && REPLY+=$'\n'"#SBATCH --partition=$PARTITION"
  [[ -n $ACCOUNT ]] && REPLY+=$'\n'"#SBATCH --account=$ACCOUNT"
  [[ -n $QOS ]] && REPLY+=$'\n'"#SBATCH --qos=$QOS"
  [[ -n $TIME_LIMIT ]] && REPLY+=$'\n'"#SBATCH --time=$TIME_LIMIT"
  return 0
}

# The valued flags every Slurm launcher takes (a regex alternation for the caller's VALUED), set by
# `set_slurm_flag NAME VALUE`, which returns non-zero for any other flag.
SLURM_VALUED="--cpus_per_task|--partition|--account|--qos|--time|--job_name|--repo_dir|--setup|--python"
set_slurm_flag() {
  case "$1" in
    --cpus_per_task) CPUS_PER_TASK=$2 ;;
    --partition) PARTITION=$2 ;;
    --account) ACCOUNT=$2 ;;
    --qos) QOS=$2 ;;
    --time) TIME_LIMIT=$2 ;;
    --job_name) JOB_NAME=$2 ;;
    --repo_dir) REPO_DIR=$2 ;;
    --setup) SETUP=$2 ;;
    --python) PYTHON=$2 ;;
    *) return 1 ;;
  esac
}

# usage_error unless the config file $1 exists: relative to REPO_DIR, or an absolute path. Checked
# only when REPO_DIR is a directory here (a login node that does not mount it skips the check).
check_config_file() {
  [[ -d $REPO_DIR ]] || return 0
  if [[ $1 == /* ]]; then
    [[ -f $1 ]] || usage_error "--config $1: no such file"
  else
    [[ -f $REPO_DIR/$1 ]] || usage_error "--config $1: no such file in $REPO_DIR"
  fi
}

# Exits with a clear error when a real submission (DRY_RUN=0) has no sbatch to call.
require_sbatch() {
  if [[ $DRY_RUN -eq 0 ]] && ! command -v sbatch >/dev/null 2>&1; then
    echo "error: sbatch not found on PATH; run this on a Slurm login node, or use --dry_run" >&2
    exit 1
  fi
}
