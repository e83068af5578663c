#!/usr/bin/env bash
# Copies a GCS folder onto every worker's disk, for what is read with plain file I/O: the training
# JSON and images (each worker reads its own shard) and an init checkpoint's config.json.
set -euo pipefail
# shellcheck source=SCRIPTDIR/tpu.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu.sh"

USAGE="usage: copy_data.sh --src gs://BUCKET/DATA [options]
Mirror a GCS folder (training data, an init checkpoint) onto every worker of a TPU slice
(gcloud storage rsync on all workers; run again to sync changes)."
tpu_opts
SRC=
DST=data
need src SRC "gs:// folder to copy"
opt dst DST "folder on each worker, relative to the home directory (train.sh runs in REPO_DIR: say ../data there)"
parse_opts "$@"

[[ $SRC == gs://* ]] || die "--src must be a gs:// URL, got '$SRC'"
on_all_workers "mkdir -p $(shell_join "$DST") && $(shell_join gcloud storage rsync --recursive "$SRC" "$DST")"
