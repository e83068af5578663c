#!/usr/bin/env bash
# The checks that need a GPU, in one command on a single-GPU host (a lent machine has ~10 minutes a call): each
# phase has its own time limit, writes its log and JSON under OUT, and a failing phase does not stop the next.
#   kernels  the own Pallas kernel compiled (tests/attention/test_pallas_gpu.py: parity with the dense reference
#            at fp32 / bf16, the default 128 x 64 tiles, tile skipping)                              ~2-3 min
#   ar       `dvl bench accelerator` AR greedy and dynamic block diffusion at batch 1 and 2 on the 3B-shaped
#            model: at batch 1 XLA's simplifier turns the q / k / v / o vector x matrix products into elementwise
#            products and reductions (3.9 ms per AR forward on an H200 against 2.6 ms at batch 2; its switch,
#            xla_gpu_enable_dot_strength_reduction, is gone from XLA): AR at batch 1 now runs as batch 2 with a
#            dead row on GPUs (ar_sampler.least_rows; compiled for an H200 without one, the batch-2 program's
#            526 kernels per step against 708), so batch 1 should cost what batch 2 does; then AR at batch 1
#            without that (--plain-one-row-products), the A/B on the same machine                      ~3-4 min
#   serve    `dvl serve` on benchmarks/random_checkpoint.py's 179M full-vocabulary model, then benchmarks/serve.py:
#            continuous vs static batches, block diffusion vs AR, 32 text requests at concurrency 8  ~4-5 min
#   packed   (only when named) dynamic block diffusion at batch 8 and 32 with and without packed fused commits
#            (SamplingConfig.packed_commit_share 0.25; off by default: no gain on a 2-core CPU)        ~4 min
# Usage: benchmarks/gpu_checks.sh OUT [kernels] [ar] [serve] [packed]   (no phase named: the first three, in order)
# PYTHON picks the interpreter (default python3), PORT the server's port (default 8765), CHECKPOINT the serve
# phase's random checkpoint (default /tmp/dvl-random-checkpoint, written when missing). Packages the host lacks
# (a JAX of another version needs the flax that matches it; grain, ml_collections, tensorboardX; the server's
# fastapi, uvicorn, pydantic, opentelemetry-api) are installed from .whl/*.whl when that folder exists
# (benchmarks/gpu_wheels.sh fills it where pip works). A server that exits before its port opens ends the serve
# phase at once, its log's last lines printed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
  exit 0
fi
out=$1
shift
phases=("$@")
[[ ${#phases[@]} -gt 0 ]] || phases=(kernels ar serve)
for phase in "${phases[@]}"; do
  case $phase in
    kernels | ar | serve | packed) ;;
    *) echo "unknown phase '$phase': use kernels, ar, serve or packed" >&2; exit 2 ;;
  esac
done
py=${PYTHON:-python3}
port=${PORT:-8765}
mkdir -p "$out" || exit 1
export PYTHONUNBUFFERED=1 PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [[ -d .whl ]]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/dvl-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/dvl-site"
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$py" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__, jax.devices())'
} 2>&1 | tee "$out/host.txt"
status=0

kernels() {
  timeout 240 "$py" -m pytest -p no:cacheprovider tests/attention/test_pallas_gpu.py 2>&1 | tee "$out/kernels.log"
}

ar() {
  timeout 200 "$py" benchmarks/accelerator.py --sections sampler --batches 1 2 \
    --settings "AR greedy" "dynamic t0.85 fused" --budget-s 180 --json "$out/ar.json" || return
  timeout 120 "$py" benchmarks/accelerator.py --sections sampler --batches 1 --settings "AR greedy" \
    --plain-one-row-products --budget-s 100 --json "$out/ar-plain-one-row.json"
}

packed() {
  timeout 270 "$py" benchmarks/accelerator.py --sections sampler --batches 8 32 \
    --settings "dynamic t0.85 fused" "dynamic t0.85 fused, commits packed" --budget-s 250 --json "$out/packed.json"
}

serve() {
  local ckpt=${CHECKPOINT:-/tmp/dvl-random-checkpoint} server rc
  # the server and serve.py's static rows each hold a JAX client on the one GPU: neither may take 75% of it
  local -x XLA_PYTHON_CLIENT_MEM_FRACTION=0.4
  [[ -d $ckpt ]] || timeout 120 "$py" benchmarks/random_checkpoint.py --out "$ckpt" || return
  timeout 330 "$py" -c 'import sys; from dvl_jax import cli; sys.exit(cli.main(sys.argv[1:]))' serve \
    --checkpoint "$ckpt" --port "$port" --slots 8 --max-prompt 128 --gen-length 128 \
    --warm-up block_diffusion,autoregressive > "$out/server.log" 2>&1 &
  server=$!
  # the port opens once warm-up has compiled every text program; a server that dies first ends the wait
  timeout 240 "$py" -c 'import sys, time, urllib.request
url, pid = sys.argv[1:]
def alive():
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False
while alive():
  try:
    sys.exit(urllib.request.urlopen(url, timeout=5).status != 200)
  except OSError:
    time.sleep(2)
sys.exit("the server exited before its port opened; the end of its log:")' "http://127.0.0.1:$port/health" "$server"
  rc=$?
  if [[ $rc -eq 0 ]]; then
    timeout 240 "$py" benchmarks/serve.py --url "http://127.0.0.1:$port" --checkpoint "$ckpt" --num-requests 32 \
      --concurrency 8 --image-fraction 0 2>&1 | tee "$out/serve.log"
    rc=$?
  else
    tail -n 5 "$out/server.log"
  fi
  kill -TERM "$server" 2> /dev/null
  wait "$server"
  return "$rc"
}

for phase in "${phases[@]}"; do
  echo "== $phase ($(date -u +%T))"
  case $phase in kernels) kernels ;; ar) ar ;; serve) serve ;; packed) packed ;; esac \
    || { echo "== $phase failed (exit $?)"; status=1; }
done
echo "== done ($(date -u +%T))"
exit "$status"
