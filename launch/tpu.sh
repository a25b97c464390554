#!/usr/bin/env bash
# Cloud TPU VM launcher for gpt_jax: create, setup, train, logs, stop, status, delete, supervise.
# Every command takes --dry-run, which prints the exact commands instead of running them.
# Walkthrough: launch/README.md.
set -euo pipefail
PROG=tpu.sh
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND --name NAME --zone ZONE [flags] [-- TRAINER_OVERRIDES...]

Commands:
  create     create the TPU VM (or a queued resource with --queued / --node-count N>1)
  setup      copy the repo to every worker and `pip install -e '.[tpu]'` it
  train      start `python3 -m gpt_jax.train` on every worker in the background (log: ~/train.log)
  logs       tail ~/train.log on one worker (default worker 0 of the first slice)
  stop       send SIGTERM to the trainer on every worker (it checkpoints and exits)
  status     print the TPU VM / queued resource state
  delete     delete the TPU VM / queued resource
  supervise  create (if needed), setup, train, and keep polling: on preemption (PREEMPTED,
             SUSPENDED, FAILED, ... or 3 failed ssh checks in a row) delete, recreate,
             reinstall and restart the same command with the same workdir; exits 0 when the
             trainer exits 0 on a healthy TPU

Flags (every command accepts every flag, so one flag set can be reused):
  --name NAME             TPU VM / queued resource name (required). Multi-slice nodes are NAME-0..
  --zone ZONE             e.g. us-central2-b (required)
  --project PROJECT       default: gcloud's configured project
  --accelerator TYPE      v4-N | v5litepod-N (v5e) | v5p-N | v6e-N (required: create, supervise)
  --runtime VERSION       default per generation: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                          v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot                  spot capacity (tpu-vm create or queued resource)
  --preemptible           legacy preemptible TPU VM (not with queued resources)
  --queued                use `gcloud compute tpus queued-resources` instead of `tpu-vm create`
  --node-count N          N>1 slices (multi-slice; implies --queued). train adds
                          --config.mesh.dcn_data=N unless you pass it yourself
  --repo URL              setup: git clone URL on the workers (default: copy `git archive` of
                          the local checkout)
  --ref REF               setup: branch/tag to clone, or commit to archive (default HEAD)
  --config FILE[:VARIANT] trainer --config (required: train, supervise)
  --workdir gs://...      trainer --workdir, must be on GCS (required: train, supervise)
  --python PY             python on the workers (default python3)
  --worker W              logs: which worker to tail (default 0; `all` for every worker)
  --max-restarts N        supervise: recreations/restarts before giving up (default 100)
  --poll SECONDS          supervise: seconds between checks (default 300)
  --dry-run               print the commands, one per line, instead of running them
  -h, --help              this help

Trainer overrides go after `--` (or directly, as --config.FIELD=VALUE):
  launch/tpu.sh train --name t --zone z --config experiments/gpt2.py:small \
      --workdir gs://bucket/runs/small -- --config.train.steps=1000

Dry-run test hooks (supervise only, honored only together with --dry-run): a dry run never
calls gcloud, so the answers it would get come from comma-separated lists:
  LAUNCH_FAKE_STATES  successive TPU/queued-resource states, NOT_FOUND for "does not exist"
                      (default NOT_FOUND,CREATING,READY,READY,READY,READY)
  LAUNCH_FAKE_TRAIN   successive trainer checks on worker 0: running | none | exit:CODE |
                      ssh-failed (default none,running,exit:0)
EOF
}

NAME="" ZONE="" PROJECT="" ACCEL="" RUNTIME="" SPOT=0 PREEMPTIBLE=0 QUEUED=0 NODE_COUNT=1
REPO="" REF="" CONFIG="" WORKDIR="" PYTHON=python3 WORKER=0 MAX_RESTARTS=100 POLL=300
OVERRIDES=()

if [[ $# -eq 0 ]]; then usage >&2; exit 2; fi
case $1 in
  -h|--help) usage; exit 0 ;;
  create|setup|train|logs|stop|status|delete|supervise) CMD=$1; shift ;;
  *) usage_error "unknown command '$1' (expected create|setup|train|logs|stop|status|delete|supervise)" ;;
esac

while [[ $# -gt 0 ]]; do
  case $1 in
    --config.*=*) OVERRIDES+=("$1"); shift ;;
    --*=*) set -- "${1%%=*}" "${1#*=}" "${@:2}" ;;  # --flag=value -> --flag value
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator) need_value "$@"; ACCEL=$2; shift 2 ;;
    --runtime) need_value "$@"; RUNTIME=$2; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --queued) QUEUED=1; shift ;;
    --node-count) need_value "$@"; NODE_COUNT=$2; shift 2 ;;
    --repo) need_value "$@"; REPO=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --max-restarts) need_value "$@"; MAX_RESTARTS=$2; shift 2 ;;
    --poll) need_value "$@"; POLL=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    *) usage_error "unknown flag '$1'" ;;
  esac
done

# ---- validation ---------------------------------------------------------------------------
reject_dry_run_after_dashes ${OVERRIDES[@]+"${OVERRIDES[@]}"}
require --name "$NAME"
require --zone "$ZONE"
require_int --node-count "$NODE_COUNT" 1
require_int --max-restarts "$MAX_RESTARTS" 0
require_int --poll "$POLL" 1
(( NODE_COUNT > 1 )) && QUEUED=1
if (( SPOT && PREEMPTIBLE )); then usage_error "--spot and --preemptible are exclusive"; fi
if (( QUEUED && PREEMPTIBLE )); then
  usage_error "--preemptible is for tpu-vm create only; use --spot with queued resources"
fi
case $CMD in
  create|supervise)
    require --accelerator "$ACCEL"
    case $ACCEL in
      v4-*) default_runtime=tpu-ubuntu2204-base ;;
      v5litepod-*) default_runtime=v2-alpha-tpuv5-lite ;;
      v5p-*) default_runtime=v2-alpha-tpuv5 ;;
      v6e-*) default_runtime=v2-alpha-tpuv6e ;;
      *) usage_error "--accelerator '$ACCEL': expected v4-N, v5litepod-N (v5e), v5p-N or v6e-N" ;;
    esac
    RUNTIME=${RUNTIME:-$default_runtime} ;;
esac
case $CMD in
  train|supervise)
    require --config "$CONFIG"
    require --workdir "$WORKDIR"
    [[ $WORKDIR == gs://?* ]] || usage_error "--workdir must be a gs:// path (every worker and \
every recreated VM must see the same checkpoints), got '$WORKDIR'" ;;
esac
if [[ -n ${LAUNCH_FAKE_STATES:-}${LAUNCH_FAKE_TRAIN:-} ]] && ! (( DRY_RUN )); then
  usage_error "LAUNCH_FAKE_STATES / LAUNCH_FAKE_TRAIN are dry-run test hooks; add --dry-run"
fi

# ---- derived values -------------------------------------------------------------------------
GC=(--zone="$ZONE")
[[ -n $PROJECT ]] && GC+=(--project="$PROJECT")
NODES=()  # the TPU VMs to ssh into: NAME, or NAME-0..NAME-(N-1) for multi-slice
if (( NODE_COUNT > 1 )); then
  for ((i = 0; i < NODE_COUNT; i++)); do NODES+=("$NAME-$i"); done
else
  NODES=("$NAME")
fi
if (( QUEUED )); then KIND=queued-resources; else KIND=tpu-vm; fi

# shellcheck disable=SC2088  # the tilde is expanded by the workers' shell, not here
REMOTE_DIR='~/gpt_jax'
# shellcheck disable=SC2016  # $? / $! / $(...) are for the workers' shell
TRAIN_CHECK='if [ -f ~/train.exit ]; then echo "exit:$(cat ~/train.exit)"; elif [ -f ~/train.pid ] && kill -0 "$(cat ~/train.pid)" 2>/dev/null; then echo running; else echo none; fi'

# ---- commands -------------------------------------------------------------------------------
ssh_all() {  # ssh_all NODE REMOTE_COMMAND: run on every worker of one slice
  run gcloud compute tpus tpu-vm ssh "$1" "${GC[@]}" --worker=all --command "$2"
}

do_create() {
  local args
  if (( QUEUED )); then
    args=(gcloud compute tpus queued-resources create "$NAME" "${GC[@]}"
          --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
    if (( NODE_COUNT > 1 )); then
      args+=(--node-count="$NODE_COUNT" --node-prefix="$NAME")
    else
      args+=(--node-id="$NAME")
    fi
  else
    args=(gcloud compute tpus tpu-vm create "$NAME" "${GC[@]}"
          --accelerator-type="$ACCEL" --version="$RUNTIME")
  fi
  (( SPOT )) && args+=(--spot)
  (( PREEMPTIBLE )) && args+=(--preemptible)
  run "${args[@]}"
}

do_setup() {
  local install node fetch tarball
  install="cd $REMOTE_DIR && $PYTHON -m pip install -U pip && $PYTHON -m pip install -e \".[tpu]\""
  if [[ -n $REPO ]]; then
    fetch="rm -rf $REMOTE_DIR && git clone --depth=1${REF:+ --branch=$(quote_dq "$REF")} $(quote_dq "$REPO") $REMOTE_DIR"
    for node in "${NODES[@]}"; do ssh_all "$node" "$fetch && $install" || return; done
  else
    tarball=/tmp/gpt_jax-$NAME.tar.gz
    run git -C "$REPO_ROOT" archive --format=tar.gz --output="$tarball" "${REF:-HEAD}" || return
    fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ~/gpt_jax.tar.gz -C $REMOTE_DIR"
    for node in "${NODES[@]}"; do
      run gcloud compute tpus tpu-vm scp "$tarball" "$node:gpt_jax.tar.gz" "${GC[@]}" --worker=all \
        || return
      ssh_all "$node" "$fetch && $install" || return
    done
  fi
}

train_command() {  # the trainer command line, shell-quoted
  local args=("$PYTHON" -m gpt_jax.train --config="$CONFIG" --workdir="$WORKDIR") o dcn=0
  for o in ${OVERRIDES[@]+"${OVERRIDES[@]}"}; do
    args+=("$o")
    [[ $o == --config.mesh.dcn_data=* ]] && dcn=1
  done
  (( NODE_COUNT > 1 && ! dcn )) && args+=(--config.mesh.dcn_data="$NODE_COUNT")
  quote_cmd_dq "${args[@]}"
}

do_train() {
  # Backgrounded so the ssh returns at once; HUP is ignored so the job outlives the session.
  # ~/train.pid holds the trainer's pid, ~/train.exit its exit code once it ends.
  local remote node
  remote="cd $REMOTE_DIR && rm -f ~/train.pid ~/train.exit && (trap \"\" HUP; nohup $(train_command) & echo \$! > ~/train.pid; wait \$!; echo \$? > ~/train.exit) >> ~/train.log 2>&1 < /dev/null &"
  for node in "${NODES[@]}"; do ssh_all "$node" "$remote" || return; done
}

do_logs() {
  run gcloud compute tpus tpu-vm ssh "${NODES[0]}" "${GC[@]}" --worker="$WORKER" \
    --command "tail -n 200 -F ~/train.log"
}

do_stop() {
  local node
  # shellcheck disable=SC2016  # for the workers' shell
  for node in "${NODES[@]}"; do
    ssh_all "$node" 'if [ -f ~/train.pid ]; then kill -TERM "$(cat ~/train.pid)" 2>/dev/null || true; fi' \
      || return
  done
}

state_args() {  # sets STATE_ARGS: the gcloud describe command that prints the state
  if (( QUEUED )); then
    STATE_ARGS=(gcloud compute tpus queued-resources describe "$NAME" "${GC[@]}"
                --format 'value(state.state)')
  else
    STATE_ARGS=(gcloud compute tpus tpu-vm describe "$NAME" "${GC[@]}" --format 'value(state)')
  fi
}

do_delete() {
  if (( QUEUED )); then
    run gcloud compute tpus queued-resources delete "$NAME" "${GC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GC[@]}" --quiet
  fi
}

# ---- supervisor -----------------------------------------------------------------------------
# shellcheck disable=SC2034  # read through ${!1} in next_fake
FAKE_STATES=${LAUNCH_FAKE_STATES:-NOT_FOUND,CREATING,READY,READY,READY,READY}
# shellcheck disable=SC2034
FAKE_TRAIN=${LAUNCH_FAKE_TRAIN:-none,running,exit:0}

next_fake() {  # next_fake VAR: pop the first item of the comma list in VAR into FAKE
  local list=${!1}
  [[ -n $list ]] || die "dry run: ran out of fake answers in $1 (LAUNCH_${1})"
  FAKE=${list%%,*}
  if [[ $list == *,* ]]; then list=${list#*,}; else list=""; fi
  printf -v "$1" '%s' "$list"
}

get_state() {  # sets STATE: the gcloud state, NOT_FOUND, or UNKNOWN (API trouble)
  local out
  state_args
  if (( DRY_RUN )); then
    quote_cmd "${STATE_ARGS[@]}"; next_fake FAKE_STATES; STATE=$FAKE; return
  fi
  if out=$("${STATE_ARGS[@]}" 2>&1); then
    STATE=${out:-UNKNOWN}
  elif [[ $out == *NOT_FOUND* || $out == *"not found"* ]]; then
    STATE=NOT_FOUND
  else
    STATE=UNKNOWN
  fi
}

get_train() {  # sets TRAIN: running | none | exit:CODE | ssh-failed (worker 0 of the first slice)
  local out
  if (( DRY_RUN )); then
    quote_cmd gcloud compute tpus tpu-vm ssh "${NODES[0]}" "${GC[@]}" --worker=0 --command "$TRAIN_CHECK"
    next_fake FAKE_TRAIN; TRAIN=$FAKE; return
  fi
  if out=$(gcloud compute tpus tpu-vm ssh "${NODES[0]}" "${GC[@]}" --worker=0 \
             --command "$TRAIN_CHECK" 2>/dev/null); then
    out=${out//$'\r'/}
    TRAIN=${out##*$'\n'}
  else
    TRAIN=ssh-failed
  fi
}

RESTARTS=0
count_restart() {
  RESTARTS=$((RESTARTS + 1))
  if (( RESTARTS > MAX_RESTARTS )); then
    die "giving up: more than --max-restarts $MAX_RESTARTS restarts"
  fi
  log "restart $RESTARTS of at most $MAX_RESTARTS"
}

recreate() {
  count_restart
  do_delete || log "delete failed; trying to create anyway"
  do_create || log "create failed; will retry after the next poll"
}

supervise() {
  local ssh_failures=0 launched=0
  log "supervising $KIND $NAME (poll ${POLL}s, max restarts $MAX_RESTARTS)"
  while true; do
    get_state
    case $STATE in
      READY|ACTIVE)
        get_train
        log "state $STATE, trainer $TRAIN"
        case $TRAIN in
          running) ssh_failures=0 ;;
          none)  # fresh (or rebooted) VM: install and start the trainer; it resumes from WORKDIR.
                 # Counted as a restart only if we had launched on this VM before (a reboot).
            ssh_failures=0
            if (( launched )); then count_restart; fi
            launched=1
            if do_setup && do_train; then :; else log "setup/train failed; retrying next poll"; fi ;;
          exit:0)  # a preempted trainer also exits 0 after checkpointing: look again first
            run sleep "$POLL"
            get_state
            if [[ $STATE == READY || $STATE == ACTIVE ]]; then
              log "trainer finished (exit 0) on a healthy $KIND"
              return 0
            fi
            continue ;;
          exit:*)
            log "trainer failed ($TRAIN): stopping leftovers and restarting it"
            count_restart
            do_stop || true
            run sleep 60
            do_train || log "train failed; retrying next poll" ;;
          *)
            ssh_failures=$((ssh_failures + 1))
            log "trainer check failed ($ssh_failures in a row)"
            if (( ssh_failures >= 3 )); then ssh_failures=0; launched=0; recreate; fi ;;
        esac ;;
      NOT_FOUND)
        log "$KIND $NAME does not exist: creating it"
        if (( launched )); then count_restart; launched=0; fi
        do_create || log "create failed; will retry after the next poll" ;;
      PREEMPTED|SUSPENDED|SUSPENDING|FAILED|TERMINATED|STOPPED|STOPPING)
        log "$KIND $NAME is $STATE: deleting and recreating it"
        launched=0
        recreate ;;
      *) log "$KIND $NAME is $STATE: waiting" ;;  # CREATING, ACCEPTED, PROVISIONING, ...
    esac
    run sleep "$POLL"
  done
}

case $CMD in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  status)
    if (( DRY_RUN )); then state_args; quote_cmd "${STATE_ARGS[@]}"; else get_state; echo "$STATE"; fi ;;
  delete) do_delete ;;
  supervise) supervise ;;
esac
