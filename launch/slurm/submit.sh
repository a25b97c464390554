#!/usr/bin/env bash
# Submit launch/slurm/train.sbatch with the node/GPU layout on the command line.
# --dry-run prints the sbatch command and, as a comment, the srun line the job will run.
set -euo pipefail
PROG=submit.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

usage() {
  cat <<'EOF'
Usage: launch/slurm/submit.sh --config FILE[:VARIANT] --workdir DIR [flags] [-- TRAINER_OVERRIDES...]

  --config FILE[:VARIANT]  trainer --config (required)
  --workdir DIR            shared-filesystem or gs:// workdir; the same one resumes (required)
  --nodes N                nodes (default 1)
  --gpus-per-node G        GPUs per node = processes per node (default 8)
  --time T                 sbatch --time, e.g. 24:00:00 (default: the script's 24:00:00)
  --partition P            sbatch --partition
  --account A              sbatch --account
  --job-name NAME          sbatch --job-name (default gpt-jax)
  --python PY              python with gpt_jax installed (default python3 on PATH)
  --dry-run                print the commands instead of running them
  -h, --help               this help
Trainer overrides go after `--`, or directly as --config.FIELD=VALUE.
Logs: runs/slurm/NAME-JOBID.out in the repo (appended to across requeues).
EOF
}

CONFIG="" WORKDIR="" NODES=1 GPUS=8 TIME="" PARTITION="" ACCOUNT="" JOB_NAME=gpt-jax PYTHON=""
OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config.*=*) OVERRIDES+=("$1"); shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --nodes) need_value "$@"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS=$2; shift 2 ;;
    --time) need_value "$@"; TIME=$2; shift 2 ;;
    --partition) need_value "$@"; PARTITION=$2; shift 2 ;;
    --account) need_value "$@"; ACCOUNT=$2; shift 2 ;;
    --job-name) need_value "$@"; JOB_NAME=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) usage_error "unknown flag '$1'" ;;
  esac
done
reject_dry_run_after_dashes ${OVERRIDES[@]+"${OVERRIDES[@]}"}
require --config "$CONFIG"
require --workdir "$WORKDIR"
require_int --nodes "$NODES" 1
require_int --gpus-per-node "$GPUS" 1

SBATCH=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --gpus-per-node="$GPUS"
        --ntasks-per-node="$GPUS")
[[ -n $TIME ]] && SBATCH+=(--time="$TIME")
[[ -n $PARTITION ]] && SBATCH+=(--partition="$PARTITION")
[[ -n $ACCOUNT ]] && SBATCH+=(--account="$ACCOUNT")
SBATCH+=(--chdir="$REPO_ROOT" --output=runs/slurm/%x-%j.out)

JOB_ARGS=(--config "$CONFIG" --workdir "$WORKDIR")
[[ -n $PYTHON ]] && JOB_ARGS+=(--python "$PYTHON")
if [[ ${#OVERRIDES[@]} -gt 0 ]]; then JOB_ARGS+=(-- "${OVERRIDES[@]}"); fi

run mkdir -p "$REPO_ROOT/runs/slurm"
run "${SBATCH[@]}" "$REPO_ROOT/launch/slurm/train.sbatch" "${JOB_ARGS[@]}"
if (( DRY_RUN )); then
  printf '# in the job, on %s node(s) x %s task(s): ' "$NODES" "$GPUS"
  bash "$LAUNCH_DIR/slurm/train.sbatch" --dry-run "${JOB_ARGS[@]}"
fi
