#!/usr/bin/env bash
# Trains on GPU nodes without a scheduler: one process per node, started over ssh, told its place by
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (dvl train then calls
# jax.distributed.initialize()).
set -euo pipefail
# shellcheck source=SCRIPTDIR/gpu.sh
source "$(dirname "${BASH_SOURCE[0]}")/gpu.sh"

USAGE="usage: multinode_train.sh --hosts NODE0,NODE1,... --workdir DIR [options] [-- --config.KEY=VALUE ...]
Start dvl train on every host over ssh (one process per node, all its GPUs) and wait for all of them;
when one fails, the others are stopped. Without passwordless ssh, run each line of --dry-run's
output on its node by hand (the part inside the quotes).
The mesh (data,fsdp,tensor) is --data, GPUs / (data x tensor), --tensor."
gpu_opts
HOSTS=
COORDINATOR=
need hosts HOSTS "comma-separated nodes as ssh reaches them; process i runs on the i-th"
opt coordinator COORDINATOR "HOST:PORT where the processes meet; none = the first of --hosts, port 12355"
parse_opts "$@"

positive_int "$GPUS_PER_NODE" --gpus-per-node
IFS=, read -ra hosts <<<"$HOSTS"
for host in "${hosts[@]}"; do
  [[ $host =~ ^[A-Za-z0-9_.@:-]+$ ]] || die "--hosts must be comma-separated host names, got '$HOSTS'"
done
coordinator=${COORDINATOR:-${hosts[0]}:12355}
[[ $coordinator =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator must be HOST:PORT, got '$coordinator'"
train_command $((${#hosts[@]} * GPUS_PER_NODE))
note "${#hosts[@]} nodes x $GPUS_PER_NODE GPUs, coordinator $coordinator, mesh (data,fsdp,tensor) = $MESH"
for i in "${!hosts[@]}"; do
  gpu_env "JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_NUM_PROCESSES=${#hosts[@]}" "JAX_PROCESS_ID=$i"
  spawn ssh -o BatchMode=yes "${hosts[i]}" "cd $(shell_join "$REPO_DIR") && $(shell_join "${ENV[@]}" "${TRAIN[@]}")"
done
wait_all
