# Shell helpers the launchers share (sourced by launch/tpu_run.sh and launch/slurm_run.sh).

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
