#!/usr/bin/env bash
# Trains on a SLURM cluster. Run on the login node, it submits itself with sbatch; inside the job it
# starts the training processes with srun, and jax.distributed finds its peers from SLURM's variables.
set -euo pipefail
# shellcheck source=SCRIPTDIR/gpu.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu.sh"

USAGE="usage: slurm_train.sh --workdir DIR [options] [-- --config.KEY=VALUE ...]
Submit dvl train as a SLURM job (sbatch) that runs one process per node or per GPU (srun).
Inside an allocation (salloc, or the submitted job) it runs srun directly.
The mesh (data,fsdp,tensor) is --data, GPUs / (data x tensor), --tensor."
gpu_opts
NODES=2
PROCESS_PER=node
PARTITION=
ACCOUNT=
TIME=
CPUS_PER_TASK=
JOB_NAME=dvl-train
LOG_DIR=$REPO_ROOT/runs/slurm-logs
opt nodes NODES "nodes to allocate"
opt process-per PROCESS_PER "one training process per node (driving all its GPUs) or per gpu"
opt cpus-per-task CPUS_PER_TASK "CPU cores per process, for the input pipeline; none = SLURM's default (often 1)"
opt partition PARTITION "partition; none = the cluster's default"
opt account ACCOUNT "account to charge; none = yours by default"
opt time TIME "wall-clock limit, e.g. 2-00:00:00; none = the partition's"
opt job-name JOB_NAME "job name"
opt log-dir LOG_DIR "where the job's output goes (JOB_NAME-JOBID.out)"
parse_opts "$@"

positive_int "$NODES" --nodes
positive_int "$GPUS_PER_NODE" --gpus-per-node
case $PROCESS_PER in
  node) TASKS=1 ;;
  gpu) TASKS=$GPUS_PER_NODE ;;
  *) die "--process-per must be node or gpu, got '$PROCESS_PER'" ;;
esac
CPUS=()
if [[ -n $CPUS_PER_TASK ]]; then
  positive_int "$CPUS_PER_TASK" --cpus-per-task
  CPUS=("--cpus-per-task=$CPUS_PER_TASK")
fi

# The srun line for a job of $1 nodes.
launch_in_job() {
  local per_process=()
  train_command $(($1 * GPUS_PER_NODE))
  # Under SLURM, JAX restricts each process to GPU number SLURM_LOCALID unless told otherwise: with
  # one process per node that would be GPU 0 alone.
  if [[ $PROCESS_PER == node ]]; then
    per_process=("JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))")
  fi
  gpu_env "${per_process[@]}"
  note "$1 nodes x $GPUS_PER_NODE GPUs, $TASKS process(es) per node, mesh (data,fsdp,tensor) = $MESH"
  run srun "--nodes=$1" "--ntasks-per-node=$TASKS" "${CPUS[@]}" --kill-on-bad-exit=1 "--chdir=$REPO_DIR" \
    "${ENV[@]}" "${TRAIN[@]}"
}

if [[ -n ${SLURM_JOB_ID:-} ]]; then
  launch_in_job "${SLURM_JOB_NUM_NODES:?is not set: is this a SLURM allocation?}"
  exit 0
fi
train_command $((NODES * GPUS_PER_NODE)) # fail here, not in the queue
submit=(sbatch "--job-name=$JOB_NAME" "--nodes=$NODES" "--ntasks-per-node=$TASKS" "--gpus-per-node=$GPUS_PER_NODE"
  "${CPUS[@]}" --exclusive "--chdir=$REPO_DIR" "--output=$LOG_DIR/%x-%j.out")
if [[ -n $PARTITION ]]; then submit+=("--partition=$PARTITION"); fi
if [[ -n $ACCOUNT ]]; then submit+=("--account=$ACCOUNT"); fi
if [[ -n $TIME ]]; then submit+=("--time=$TIME"); fi
run mkdir -p "$LOG_DIR"
run "${submit[@]}" "--wrap=$(shell_join bash "$SELF" "${ARGS[@]}")"
if ((DRY_RUN)); then
  note "inside the job, the script then runs:"
  launch_in_job "$NODES"
fi
