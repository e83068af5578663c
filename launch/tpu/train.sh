#!/usr/bin/env bash
# Starts `dvl train` on every worker of a slice at once; JAX finds the other workers itself
# (Cloud TPU metadata) and the mesh comes from the slice's chip count.
set -euo pipefail
# shellcheck source=SCRIPTDIR/tpu.sh
source "$(dirname "${BASH_SOURCE[0]}")/tpu.sh"

USAGE="usage: train.sh --workdir gs://BUCKET/RUN [options] [-- --config.KEY=VALUE ...]
Run dvl train on all workers of a TPU slice (gcloud compute tpus tpu-vm ssh --worker=all).
The mesh (data,fsdp,tensor) is --data, chips / (data x tensor), --tensor."
tpu_opts
slice_opt
train_opts
REPO_DIR=dvl_jax
DETACH=0
opt repo-dir REPO_DIR "checkout on each worker (from setup.sh), relative to the home directory"
flag detach DETACH "run under nohup with output in REPO_DIR/train.log on each worker, and return at once"
parse_opts "$@"

tpu_slice
[[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// URL: every worker writes checkpoints there, and VM disks go with the slice"
train_command "$TPU_DEVICES"
env_command "LIBTPU_INIT_ARGS=${TPU_FLAGS[*]}"
note "$TPU_TYPE: $TPU_DEVICES chips, mesh (data,fsdp,tensor) = $MESH"
command="$(shell_join "${ENV[@]}" "${TRAIN[@]}")"
if ((DETACH)); then command="nohup $command > train.log 2>&1 < /dev/null &"; fi
on_all_workers "cd $(shell_join "$REPO_DIR") && $command"
