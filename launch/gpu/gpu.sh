# shellcheck shell=bash
# shellcheck disable=SC2034  # sets variables for the scripts that source it
# Sourced by the launch/gpu scripts: the options they share and the environment of every training
# process (XLA flags, memory fraction, NCCL logging).

# shellcheck source=SCRIPTDIR/../common.sh
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

# What each flag does: launch/README.md.
GPU_FLAGS=(
  --xla_gpu_enable_latency_hiding_scheduler=true
  --xla_gpu_all_reduce_combine_threshold_bytes=134217728
  --xla_gpu_all_gather_combine_threshold_bytes=134217728
  --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728
  --xla_gpu_enable_pipelined_all_gather=true
  --xla_gpu_enable_pipelined_reduce_scatter=true
  --xla_gpu_enable_pipelined_all_reduce=true
)

gpu_opts() {
  GPUS_PER_NODE=8
  REPO_DIR=$REPO_ROOT
  opt gpus-per-node GPUS_PER_NODE "GPUs on each node"
  opt repo-dir REPO_DIR "dvl_jax checkout with its .venv, at the same path on every node"
  train_opts
}

# Sets ENV for a training process; arguments are further per-process variables.
gpu_env() {
  env_command "XLA_FLAGS=${GPU_FLAGS[*]}" XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 NCCL_DEBUG=WARN "$@"
}
