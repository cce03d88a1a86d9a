# Shell helpers the launchers share (sourced by launch/tpu_run.sh, launch/slurm_run.sh and
# launch/slurm_ingest.sh).

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
