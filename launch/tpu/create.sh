#!/usr/bin/env bash
# Requests a Cloud TPU slice as a queued resource (Google's recommended path: the request waits for
# capacity instead of failing) and waits until its VMs are up.
set -euo pipefail
# shellcheck source=SCRIPTDIR/tpu.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu.sh"

USAGE="usage: create.sh [options]
Create a TPU VM slice (gcloud compute tpus queued-resources create) and wait until it is ACTIVE."
tpu_opts
slice_opt
RUNTIME_VERSION=
SPOT=0
NO_WAIT=0
opt runtime-version RUNTIME_VERSION "TPU VM image; none = the one for the slice type"
flag spot SPOT "Spot capacity (cheaper, can be preempted: train with --resume after a new create)"
flag no-wait NO_WAIT "return once the request is queued"
parse_opts "$@"

tpu_slice
tpu_where
note "$TPU_TYPE: $TPU_DEVICES chips"
create=(gcloud compute tpus queued-resources create "$TPU_NAME" "${WHERE[@]}" "--node-id=$TPU_NAME"
  "--accelerator-type=$TPU_TYPE" "--runtime-version=${RUNTIME_VERSION:-$TPU_RUNTIME}")
if ((SPOT)); then create+=(--spot); fi
run "${create[@]}"
if ((NO_WAIT)); then exit 0; fi

state=(gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" "--format=value(state.state)")
if ((DRY_RUN)); then
  note "then, every 30 s until it prints ACTIVE:"
  run "${state[@]}"
  exit 0
fi
while true; do
  current=$(run "${state[@]}")
  case $current in
    ACTIVE) break ;;
    FAILED | SUSPENDING | SUSPENDED) die "queued resource $TPU_NAME is $current" ;;
  esac
  note "$TPU_NAME is ${current:-WAITING}; checking again in 30 s"
  sleep 30
done
note "$TPU_NAME is ACTIVE"
