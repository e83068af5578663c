# shellcheck shell=bash
# shellcheck disable=SC2034  # sets variables for the scripts that source it
# Sourced by the launch/tpu scripts: the slice table, the gcloud options they share and the
# libtpu flags for training.

# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# What each flag does: launch/README.md.
TPU_FLAGS=(
  --xla_tpu_enable_latency_hiding_scheduler=true
  --xla_tpu_enable_async_collective_fusion=true
  --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true
  --xla_tpu_enable_async_collective_fusion_multiple_steps=true
  --xla_tpu_overlap_compute_collective_tc=true
  --xla_enable_async_all_gather=true
)

# The options of every TPU script: which slice, where. Empty zone/project mean gcloud's configured
# compute/zone and core/project.
tpu_opts() {
  TPU_NAME=dvl-tpu
  ZONE=
  PROJECT=
  opt name TPU_NAME "slice name (queued resource and TPU VM)"
  opt zone ZONE "zone, or none for gcloud's compute/zone setting"
  opt project PROJECT "project, or none for gcloud's core/project setting"
}

# The --accelerator-type option of the scripts that need the slice's size.
slice_opt() {
  ACCELERATOR_TYPE=v5litepod-64
  opt accelerator-type ACCELERATOR_TYPE "slice type: v4-N, v5p-N (N TensorCores, 2 per chip), v5litepod-N or v5e-N, v6e-N (N chips)"
}

# Sets TPU_TYPE (gcloud's spelling), TPU_RUNTIME (the TPU VM image) and TPU_DEVICES (JAX devices =
# chips: v4 and v5p count two TensorCores per chip, which JAX drives as one megacore device).
tpu_slice() {
  [[ $ACCELERATOR_TYPE =~ ^(v4|v5p|v5e|v5litepod|v6e)-([1-9][0-9]*)$ ]] ||
    die "unknown --accelerator-type '$ACCELERATOR_TYPE' (expected v4-N, v5p-N, v5litepod-N, v5e-N or v6e-N)"
  local gen=${BASH_REMATCH[1]} n=${BASH_REMATCH[2]} cores_per_chip=1
  case $gen in
    v4) TPU_TYPE=v4-$n TPU_RUNTIME=tpu-ubuntu2204-base cores_per_chip=2 ;;
    v5p) TPU_TYPE=v5p-$n TPU_RUNTIME=v2-alpha-tpuv5 cores_per_chip=2 ;;
    v5e | v5litepod) TPU_TYPE=v5litepod-$n TPU_RUNTIME=v2-alpha-tpuv5-lite ;;
    v6e) TPU_TYPE=v6e-$n TPU_RUNTIME=v2-alpha-tpuv6e ;;
  esac
  ((n % cores_per_chip == 0)) || die "$gen-N counts TensorCores, 2 per chip: N must be even, got $n"
  TPU_DEVICES=$((n / cores_per_chip))
}

# Sets WHERE to the --zone/--project flags of a gcloud command.
tpu_where() {
  WHERE=()
  if [[ -n $ZONE ]]; then WHERE+=("--zone=$ZONE"); fi
  if [[ -n $PROJECT ]]; then WHERE+=("--project=$PROJECT"); fi
}

# Runs the shell command line $1 on every worker of the slice, all at once.
on_all_workers() {
  tpu_where
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" --worker=all "--command=$1"
}
