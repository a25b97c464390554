# shellcheck shell=bash
# Helpers shared by launch/tpu.sh, launch/slurm/submit.sh and launch/slurm/train.sbatch.
# Sourced, never run. Callers set PROG (the name used in messages) and `set -euo pipefail`.
# Written for bash >= 3.2 (macOS laptops): no namerefs, no associative arrays.

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$LAUNCH_DIR/.." && pwd)"
DRY_RUN=0

# quote WORD: WORD as the shell would need it typed (single quotes only when necessary).
quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

# quote_dq WORD: WORD in double quotes when needed, for commands nested inside a single-quoted
# remote command (gcloud ... --command '...'), where single quotes would turn into '\''.
quote_dq() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "$s"
  else
    s=${s//\\/\\\\}; s=${s//\"/\\\"}; s=${s//\$/\\\$}; s=${s//\`/\\\`}
    printf '"%s"' "$s"
  fi
}

# quote_each QUOTER ARGS...: ARGS on one line, each passed through QUOTER.
quote_each() {
  local quoter=$1 out="" a
  shift
  for a in "$@"; do
    out+="${out:+ }$("$quoter" "$a")"
  done
  printf '%s\n' "$out"
}

# quote_cmd ARGS...: one line that re-parses (sh, bash, shlex.split) into exactly ARGS.
quote_cmd() { quote_each quote "$@"; }

# quote_cmd_dq ARGS...: like quote_cmd, with quote_dq.
quote_cmd_dq() { quote_each quote_dq "$@"; }

# run CMD ARGS...: with --dry-run print the command on stdout (nothing is executed);
# otherwise echo it to stderr as "+ cmd" and execute it, returning its status.
run() {
  if (( DRY_RUN )); then
    quote_cmd "$@"
  else
    printf '+ %s' "$(quote_cmd "$@")" >&2
    printf '\n' >&2
    "$@"
  fi
}

log() { printf '[%s] %s: %s\n' "$(date +%H:%M:%S)" "$PROG" "$*" >&2; }

# die MSG: a runtime failure (exit 1).
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }

# usage_error MSG: bad or missing command-line input (exit 2).
usage_error() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# need_value "$@": inside a flag loop, fail unless the flag in $1 has a value in $2.
need_value() { [[ $# -ge 2 ]] || usage_error "flag $1 needs a value"; }

# require FLAG VALUE: fail naming FLAG when VALUE is empty.
require() { [[ -n $2 ]] || usage_error "missing required flag $1"; }

# require_int FLAG VALUE MIN: VALUE must be an integer >= MIN.
require_int() {
  if ! [[ $2 =~ ^[0-9]+$ ]] || (( $2 < $3 )); then
    usage_error "flag $1 must be an integer >= $3 (got '$2')"
  fi
}

# reject_dry_run_after_dashes OVERRIDES...: --dry-run after `--` would reach the trainer
# (and the real commands would run), so refuse it.
reject_dry_run_after_dashes() {
  local o
  for o in "$@"; do
    [[ $o != --dry-run ]] || usage_error "--dry-run after \`--\` would go to the trainer; put it before \`--\`"
  done
}

