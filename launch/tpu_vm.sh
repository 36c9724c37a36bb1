#!/usr/bin/env bash
# Runs a resnet_ensemble config on a Cloud TPU VM (one host or a whole pod slice).
#
#   launch/tpu_vm.sh --name NAME --zone ZONE --type ACCELERATOR_TYPE \
#       --config configs/X.py --workdir gs://BUCKET/DIR [options] [--config.a.b=v ...] [-- ARGS]
#
# Steps (each one a gcloud command; --dry-run prints them, one per line prefixed "+ ", and
# runs nothing):
#   1. create the TPU VM (`tpus tpu-vm create`), or a queued resource (`tpus queued-resources
#      create`, then wait until it is ACTIVE) with --queued or --spot; skipped with --no-create
#   2. pack the checkout (tracked + untracked-but-not-ignored files, uncommitted edits
#      included) into a tarball and copy it to every worker (`tpu-vm scp --worker=all`)
#   3. unpack and install on every worker: pip install -e ".[tfds]" "jax[tpu]"; then the
#      --setup command, if any, on every worker
#   4. run the program on every worker at once (`tpu-vm ssh --worker=all`) with
#      RESNET_ENSEMBLE_DISTRIBUTED=1, so each host calls jax.distributed.initialize() (which
#      needs no arguments on Cloud TPU); the output of all workers streams to this terminal and
#      is also appended to ~/resnet-ensemble.log on each worker
#   5. with --delete only: delete the VM (or the queued resource and its VM), even if the run
#      failed. Without --delete the VM is left running (and billed).
#
# The workdir must be reachable from every worker: use gs:// on a multi-host slice. Rerunning
# the same command (with --no-create while the VM exists) resumes from the newest checkpoint.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh --name NAME --zone ZONE --type TYPE --config CONFIG --workdir WORKDIR
                        [--project PROJECT] [--version RUNTIME] [--mode MODE] [--setup CMD]
                        [--queued] [--spot] [--no-create] [--no-install] [--detach] [--delete]
                        [--dry-run] [--config.a.b=value ...] [-- EXTRA_PROGRAM_ARGS ...]

required:
  --name NAME         TPU VM name (also the queued-resource id)
  --zone ZONE         e.g. us-central2-b
  --type TYPE         accelerator type, e.g. v4-8, v4-32, v5litepod-16
  --config CONFIG     config file relative to the repository root, e.g. configs/cifar10_resnet110.py
  --workdir WORKDIR   checkpoints and results; gs://BUCKET/DIR for multi-host slices
optional:
  --project PROJECT   GCP project (default: gcloud's configured project)
  --version RUNTIME   TPU software version (default: tpu-ubuntu2204-base)
  --mode MODE         train | lesion | gradients | report | all (default: train;
                      paths: the old name of gradients)
  --setup CMD         a shell command run on every worker after the install, before the run
                      (in the code directory), e.g. to fetch a dataset
  --queued            create a queued resource and wait until it is ACTIVE
  --spot              spot capacity (implies --queued: spot capacity is waited for)
  --no-create         use an existing VM of that name (e.g. to resume or rerun)
  --no-install        skip copying the code and installing it
  --detach            start the run in the background on the workers (nohup) and return;
                      follow it with the printed `tail -f` command (not with --delete)
  --delete            delete the VM / queued resource at the end, even if the run failed
  --dry-run           print every command (one per line, prefixed "+ ") without running it
  --config.a.b=value  config overrides, passed to the program
  -- ARGS             anything after -- is passed to the program unchanged
  -h, --help          this message
EOF
}

die_usage() {
  echo "tpu_vm.sh: error: $*" >&2
  usage >&2
  exit 2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

name="" zone="" type="" config="" workdir="" project="" version="tpu-ubuntu2204-base"
mode="train" setup="" queued=0 spot=0 create=1 install=1 detach=0 delete=0 dry_run=0
overrides=() extra=()

# Options take "--opt VALUE" or "--opt=VALUE". Empty arrays are expanded as ${a[@]+"${a[@]}"}
# so that macOS's bash 3.2 accepts them under set -u.
while [ $# -gt 0 ]; do
  arg=$1
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --queued) queued=1; shift; continue ;;
    --spot) spot=1; queued=1; shift; continue ;;
    --no-create) create=0; shift; continue ;;
    --no-install) install=0; shift; continue ;;
    --detach) detach=1; shift; continue ;;
    --delete) delete=1; shift; continue ;;
    --dry-run) dry_run=1; shift; continue ;;
    --) shift; extra=("$@"); break ;;
    --config.*) overrides+=("$arg"); shift; continue ;;
    --name|--zone|--type|--config|--workdir|--project|--version|--mode|--setup)
      [ $# -ge 2 ] && [[ "$2" != --* ]] || die_usage "$arg needs a value"
      key=${arg#--}; value=$2; shift 2 ;;
    --name=*|--zone=*|--type=*|--config=*|--workdir=*|--project=*|--version=*|--mode=*|--setup=*)
      key=${arg%%=*}; key=${key#--}; value=${arg#*=}; shift ;;
    *) die_usage "unknown argument: $arg" ;;
  esac
  [ -n "$value" ] || die_usage "--$key needs a non-empty value"
  case "$key" in
    name) name=$value ;; zone) zone=$value ;; type) type=$value ;; config) config=$value ;;
    workdir) workdir=$value ;; project) project=$value ;; version) version=$value ;;
    mode) mode=$value ;; setup) setup=$value ;;
  esac
done

for required in name zone type config workdir; do
  [ -n "${!required}" ] || die_usage "missing required argument --$required"
done
case "$mode" in
  train|lesion|gradients|paths|report|all) ;;
  *) die_usage "--mode must be one of train, lesion, gradients, report, all (got '$mode')" ;;
esac
case "$config" in
  /*) die_usage "--config must be relative to the repository root (e.g. configs/X.py)" ;;
esac
[ -f "$REPO/$config" ] || die_usage "--config $config: no such file in $REPO"
if [ "$detach" = 1 ] && [ "$delete" = 1 ]; then
  die_usage "--detach and --delete together would delete the VM under the running job"
fi
case "$workdir" in
  gs://*) ;;
  *) echo "tpu_vm.sh: warning: --workdir $workdir is not gs://: each worker writes its own" \
          "local copy, which is lost when the VM is deleted" >&2 ;;
esac

# Shell-quote one word only where needed, so printed commands stay readable and can be pasted.
# "--opt=some value" prints as --opt='some value'.
quote() {
  local safe='^[A-Za-z0-9_./=:,@%+-]+$' opt='^(--[A-Za-z0-9_.-]+=)(.*)$'
  if [[ "$1" =~ $safe ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ $opt ]]; then
    local value=${BASH_REMATCH[2]}
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${value//\'/\'\\\'\'}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
quote_all() {
  local out="" w
  for w in "$@"; do out+="${out:+ }$(quote "$w")"; done
  printf '%s' "$out"
}

# Print the command ("+ cmd"), then run it unless --dry-run.
run() {
  echo "+ $(quote_all "$@")"
  [ "$dry_run" = 1 ] || "$@"
}

common=(--zone="$zone")
[ -z "$project" ] || common+=(--project="$project")

# shellcheck disable=SC2088  # the ~ is for the worker's shell to expand, not this one
remote_dir='~/resnet-ensemble'
tarball_remote='resnet-ensemble.tar.gz'
# shellcheck disable=SC2088
log='~/resnet-ensemble.log'

# --- 1. create ------------------------------------------------------------------------------
delete_vm() {
  if [ "$queued" = 1 ]; then
    run gcloud compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}
status=0 tmp=""
finish() {
  status=$?
  [ -z "$tmp" ] || rm -rf "$tmp"
  if [ "$delete" = 1 ]; then
    trap - EXIT
    delete_vm || true
  fi
  exit "$status"
}
trap finish EXIT

if [ "$create" = 1 ]; then
  if [ "$queued" = 1 ]; then
    create_cmd=(gcloud compute tpus queued-resources create "$name" "${common[@]}"
                --node-id="$name" --accelerator-type="$type" --runtime-version="$version")
    [ "$spot" = 0 ] || create_cmd+=(--spot)
    run "${create_cmd[@]}"
    describe=(gcloud compute tpus queued-resources describe "$name" "${common[@]}"
              --format='value(state.state)')
    echo "+ $(quote_all "${describe[@]}")   # repeated every 30 s until ACTIVE"
    if [ "$dry_run" = 0 ]; then
      while :; do
        state=$("${describe[@]}")
        echo "queued resource $name: $state"
        case "$state" in
          ACTIVE) break ;;
          FAILED|SUSPENDED|SUSPENDING) echo "tpu_vm.sh: error: queued resource $name is $state" >&2
                                       exit 1 ;;
        esac
        sleep 30
      done
    fi
  else
    run gcloud compute tpus tpu-vm create "$name" "${common[@]}" \
        --accelerator-type="$type" --version="$version"
  fi
fi

ssh_all=(gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all)

# --- 2. copy the code, 3. install -------------------------------------------------------------
if [ "$install" = 1 ]; then
  tmp=$(mktemp -d)
  tarball="$tmp/$tarball_remote"
  # Tracked and untracked-but-not-ignored files as they are on disk (uncommitted edits too).
  pack="cd $(quote "$REPO") && git ls-files -z --cached --others --exclude-standard | "
  pack+="xargs -0 sh -c 'for f; do [ -f \"\$f\" ] && printf \"%s\\0\" \"\$f\"; done' _ | "
  pack+="tar --null -T - -czf $(quote "$tarball")"
  echo "+ $pack"
  [ "$dry_run" = 1 ] || bash -c "$pack"
  run gcloud compute tpus tpu-vm scp "$tarball" "$name:$tarball_remote" "${common[@]}" --worker=all
  run "${ssh_all[@]}" --command="rm -rf $remote_dir && mkdir -p $remote_dir && tar -xzf $tarball_remote -C $remote_dir && cd $remote_dir && python3 -m pip install -q -U pip && python3 -m pip install -q -e '.[tfds]' 'jax[tpu]'"
fi

if [ -n "$setup" ]; then
  run "${ssh_all[@]}" --command="cd $remote_dir && $setup"
fi

# --- 4. run on every worker -------------------------------------------------------------------
program=(python3 -m resnet_ensemble --config="$config" --workdir="$workdir" --mode="$mode"
         ${overrides[@]+"${overrides[@]}"} ${extra[@]+"${extra[@]}"})
env_vars="RESNET_ENSEMBLE_DISTRIBUTED=1 PYTHONUNBUFFERED=1"
if [ "$detach" = 1 ]; then
  run "${ssh_all[@]}" --command="cd $remote_dir && $env_vars nohup $(quote_all "${program[@]}") >> $log 2>&1 < /dev/null &"
  echo "started in the background; follow worker 0 with:"
  echo "  $(quote_all gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=0 --command="tail -f $log")"
else
  # Each line is prefixed with the worker's hostname (all workers stream to this terminal).
  run "${ssh_all[@]}" --command="cd $remote_dir && set -o pipefail && $env_vars $(quote_all "${program[@]}") 2>&1 | tee -a $log | sed -u \"s/^/[\$(hostname)] /\""
fi
# --- 5. delete (trap) -------------------------------------------------------------------------
