#!/usr/bin/env bash
# Deletes a slice made by create.sh: the queued resource and, with --force, its TPU VMs.
set -euo pipefail
# shellcheck source=SCRIPTDIR/tpu.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu.sh"

USAGE="usage: delete.sh [options]
Delete a TPU slice and its queued resource (checkpoints on gs:// stay; the VMs' disks do not)."
tpu_opts
parse_opts "$@"

tpu_where
run gcloud compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
